//! Translation between the Rust traits of [`crate::roles`] / [`crate::host`] and the ABI objects
//! of [`crate::abi`], in both directions.
//!
//! Every call that enters code on the other side of the boundary runs under [`guard`]: a panic
//! there (including tch's panicking methods) becomes an [`ErrorKind::Panic`] error instead of
//! unwinding into an `extern "C"` frame, which would abort the whole process.
//!
//! Hidden from the documentation: [`crate::Plugin`] and the host use it; plugin authors never
//! do.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec, Tuple2};
use tch::Tensor;

use crate::abi::*;
use crate::error::{Error, Result};
use crate::host::{HostServices, Model};
use crate::roles::*;
use crate::tensor::{TensorHandle, TensorRef};

thread_local! {
    /// Filled by the panic hook a plugin installs at load time: the message with its location.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records panics with their location instead of printing them: the host reports them, naming
/// the plugin and component. Installed in each plugin (a dylib has its own copy of std's hook).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = without_backtrace(&panic_message(info.payload()));
        let text = match info.location() {
            Some(at) => format!("{message} (at {}:{})", short_path(at.file()), at.line()),
            None => message,
        };
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
    }));
}

/// A source path as a panic location shows it: a dependency's file relative to the registry
/// (`tch-0.24.0/src/wrappers/tensor_generated.rs`), not under the builder's home directory.
fn short_path(file: &str) -> &str {
    match file.find("/registry/src/") {
        Some(at) => {
            let index = &file[at + "/registry/src/".len()..];
            index.split_once('/').map_or(index, |(_, rest)| rest)
        }
        None => file,
    }
}

/// A libtorch message without the C++ backtrace libtorch appends to it ("Exception raised from
/// ... (most recent call first):" and some thirty "frame #N: ..." lines), which tells a user
/// nothing. tch's panicking methods unwrap the error, so their panics read "called
/// `Result::unwrap()` on an `Err` value: Torch(\"...\")", escaped; that becomes "libtorch: ...".
pub fn without_backtrace(message: &str) -> String {
    let mut text = message;
    for marker in ["Exception raised from ", "frame #0: "] {
        if let Some(at) = text.find(marker) {
            text = &text[..at];
        }
    }
    let mut text = text.trim_end();
    while let Some(rest) = text.strip_suffix("\\n") {
        text = rest.trim_end();
    }
    const UNWRAPPED: &str = "called `Result::unwrap()` on an `Err` value: Torch(\"";
    if let Some(rest) = text.strip_prefix(UNWRAPPED) {
        let rest = rest.strip_suffix("\")").unwrap_or(rest);
        return format!(
            "libtorch: {}",
            rest.replace("\\n", "\n").replace("\\\"", "\"")
        )
        .trim_end()
        .to_string();
    }
    if let Some(rest) = text.strip_prefix("Internal torch error: ") {
        return format!("libtorch: {rest}");
    }
    if text.is_empty() {
        return message.lines().next().unwrap_or_default().to_string();
    }
    text.to_string()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs `f`, turning a panic into an error.
pub fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    LAST_PANIC.with(|p| p.borrow_mut().take());
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let recorded = LAST_PANIC.with(|p| p.borrow_mut().take());
            Err(Error::panic(
                recorded.unwrap_or_else(|| panic_message(payload.as_ref())),
            ))
        }
    }
}

fn ffi<T, U>(f: impl FnOnce() -> Result<T>, convert: impl FnOnce(T) -> U) -> FfiResult<U> {
    match guard(f) {
        Ok(v) => RResult::ROk(convert(v)),
        Err(e) => RResult::RErr(e.into()),
    }
}

fn from_ffi<T>(r: FfiResult<T>) -> Result<T> {
    r.into_result().map_err(Error::from)
}

// ---------------------------------------------------------------------------------------------
// Plain data.

pub(crate) fn to_ffi_named(tensors: Vec<(String, Tensor)>) -> RVec<FfiNamedTensor> {
    tensors
        .into_iter()
        .map(|(name, tensor)| FfiNamedTensor {
            name: name.into(),
            tensor: tensor.into(),
        })
        .collect()
}

