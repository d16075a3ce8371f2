//! The binary interface between the `trellis` host and plugin dylibs.
//!
//! Everything here is `#[repr(C)]` + `StableAbi`, so abi_stable checks the layout of the whole
//! tree when a plugin is loaded. Plugin authors never touch these types: they implement the
//! Rust traits in [`crate::roles`] and the adapters in [`crate::adapt`] translate.
//!
//! Changing anything in this file is an ABI change: bump [`ABI_VERSION`].

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

/// What a component does in the run.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Optimizer,
    Scheduler,
    Pruner,
    Distiller,
    Metric,
    /// An architecture: `[model] use = "name"`.
    Model,
    /// Receives the run's events (`[[callbacks]]`) and may act on them.
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

/// What kind of layer a parameter belongs to; pruners and TempBalance select layers by it.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    Conv2d,
    Linear,
    BatchNorm,
    LayerNorm,
    Other,
}

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

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiError {
    pub kind: ErrorKind,
    pub message: RString,
    pub key: ROption<RString>,
}

pub type FfiResult<T> = RResult<T, FfiError>;

/// One component a plugin offers.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ComponentDecl {
    pub role: Role,
    pub name: RString,
    pub description: RString,
    /// The component's default configuration, as TOML.
    pub default_config: RString,
}

/// Everything a plugin says about itself; checked by the host before anything is created.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Declaration {
    pub name: RString,
    pub version: RString,
    pub description: RString,
    pub components: RVec<ComponentDecl>,
    pub sdk_abi: u32,
    pub sdk_version: RString,
    pub tch_version: RString,
    pub libtorch_version: RString,
    pub cuda: bool,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiNamedTensor {
    pub name: RString,
    pub tensor: TensorHandle,
}

