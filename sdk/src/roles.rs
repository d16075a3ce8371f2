//! The traits a plugin implements, one per role, in plain Rust with `tch::Tensor`, and the data
//! that passes through them.
//!
//! The host uses the very same traits for components it links statically, so a method behaves
//! identically whether it was loaded from a dylib or not. The traits' methods return [`Result`]
//! (all but [`Callback::events`]): an `Err` stops the run with the error's message, naming the
//! plugin and component; so does a panic.
//!
//! Unless a method says otherwise, tensors the host hands over live on the run's device
//! ([`crate::Host::device`]) and share storage with the host's own: in-place changes are seen
//! by the host.

use tch::{Device, Tensor};

pub use crate::abi::{Boundary, LayerKind, Role, SchedulePoint, Scope};
use crate::error::Result;
use crate::host::Model;

/// Named tensors plus a small metadata string: what a component saves into a checkpoint.
///
/// The host asks for it (`state`) whenever it writes a checkpoint, and hands it back
/// (`load_state`) only when a run resumes, after the component was created and, for an optimizer,
/// after [`Optimizer::set_param_groups`]. The tensors come back by name, sorted by name, on the
/// CPU: look them up by name and move them to where they belong. A component whose part of the
/// checkpoint is missing gets the default (no tensors, empty `meta`).
#[derive(Debug, Default)]
pub struct State {
    /// Tensors by name; names must be unique within one component. The host saves them detached,
    /// on the CPU and contiguous, so any device and dtype may be returned.
    pub tensors: Vec<(String, Tensor)>,
    /// Free-form text saved next to the tensors (counters, a format version, ...).
    pub meta: String,
}

/// A trainable parameter of a model, as [`Architecture::parameters`] lists it.
#[derive(Debug)]
pub struct Param {
    /// The full name, `module.tensor` (e.g. `layer1.0.conv1.weight`); unique within the model
    /// and the key in `model.safetensors`, pruning masks and parameter groups.
    pub name: String,
    /// The path of the module owning the parameter (`layer1.0.conv1`); parameters with the same
    /// module form one layer in per-layer reports and methods.
    pub module: String,
    /// The kind of that module; Conv2d and Linear `weight`s are the prunable set.
    pub kind: LayerKind,
    /// The parameter itself (not a copy): it shares storage and autograd identity with the
    /// model's, so its `.grad()` is the model's gradient and in-place changes change the model.
    pub tensor: Tensor,
}

impl Param {
    /// Another handle to the same parameter (the tensor is shared, not copied): what
    /// [`Architecture::parameters`] returns for a parameter a model keeps.
    pub fn shallow_clone(&self) -> Param {
        Param {
            name: self.name.clone(),
            module: self.module.clone(),
            kind: self.kind,
            tensor: self.tensor.shallow_clone(),
        }
    }
}

/// A batch of images and their labels.
#[derive(Debug)]
pub struct Batch {
    /// Images, float32 `[B, C, H, W]` on the run's device, already normalised
    /// ([`crate::Host::normalization`]) and, for training batches, augmented as `[data]` says.
    pub inputs: Tensor,
    /// Labels: int64 class indices `[B]`, or, after a callback's [`Callback::batch_start`] made
    /// them soft, float per-class probabilities `[B, classes]`.
    pub targets: Tensor,
}

/// What the model computed for a batch: logits and the pooled features fed to the classifier.
#[derive(Debug)]
pub struct Outputs {
    /// Class scores before softmax, `[B, classes]`.
    pub logits: Tensor,
    /// The pooled features the classifier head takes, `[B, feature_dim]`.
    pub features: Tensor,
}

/// A set of parameters that share a learning rate and weight decay, as the host hands it to
/// [`Optimizer::set_param_groups`].
///
/// The groups are, in order: the scheduler's ([`Scheduler::param_groups`]); then `rest`, every
/// model parameter the scheduler left out (`all` when there is no scheduler or it named no
/// group); then one group per distiller that brought [`Distiller::trainable_parameters`], named
/// `distiller.N` (N its index in `[[distillers]]`), its members named `distiller.N.name`.
/// Groups without members are left out.
#[derive(Debug)]
pub struct ParamGroup {
    /// The group's name.
    pub name: String,
    /// The members by name, each sharing storage with the parameter it is: update them in place.
    pub params: Vec<(String, Tensor)>,
    /// The initial learning rate, `[optimizer] lr`; the rates to use come with
    /// [`Optimizer::set_learning_rates`] before the first step.
    pub lr: f64,
    /// `[optimizer] weight_decay` (0 when not set), the same for every group; how (or whether)
    /// to apply it is the optimizer's choice.
    pub weight_decay: f64,
}