pub(crate) fn from_ffi_named(tensors: RVec<FfiNamedTensor>) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .map(|t| (t.name.into_string(), t.tensor.into_tensor()))
        .collect()
}

fn to_ffi_state(state: State) -> FfiState {
    FfiState {
        tensors: to_ffi_named(state.tensors),
        meta: state.meta.into(),
    }
}

fn from_ffi_state(state: FfiState) -> State {
    State {
        tensors: from_ffi_named(state.tensors),
        meta: state.meta.into_string(),
    }
}

pub(crate) fn from_ffi_param(p: FfiParam) -> Param {
    Param {
        name: p.name.into_string(),
        module: p.module.into_string(),
        kind: p.kind,
        tensor: p.tensor.into_tensor(),
    }
}

fn to_ffi_param(p: Param) -> FfiParam {
    FfiParam {
        name: p.name.into(),
        module: p.module.into(),
        kind: p.kind,
        tensor: p.tensor.into(),
    }
}

pub(crate) fn from_ffi_batch(b: FfiBatch) -> Batch {
    Batch {
        inputs: b.inputs.into_tensor(),
        targets: b.targets.into_tensor(),
    }
}

fn to_ffi_batch(b: Batch) -> FfiBatch {
    FfiBatch {
        inputs: b.inputs.into(),
        targets: b.targets.into(),
    }
}

fn batch_from_ref(b: FfiBatchRef<'_>) -> Batch {
    Batch {
        inputs: b.inputs.to_owned(),
        targets: b.targets.to_owned(),
    }
}

fn batch_ref(b: &Batch) -> FfiBatchRef<'_> {
    FfiBatchRef {
        inputs: TensorRef::new(&b.inputs),
        targets: TensorRef::new(&b.targets),
    }
}

pub(crate) fn from_ffi_outputs(o: FfiOutputs) -> Outputs {
    Outputs {
        logits: o.logits.into_tensor(),
        features: o.features.into_tensor(),
    }
}

fn outputs_from_ref(o: FfiOutputsRef<'_>) -> Outputs {
    Outputs {
        logits: o.logits.to_owned(),
        features: o.features.to_owned(),
    }
}

fn outputs_ref(o: &Outputs) -> FfiOutputsRef<'_> {
    FfiOutputsRef {
        logits: TensorRef::new(&o.logits),
        features: TensorRef::new(&o.features),
    }
}

pub(crate) fn from_ffi_step(s: FfiStepInfo) -> StepInfo {
    StepInfo {
        epoch: s.epoch,
        epochs: s.epochs,
        step: s.step,
        steps_per_epoch: s.steps_per_epoch,
    }
}

fn to_ffi_step(s: StepInfo) -> FfiStepInfo {
    FfiStepInfo {
        epoch: s.epoch,
        epochs: s.epochs,
        step: s.step,
        steps_per_epoch: s.steps_per_epoch,
    }
}

fn from_ffi_epoch(info: FfiEpochInfo) -> EpochInfo {
    EpochInfo {
        epoch: info.epoch,
        epochs: info.epochs,
        step: info.step,
    }
}

fn to_ffi_epoch(info: EpochInfo) -> FfiEpochInfo {
    FfiEpochInfo {
        epoch: info.epoch,
        epochs: info.epochs,
        step: info.step,
    }
}

fn to_ffi_terms(terms: Vec<(String, Tensor)>) -> RVec<FfiLossTerm> {
    terms
        .into_iter()
        .map(|(name, value)| FfiLossTerm {
            name: name.into(),
            value: value.into(),
        })
        .collect()
}

fn from_ffi_terms(terms: RVec<FfiLossTerm>) -> Vec<(String, Tensor)> {
    terms
        .into_iter()
        .map(|t| (t.name.into_string(), t.value.into_tensor()))
        .collect()
}

