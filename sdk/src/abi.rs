//! The binary interface between the `trellis` host and plugin dylibs.
//!
//! Everything here is `#[repr(C)]` + `StableAbi`, so abi_stable checks the layout of the whole
//! tree when a plugin is loaded. Plugin authors never touch these types: they implement the
//! Rust traits in [`crate::roles`] and the adapters in [`crate::adapt`] translate.
//!
//! Changing anything in this file is an ABI change: bump [`ABI_VERSION`].
//!
//! Hidden from the documentation: the host (`trellis`) and [`crate::export_plugin!`] use it by
//! path. The enums and [`SchedulePoint`] that plugin authors need are re-exported at the crate
//! root and documented there.

// `#[sabi_trait]` expands to impls inside consts, which this newer lint flags; the code is
// abi_stable's, not ours.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::sabi_trait;
use abi_stable::sabi_types::RMut;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2};
use abi_stable::{declare_root_module_statics, package_version_strings, StableAbi};

use crate::tensor::{TensorHandle, TensorRef};

/// Bumped on every change to this module. The host reads it through a plain exported symbol
/// before touching anything else, so a mismatch is reported as such rather than as a layout error.
pub const ABI_VERSION: u32 = 2;

/// The exported symbol holding the plugin's [`ABI_VERSION`].
pub const ABI_VERSION_SYMBOL: &[u8] = b"TRELLIS_SDK_ABI_VERSION\0";

/// What a component does in the run; each role has its trait and its table in the run config.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Updates the parameters: [`crate::Optimizer`], `[optimizer] use = "name"`.
    Optimizer,
    /// Sets per-group learning rates: [`crate::Scheduler`], `[scheduler] use = "name"`.
    Scheduler,
    /// Chooses the weights to remove: [`crate::Pruner`], `[pruner] use = "name"`.
    Pruner,
    /// Adds loss terms: [`crate::Distiller`], `[[distillers]] use = "name"`.
    Distiller,
    /// Reports values at evaluation: [`crate::Metric`], `[[metrics]] use = "name"`.
    Metric,
    /// An architecture: [`crate::Architecture`], `[model] use = "name"`.
    Model,
    /// Receives the run's events (`[[callbacks]]`) and may act on them: [`crate::Callback`].
    Callback,
}

impl Role {
    /// Every role, in the order `trellis plugins` lists them.
    pub const ALL: [Role; 7] = [
        Role::Model,
        Role::Optimizer,
        Role::Scheduler,
        Role::Pruner,
        Role::Distiller,
        Role::Metric,
        Role::Callback,
    ];

    /// The role's lowercase name (`"optimizer"`, ...), as messages and `trellis plugins` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Optimizer => "optimizer",
            Role::Scheduler => "scheduler",
            Role::Pruner => "pruner",
            Role::Distiller => "distiller",
            Role::Metric => "metric",
            Role::Model => "model",
            Role::Callback => "callback",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of layer a parameter belongs to; pruners and per-layer methods select layers by it.
/// A model component reports it for each of its parameters ([`crate::Param::kind`]).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// A 2-D convolution; its `weight` is `[out, in, kh, kw]` and prunable.
    Conv2d,
    /// A fully connected layer; its `weight` is `[out, in]` and prunable.
    Linear,
    /// Batch normalisation (scale and shift; its running statistics are buffers).
    BatchNorm,
    /// Layer normalisation.
    LayerNorm,
    /// Anything else (embeddings, free-standing tensors); never pruned.
    Other,
}

/// How an [`crate::Error`] is reported.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The component's configuration was refused; `key` names the offending key if known.
    Config,
    /// Plugin code panicked; the message holds the panic message and location.
    Panic,
    /// Anything else that went wrong.
    Failed,
}

/// An [`crate::Error`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiError {
    /// See [`crate::Error::kind`].
    pub kind: ErrorKind,
    /// See [`crate::Error::message`].
    pub message: RString,
    /// See [`crate::Error::key`].
    pub key: ROption<RString>,
}