/// A parameter group as a scheduler asks for it: a name and the parameters in it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    /// The group's name (`rest` and `all` are taken by the host's own group).
    pub name: String,
    /// Names of model parameters ([`Param::name`]); each may be in at most one group, and an
    /// unknown name stops the run.
    pub params: Vec<String>,
}

/// A parameter group's current learning rate, as [`crate::Host::learning_rates`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRate {
    /// The group's name (see [`ParamGroup`] for the groups there are).
    pub name: String,
    /// The learning rate the optimizer was last given for the group.
    pub lr: f64,
    /// Names of the group's members.
    pub params: Vec<String>,
}

/// Steps parameter groups (`[optimizer] use = "name"`, the one required component).
///
/// The host zeroes gradients, calls `backward` and applies pruning masks to the gradients before
/// [`step`](Optimizer::step), and applies the masks to the weights again after it; the optimizer
/// only updates. `lr` and `weight_decay` in `[optimizer]` are the host's keys: they reach the
/// optimizer through [`ParamGroup`], not its configuration.
pub trait Optimizer {
    /// The groups to update. Called once, after every component is created and before the first
    /// step (and before [`load_state`](Optimizer::load_state) when resuming).
    fn set_param_groups(&mut self, groups: Vec<ParamGroup>) -> Result<()>;
    /// One rate per group, in the order of `set_param_groups`. Called before the first step and
    /// then whenever a rate changes (at an epoch start, or before a step for per-step schedules).
    fn set_learning_rates(&mut self, rates: &[f64]) -> Result<()>;
    /// Updates the parameters in place from their current `.grad()`; called once per training
    /// step (unless a callback takes the step over, see [`Callback::optimizer_step`]).
    fn step(&mut self) -> Result<()>;
    /// Everything a resumed run needs to continue exactly (momentum buffers, step counts).
    fn state(&self) -> Result<State>;
    /// Restores what [`state`](Optimizer::state) returned; called only when resuming.
    fn load_state(&mut self, state: State) -> Result<()>;
}

/// Sets per-group learning rates from the global schedule and the model (`[scheduler]`).
pub trait Scheduler {
    /// The parameter groups this scheduler sets rates for; asked once, before the optimizer gets
    /// its groups. Model parameters not named go to a group `rest` that follows the `[schedule]`.
    fn param_groups(&mut self) -> Result<Vec<GroupSpec>>;
    /// Rates for the groups of [`param_groups`](Scheduler::param_groups), in that order (finite
    /// and non-negative, one per group), or `None` to keep the rates they have. Asked at the start
    /// of every epoch ([`Boundary::EpochStart`]) and before every step but an epoch's first
    /// ([`Boundary::Step`]); the host's own groups get [`SchedulePoint::base_lr`].
    fn learning_rates(&mut self, point: SchedulePoint) -> Result<Option<Vec<f64>>>;
    /// State for checkpoints; by default nothing.
    fn state(&self) -> Result<State> {
        Ok(State::default())
    }
    /// Restores what [`state`](Scheduler::state) returned; called only when resuming.
    fn load_state(&mut self, _state: State) -> Result<()> {
        Ok(())
    }
}

/// What a pruner is asked for.
#[derive(Debug)]
pub struct PruneRequest {
    /// Fraction of prunable weights to keep, in `[0, 1]` (`[pruner] density`, or derived from
    /// `sparsity` or `compression`). Exactly `round((1 - density) * N)` of `N` weights must be
    /// pruned: `N` all prunable weights together, or each prunable weight tensor's own, as
    /// [`scope`](PruneRequest::scope) says. A run with `[pruner] count = "floor"` passes the
    /// pruner `count = "floor"` among its own keys, and then `floor((1 - density) * N)` must be.
    pub density: f64,
    /// Whether the density holds over all prunable weights or in every layer.
    pub scope: Scope,
    /// Scoring batches: `[pruner] samples_per_class` images of every class drawn with the run's
    /// seed (or, with `scoring = "random"`, as many drawn whatever their class), without
    /// augmentation unless `scoring_augment = true`, split into `[pruner] batches` batches (at
    /// least one). Data-free methods ignore them.
    pub batches: Vec<Batch>,
}