fn strings(v: Vec<String>) -> RVec<RString> {
    v.into_iter().map(RString::from).collect()
}

fn from_strings(v: RVec<RString>) -> Vec<String> {
    v.into_iter().map(RString::into_string).collect()
}

fn to_ffi_values(v: MetricValues) -> FfiMetricValues {
    FfiMetricValues {
        scalars: v
            .scalars
            .into_iter()
            .map(|(name, value)| FfiScalar {
                name: name.into(),
                value,
            })
            .collect(),
        tables: v
            .tables
            .into_iter()
            .map(|t| FfiTable {
                name: t.name.into(),
                columns: strings(t.columns),
                rows: t
                    .rows
                    .into_iter()
                    .map(|(label, values)| FfiRow {
                        label: label.into(),
                        values: values.into(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn from_ffi_values(v: FfiMetricValues) -> MetricValues {
    MetricValues {
        scalars: v
            .scalars
            .into_iter()
            .map(|s| (s.name.into_string(), s.value))
            .collect(),
        tables: v
            .tables
            .into_iter()
            .map(|t| Table {
                name: t.name.into_string(),
                columns: from_strings(t.columns),
                rows: t
                    .rows
                    .into_iter()
                    .map(|r| (r.label.into_string(), r.values.into_vec()))
                    .collect(),
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Plugin side: a component implemented in Rust, exposed as an ABI object.

/// Wraps a component so every call into it is guarded against panics.
pub struct Guarded<T>(
    /// The component.
    pub T,
);

impl<T: Optimizer + 'static> FfiOptimizer for Guarded<T> {
    fn set_param_groups(&mut self, groups: RVec<FfiParamGroup>) -> FfiResult<()> {
        let groups = groups
            .into_iter()
            .map(|g| ParamGroup {
                name: g.name.into_string(),
                params: from_ffi_named(g.params),
                lr: g.lr,
                weight_decay: g.weight_decay,
            })
            .collect();
        ffi(|| self.0.set_param_groups(groups), |v| v)
    }
    fn set_learning_rates(&mut self, rates: RSlice<'_, f64>) -> FfiResult<()> {
        ffi(|| self.0.set_learning_rates(rates.as_slice()), |v| v)
    }
    fn step(&mut self) -> FfiResult<()> {
        ffi(|| self.0.step(), |v| v)
    }
    fn state(&self) -> FfiResult<FfiState> {
        ffi(|| self.0.state(), to_ffi_state)
    }
    fn load_state(&mut self, state: FfiState) -> FfiResult<()> {
        let state = from_ffi_state(state);
        ffi(|| self.0.load_state(state), |v| v)
    }
}

impl<T: Scheduler + 'static> FfiScheduler for Guarded<T> {
    fn param_groups(&mut self) -> FfiResult<RVec<FfiGroupSpec>> {
        ffi(
            || self.0.param_groups(),
            |groups| {
                groups
                    .into_iter()
                    .map(|g| FfiGroupSpec {
                        name: g.name.into(),
                        params: strings(g.params),
                    })
                    .collect()
            },
        )
    }
    fn learning_rates(&mut self, point: SchedulePoint) -> FfiResult<ROption<RVec<f64>>> {
        ffi(
            || self.0.learning_rates(point),
            |rates| rates.map(RVec::from).into(),
        )
    }
    fn state(&self) -> FfiResult<FfiState> {
        ffi(|| self.0.state(), to_ffi_state)
    }
    fn load_state(&mut self, state: FfiState) -> FfiResult<()> {
        let state = from_ffi_state(state);
        ffi(|| self.0.load_state(state), |v| v)
    }
}

impl<T: Pruner + 'static> FfiPruner for Guarded<T> {
    fn prune(&mut self, request: FfiPruneRequest) -> FfiResult<FfiPruneResult> {
        let request = PruneRequest {
            density: request.density,
            scope: request.scope,
            batches: request.batches.into_iter().map(from_ffi_batch).collect(),
        };
        ffi(
            || self.0.prune(request),
            |r| FfiPruneResult {
                masks: to_ffi_named(r.masks),
                scores: to_ffi_named(r.scores),
            },
        )
    }
}

impl<T: Distiller + 'static> FfiDistiller for Guarded<T> {
    fn trainable_parameters(&mut self) -> FfiResult<RVec<FfiNamedTensor>> {
        ffi(|| self.0.trainable_parameters(), to_ffi_named)
    }
    fn replaces_task_loss(&self) -> FfiResult<bool> {
        ffi(|| self.0.replaces_task_loss(), |v| v)
    }
    fn set_training(&mut self, train: bool) -> FfiResult<()> {
        ffi(|| self.0.set_training(train), |v| v)
    }
    fn loss(
        &mut self,
        batch: FfiBatchRef<'_>,
        outputs: FfiOutputsRef<'_>,
    ) -> FfiResult<RVec<FfiLossTerm>> {
        ffi(
            || {
                self.0
                    .loss(&batch_from_ref(batch), &outputs_from_ref(outputs))
            },
            to_ffi_terms,
        )
    }
    fn state(&self) -> FfiResult<FfiState> {
        ffi(|| self.0.state(), to_ffi_state)
    }
    fn load_state(&mut self, state: FfiState) -> FfiResult<()> {
        let state = from_ffi_state(state);
        ffi(|| self.0.load_state(state), |v| v)
    }
}

impl<T: Metric + 'static> FfiMetric for Guarded<T> {
    fn reset(&mut self) -> FfiResult<()> {
        ffi(|| self.0.reset(), |v| v)
    }
    fn wants_batches(&self) -> FfiResult<bool> {
        ffi(|| self.0.wants_batches(), |v| v)
    }
    fn update(&mut self, batch: FfiBatchRef<'_>, outputs: FfiOutputsRef<'_>) -> FfiResult<()> {
        ffi(
            || {
                self.0
                    .update(&batch_from_ref(batch), &outputs_from_ref(outputs))
            },
            |v| v,
        )
    }
    fn compute(&mut self, info: FfiEpochInfo) -> FfiResult<FfiMetricValues> {
        ffi(|| self.0.compute(from_ffi_epoch(info)), to_ffi_values)
    }
}

/// The host's step control, seen from inside a plugin.
struct RemoteStepControl<'a>(FfiStepControlMut<'a>);

impl StepControl for RemoteStepControl<'_> {
    fn recompute(&mut self) -> Result<f64> {
        from_ffi(self.0.recompute())
    }
    fn base_step(&mut self) -> Result<()> {
        from_ffi(self.0.base_step())
    }
}

impl<T: Callback + 'static> FfiCallback for Guarded<T> {
    fn events(&self) -> FfiResult<u32> {
        ffi(|| Ok(self.0.events()), |e| e.0)
    }
    fn batch_start(&mut self, batch: FfiBatch, at: FfiStepInfo) -> FfiResult<FfiBatch> {
        let batch = from_ffi_batch(batch);
        ffi(
            || self.0.batch_start(batch, from_ffi_step(at)),
            to_ffi_batch,
        )
    }
    fn after_loss(
        &mut self,
        batch: FfiBatchRef<'_>,
        outputs: FfiOutputsRef<'_>,
        loss: TensorRef<'_>,
        at: FfiStepInfo,
    ) -> FfiResult<RVec<FfiLossTerm>> {
        ffi(
            || {
                self.0.after_loss(
                    &batch_from_ref(batch),
                    &outputs_from_ref(outputs),
                    &loss.get(),
                    from_ffi_step(at),
                )
            },
            to_ffi_terms,
        )
    }
    fn after_backward(&mut self, at: FfiStepInfo) -> FfiResult<()> {
        ffi(|| self.0.after_backward(from_ffi_step(at)), |v| v)
    }
    fn optimizer_step(
        &mut self,
        control: FfiStepControlMut<'_>,
        at: FfiStepInfo,
    ) -> FfiResult<bool> {
        let mut control = RemoteStepControl(control);
        ffi(
            || self.0.optimizer_step(&mut control, from_ffi_step(at)),
            |v| v,
        )
    }
    fn after_step(&mut self, at: FfiStepInfo) -> FfiResult<()> {
        ffi(|| self.0.after_step(from_ffi_step(at)), |v| v)
    }
    fn epoch_end(&mut self, info: FfiEpochInfo) -> FfiResult<()> {
        ffi(|| self.0.epoch_end(from_ffi_epoch(info)), |v| v)
    }
    fn eval_start(&mut self, info: FfiEpochInfo) -> FfiResult<()> {
        ffi(|| self.0.eval_start(from_ffi_epoch(info)), |v| v)
    }
    fn eval_end(&mut self, info: FfiEpochInfo) -> FfiResult<()> {
        ffi(|| self.0.eval_end(from_ffi_epoch(info)), |v| v)
    }
    fn state(&self) -> FfiResult<FfiState> {
        ffi(|| self.0.state(), to_ffi_state)
    }
    fn load_state(&mut self, state: FfiState) -> FfiResult<()> {
        let state = from_ffi_state(state);
        ffi(|| self.0.load_state(state), |v| v)
    }
}

// ---------------------------------------------------------------------------------------------
// Host side: an ABI object from a plugin, used through the Rust trait.

/// A plugin's optimizer as the host holds it; implements [`Optimizer`].
pub type OptimizerBox = FfiOptimizer_TO<'static, abi_stable::std_types::RBox<()>>;
/// A plugin's scheduler as the host holds it; implements [`Scheduler`].
pub type SchedulerBox = FfiScheduler_TO<'static, abi_stable::std_types::RBox<()>>;
/// A plugin's pruner as the host holds it; implements [`Pruner`].
pub type PrunerBox = FfiPruner_TO<'static, abi_stable::std_types::RBox<()>>;
/// A plugin's distiller as the host holds it; implements [`Distiller`].
pub type DistillerBox = FfiDistiller_TO<'static, abi_stable::std_types::RBox<()>>;
/// A plugin's metric as the host holds it; implements [`Metric`].
pub type MetricBox = FfiMetric_TO<'static, abi_stable::std_types::RBox<()>>;
/// A plugin's callback as the host holds it; implements [`Callback`].
pub type CallbackBox = FfiCallback_TO<'static, abi_stable::std_types::RBox<()>>;

impl Optimizer for OptimizerBox {
    fn set_param_groups(&mut self, groups: Vec<ParamGroup>) -> Result<()> {
        let groups = groups
            .into_iter()
            .map(|g| FfiParamGroup {
                name: g.name.into(),
                params: to_ffi_named(g.params),
                lr: g.lr,
                weight_decay: g.weight_decay,
            })
            .collect();
        from_ffi(FfiOptimizer_TO::set_param_groups(self, groups))
    }
    fn set_learning_rates(&mut self, rates: &[f64]) -> Result<()> {
        from_ffi(FfiOptimizer_TO::set_learning_rates(self, rates.into()))
    }
    fn step(&mut self) -> Result<()> {
        from_ffi(FfiOptimizer_TO::step(self))
    }
    fn state(&self) -> Result<State> {
        from_ffi(FfiOptimizer_TO::state(self)).map(from_ffi_state)
    }
    fn load_state(&mut self, state: State) -> Result<()> {
        from_ffi(FfiOptimizer_TO::load_state(self, to_ffi_state(state)))
    }
}

impl Scheduler for SchedulerBox {
    fn param_groups(&mut self) -> Result<Vec<GroupSpec>> {
        let groups = from_ffi(FfiScheduler_TO::param_groups(self))?;
        Ok(groups
            .into_iter()
            .map(|g| GroupSpec {
                name: g.name.into_string(),
                params: from_strings(g.params),
            })
            .collect())
    }
    fn learning_rates(&mut self, point: SchedulePoint) -> Result<Option<Vec<f64>>> {
        let rates = from_ffi(FfiScheduler_TO::learning_rates(self, point))?;
        Ok(rates.into_option().map(RVec::into_vec))
    }
    fn state(&self) -> Result<State> {
        from_ffi(FfiScheduler_TO::state(self)).map(from_ffi_state)
    }
    fn load_state(&mut self, state: State) -> Result<()> {
        from_ffi(FfiScheduler_TO::load_state(self, to_ffi_state(state)))
    }
}

impl Pruner for PrunerBox {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult> {
        let request = FfiPruneRequest {
            density: request.density,
            scope: request.scope,
            batches: request.batches.into_iter().map(to_ffi_batch).collect(),
        };
        let r = from_ffi(FfiPruner_TO::prune(self, request))?;
        Ok(PruneResult {
            masks: from_ffi_named(r.masks),
            scores: from_ffi_named(r.scores),
        })
    }
}

impl Distiller for DistillerBox {
    fn trainable_parameters(&mut self) -> Result<Vec<(String, Tensor)>> {
        from_ffi(FfiDistiller_TO::trainable_parameters(self)).map(from_ffi_named)
    }
    fn replaces_task_loss(&self) -> Result<bool> {
        from_ffi(FfiDistiller_TO::replaces_task_loss(self))
    }
    fn set_training(&mut self, train: bool) -> Result<()> {
        from_ffi(FfiDistiller_TO::set_training(self, train))
    }
    fn loss(&mut self, batch: &Batch, outputs: &Outputs) -> Result<Vec<(String, Tensor)>> {
        let terms = from_ffi(FfiDistiller_TO::loss(
            self,
            batch_ref(batch),
            outputs_ref(outputs),
        ))?;
        Ok(from_ffi_terms(terms))
    }
    fn state(&self) -> Result<State> {
        from_ffi(FfiDistiller_TO::state(self)).map(from_ffi_state)
    }
    fn load_state(&mut self, state: State) -> Result<()> {
        from_ffi(FfiDistiller_TO::load_state(self, to_ffi_state(state)))
    }
}

impl Metric for MetricBox {
    fn reset(&mut self) -> Result<()> {
        from_ffi(FfiMetric_TO::reset(self))
    }
    fn wants_batches(&self) -> Result<bool> {
        from_ffi(FfiMetric_TO::wants_batches(self))
    }
    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        from_ffi(FfiMetric_TO::update(
            self,
            batch_ref(batch),
            outputs_ref(outputs),
        ))
    }
    fn compute(&mut self, info: EpochInfo) -> Result<MetricValues> {
        from_ffi(FfiMetric_TO::compute(self, to_ffi_epoch(info))).map(from_ffi_values)
    }
}

/// The host's step control handed across the boundary to a plugin's callback.
struct LocalStepControl<'a>(&'a mut dyn StepControl);

impl FfiStepControl for LocalStepControl<'_> {
    fn recompute(&mut self) -> FfiResult<f64> {
        ffi(|| self.0.recompute(), |v| v)
    }
    fn base_step(&mut self) -> FfiResult<()> {
        ffi(|| self.0.base_step(), |v| v)
    }
}