/// The result of every fallible call across the boundary.
pub type FfiResult<T> = RResult<T, FfiError>;

/// One component a plugin offers.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ComponentDecl {
    /// The component's role.
    pub role: Role,
    /// [`crate::Component::NAME`].
    pub name: RString,
    /// [`crate::Component::DESCRIPTION`].
    pub description: RString,
    /// The component's default configuration, as TOML.
    pub default_config: RString,
}

/// Everything a plugin says about itself; checked by the host before anything is created.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Declaration {
    /// The plugin's name ([`crate::Plugin::new`]).
    pub name: RString,
    /// The plugin's version.
    pub version: RString,
    /// The plugin's one-line description.
    pub description: RString,
    /// Every component it offers, in the order they were added.
    pub components: RVec<ComponentDecl>,
    /// The [`ABI_VERSION`] it was built with.
    pub sdk_abi: u32,
    /// [`crate::plugin::SDK_VERSION`].
    pub sdk_version: RString,
    /// [`crate::plugin::TCH_VERSION`].
    pub tch_version: RString,
    /// [`crate::plugin::LIBTORCH_VERSION`].
    pub libtorch_version: RString,
    /// [`crate::plugin::LIBTORCH_CUDA`].
    pub cuda: bool,
}

/// A named, owned tensor.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiNamedTensor {
    /// The name.
    pub name: RString,
    /// The tensor, owned by the receiver.
    pub tensor: TensorHandle,
}

/// State a component saves into a checkpoint: named tensors plus a small metadata string.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiState {
    /// See [`crate::State::tensors`].
    pub tensors: RVec<FfiNamedTensor>,
    /// See [`crate::State::meta`].
    pub meta: RString,
}

/// A [`crate::Param`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiParam {
    /// The full name, `module.tensor`.
    pub name: RString,
    /// Module path, e.g. `layer1.0.conv1` for `layer1.0.conv1.weight`.
    pub module: RString,
    /// The module's kind.
    pub kind: LayerKind,
    /// A handle sharing storage with the model's parameter.
    pub tensor: TensorHandle,
}

/// An owned [`crate::Batch`].
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiBatch {
    /// See [`crate::Batch::inputs`].
    pub inputs: TensorHandle,
    /// See [`crate::Batch::targets`].
    pub targets: TensorHandle,
}

/// A [`crate::Batch`] borrowed for one call.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiBatchRef<'a> {
    /// See [`crate::Batch::inputs`].
    pub inputs: TensorRef<'a>,
    /// See [`crate::Batch::targets`].
    pub targets: TensorRef<'a>,
}

/// Owned [`crate::Outputs`].
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiOutputs {
    /// See [`crate::Outputs::logits`].
    pub logits: TensorHandle,
    /// See [`crate::Outputs::features`].
    pub features: TensorHandle,
}

/// What [`crate::Architecture::forward_with_feature_map`] returns.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiFeatureMapOutputs {
    /// The logits and pooled features.
    pub outputs: FfiOutputs,
    /// The last convolutional stage's activations `[B, C, H, W]`.
    pub feature_map: TensorHandle,
}

/// [`crate::Outputs`] borrowed for one call.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiOutputsRef<'a> {
    /// See [`crate::Outputs::logits`].
    pub logits: TensorRef<'a>,
    /// See [`crate::Outputs::features`].
    pub features: TensorRef<'a>,
}

/// A [`crate::ParamGroup`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiParamGroup {
    /// See [`crate::ParamGroup::name`].
    pub name: RString,
    /// See [`crate::ParamGroup::params`].
    pub params: RVec<FfiNamedTensor>,
    /// See [`crate::ParamGroup::lr`].
    pub lr: f64,
    /// See [`crate::ParamGroup::weight_decay`].
    pub weight_decay: f64,
}