/// A pruner's answer.
#[derive(Debug, Default)]
pub struct PruneResult {
    /// A mask for every prunable weight ([`crate::Model::prunable_parameters`]), by parameter
    /// name, with the weight's shape and only 0 (pruned) and 1 (kept) in it; the host converts it
    /// to the weight's dtype and device, checks the density and keeps it in force for the rest of
    /// the run. A missing, extra or malformed mask stops the run.
    pub masks: Vec<(String, Tensor)>,
    /// The scores the masks come from, by the same names; not checked, kept only by
    /// `trellis prune` for inspection (may be empty).
    pub scores: Vec<(String, Tensor)>,
}

/// Chooses which weights to remove (`[pruner] use = "name"`).
///
/// Created when the run is set up and called once, before training step `[pruner] at_step`
/// (0: at initialisation). The model's train/eval mode is restored after the call, so the pruner
/// may switch it; `[pruner]`'s own keys (`density`, `sparsity`, `compression`, `scope`,
/// `at_step`, `samples_per_class`, `batches`, `scoring`, `scoring_augment`, `masks`) are the
/// host's, not the pruner's configuration. The host saves the masks in checkpoints, so a pruner
/// has no state.
pub trait Pruner {
    /// Scores the model's prunable weights (through the [`crate::Host`] the pruner was created
    /// with) and returns their masks. The host applies them: leave the model's weights and
    /// buffers as they were (restore anything changed while scoring).
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult>;
}

/// Adds loss terms to every training step (`[[distillers]]`, any number).
pub trait Distiller {
    /// Extra trainable parameters (e.g. an auxiliary branch), on the run's device with
    /// `requires_grad`: the host adds them to the optimizer (group `distiller.N`) and to
    /// checkpoints, but never to the exported model. Asked once, before training.
    fn trainable_parameters(&mut self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Whether the host should drop its own cross-entropy term, leaving the loss to the
    /// distillers' terms (and callbacks'); asked at the start of every epoch.
    fn replaces_task_loss(&self) -> Result<bool> {
        Ok(false)
    }
    /// `true` at the start of every training epoch, `false` before every evaluation: switch any
    /// model of the distiller's own (a teacher, a branch) accordingly.
    fn set_training(&mut self, _train: bool) -> Result<()> {
        Ok(())
    }
    /// Loss terms for this training batch, each a scalar tensor with its autograd graph; the host
    /// adds them to the loss it backpropagates (the names are for the distiller's own use).
    /// Called once per step after the forward pass, and again for every extra pass a callback
    /// asks for ([`StepControl::recompute`]).
    fn loss(&mut self, batch: &Batch, outputs: &Outputs) -> Result<Vec<(String, Tensor)>>;
    /// State for checkpoints; by default nothing. The host saves the values of
    /// `trainable_parameters` itself.
    fn state(&self) -> Result<State> {
        Ok(State::default())
    }
    /// Restores what [`state`](Distiller::state) returned; called only when resuming.
    fn load_state(&mut self, _state: State) -> Result<()> {
        Ok(())
    }
}

/// A table of per-row values, e.g. one row per layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// The table's name, its key in the epoch's record in `metrics.jsonl`.
    pub name: String,
    /// Column headers, one per value in a row.
    pub columns: Vec<String>,
    /// Rows as `(label, values)`, each with one value per column.
    pub rows: Vec<(String, Vec<f64>)>,
}

/// What a metric reports for one evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricValues {
    /// Named numbers (`top1`, ...); a name reported by two metrics keeps the later
    /// metric's value, so prefix them if they might clash.
    pub scalars: Vec<(String, f64)>,
    /// Named tables, recorded next to the scalars.
    pub tables: Vec<Table>,
}

/// Where the run is at an epoch's end, for metrics and callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochInfo {
    /// Epochs completed, counting the one just finished (1 after the first).
    pub epoch: u64,
    /// The epochs the run trains for (`[train] epochs`).
    pub epochs: u64,
    /// Optimizer steps completed so far in the run.
    pub step: u64,
}