impl Callback for CallbackBox {
    fn events(&self) -> Events {
        // The host asks once when it creates the callback and reports an error there; should a
        // later answer fail, every event is called rather than silently none.
        match FfiCallback_TO::events(self).into_result() {
            Ok(bits) => Events(bits),
            Err(_) => Events(u32::MAX),
        }
    }
    fn batch_start(&mut self, batch: Batch, at: StepInfo) -> Result<Batch> {
        from_ffi(FfiCallback_TO::batch_start(
            self,
            to_ffi_batch(batch),
            to_ffi_step(at),
        ))
        .map(from_ffi_batch)
    }
    fn after_loss(
        &mut self,
        batch: &Batch,
        outputs: &Outputs,
        loss: &Tensor,
        at: StepInfo,
    ) -> Result<Vec<(String, Tensor)>> {
        from_ffi(FfiCallback_TO::after_loss(
            self,
            batch_ref(batch),
            outputs_ref(outputs),
            TensorRef::new(loss),
            to_ffi_step(at),
        ))
        .map(from_ffi_terms)
    }
    fn after_backward(&mut self, at: StepInfo) -> Result<()> {
        from_ffi(FfiCallback_TO::after_backward(self, to_ffi_step(at)))
    }
    fn optimizer_step(&mut self, control: &mut dyn StepControl, at: StepInfo) -> Result<bool> {
        let mut local = LocalStepControl(control);
        let remote = FfiStepControl_TO::from_ptr(&mut local, TD_Opaque);
        from_ffi(FfiCallback_TO::optimizer_step(
            self,
            remote,
            to_ffi_step(at),
        ))
    }
    fn after_step(&mut self, at: StepInfo) -> Result<()> {
        from_ffi(FfiCallback_TO::after_step(self, to_ffi_step(at)))
    }
    fn epoch_end(&mut self, info: EpochInfo) -> Result<()> {
        from_ffi(FfiCallback_TO::epoch_end(self, to_ffi_epoch(info)))
    }
    fn eval_start(&mut self, info: EpochInfo) -> Result<()> {
        from_ffi(FfiCallback_TO::eval_start(self, to_ffi_epoch(info)))
    }
    fn eval_end(&mut self, info: EpochInfo) -> Result<()> {
        from_ffi(FfiCallback_TO::eval_end(self, to_ffi_epoch(info)))
    }
    fn state(&self) -> Result<State> {
        from_ffi(FfiCallback_TO::state(self)).map(from_ffi_state)
    }
    fn load_state(&mut self, state: State) -> Result<()> {
        from_ffi(FfiCallback_TO::load_state(self, to_ffi_state(state)))
    }
}

