//! The traits a plugin implements, one per role, in plain Rust with `tch::Tensor`.
//!
//! The host uses the very same traits for components it links statically, so a method behaves
//! identically whether it was loaded from a dylib or not.

use tch::{Device, Tensor};

pub use crate::abi::{Boundary, LayerKind, Role, SchedulePoint, Scope};
use crate::error::Result;
use crate::host::Model;

/// Named tensors plus a small metadata string: what a component saves into a checkpoint.
///
/// On resume the tensors come back by name (sorted, on the CPU): look them up by name and move
/// them to where they belong. A component that saved nothing, or a fresh run, gets the default.
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
    fn replaces_task_loss(&self) -> Result<bool> {
        Ok(false)
    }
    fn set_training(&mut self, _train: bool) -> Result<()> {
        Ok(())
    }
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
    fn wants_batches(&self) -> Result<bool> {
        Ok(true)
    }
    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()>;
    fn compute(&mut self, info: EpochInfo) -> Result<MetricValues>;
}

/// A network: logits and pooled features from images, a classifier head, its parameters.
///
/// The model role (`[model] use = "name"`) implements it, and so does the host for its built-in
/// architectures, so a plugin's model is used exactly like a built-in one: every pruner,
/// scheduler, distiller and metric, checkpoints and `model.safetensors` work on it unchanged.
/// Methods take `&self` because the host shares the model with the components that look at it;
/// keep the train/eval flag in a `Cell`.
pub trait Architecture: 'static {
    /// Logits `[B, classes]` and the pooled features fed to the head `[B, feature_dim]`, in the
    /// current train/eval mode.
    fn forward(&self, inputs: &Tensor) -> Result<Outputs>;
    /// The classifier head alone applied to features.
    fn head(&self, features: &Tensor) -> Result<Tensor>;
    /// Trainable parameters in module registration order, sharing storage with the model. Names
    /// are `module.tensor` (e.g. `layer1.0.conv1.weight`); `model.safetensors` uses them.
    fn parameters(&self) -> Result<Vec<Param>>;
    /// Non-trainable state saved with the weights (BatchNorm running statistics).
    fn buffers(&self) -> Result<Vec<(String, Tensor)>>;
    fn set_training(&self, train: bool) -> Result<()>;
    fn is_training(&self) -> Result<bool>;
    /// Converts every parameter and buffer to float64 (or back to float32) *in place*
    /// (`Tensor::set_data`), so tensors handed out before keep pointing at the model's.
    fn set_double(&self, double: bool) -> Result<()>;
    /// The width of the features `forward` returns and `head` takes.
    fn feature_dim(&self) -> Result<i64>;
    /// The `[model]` table that builds this model again, as TOML (`use = "name"` and the
    /// component's keys for a plugin's model).
    fn spec(&self) -> Result<String>;
}

/// The training loop's position, handed to callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepInfo {
    /// Epochs completed so far (0 during the first epoch).
    pub epoch: u64,
    pub epochs: u64,
    /// Optimizer steps completed so far in the run (the current step is not counted yet).
    pub step: u64,
    pub steps_per_epoch: u64,
}

/// The events a callback is called for: a bit set, `Events::BATCH_START | Events::AFTER_STEP`.
/// Events not in the set cost nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Events(pub u32);

impl Events {
    /// Before the forward pass; may replace inputs and targets.
    pub const BATCH_START: Events = Events(1);
    /// After the loss; may add loss terms.
    pub const AFTER_LOSS: Events = Events(1 << 1);
    /// After backward (and pruning masks); may change gradients.
    pub const AFTER_BACKWARD: Events = Events(1 << 2);
    /// Instead of the optimizer step; may take it over.
    pub const OPTIMIZER_STEP: Events = Events(1 << 3);
    /// After the optimizer step (and pruning masks); may change weights.
    pub const AFTER_STEP: Events = Events(1 << 4);
    /// After each training epoch, before evaluation.
    pub const EPOCH_END: Events = Events(1 << 5);
    /// Around evaluation; may swap the weights evaluated.
    pub const EVAL: Events = Events(1 << 6);
    pub const NONE: Events = Events(0);

    pub fn contains(self, other: Events) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }
}

impl std::ops::BitOr for Events {
    type Output = Events;
    fn bitor(self, rhs: Events) -> Events {
        Events(self.0 | rhs.0)
    }
}

/// What the host lends [`Callback::optimizer_step`]: the step's batch and the configured
/// optimizer, for methods that need more than one pass (SAM).
pub trait StepControl {
    /// Zeroes gradients and runs forward, loss (task, distillers, other callbacks' terms),
    /// backward and the other callbacks' `after_backward` again on the step's batch at the current
    /// weights, pruning masks applied to the gradients; returns the loss.
    fn recompute(&mut self) -> Result<f64>;
    /// The configured optimizer's own step on the current gradients.
    fn base_step(&mut self) -> Result<()>;
}

/// Receives the run's events and may act on them (`[[callbacks]]`, run in config order).
///
/// Every method has a default that does nothing; [`Callback::events`] says which ones the host
/// calls. Per training step the order is: batch start, forward, loss, after loss, backward,
/// after backward, optimizer step, after step.
#[allow(unused_variables)]
pub trait Callback {
    /// The events this callback is called for.
    fn events(&self) -> Events;
    /// The batch to train on: return it, or a replacement. Targets may become soft, per-class
    /// probabilities `[B, classes]` (float); the host's loss and metrics accept them.
    fn batch_start(&mut self, batch: Batch, at: StepInfo) -> Result<Batch> {
        Ok(batch)
    }
    /// Named loss terms to add to `loss` (the loss so far, with its graph).
    fn after_loss(
        &mut self,
        batch: &Batch,
        outputs: &Outputs,
        loss: &Tensor,
        at: StepInfo,
    ) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Gradients are in place (`Host::optimized_parameters`); change them here.
    fn after_backward(&mut self, at: StepInfo) -> Result<()> {
        Ok(())
    }
    /// Take the step over: return `true` after stepping through `control`, or `false` to let
    /// the host step (the first callback that returns `true` wins).
    fn optimizer_step(&mut self, control: &mut dyn StepControl, at: StepInfo) -> Result<bool> {
        Ok(false)
    }
    fn after_step(&mut self, at: StepInfo) -> Result<()> {
        Ok(())
    }
    fn epoch_end(&mut self, info: EpochInfo) -> Result<()> {
        Ok(())
    }
    /// Before evaluation; may swap the weights evaluated (restore them in `eval_end`).
    fn eval_start(&mut self, info: EpochInfo) -> Result<()> {
        Ok(())
    }
    fn eval_end(&mut self, info: EpochInfo) -> Result<()> {
        Ok(())
    }
    fn state(&self) -> Result<State> {
        Ok(State::default())
    }
    fn load_state(&mut self, state: State) -> Result<()> {
        Ok(())
    }
}

/// Helpers for code that receives the host's model.
impl Model {
    /// Parameters of convolution and linear layers: the prunable set of METHODS.md section 0.
    pub fn prunable_parameters(&self) -> Result<Vec<Param>> {
        Ok(self
            .parameters()?
            .into_iter()
            .filter(|p| {
                matches!(p.kind, LayerKind::Conv2d | LayerKind::Linear)
                    && p.name.ends_with("weight")
            })
            .collect())
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