/// Accumulates over evaluation batches and/or inspects the model at evaluation
/// (`[[metrics]]`, any number).
///
/// The host evaluates after every `[train] eval_every` epochs and after the last: it calls
/// [`reset`](Metric::reset), then [`update`](Metric::update) for every test batch, then
/// [`compute`](Metric::compute). Metrics keep no checkpoint state: each evaluation starts afresh.
pub trait Metric {
    /// Forgets what earlier evaluations accumulated; called at the start of every evaluation.
    fn reset(&mut self) -> Result<()>;
    /// `false` for metrics that only inspect the model; the host then skips `update`. Asked at
    /// every evaluation, after `reset`.
    fn wants_batches(&self) -> Result<bool> {
        Ok(true)
    }
    /// One test batch (unaugmented, `[train] eval_batch_size` images) and the model's outputs
    /// for it, computed in evaluation mode under `no_grad`.
    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()>;
    /// The values for this evaluation, after the last `update`.
    fn compute(&mut self, info: EpochInfo) -> Result<MetricValues>;
}

/// A network: logits and pooled features from images, a classifier head, its parameters.
///
/// The model role (`[model] use = "name"`) implements it, and so does the host for its built-in
/// architectures, so a plugin's model is used exactly like a built-in one: every pruner,
/// scheduler, distiller and metric, checkpoints and `model.safetensors` work on it unchanged.
/// Methods take `&self` because the host shares the model with the components that look at it;
/// keep the train/eval flag in a `Cell`.
///
/// A model component is created first, before every other component: in its constructor
/// [`crate::Host::model`] is an error, and every tensor should be created on
/// [`crate::Host::device`] with [`crate::Host::num_classes`] outputs for
/// [`crate::Host::input_shape`] images.
pub trait Architecture: 'static {
    /// Logits `[B, classes]` and the pooled features fed to the head `[B, feature_dim]`, in the
    /// current train/eval mode.
    fn forward(&self, inputs: &Tensor) -> Result<Outputs>;
    /// The classifier head alone applied to features `[B, feature_dim]`: logits `[B, classes]`,
    /// the same `forward` computes from them.
    fn head(&self, features: &Tensor) -> Result<Tensor>;
    /// Trainable parameters in module registration order, sharing storage with the model. Names
    /// are `module.tensor` (e.g. `layer1.0.conv1.weight`); `model.safetensors` uses them.
    ///
    /// The host reads the list once when the model is built (and again after
    /// [`set_double`](Architecture::set_double)) and keeps those tensors: return the same
    /// tensors every time, on [`crate::Host::device`], with unique names and at least one.
    fn parameters(&self) -> Result<Vec<Param>>;
    /// Non-trainable state saved with the weights (BatchNorm running statistics), by
    /// `module.tensor` name, read like [`parameters`](Architecture::parameters).
    fn buffers(&self) -> Result<Vec<(String, Tensor)>>;
    /// Switches BatchNorm (and anything else mode-dependent) between training and evaluation.
    /// The host calls it before a forward pass whose mode differs from the last one it set.
    fn set_training(&self, train: bool) -> Result<()>;
    /// The mode last set with [`set_training`](Architecture::set_training).
    fn is_training(&self) -> Result<bool>;
    /// Converts every parameter and buffer to float64 (or back to float32) *in place*
    /// (`Tensor::set_data`), so tensors handed out before keep pointing at the model's.
    fn set_double(&self, double: bool) -> Result<()>;
    /// The width of the features `forward` returns and `head` takes; read once when the model is
    /// built.
    fn feature_dim(&self) -> Result<i64>;
    /// The `[model]` table that builds this model again, as TOML (`use = "name"` and the
    /// component's keys for a plugin's model). For the run's own model the host reports the
    /// config's `[model]` table instead ([`crate::Model::spec`]).
    fn spec(&self) -> Result<String>;
    /// [`forward`](Architecture::forward) that also returns the activations of the last
    /// convolutional stage `[B, C, H, W]`, in the same graph as the logits, for methods that look
    /// inside the network (Grad-CAM differentiates a logit with respect to them). The default
    /// reports that the model has none; a model without convolutions keeps it.
    fn forward_with_feature_map(&self, inputs: &Tensor) -> Result<(Outputs, Tensor)> {
        let _ = inputs;
        Err(crate::Error::msg(
            "this model does not expose a convolutional feature map",
        ))
    }
}