// ---------------------------------------------------------------------------------------------
// The host's services, exposed to plugins.

/// An [`Architecture`] (the host's network or a plugin's model) as an ABI object; every call
/// into it is guarded.
pub(crate) struct ModelAdapter<M>(pub M);

impl<M: Architecture> FfiModel for ModelAdapter<M> {
    fn forward(&self, inputs: TensorRef<'_>) -> FfiResult<FfiOutputs> {
        ffi(
            || self.0.forward(&inputs.get()),
            |o| FfiOutputs {
                logits: o.logits.into(),
                features: o.features.into(),
            },
        )
    }
    fn head(&self, features: TensorRef<'_>) -> FfiResult<TensorHandle> {
        ffi(|| self.0.head(&features.get()), TensorHandle::from)
    }
    fn parameters(&self) -> FfiResult<RVec<FfiParam>> {
        ffi(
            || self.0.parameters(),
            |params| params.into_iter().map(to_ffi_param).collect(),
        )
    }
    fn buffers(&self) -> FfiResult<RVec<FfiNamedTensor>> {
        ffi(|| self.0.buffers(), to_ffi_named)
    }
    fn set_training(&self, train: bool) -> FfiResult<()> {
        ffi(|| self.0.set_training(train), |v| v)
    }
    fn is_training(&self) -> FfiResult<bool> {
        ffi(|| self.0.is_training(), |v| v)
    }
    fn set_double(&self, double: bool) -> FfiResult<()> {
        ffi(|| self.0.set_double(double), |v| v)
    }
    fn feature_dim(&self) -> FfiResult<i64> {
        ffi(|| self.0.feature_dim(), |v| v)
    }
    fn spec(&self) -> FfiResult<RString> {
        ffi(|| self.0.spec(), RString::from)
    }
    fn forward_with_feature_map(&self, inputs: TensorRef<'_>) -> FfiResult<FfiFeatureMapOutputs> {
        ffi(
            || self.0.forward_with_feature_map(&inputs.get()),
            |(o, map)| FfiFeatureMapOutputs {
                outputs: FfiOutputs {
                    logits: o.logits.into(),
                    features: o.features.into(),
                },
                feature_map: map.into(),
            },
        )
    }
}