/// State a component saves into a checkpoint: named tensors plus a small metadata string.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiState {
    pub tensors: RVec<FfiNamedTensor>,
    pub meta: RString,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiParam {
    pub name: RString,
    /// Module path, e.g. `layer1.0.conv1` for `layer1.0.conv1.weight`.
    pub module: RString,
    pub kind: LayerKind,
    pub tensor: TensorHandle,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiBatch {
    pub inputs: TensorHandle,
    pub targets: TensorHandle,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiBatchRef<'a> {
    pub inputs: TensorRef<'a>,
    pub targets: TensorRef<'a>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiOutputs {
    pub logits: TensorHandle,
    pub features: TensorHandle,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiOutputsRef<'a> {
    pub logits: TensorRef<'a>,
    pub features: TensorRef<'a>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiParamGroup {
    pub name: RString,
    pub params: RVec<FfiNamedTensor>,
    pub lr: f64,
    pub weight_decay: f64,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiGroupSpec {
    pub name: RString,
    pub params: RVec<RString>,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiGroupRate {
    pub name: RString,
    pub lr: f64,
    pub params: RVec<RString>,
}

/// Where in training a schedule is asked for rates.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// Before the first step of an epoch.
    EpochStart,
    /// Before an optimizer step.
    Step,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub struct SchedulePoint {
    pub boundary: Boundary,
    /// Epochs completed so far (0 during the first epoch).
    pub epoch: u64,
    pub epochs: u64,
    /// Optimizer steps completed so far in the run.
    pub step: u64,
    pub steps_per_epoch: u64,
    /// The global schedule's learning rate at this point (`[schedule]`).
    pub base_lr: f64,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One threshold over all prunable weights.
    Global,
    /// The same density in every layer.
    Layer,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiPruneRequest {
    pub density: f64,
    pub scope: Scope,
    pub batches: RVec<FfiBatch>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiPruneResult {
    /// One 0/1 mask per pruned parameter, keyed by parameter name.
    pub masks: RVec<FfiNamedTensor>,
    /// The raw scores the masks were thresholded from (same names).
    pub scores: RVec<FfiNamedTensor>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct FfiLossTerm {
    pub name: RString,
    pub value: TensorHandle,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiRow {
    pub label: RString,
    pub values: RVec<f64>,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiTable {
    pub name: RString,
    pub columns: RVec<RString>,
    pub rows: RVec<FfiRow>,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiScalar {
    pub name: RString,
    pub value: f64,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiMetricValues {
    pub scalars: RVec<FfiScalar>,
    pub tables: RVec<FfiTable>,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct FfiEpochInfo {
    /// Epochs completed, counting the one just finished.
    pub epoch: u64,
    pub epochs: u64,
    pub step: u64,
}

/// Where the run is: the training loop's position when a component asks or is called.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfiStepInfo {
    /// Epochs completed so far (0 during the first epoch).
    pub epoch: u64,
    pub epochs: u64,
    /// Optimizer steps completed so far in the run.
    pub step: u64,
    pub steps_per_epoch: u64,
}

/// The normalisation the host applies to images before a model sees them.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiNormalization {
    pub mean: RVec<f64>,
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
    fn parameters(&self) -> FfiResult<RVec<FfiParam>>;
    fn buffers(&self) -> FfiResult<RVec<FfiNamedTensor>>;
    fn set_training(&self, train: bool) -> FfiResult<()>;
    fn is_training(&self) -> FfiResult<bool>;
    /// Switches every parameter and buffer to float64 (`true`) or float32 (`false`) in place.
    fn set_double(&self, double: bool) -> FfiResult<()>;
    /// The width of the pooled features the head takes.
    fn feature_dim(&self) -> FfiResult<i64>;
    /// The model's `[model]` spec as TOML, which `build_model` turns back into the same model.
    #[sabi(last_prefix_field)]
    fn spec(&self) -> FfiResult<RString>;
}

pub type FfiModelBox = FfiModel_TO<'static, RBox<()>>;

/// Services the host offers to the components it creates.
#[sabi_trait]
pub trait FfiHost {
    /// The run's model; an error while the model itself is being built.
    fn model(&self) -> FfiResult<FfiModelBox>;
    fn num_classes(&self) -> i64;
    /// `[channels, height, width]` of the images the model takes.
    fn input_shape(&self) -> RVec<i64>;
    fn normalization(&self) -> FfiNormalization;
    /// -1 for the CPU, otherwise the CUDA device index.
    fn device(&self) -> i64;
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
    fn run_dir(&self) -> ROption<RString>;
    /// The directory of the run config: relative paths in a component's configuration are
    /// relative to it.
    #[sabi(last_prefix_field)]
    fn config_dir(&self) -> RString;
}

pub type FfiHostBox = FfiHost_TO<'static, RBox<()>>;

#[sabi_trait]
pub trait FfiOptimizer {
    fn set_param_groups(&mut self, groups: RVec<FfiParamGroup>) -> FfiResult<()>;
    fn set_learning_rates(&mut self, rates: RSlice<'_, f64>) -> FfiResult<()>;
    fn step(&mut self) -> FfiResult<()>;
    fn state(&self) -> FfiResult<FfiState>;
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

#[sabi_trait]
pub trait FfiScheduler {
    fn param_groups(&mut self) -> FfiResult<RVec<FfiGroupSpec>>;
    fn learning_rates(&mut self, point: SchedulePoint) -> FfiResult<ROption<RVec<f64>>>;
    fn state(&self) -> FfiResult<FfiState>;
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

#[sabi_trait]
pub trait FfiPruner {
    #[sabi(last_prefix_field)]
    fn prune(&mut self, request: FfiPruneRequest) -> FfiResult<FfiPruneResult>;
}

#[sabi_trait]
pub trait FfiDistiller {
    fn trainable_parameters(&mut self) -> FfiResult<RVec<FfiNamedTensor>>;
    fn replaces_task_loss(&self) -> FfiResult<bool>;
    fn set_training(&mut self, train: bool) -> FfiResult<()>;
    fn loss(
        &mut self,
        batch: FfiBatchRef<'_>,
        outputs: FfiOutputsRef<'_>,
    ) -> FfiResult<RVec<FfiLossTerm>>;
    fn state(&self) -> FfiResult<FfiState>;
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

#[sabi_trait]
pub trait FfiMetric {
    fn reset(&mut self) -> FfiResult<()>;
    fn wants_batches(&self) -> FfiResult<bool>;
    fn update(&mut self, batch: FfiBatchRef<'_>, outputs: FfiOutputsRef<'_>) -> FfiResult<()>;
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

pub type FfiStepControlMut<'a> = FfiStepControl_TO<'a, RMut<'a, ()>>;

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
    fn after_backward(&mut self, at: FfiStepInfo) -> FfiResult<()>;
    /// `true` when the callback stepped (through `control`) and the host must not.
    fn optimizer_step(
        &mut self,
        control: FfiStepControlMut<'_>,
        at: FfiStepInfo,
    ) -> FfiResult<bool>;
    fn after_step(&mut self, at: FfiStepInfo) -> FfiResult<()>;
    fn epoch_end(&mut self, info: FfiEpochInfo) -> FfiResult<()>;
    fn eval_start(&mut self, info: FfiEpochInfo) -> FfiResult<()>;
    fn eval_end(&mut self, info: FfiEpochInfo) -> FfiResult<()>;
    fn state(&self) -> FfiResult<FfiState>;
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: FfiState) -> FfiResult<()>;
}

/// A created component.
#[repr(C, u8)]
#[derive(StableAbi)]
pub enum FfiComponent {
    Optimizer(FfiOptimizer_TO<'static, RBox<()>>),
    Scheduler(FfiScheduler_TO<'static, RBox<()>>),
    Pruner(FfiPruner_TO<'static, RBox<()>>),
    Distiller(FfiDistiller_TO<'static, RBox<()>>),
    Metric(FfiMetric_TO<'static, RBox<()>>),
    Model(FfiModelBox),
    Callback(FfiCallback_TO<'static, RBox<()>>),
}

/// How a plugin's `tracing` events reach the host: level (0 = error … 4 = trace), target, message.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy)]
pub struct LogFn {
    pub func: extern "C" fn(u8, RStr<'_>, RStr<'_>),
}

/// The root module every plugin exports (through [`crate::export_plugin!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    pub declaration: extern "C" fn() -> Declaration,
    /// Called once after loading: installs the logging bridge (forwarding events up to the given
    /// level, 0 = error … 4 = trace) and the panic hook.
    pub init: extern "C" fn(LogFn, u8),
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(Role, RStr<'_>, RStr<'_>, FfiHostBox) -> FfiResult<FfiComponent>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "trellis_plugin";
    const NAME: &'static str = "trellis_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