/// The training loop's position, handed to callbacks and reported by
/// [`crate::Host::progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepInfo {
    /// Epochs completed so far (0 during the first epoch).
    pub epoch: u64,
    /// The epochs the run trains for (`[train] epochs`).
    pub epochs: u64,
    /// Optimizer steps completed so far in the run (the current step is not counted yet).
    pub step: u64,
    /// Training steps (batches) in one epoch.
    pub steps_per_epoch: u64,
}

/// The events a callback is called for: a bit set, `Events::BATCH_START | Events::AFTER_STEP`.
/// Events not in the set cost nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Events(
    /// The bits, one per event constant below; unknown bits are ignored.
    pub u32,
);

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
    /// No events: none of the callback's event methods is called.
    pub const NONE: Events = Events(0);

    /// Whether every event of `other` is in `self` (never for [`Events::NONE`]).
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
    /// The events this callback is called for; asked once, right after the callback is created.
    fn events(&self) -> Events;
    /// The batch to train on ([`Events::BATCH_START`]): return it, or a replacement with one
    /// target per image. Targets may become soft, per-class probabilities `[B, classes]` (float);
    /// the host's task loss accepts them. Each callback gets the batch the previous one returned.
    fn batch_start(&mut self, batch: Batch, at: StepInfo) -> Result<Batch> {
        Ok(batch)
    }
    /// Named loss terms to add to `loss` ([`Events::AFTER_LOSS`]): `loss` is the loss so far
    /// (task loss, distillers' terms, earlier callbacks' terms) with its graph; each term is a
    /// scalar tensor with its own graph. Also called in every other callback's
    /// [`StepControl::recompute`].
    fn after_loss(
        &mut self,
        batch: &Batch,
        outputs: &Outputs,
        loss: &Tensor,
        at: StepInfo,
    ) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// After backward ([`Events::AFTER_BACKWARD`]): the gradients are in the `.grad()` of
    /// [`crate::Host::optimized_parameters`], pruning masks already applied; change them here
    /// (clipping, say). Also called in every other callback's [`StepControl::recompute`].
    fn after_backward(&mut self, at: StepInfo) -> Result<()> {
        Ok(())
    }
    /// Take the step over ([`Events::OPTIMIZER_STEP`]): return `true` after stepping through
    /// `control`, or `false` to let the host step (the first callback that returns `true` wins).
    fn optimizer_step(&mut self, control: &mut dyn StepControl, at: StepInfo) -> Result<bool> {
        Ok(false)
    }
    /// After the optimizer step and the pruning masks ([`Events::AFTER_STEP`]): the weights are
    /// the step's result; change or record them here (an average of weights, say).
    fn after_step(&mut self, at: StepInfo) -> Result<()> {
        Ok(())
    }
    /// After each training epoch, before its evaluation ([`Events::EPOCH_END`]).
    fn epoch_end(&mut self, info: EpochInfo) -> Result<()> {
        Ok(())
    }
    /// Before evaluation ([`Events::EVAL`]), with the model already in evaluation mode; may swap
    /// the weights evaluated (restore them in `eval_end`).
    fn eval_start(&mut self, info: EpochInfo) -> Result<()> {
        Ok(())
    }
    /// After evaluation ([`Events::EVAL`]), once the metrics are computed.
    fn eval_end(&mut self, info: EpochInfo) -> Result<()> {
        Ok(())
    }
    /// State for checkpoints; by default nothing.
    fn state(&self) -> Result<State> {
        Ok(State::default())
    }
    /// Restores what [`state`](Callback::state) returned; called only when resuming.
    fn load_state(&mut self, state: State) -> Result<()> {
        Ok(())
    }
}

/// Helpers for code that receives the host's model.
impl Model {
    /// The weights of convolution and linear layers ([`LayerKind::Conv2d`] and
    /// [`LayerKind::Linear`] parameters named `...weight`): the prunable set, the parameters a
    /// [`Pruner`] returns masks for. Biases and normalisation layers are never pruned.
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

/// `tch::Device` from the host's device number (-1 = CPU, otherwise the CUDA index).
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