pub(crate) struct HostAdapter<S>(pub S);

impl<S: HostServices> FfiHost for HostAdapter<S> {
    fn model(&self) -> FfiResult<FfiModelBox> {
        ffi(|| self.0.model(), |m: Model| m.inner)
    }
    fn num_classes(&self) -> i64 {
        self.0.num_classes()
    }
    fn input_shape(&self) -> RVec<i64> {
        self.0.input_shape().to_vec().into()
    }
    fn normalization(&self) -> FfiNormalization {
        let n = self.0.normalization();
        FfiNormalization {
            mean: n.mean.into(),
            std: n.std.into(),
        }
    }
    fn device(&self) -> i64 {
        device_index(self.0.device())
    }
    fn seed(&self) -> u64 {
        self.0.seed()
    }
    fn progress(&self) -> FfiStepInfo {
        to_ffi_step(self.0.progress())
    }
    fn train_batch(&self) -> FfiResult<FfiBatch> {
        ffi(|| self.0.train_batch(), to_ffi_batch)
    }
    fn build_model(&self, spec: RStr<'_>, checkpoint: ROption<RStr<'_>>) -> FfiResult<FfiModelBox> {
        ffi(
            || {
                let checkpoint = checkpoint.into_option().map(|c| Path::new(c.as_str()));
                self.0.build_model(spec.as_str(), checkpoint)
            },
            |m: Model| m.inner,
        )
    }
    fn learning_rates(&self) -> RVec<FfiGroupRate> {
        self.0
            .learning_rates()
            .into_iter()
            .map(|g| FfiGroupRate {
                name: g.name.into(),
                lr: g.lr,
                params: strings(g.params),
            })
            .collect()
    }
    fn optimized_parameters(&self) -> RVec<FfiNamedTensor> {
        to_ffi_named(self.0.optimized_parameters())
    }
    fn rank_and_world_size(&self) -> Tuple2<u32, u32> {
        let (rank, world) = self.0.rank_and_world_size();
        Tuple2(rank, world)
    }
    fn config_dir(&self) -> RString {
        self.0.config_dir().to_string_lossy().into_owned().into()
    }
    fn run_dir(&self) -> ROption<RString> {
        self.0
            .run_dir()
            .map(|p: PathBuf| RString::from(p.to_string_lossy().into_owned()))
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::without_backtrace;

    const FRAMES: &str = "Exception raised from meta at /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:191 \
                          (most recent call first):\nframe #0: c10::Error::Error(c10::SourceLocation, \
                          std::string) + 0x98 (0x7f in libc10.so)\nframe #1: <unknown function> + 0x1";

    #[test]
    fn libtorch_backtraces_are_trimmed() {
        // A TchError's Display: real newlines.
        let error = format!("Internal torch error: mat1 and mat2 shapes cannot be multiplied (2x10 and 3x7)\n{FRAMES}");
        assert_eq!(
            without_backtrace(&error),
            "libtorch: mat1 and mat2 shapes cannot be multiplied (2x10 and 3x7)"
        );
        // tch's panicking methods: the error's Debug, newlines and quotes escaped.
        let panic = format!(
            "called `Result::unwrap()` on an `Err` value: Torch(\"size \\\"mismatch\\\"\\n{}\")",
            FRAMES.replace('\n', "\\n")
        );
        assert_eq!(without_backtrace(&panic), "libtorch: size \"mismatch\"");
        // Anything else is left alone.
        assert_eq!(without_backtrace("boom in step"), "boom in step");
        assert_eq!(
            without_backtrace("called `Result::unwrap()` on an `Err` value: Torch(\"bad\")"),
            "libtorch: bad"
        );
        assert!(!without_backtrace(FRAMES).is_empty());
    }

    #[test]
    fn dependency_locations_are_shortened() {
        assert_eq!(
            super::short_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/tch-0.24.0/src/lib.rs"
            ),
            "tch-0.24.0/src/lib.rs"
        );
        assert_eq!(super::short_path("src/lib.rs"), "src/lib.rs");
    }
}