/// A [`crate::GroupSpec`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiGroupSpec {
    /// See [`crate::GroupSpec::name`].
    pub name: RString,
    /// See [`crate::GroupSpec::params`].
    pub params: RVec<RString>,
}

/// A [`crate::GroupRate`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiGroupRate {
    /// See [`crate::GroupRate::name`].
    pub name: RString,
    /// See [`crate::GroupRate::lr`].
    pub lr: f64,
    /// See [`crate::GroupRate::params`].
    pub params: RVec<RString>,
}

/// Where in training a scheduler is asked for rates ([`SchedulePoint::boundary`]).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// Before the first step of an epoch.
    EpochStart,
    /// Before an optimizer step other than an epoch's first.
    Step,
}

/// Where training is when [`crate::Scheduler::learning_rates`] is asked, and the global
/// schedule's rate there.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub struct SchedulePoint {
    /// Whether this is an epoch's start or a step within it.
    pub boundary: Boundary,
    /// Epochs completed so far (0 during the first epoch).
    pub epoch: u64,
    /// The epochs the run trains for (`[train] epochs`).
    pub epochs: u64,
    /// Optimizer steps completed so far in the run: the index of the step about to be taken.
    pub step: u64,
    /// Training steps in one epoch.
    pub steps_per_epoch: u64,
    /// The global schedule's learning rate at this point (`[optimizer] lr` shaped by
    /// `[schedule]`, warm-up included).
    pub base_lr: f64,
}

/// Over what a pruner's density holds (`[pruner] scope`).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One threshold over all prunable weights: only the total count kept is fixed.
    Global,
    /// The same density in every layer: each prunable weight keeps its own exact count.
    Layer,
}

/// A [`crate::PruneRequest`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiPruneRequest {
    /// See [`crate::PruneRequest::density`].
    pub density: f64,
    /// See [`crate::PruneRequest::scope`].
    pub scope: Scope,
    /// See [`crate::PruneRequest::batches`].
    pub batches: RVec<FfiBatch>,
}

/// A [`crate::PruneResult`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiPruneResult {
    /// One 0/1 mask per pruned parameter, keyed by parameter name.
    pub masks: RVec<FfiNamedTensor>,
    /// The raw scores the masks were thresholded from (same names).
    pub scores: RVec<FfiNamedTensor>,
}

/// A named loss term: a scalar tensor with its autograd graph.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiLossTerm {
    /// The term's name.
    pub name: RString,
    /// The scalar loss term.
    pub value: TensorHandle,
}

/// One row of a [`FfiTable`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiRow {
    /// The row's label.
    pub label: RString,
    /// One value per column.
    pub values: RVec<f64>,
}

/// A [`crate::Table`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiTable {
    /// See [`crate::Table::name`].
    pub name: RString,
    /// See [`crate::Table::columns`].
    pub columns: RVec<RString>,
    /// See [`crate::Table::rows`].
    pub rows: RVec<FfiRow>,
}

/// A named scalar of [`crate::MetricValues::scalars`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiScalar {
    /// The scalar's name.
    pub name: RString,
    /// Its value.
    pub value: f64,
}

/// [`crate::MetricValues`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiMetricValues {
    /// See [`crate::MetricValues::scalars`].
    pub scalars: RVec<FfiScalar>,
    /// See [`crate::MetricValues::tables`].
    pub tables: RVec<FfiTable>,
}

/// [`crate::EpochInfo`] crossing the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct FfiEpochInfo {
    /// Epochs completed, counting the one just finished.
    pub epoch: u64,
    /// See [`crate::EpochInfo::epochs`].
    pub epochs: u64,
    /// See [`crate::EpochInfo::step`].
    pub step: u64,
}

/// Where the run is: the training loop's position when a component asks or is called.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfiStepInfo {
    /// Epochs completed so far (0 during the first epoch).
    pub epoch: u64,
    /// See [`crate::StepInfo::epochs`].
    pub epochs: u64,
    /// Optimizer steps completed so far in the run.
    pub step: u64,
    /// See [`crate::StepInfo::steps_per_epoch`].
    pub steps_per_epoch: u64,
}

