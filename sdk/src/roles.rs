//! The traits a plugin implements, one per role, in plain Rust with `tch::Tensor`.
//!
//! The host uses the very same traits for components it links statically, so a method behaves
//! identically whether it was loaded from a dylib or not.

use tch::{Device, Tensor};

pub use crate::abi::{Boundary, LayerKind, Role, SchedulePoint, Scope};
use crate::error::Result;
use crate::host::Model;

/// Named tensors plus a small metadata string: what a component saves into a checkpoint.
#[derive(Debug, Default)]
pub struct State {
    pub tensors: Vec<(String, Tensor)>,
    pub meta: String,
}

/// A parameter of a model as plugins see it. `tensor` shares storage with the model's.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub module: String,
    pub kind: LayerKind,
    pub tensor: Tensor,
}

#[derive(Debug)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
}

/// What the model computed for a batch: logits and the pooled features fed to the classifier.
#[derive(Debug)]
pub struct Outputs {
    pub logits: Tensor,
    pub features: Tensor,
}

/// A set of parameters that share a learning rate and weight decay.
#[derive(Debug)]
pub struct ParamGroup {
    pub name: String,
    pub params: Vec<(String, Tensor)>,
    pub lr: f64,
    pub weight_decay: f64,
}

/// A parameter group as a scheduler asks for it: a name and the parameters in it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    pub name: String,
    pub params: Vec<String>,
}

/// A parameter group's current learning rate, as metrics see it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRate {
    pub name: String,
    pub lr: f64,
    pub params: Vec<String>,
}

/// Steps parameter groups. The host zeroes gradients, calls `backward` and applies pruning
/// masks; the optimizer only updates.
pub trait Optimizer {
    /// Called once before training, and again whenever the groups change.
    fn set_param_groups(&mut self, groups: Vec<ParamGroup>) -> Result<()>;
    /// One rate per group, in the order of `set_param_groups`.
    fn set_learning_rates(&mut self, rates: &[f64]) -> Result<()>;
    fn step(&mut self) -> Result<()>;
    fn state(&self) -> Result<State>;
    fn load_state(&mut self, state: State) -> Result<()>;
}

/// Sets per-group learning rates from the global schedule and the model.
pub trait Scheduler {
    /// The parameter groups this scheduler wants. Parameters not named go to a group `rest`.
    fn param_groups(&mut self) -> Result<Vec<GroupSpec>>;
    /// Rates per group at this point, or `None` to leave them as they are.
    fn learning_rates(&mut self, point: SchedulePoint) -> Result<Option<Vec<f64>>>;
    fn state(&self) -> Result<State> {
        Ok(State::default())
    }
    fn load_state(&mut self, _state: State) -> Result<()> {
        Ok(())
    }
}

/// What a pruner is asked for.
#[derive(Debug)]
pub struct PruneRequest {
    /// Fraction of prunable weights to keep.
    pub density: f64,
    pub scope: Scope,
    /// Scoring batches (class-balanced, no augmentation); empty for data-free methods.
    pub batches: Vec<Batch>,
}

#[derive(Debug, Default)]
pub struct PruneResult {
    /// A 0/1 mask (the parameter's shape and dtype) for every pruned parameter, by name.
    pub masks: Vec<(String, Tensor)>,
    /// The scores the masks come from, for inspection.
    pub scores: Vec<(String, Tensor)>,
}

pub trait Pruner {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult>;
}

/// Adds loss terms to every training step.
pub trait Distiller {
    /// Extra trainable parameters (e.g. an auxiliary branch): the host adds them to the optimizer
    /// and to checkpoints, but never to the exported model.
    fn trainable_parameters(&mut self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Whether the host should drop its own cross-entropy term.
    fn replaces_task_loss(&self) -> bool {
        false
    }
    fn set_training(&mut self, _train: bool) {}
    /// Named scalar loss terms for this batch; the host sums them into the loss it backpropagates.
    fn loss(&mut self, batch: &Batch, outputs: &Outputs) -> Result<Vec<(String, Tensor)>>;
    fn state(&self) -> Result<State> {
        Ok(State::default())
    }
    fn load_state(&mut self, _state: State) -> Result<()> {
        Ok(())
    }
}

/// A table of per-row values, e.g. one row per layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<f64>)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricValues {
    pub scalars: Vec<(String, f64)>,
    pub tables: Vec<Table>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochInfo {
    /// Epochs completed, counting the one just finished.
    pub epoch: u64,
    pub epochs: u64,
    pub step: u64,
}

/// Accumulates over evaluation batches and/or inspects the model at epoch end.
pub trait Metric {
    fn reset(&mut self) -> Result<()>;
    /// `false` for metrics that only inspect the model; the host then skips `update`.
    fn wants_batches(&self) -> bool {
        true
    }
    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()>;
    fn compute(&mut self, info: EpochInfo) -> Result<MetricValues>;
}

/// Helpers for code that receives the host's model.
impl Model {
    /// Parameters of convolution and linear layers: the prunable set of METHODS.md section 0.
    pub fn prunable_parameters(&self) -> Vec<Param> {
        self.parameters()
            .into_iter()
            .filter(|p| {
                matches!(p.kind, LayerKind::Conv2d | LayerKind::Linear)
                    && p.name.ends_with("weight")
            })
            .collect()
    }
}

/// `tch::Device` from the host's device number (-1 = CPU).
pub fn device_from_index(index: i64) -> Device {
    if index < 0 {
        Device::Cpu
    } else {
        Device::Cuda(index as usize)
    }
}

/// The host's device number for a `tch::Device`.
pub fn device_index(device: Device) -> i64 {
    match device {
        Device::Cuda(i) => i as i64,
        _ => -1,
    }
}