/// The normalisation the host applies to images before a model sees them.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiNormalization {
    /// See [`crate::Normalization::mean`].
    pub mean: RVec<f64>,
    /// See [`crate::Normalization::std`].
    pub std: RVec<f64>,
}

/// A model: the host's (the run's student, or one built from a spec) or a plugin's architecture.
/// Both sides implement the same interface, so a plugin model is used exactly like a built-in one.
#[sabi_trait]
pub trait FfiModel {
    /// Logits and the pooled features, in the model's current train/eval mode.
    fn forward(&self, inputs: TensorRef<'_>) -> FfiResult<FfiOutputs>;
    /// The classifier head alone applied to features.
    fn head(&self, features: TensorRef<'_>) -> FfiResult<TensorHandle>;
    /// See [`crate::Architecture::parameters`].
    fn parameters(&self) -> FfiResult<RVec<FfiParam>>;
    /// See [`crate::Architecture::buffers`].
    fn buffers(&self) -> FfiResult<RVec<FfiNamedTensor>>;
    /// See [`crate::Architecture::set_training`].
    fn set_training(&self, train: bool) -> FfiResult<()>;
    /// See [`crate::Architecture::is_training`].
    fn is_training(&self) -> FfiResult<bool>;
    /// Switches every parameter and buffer to float64 (`true`) or float32 (`false`) in place.
    fn set_double(&self, double: bool) -> FfiResult<()>;
    /// The width of the pooled features the head takes.
    fn feature_dim(&self) -> FfiResult<i64>;
    /// The model's `[model]` spec as TOML, which `build_model` turns back into the same model.
    fn spec(&self) -> FfiResult<RString>;
    /// See [`crate::Architecture::forward_with_feature_map`].
    #[sabi(last_prefix_field)]
    fn forward_with_feature_map(&self, inputs: TensorRef<'_>) -> FfiResult<FfiFeatureMapOutputs>;
}

/// An owned model object.
pub type FfiModelBox = FfiModel_TO<'static, RBox<()>>;

/// Services the host offers to the components it creates.
#[sabi_trait]
pub trait FfiHost {
    /// The run's model; an error while the model itself is being built.
    fn model(&self) -> FfiResult<FfiModelBox>;
    /// See [`crate::Host::num_classes`].
    fn num_classes(&self) -> i64;
    /// `[channels, height, width]` of the images the model takes.
    fn input_shape(&self) -> RVec<i64>;
    /// See [`crate::Host::normalization`].
    fn normalization(&self) -> FfiNormalization;
    /// -1 for the CPU, otherwise the CUDA device index.
    fn device(&self) -> i64;
    /// See [`crate::Host::seed`].
    fn seed(&self) -> u64;
    /// Where training is now.
    fn progress(&self) -> FfiStepInfo;
    /// The next training batch (augmented, on the device).
    fn train_batch(&self) -> FfiResult<FfiBatch>;
    /// Builds a model from a `[model]`-style TOML spec (built-in `arch` or plugin `use`), fresh
    /// from the run's seed or with the weights of a safetensors checkpoint.
    fn build_model(&self, spec: RStr<'_>, checkpoint: ROption<RStr<'_>>) -> FfiResult<FfiModelBox>;
    /// The optimizer's parameter groups with their current learning rates.
    fn learning_rates(&self) -> RVec<FfiGroupRate>;
    /// Every tensor the optimizer updates (the model's parameters and any a distiller added).
    fn optimized_parameters(&self) -> RVec<FfiNamedTensor>;
    /// The process's rank and the number of processes training together (0 and 1 alone).
    fn rank_and_world_size(&self) -> Tuple2<u32, u32>;
    /// See [`crate::Host::run_dir`].
    fn run_dir(&self) -> ROption<RString>;
    /// The directory of the run config: relative paths in a component's configuration are
    /// relative to it.
    #[sabi(last_prefix_field)]
    fn config_dir(&self) -> RString;
}

/// An owned host object.
pub type FfiHostBox = FfiHost_TO<'static, RBox<()>>;

/// [`crate::Optimizer`] across the boundary.
#[sabi_trait]
pub trait FfiOptimizer {
    /// See [`crate::Optimizer::set_param_groups`].
    fn set_param_groups(&mut self, groups: RVec<FfiParamGroup>) -> FfiResult<()>;
    /// See [`crate::Optimizer::set_learning_rates`].
    fn set_learning_rates(&mut self, rates: RSlice<'_, f64>) -> FfiResult<()>;
    /// See [`crate::Optimizer::step`].
    fn step(&mut self) -> FfiResult<()>;
    /// See [`crate::Optimizer::state`].
    fn state(&self) -> FfiResult<FfiState>;
    /// See [`crate::Optimizer::load_state`].
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

/// [`crate::Scheduler`] across the boundary.
#[sabi_trait]
pub trait FfiScheduler {
    /// See [`crate::Scheduler::param_groups`].
    fn param_groups(&mut self) -> FfiResult<RVec<FfiGroupSpec>>;
    /// See [`crate::Scheduler::learning_rates`].
    fn learning_rates(&mut self, point: SchedulePoint) -> FfiResult<ROption<RVec<f64>>>;
    /// See [`crate::Scheduler::state`].
    fn state(&self) -> FfiResult<FfiState>;
    /// See [`crate::Scheduler::load_state`].
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

/// [`crate::Pruner`] across the boundary.
#[sabi_trait]
pub trait FfiPruner {
    /// See [`crate::Pruner::prune`].
    #[sabi(last_prefix_field)]
    fn prune(&mut self, request: FfiPruneRequest) -> FfiResult<FfiPruneResult>;
}

/// [`crate::Distiller`] across the boundary.
#[sabi_trait]
pub trait FfiDistiller {
    /// See [`crate::Distiller::trainable_parameters`].
    fn trainable_parameters(&mut self) -> FfiResult<RVec<FfiNamedTensor>>;
    /// See [`crate::Distiller::replaces_task_loss`].
    fn replaces_task_loss(&self) -> FfiResult<bool>;
    /// See [`crate::Distiller::set_training`].
    fn set_training(&mut self, train: bool) -> FfiResult<()>;
    /// See [`crate::Distiller::loss`].
    fn loss(
        &mut self,
        batch: FfiBatchRef<'_>,
        outputs: FfiOutputsRef<'_>,
    ) -> FfiResult<RVec<FfiLossTerm>>;
    /// See [`crate::Distiller::state`].
    fn state(&self) -> FfiResult<FfiState>;
    /// See [`crate::Distiller::load_state`].
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

/// [`crate::Metric`] across the boundary.
#[sabi_trait]
pub trait FfiMetric {
    /// See [`crate::Metric::reset`].
    fn reset(&mut self) -> FfiResult<()>;
    /// See [`crate::Metric::wants_batches`].
    fn wants_batches(&self) -> FfiResult<bool>;
    /// See [`crate::Metric::update`].
    fn update(&mut self, batch: FfiBatchRef<'_>, outputs: FfiOutputsRef<'_>) -> FfiResult<()>;
    /// See [`crate::Metric::compute`].
    #[sabi(last_prefix_field)]
    fn compute(&mut self, info: FfiEpochInfo) -> FfiResult<FfiMetricValues>;
}

/// What the host lends a callback that takes over the optimizer step.
#[sabi_trait]
pub trait FfiStepControl {
    /// Zeroes the gradients and runs forward, loss and backward again on the step's batch at the
    /// current weights; returns the loss.
    fn recompute(&mut self) -> FfiResult<f64>;
    /// The configured optimizer's own step.
    #[sabi(last_prefix_field)]
    fn base_step(&mut self) -> FfiResult<()>;
}

/// A step control borrowed for one [`FfiCallback::optimizer_step`] call.
pub type FfiStepControlMut<'a> = FfiStepControl_TO<'a, RMut<'a, ()>>;

/// [`crate::Callback`] across the boundary.
#[sabi_trait]
pub trait FfiCallback {
    /// The events to be called for, as a bit set of [`crate::roles::Events`]; asked once.
    fn events(&self) -> FfiResult<u32>;
    /// Returns the batch to train on: this one, or a replacement (soft targets allowed).
    fn batch_start(&mut self, batch: FfiBatch, at: FfiStepInfo) -> FfiResult<FfiBatch>;
    /// Extra loss terms; `loss` is the loss so far.
    fn after_loss(
        &mut self,
        batch: FfiBatchRef<'_>,
        outputs: FfiOutputsRef<'_>,
        loss: TensorRef<'_>,
        at: FfiStepInfo,
    ) -> FfiResult<RVec<FfiLossTerm>>;
    /// See [`crate::Callback::after_backward`].
    fn after_backward(&mut self, at: FfiStepInfo) -> FfiResult<()>;
    /// `true` when the callback stepped (through `control`) and the host must not.
    fn optimizer_step(
        &mut self,
        control: FfiStepControlMut<'_>,
        at: FfiStepInfo,
    ) -> FfiResult<bool>;
    /// See [`crate::Callback::after_step`].
    fn after_step(&mut self, at: FfiStepInfo) -> FfiResult<()>;
    /// See [`crate::Callback::epoch_end`].
    fn epoch_end(&mut self, info: FfiEpochInfo) -> FfiResult<()>;
    /// See [`crate::Callback::eval_start`].
    fn eval_start(&mut self, info: FfiEpochInfo) -> FfiResult<()>;
    /// See [`crate::Callback::eval_end`].
    fn eval_end(&mut self, info: FfiEpochInfo) -> FfiResult<()>;
    /// See [`crate::Callback::state`].
    fn state(&self) -> FfiResult<FfiState>;
    /// See [`crate::Callback::load_state`].
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

/// A created component, by role.
#[repr(C, u8)]
#[derive(StableAbi)]
pub enum FfiComponent {
    /// An optimizer.
    Optimizer(FfiOptimizer_TO<'static, RBox<()>>),
    /// A scheduler.
    Scheduler(FfiScheduler_TO<'static, RBox<()>>),
    /// A pruner.
    Pruner(FfiPruner_TO<'static, RBox<()>>),
    /// A distiller.
    Distiller(FfiDistiller_TO<'static, RBox<()>>),
    /// A metric.
    Metric(FfiMetric_TO<'static, RBox<()>>),
    /// A model.
    Model(FfiModelBox),
    /// A callback.
    Callback(FfiCallback_TO<'static, RBox<()>>),
}

/// How a plugin's `tracing` events reach the host: level (0 = error … 4 = trace), target, message.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy)]
pub struct LogFn {
    /// The host's logging function: `(level, plugin name, formatted message)`.
    pub func: extern "C" fn(u8, RStr<'_>, RStr<'_>),
}

/// The root module every plugin exports (through [`crate::export_plugin!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// Returns the plugin's [`Declaration`]; the host checks it before anything is created.
    pub declaration: extern "C" fn() -> Declaration,
    /// Called once after loading: installs the logging bridge (forwarding events up to the given
    /// level, 0 = error … 4 = trace) and the panic hook.
    pub init: extern "C" fn(LogFn, u8),
    /// Creates the component of a role by name from its configuration (TOML) and a host.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(Role, RStr<'_>, RStr<'_>, FfiHostBox) -> FfiResult<FfiComponent>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "trellis_plugin";
    const NAME: &'static str = "trellis_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
