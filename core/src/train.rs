//! The training loop: a run set up from its config (data, model, components), its epochs and
//! steps with their events, evaluation, and the state a checkpoint holds. The commands that
//! drive it are in [`crate::commands`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};
use trellis_sdk::{
    Batch, Boundary, Callback, Distiller, EpochInfo, Events, GroupRate, GroupSpec, Host, Metric,
    Optimizer, Outputs, ParamGroup, Role, SchedulePoint, Scheduler, State, StepControl, StepInfo,
};

use crate::checkpoint::TrainingState;
use crate::config::{component_text, DeviceChoice, LoadedConfig, Loss, TablePath};
use crate::data::{self, Dataset, Loader, LoaderOptions, Normalize, Shard};
use crate::distributed::Dist;
use crate::models::{ModelSpec, Network};
use crate::plugin_host::{Component, Registry};
use crate::prune::{Masks, Pruning};
use crate::report::Progress;
use crate::services::{build_network, RunHost, RunState, SharedModel};

pub fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Auto => Device::cuda_if_available(),
        DeviceChoice::Cuda => {
            if !tch::Cuda::is_available() {
                bail!(
                    "train.device = \"cuda\" but libtorch sees no CUDA device\n  help: use device = \"cpu\" \
                     or \"auto\", or check the driver with nvidia-smi"
                );
            }
            Device::Cuda(0)
        }
    })
}

/// A callback and the events it asked for (asked once, so an event nobody wants costs nothing).
pub struct Hooked {
    pub callback: Box<dyn Callback>,
    pub events: Events,
}

/// The components of a run, created from the config.
pub struct Components {
    pub optimizer: Box<dyn Optimizer>,
    pub scheduler: Option<Box<dyn Scheduler>>,
    pub distillers: Vec<Box<dyn Distiller>>,
    pub metrics: Vec<Box<dyn Metric>>,
    pub callbacks: Vec<Hooked>,
}

/// Loads the plugin manifest the config (or `--manifest`) names.
pub fn load_registry(cfg: &LoadedConfig, manifest: Option<&Path>) -> Result<Registry> {
    let manifest = match manifest {
        Some(m) => m.to_path_buf(),
        None => match &cfg.config.plugins {
            Some(p) => cfg.resolve(p),
            None => {
                return Err(cfg.source.error(
                    "the config names components but no plugin manifest\n  help: add `plugins = \"plugins.toml\"` \
                     at the top (relative to the config) or pass --manifest",
                ))
            }
        },
    };
    Registry::load(&manifest).with_context(|| {
        format!(
            "while loading the plugins of {}",
            cfg.source.path().display()
        )
    })
}

/// Builds the run's network, pointing errors at `[model]`.
fn build_model(cfg: &LoadedConfig, registry: &Registry, host: &RunHost) -> Result<Network> {
    let spec = &cfg.config.model;
    if let ModelSpec::Plugin(m) = spec {
        if !cfg.config.train.autocast.is_off() {
            return Err(cfg.error_at(
                &[
                    crate::source::Seg::Key("train"),
                    crate::source::Seg::Key("autocast"),
                ],
                &format!(
                    "train.autocast applies to the built-in architectures; model `{}` is a plugin's \
                     and computes in its weights' dtype",
                    m.component
                ),
                Some("remove train.autocast, or use a built-in `arch`"),
            ));
        }
        if !registry.provides(Role::Model, &m.component) {
            return Err(cfg.use_error(
                &TablePath::Model,
                &registry.unknown(Role::Model, &m.component),
            ));
        }
    }
    build_network(spec, host).map_err(|e| match spec {
        ModelSpec::Plugin(_) => cfg.component_error(&TablePath::Model, e),
        ModelSpec::Builtin(_) => {
            cfg.error_at(&[crate::source::Seg::Key("model")], &format!("{e:#}"), None)
        }
    })
}

/// Creates every component the config names, except the model (built first) and the pruner
/// (created when pruning happens, in [`crate::prune`]).
pub fn create_components(
    cfg: &LoadedConfig,
    registry: &Registry,
    host: &RunHost,
) -> Result<Components> {
    let mut optimizer = None;
    let mut scheduler = None;
    let mut distillers = Vec::new();
    let mut metrics = Vec::new();
    let mut callbacks = Vec::new();
    for (table, name, options) in cfg.components() {
        let role = table.role();
        if matches!(role, Role::Pruner | Role::Model) {
            continue;
        }
        if !registry.provides(role, name) {
            return Err(cfg.use_error(&table, &registry.unknown(role, name)));
        }
        let text = component_text(&options)?;
        let component = registry
            .create(role, name, &text, Host::new(host.clone()))
            .map_err(|e| cfg.component_error(&table, e))?;
        match component {
            Component::Optimizer(_) => optimizer = component.into_optimizer(),
            Component::Scheduler(_) => scheduler = component.into_scheduler(),
            Component::Distiller(_) => distillers.extend(component.into_distiller()),
            Component::Metric(_) => metrics.extend(component.into_metric()),
            Component::Callback(_) => {
                let callback = component.into_callback().expect("matched a callback");
                let events = callback.events();
                callbacks.push(Hooked { callback, events });
            }
            Component::Pruner(_) | Component::Model(_) => {}
        }
    }
    let optimizer = optimizer.ok_or_else(|| anyhow!("no optimizer was created"))?;
    Ok(Components {
        optimizer,
        scheduler,
        distillers,
        metrics,
        callbacks,
    })
}

fn sdk_error(e: trellis_sdk::Error) -> anyhow::Error {
    anyhow!(e.message)
}

/// Parameter groups: the scheduler's (if any), `rest` for parameters it left out, and one group
/// per distiller that brings trainable parameters.
fn build_groups(
    model: &Network,
    specs: Vec<GroupSpec>,
    extra: &[(String, Vec<(String, Tensor)>)],
    lr: f64,
    weight_decay: f64,
) -> Result<Vec<ParamGroup>> {
    let params: BTreeMap<String, Tensor> = model
        .parameters()
        .into_iter()
        .map(|(name, _, t)| (name, t))
        .collect();
    let mut taken = std::collections::BTreeSet::new();
    let mut groups = Vec::new();
    for spec in specs {
        let mut members = Vec::new();
        for name in spec.params {
            let Some(t) = params.get(&name) else {
                bail!(
                    "the scheduler put unknown parameter `{name}` in group `{}`",
                    spec.name
                );
            };
            if !taken.insert(name.clone()) {
                bail!("the scheduler put parameter `{name}` in two groups");
            }
            members.push((name, t.shallow_clone()));
        }
        groups.push(ParamGroup {
            name: spec.name,
            params: members,
            lr,
            weight_decay,
        });
    }
    let scheduled = groups.len();
    let rest: Vec<(String, Tensor)> = model
        .parameters()
        .into_iter()
        .filter(|(n, _, _)| !taken.contains(n))
        .map(|(n, _, t)| (n, t))
        .collect();
    if !rest.is_empty() {
        groups.push(ParamGroup {
            name: if scheduled == 0 { "all" } else { "rest" }.to_string(),
            params: rest,
            lr,
            weight_decay,
        });
    }
    for (owner, params) in extra {
        if !params.is_empty() {
            groups.push(ParamGroup {
                name: owner.clone(),
                params: params
                    .iter()
                    .map(|(n, t)| (format!("{owner}.{n}"), t.shallow_clone()))
                    .collect(),
                lr,
                weight_decay,
            });
        }
    }
    Ok(groups)
}

/// The loss the host trains on without distillers: cross-entropy against class indices
/// (`[B]`, int64) or against soft, per-class probabilities (`[B, classes]`, float) that a
/// callback made (mixup, label smoothing); with `Loss::Bce`, the mean sigmoid binary
/// cross-entropy of a single logit `[B, 1]` against the probability of class 1 (the label, or
/// the second column of soft targets).
pub fn task_loss(loss: Loss, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if loss == Loss::Bce {
        return binary_task_loss(logits, targets);
    }
    if targets.dim() == 2 {
        if targets.size() != logits.size() {
            bail!(
                "soft targets of shape {:?} do not match the logits {:?}\n  help: a callback's batch \
                 must keep one row per image and one column per class",
                targets.size(),
                logits.size()
            );
        }
        let kind = logits.kind();
        let log_probs = logits.log_softmax(-1, kind);
        return Ok(-(targets.to_kind(kind) * log_probs)
            .sum_dim_intlist(-1, false, kind)
            .mean(kind));
    }
    Ok(logits.cross_entropy_for_logits(targets))
}

fn binary_task_loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let batch = logits.size()[0];
    if logits.size() != [batch, 1] {
        bail!(
            "loss = \"bce\" needs a single logit per image, but the model gives {:?}\n  help: \
             set `outputs = 1` in the model's [model] table",
            logits.size()
        );
    }
    let kind = logits.kind();
    let positive = match targets.dim() {
        1 => targets.to_kind(kind),
        2 if targets.size() == [batch, 2] => targets.select(1, 1).to_kind(kind),
        _ => bail!(
            "loss = \"bce\" takes labels [B] or two-class soft targets [B, 2], got {:?}",
            targets.size()
        ),
    };
    Ok(logits
        .squeeze_dim(1)
        .binary_cross_entropy_with_logits::<Tensor>(&positive, None, None, tch::Reduction::Mean))
}

/// The loop's state between steps.
pub(crate) struct Trainer<'a> {
    pub(crate) cfg: &'a LoadedConfig,
    state: Rc<RunState>,
    pub(crate) model: Rc<SharedModel>,
    components: Components,
    pub(crate) groups: Vec<(String, Vec<String>)>,
    /// How many leading groups belong to the scheduler.
    scheduled_groups: usize,
    pub(crate) rates: Vec<f64>,
    all_params: Vec<Tensor>,
    distiller_params: Vec<(String, Vec<(String, Tensor)>)>,
    pub(crate) steps_per_epoch: u64,
    pub(crate) step: u64,
    /// The training set where the loader reads it: on the GPU for a GPU run, uploaded once.
    loader_data: Rc<Dataset>,
    /// The next epoch's loader, started before evaluation.
    next_loader: Option<(usize, Loader)>,
    pub(crate) pruning: Option<Pruning>,
    /// `trellis prune`: end the epoch as soon as the masks are in force.
    pub(crate) stop_when_pruned: bool,
    /// Whether the last epoch's progress was shown, so evaluation shows its own.
    show_progress: bool,
    /// Set by SIGINT or SIGTERM (`trellis run`): the epoch ends with [`Interrupted`] before
    /// its next step, the step under way finished.
    pub(crate) interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The other ranks of a data-parallel run ([`crate::distributed`]).
    pub(crate) dist: Option<Rc<Dist>>,
}

/// The error [`Trainer::train_epoch`] ends with when [`Trainer::interrupt`] is set.
#[derive(Debug)]
pub(crate) struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted between two training steps")
    }
}

impl std::error::Error for Interrupted {}

impl Trainer<'_> {
    /// Prunes if the plan says so before training step `self.step`.
    pub(crate) fn prune_if_due(&mut self) -> Result<()> {
        if let Some(p) = &mut self.pruning {
            if p.due(self.step) {
                p.prune(&self.state, self.step)?;
                // A pruner may draw (GraSP's re-initialised classifier, a random pruner): the
                // ranks take rank 0's masks and weights.
                if self.dist.is_some() {
                    self.synchronize("after pruning")?;
                }
            }
        }
        Ok(())
    }

    /// What every rank must hold the same: parameters, distillers' trainable parameters and
    /// the masks; with `buffers`, the batch-norm statistics too (which each rank updates from
    /// its own rows, unless `sync_bn`).
    fn replicated(&self, buffers: bool) -> Vec<Tensor> {
        let net = self.model.net();
        let mut tensors: Vec<Tensor> = net.parameters().into_iter().map(|(_, _, t)| t).collect();
        if buffers {
            tensors.extend(net.buffers().into_iter().map(|(_, t)| t));
        }
        for (_, params) in &self.distiller_params {
            tensors.extend(params.iter().map(|(_, t)| t.shallow_clone()));
        }
        if let Some(masks) = self.masks() {
            tensors.extend(masks.tensors().into_iter().map(|(_, t)| t));
        }
        tensors
    }

    /// Gives every rank rank 0's weights, buffers and masks (a no-op alone): at the start, from
    /// whatever each rank initialised or loaded, and after pruning.
    pub(crate) fn synchronize(&self, when: &str) -> Result<()> {
        if let Some(d) = &self.dist {
            d.broadcast_from_rank0(&self.replicated(true))
                .with_context(|| format!("while giving every rank rank 0's weights {when}"))?;
        }
        Ok(())
    }

    pub(crate) fn masks(&self) -> Option<&Masks> {
        self.pruning.as_ref().and_then(|p| p.masks.as_ref())
    }

    fn base_rate(&self) -> f64 {
        let c = &self.cfg.config;
        c.schedule.rate(
            c.optimizer.lr,
            self.step,
            self.steps_per_epoch,
            c.train.epochs,
        )
    }

    /// Asks the schedule (and the scheduler, if any) for rates and hands changes to the optimizer.
    fn update_rates(&mut self, boundary: Boundary, epoch: usize) -> Result<()> {
        let base = self.base_rate();
        let mut rates = vec![base; self.groups.len()];
        if let Some(s) = &mut self.components.scheduler {
            let point = SchedulePoint {
                boundary,
                epoch: epoch as u64,
                epochs: self.cfg.config.train.epochs as u64,
                step: self.step,
                steps_per_epoch: self.steps_per_epoch,
                base_lr: base,
            };
            match s.learning_rates(point).map_err(sdk_error)? {
                Some(scheduled) => {
                    if scheduled.len() != self.scheduled_groups {
                        bail!(
                            "the scheduler returned {} rates for its {} parameter groups",
                            scheduled.len(),
                            self.scheduled_groups
                        );
                    }
                    if let Some(bad) = scheduled.iter().find(|r| !r.is_finite() || **r < 0.0) {
                        bail!("the scheduler returned the learning rate {bad}");
                    }
                    rates[..self.scheduled_groups].copy_from_slice(&scheduled);
                }
                None => rates[..self.scheduled_groups]
                    .copy_from_slice(&self.rates[..self.scheduled_groups]),
            }
        }
        // The first call publishes the rates even if unchanged: metrics read them from epoch 1.
        if rates != self.rates || self.state.rates.borrow().is_empty() {
            self.components
                .optimizer
                .set_learning_rates(&rates)
                .map_err(sdk_error)?;
            *self.state.rates.borrow_mut() = self
                .groups
                .iter()
                .zip(&rates)
                .map(|((name, params), lr)| GroupRate {
                    name: name.clone(),
                    lr: *lr,
                    params: params.clone(),
                })
                .collect();
            self.rates = rates;
        }
        Ok(())
    }

    fn zero_grad(&mut self) {
        for p in &mut self.all_params {
            p.zero_grad();
        }
    }

    /// One training epoch; returns the mean training loss and the data-wait count.
    pub(crate) fn train_epoch(
        &mut self,
        epoch: usize,
        progress: &mut Progress,
    ) -> Result<(f64, usize)> {
        let c = &self.cfg.config;
        let per_step = self.components.scheduler.is_some()
            || c.schedule.granularity() == crate::schedule::Granularity::Step
            || c.schedule.warmup_epochs > 0;
        self.update_rates(Boundary::EpochStart, epoch)?;
        self.model.set_training(true);
        for d in &mut self.components.distillers {
            d.set_training(true).map_err(sdk_error)?;
        }
        let mut loader = match self.next_loader.take() {
            Some((e, loader)) if e == epoch => loader,
            _ => self.train_loader(epoch),
        };
        progress.start_epoch(epoch + 1, c.train.epochs, self.steps_per_epoch);
        self.show_progress = progress.is_shown();
        let mut replace_task_loss = false;
        for d in &self.components.distillers {
            replace_task_loss |= d.replaces_task_loss().map_err(sdk_error)?;
        }
        // Accumulated on the device and read once per log interval: no sync per step on a GPU;
        // on the CPU reading it costs nothing, so the bar shows the loss after every step.
        let check_every = match self.state.device {
            Device::Cpu => 1,
            _ => 50,
        };
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.state.device));
        let mut samples = 0i64;
        let mut since_check = 0;
        // With other ranks, each rank stops where all agreed to (the step after any of them was
        // interrupted), so every rank issues the same collectives.
        let mut stop_agreed = false;
        let has_next_epoch = epoch + 1 < c.train.epochs && !self.stop_when_pruned;
        for (i, batch) in loader.by_ref().enumerate() {
            let stop = match &self.dist {
                None => self.interrupted_here(),
                Some(_) => stop_agreed,
            };
            if stop {
                progress.finish_epoch();
                return Err(Interrupted.into());
            }
            self.prune_if_due()?;
            if self.stop_when_pruned && self.masks().is_some() {
                break;
            }
            // The next epoch's loader starts while this one's last batches are taken, so that
            // the next epoch's first step finds its batch ready, with or without an evaluation
            // in between (a loader's batches depend on (seed, epoch) only).
            if has_next_epoch
                && self.next_loader.is_none()
                && (i + crate::data::PREFETCH) as u64 >= self.steps_per_epoch
            {
                self.next_loader = Some((epoch + 1, self.train_loader(epoch + 1)));
            }
            if per_step && i > 0 {
                self.update_rates(Boundary::Step, epoch)?;
            }
            let at = self.step_info(epoch);
            self.state.progress.set(at);
            let mut batch = Batch {
                inputs: batch.inputs,
                targets: batch.targets,
            };
            for h in self.callbacks_for(Events::BATCH_START) {
                batch = h.callback.batch_start(batch, at).map_err(sdk_error)?;
            }
            let loss = self.forward_backward(&batch, replace_task_loss, at)?;
            let n = batch.targets.size()[0];
            for h in self.callbacks_for(Events::AFTER_BACKWARD) {
                h.callback.after_backward(at).map_err(sdk_error)?;
            }
            self.optimizer_step(&batch, replace_task_loss, at)?;
            // Momentum and weight decay move pruned weights off zero; put them back.
            if let Some(masks) = self.masks() {
                masks.apply();
            }
            for h in self.callbacks_for(Events::AFTER_STEP) {
                h.callback.after_step(at).map_err(sdk_error)?;
            }
            self.step += 1;
            samples += n;
            loss_sum += loss.to_kind(Kind::Double) * n as f64;
            progress.step();
            since_check += 1;
            if since_check == check_every {
                since_check = 0;
                let (sum, count, stop) = self.epoch_loss(&loss_sum, samples)?;
                stop_agreed = stop;
                let mean = sum / count;
                check_finite(mean, epoch, self.step)?;
                progress.message(format!("loss {mean:.4}"));
            }
        }
        progress.finish_epoch();
        let (sum, count, _) = self.epoch_loss(&loss_sum, samples)?;
        let mean = sum / count.max(1.0);
        check_finite(mean, epoch, self.step)?;
        if let Some(d) = &self.dist {
            d.check_identical(
                &self.replicated(false),
                &format!("after epoch {}", epoch + 1),
            )?;
        }
        if !self.stop_when_pruned {
            let info = self.epoch_info(epoch + 1);
            for h in self.callbacks_for(Events::EPOCH_END) {
                h.callback.epoch_end(info).map_err(sdk_error)?;
            }
        }
        Ok((mean, loader.waits()))
    }

    fn interrupted_here(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The loss summed over the epoch's samples so far, their number, and whether a rank was
    /// interrupted: over every rank of a data-parallel run (one small all-reduce), which then
    /// all see the same loss, stop at the same step and fail on the same NaN.
    fn epoch_loss(&self, loss_sum: &Tensor, samples: i64) -> Result<(f64, f64, bool)> {
        let here = (loss_sum.double_value(&[]), samples as f64);
        match &self.dist {
            None => Ok((here.0, here.1, self.interrupted_here())),
            Some(d) => {
                let flag = f64::from(u8::from(self.interrupted_here()));
                let all = d.sum(&[here.0, here.1, flag])?;
                Ok((all[0], all[1], all[2] > 0.0))
            }
        }
    }

    fn step_info(&self, epoch: usize) -> StepInfo {
        StepInfo {
            epoch: epoch as u64,
            epochs: self.cfg.config.train.epochs as u64,
            step: self.step,
            steps_per_epoch: self.steps_per_epoch,
        }
    }

    fn epoch_info(&self, done: usize) -> EpochInfo {
        EpochInfo {
            epoch: done as u64,
            epochs: self.cfg.config.train.epochs as u64,
            step: self.step,
        }
    }

    /// The callbacks that asked for `event`, in config order.
    fn callbacks_for(&mut self, event: Events) -> impl Iterator<Item = &mut Hooked> {
        self.components
            .callbacks
            .iter_mut()
            .filter(move |h| h.events.contains(event))
    }

    /// Forward, loss (task, distillers' terms, callbacks' terms), backward and the masks on the
    /// gradients. Returns the loss, detached.
    fn forward_backward(
        &mut self,
        batch: &Batch,
        replace_task_loss: bool,
        at: StepInfo,
    ) -> Result<Tensor> {
        let rows = batch.targets.size()[0];
        let autocast = self.cfg.config.train.autocast.kind();
        let model = &self.model;
        let forward = || crate::models::autocast(autocast, || model.forward(&batch.inputs));
        let (logits, features) = match &self.dist {
            Some(d) if self.cfg.config.distributed.sync_bn => {
                crate::models::sync_batch_norm(d, forward)??
            }
            _ => forward()?,
        };
        let mut loss = if replace_task_loss {
            Tensor::zeros([], (Kind::Float, self.state.device))
        } else {
            task_loss(self.cfg.config.train.loss, &logits, &batch.targets)?
        };
        let wants_outputs = !self.components.distillers.is_empty()
            || self
                .components
                .callbacks
                .iter()
                .any(|h| h.events.contains(Events::AFTER_LOSS));
        if wants_outputs {
            let outputs = Outputs { logits, features };
            for d in &mut self.components.distillers {
                for (_, term) in d.loss(batch, &outputs).map_err(sdk_error)? {
                    loss = &loss + term;
                }
            }
            for h in self.callbacks_for(Events::AFTER_LOSS) {
                let terms = h
                    .callback
                    .after_loss(batch, &outputs, &loss, at)
                    .map_err(sdk_error)?;
                for (_, term) in terms {
                    loss = &loss + term;
                }
            }
        }
        self.zero_grad();
        match &self.dist {
            None => loss.backward(),
            Some(d) => {
                // Each rank's loss weighted by its share of the global batch: the sum over the
                // ranks is the global batch's loss, whose gradient the all-reduce sums. (Scaled
                // here rather than the gradients after, so that what sync batch norm's backward
                // all-reduces is in the same units on every rank.)
                let share = d.gradient_share(rows, self.global_rows());
                (&loss * share)
                    .f_backward()
                    .map_err(|e| anyhow!("backward pass: {e}"))?;
            }
        }
        if let Some(masks) = self.masks() {
            masks.mask_gradients();
        }
        if let Some(d) = &self.dist {
            d.reduce_gradients(&self.all_params)?;
        }
        Ok(loss.detach())
    }

    /// The optimizer's step, unless a callback takes it over. The callback stepping is out of
    /// the list while it runs, so the passes it asks for see the others' loss terms, not its own.
    fn optimizer_step(
        &mut self,
        batch: &Batch,
        replace_task_loss: bool,
        at: StepInfo,
    ) -> Result<()> {
        for i in 0..self.components.callbacks.len() {
            if !self.components.callbacks[i]
                .events
                .contains(Events::OPTIMIZER_STEP)
            {
                continue;
            }
            let mut hooked = self.components.callbacks.remove(i);
            let mut control = HostStep {
                trainer: self,
                batch,
                replace_task_loss,
                at,
            };
            let took_over = hooked.callback.optimizer_step(&mut control, at);
            self.components.callbacks.insert(i, hooked);
            if took_over.map_err(sdk_error)? {
                return Ok(());
            }
        }
        self.components.optimizer.step().map_err(sdk_error)
    }

    /// The rows of the global batch this step trains on: `train.batch_size`, except a short
    /// final batch of the epoch.
    fn global_rows(&self) -> i64 {
        let t = &self.cfg.config.train;
        let n = self.loader_data.len();
        let last = self.step % self.steps_per_epoch == self.steps_per_epoch - 1;
        if last && !t.drop_last && !n.is_multiple_of(t.batch_size) {
            (n % t.batch_size) as i64
        } else {
            t.batch_size as i64
        }
    }

    fn train_loader(&self, epoch: usize) -> Loader {
        let c = &self.cfg.config;
        let shard = match &self.dist {
            Some(d) => Shard::Rows {
                rank: d.rank(),
                world: d.world_size(),
            },
            None => Shard::Whole,
        };
        Loader::sharded(
            self.loader_data.clone(),
            LoaderOptions {
                batch_size: c.train.batch_size,
                shuffle: true,
                augment: c.data.augment,
                drop_last: c.train.drop_last,
                seed: c.train.seed,
                epoch,
                device: self.state.device,
                normalize: self.state.normalize.clone(),
            },
            shard,
        )
    }

    pub(crate) fn evaluate(
        &mut self,
        test: &Rc<Dataset>,
        info: EpochInfo,
    ) -> Result<(BTreeMap<String, f64>, Vec<trellis_sdk::Table>)> {
        let c = &self.cfg.config;
        self.model.set_training(false);
        for d in &mut self.components.distillers {
            d.set_training(false).map_err(sdk_error)?;
        }
        for h in self.callbacks_for(Events::EVAL) {
            h.callback.eval_start(info).map_err(sdk_error)?;
        }
        // A metric with `every` sits out the evaluations between its epochs.
        let due: Vec<bool> = c
            .metrics
            .iter()
            .map(|m| m.due(info.epoch, info.epochs))
            .collect();
        let mut wants_batches = Vec::new();
        for (m, due) in self.components.metrics.iter_mut().zip(&due) {
            if *due {
                m.reset().map_err(sdk_error)?;
            }
            wants_batches.push(*due && m.wants_batches().map_err(sdk_error)?);
        }
        if wants_batches.contains(&true) {
            let _no_grad = tch::no_grad_guard();
            // DistributedDataParallel's ranks keep rank 0's batch-norm statistics.
            if let Some(d) = &self.dist {
                let buffers: Vec<Tensor> = self
                    .model
                    .net()
                    .buffers()
                    .into_iter()
                    .map(|(_, t)| t)
                    .collect();
                d.broadcast_from_rank0(&buffers)
                    .context("while giving every rank rank 0's batch-norm statistics")?;
            }
            let (rank, world) = self
                .dist
                .as_ref()
                .map_or((0, 1), |d| (d.rank(), d.world_size()));
            let mut loader = Loader::sharded(
                test.clone(),
                LoaderOptions {
                    batch_size: c.train.eval_batch_size,
                    shuffle: false,
                    augment: false,
                    drop_last: false,
                    seed: c.train.seed,
                    epoch: 0,
                    device: self.state.device,
                    normalize: self.state.normalize.clone(),
                },
                if world > 1 {
                    Shard::Batches { rank, world }
                } else {
                    Shard::Whole
                },
            );
            let batches = Loader::batches_per_epoch(test.len(), c.train.eval_batch_size, false);
            let mut progress = Progress::new(self.show_progress);
            progress.start_evaluation(batches as u64);
            // Each round, every rank evaluates one batch; all of them then feed every rank's
            // metrics in the one-process order.
            for _ in 0..batches.div_ceil(world) {
                let mine = match loader.next() {
                    Some(batch) => {
                        let model = &self.model;
                        let (logits, features) =
                            crate::models::autocast(c.train.autocast.kind(), || {
                                model.forward(&batch.inputs)
                            })?;
                        Some((
                            Batch {
                                inputs: batch.inputs,
                                targets: batch.targets,
                            },
                            Outputs { logits, features },
                        ))
                    }
                    None => None,
                };
                let round = match &self.dist {
                    None => vec![mine],
                    Some(d) => gather_evaluated(d, mine)
                        .context("while gathering the ranks' evaluation batches")?,
                };
                for (batch, outputs) in round.into_iter().flatten() {
                    let metrics = self.components.metrics.iter_mut().zip(&wants_batches);
                    for (m, _) in metrics.filter(|(_, wants)| **wants) {
                        m.update(&batch, &outputs).map_err(sdk_error)?;
                    }
                    progress.step();
                }
            }
            progress.finish_epoch();
        }
        let mut scalars = BTreeMap::new();
        let mut tables = Vec::new();
        for (m, _) in self
            .components
            .metrics
            .iter_mut()
            .zip(&due)
            .filter(|(_, d)| **d)
        {
            let values = m.compute(info).map_err(sdk_error)?;
            scalars.extend(values.scalars);
            tables.extend(values.tables);
        }
        for h in self.callbacks_for(Events::EVAL) {
            h.callback.eval_end(info).map_err(sdk_error)?;
        }
        Ok((scalars, tables))
    }

    pub(crate) fn training_state(&self, epoch: usize) -> Result<TrainingState> {
        let mut parts = BTreeMap::new();
        let state_of = |s: State| (s.tensors, s.meta);
        parts.insert(
            "optimizer".to_string(),
            state_of(self.components.optimizer.state().map_err(sdk_error)?),
        );
        if let Some(s) = &self.components.scheduler {
            parts.insert(
                "scheduler".to_string(),
                state_of(s.state().map_err(sdk_error)?),
            );
        }
        for (i, d) in self.components.distillers.iter().enumerate() {
            parts.insert(
                format!("distiller.{i}"),
                state_of(d.state().map_err(sdk_error)?),
            );
        }
        for (i, h) in self.components.callbacks.iter().enumerate() {
            parts.insert(
                format!("callback.{i}"),
                state_of(h.callback.state().map_err(sdk_error)?),
            );
        }
        for (owner, params) in &self.distiller_params {
            let tensors = params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            parts.insert(format!("params.{owner}"), (tensors, String::new()));
        }
        if let Some(part) = self.pruning.as_ref().and_then(Pruning::checkpoint_part) {
            parts.insert("masks".to_string(), part);
        }
        Ok(TrainingState {
            epoch,
            step: self.step,
            parts,
        })
    }

    pub(crate) fn restore(&mut self, mut state: TrainingState) -> Result<()> {
        let mut take = |key: &str| {
            state
                .parts
                .remove(key)
                .map(|(tensors, meta)| State { tensors, meta })
                .unwrap_or_default()
        };
        self.components
            .optimizer
            .load_state(take("optimizer"))
            .map_err(sdk_error)?;
        if let Some(s) = &mut self.components.scheduler {
            s.load_state(take("scheduler")).map_err(sdk_error)?;
        }
        for (i, d) in self.components.distillers.iter_mut().enumerate() {
            d.load_state(take(&format!("distiller.{i}")))
                .map_err(sdk_error)?;
        }
        for (i, h) in self.components.callbacks.iter_mut().enumerate() {
            h.callback
                .load_state(take(&format!("callback.{i}")))
                .map_err(sdk_error)?;
        }
        for (owner, params) in &self.distiller_params {
            let saved: BTreeMap<String, Tensor> = take(&format!("params.{owner}"))
                .tensors
                .into_iter()
                .collect();
            for (name, t) in params {
                let Some(s) = saved.get(name) else {
                    bail!("the checkpoint has no value for {owner}.{name}");
                };
                tch::no_grad(|| t.shallow_clone().copy_(s));
            }
        }
        let masks = take("masks");
        match &mut self.pruning {
            Some(p) if !masks.tensors.is_empty() => {
                p.restore(&self.state, masks.tensors, &masks.meta)?
            }
            Some(p) if state.step > p.at_step => bail!(
                "the checkpoint (step {}) is past [pruner] at_step = {} but holds no masks\n  help: the \
                 config changed since the run started; resume with the run directory's config.toml",
                state.step,
                p.at_step
            ),
            None if !masks.tensors.is_empty() => bail!(
                "the checkpoint holds pruning masks but the config has no [pruner]\n  help: resume with \
                 the run directory's config.toml, which the run started with"
            ),
            _ => {}
        }
        self.step = state.step;
        Ok(())
    }
}

/// Every rank's evaluated batch of a round (or nothing, past the last batch), in rank order:
/// batch `b` is rank `b % world`'s, so this is the one-process order.
fn gather_evaluated(
    dist: &Dist,
    mine: Option<(Batch, Outputs)>,
) -> Result<Vec<Option<(Batch, Outputs)>>> {
    let part = |f: fn(&(Batch, Outputs)) -> &Tensor| dist.gather_rows(mine.as_ref().map(f));
    let inputs = part(|(b, _)| &b.inputs)?;
    let targets = part(|(b, _)| &b.targets)?;
    let logits = part(|(_, o)| &o.logits)?;
    let features = part(|(_, o)| &o.features)?;
    Ok(inputs
        .into_iter()
        .zip(targets)
        .zip(logits.into_iter().zip(features))
        .map(|((inputs, targets), (logits, features))| {
            Some((
                Batch {
                    inputs: inputs?,
                    targets: targets?,
                },
                Outputs {
                    logits: logits?,
                    features: features?,
                },
            ))
        })
        .collect())
}

fn check_finite(loss: f64, epoch: usize, step: u64) -> Result<()> {
    if !loss.is_finite() {
        bail!(
            "the training loss became {loss} in epoch {} (by step {step})\n  help: nothing after the last \
             checkpoint was saved; lower optimizer.lr, add warm-up ([schedule] warmup_epochs), or check the data",
            epoch + 1
        );
    }
    Ok(())
}

/// A run set up to its first step: data, model, components and the loop's state. `trellis run`
/// trains it; `trellis prune` takes it only as far as its pruning point.
pub(crate) struct Prepared<'a> {
    pub(crate) trainer: Trainer<'a>,
    pub(crate) registry: Rc<Registry>,
    pub(crate) model: Rc<SharedModel>,
    pub(crate) train_data: Rc<Dataset>,
    pub(crate) test_data: Rc<Dataset>,
    pub(crate) device: Device,
}

/// A run's data, host and model, before any other component exists.
struct ModelSetup {
    state: Rc<RunState>,
    host: RunHost,
    registry: Rc<Registry>,
    model: Rc<SharedModel>,
    train_data: Rc<Dataset>,
    test_data: Rc<Dataset>,
    device: Device,
}

fn setup_model(
    cfg: &LoadedConfig,
    manifest: Option<&Path>,
    run_dir: Option<PathBuf>,
    dist: Option<&Dist>,
) -> Result<ModelSetup> {
    let c = &cfg.config;
    if c.train.threads > 0 {
        tch::set_num_threads(c.train.threads as i32);
    }
    let device = match (resolve_device(c.train.device)?, dist) {
        // One GPU per rank on each machine, as torchrun's LOCAL_RANK says.
        (Device::Cuda(_), Some(d)) => Device::Cuda(d.world().local_rank),
        (device, _) => device,
    };

    tch::manual_seed(c.train.seed as i64);
    let splits = data::load(&c.data, &cfg.dir(), c.train.seed)?;
    let normalize: Normalize = splits.normalize();
    let num_classes = splits.train.num_classes;
    if c.train.loss == Loss::Bce && num_classes != 2 {
        return Err(cfg.error_at(
            &[
                crate::source::Seg::Key("train"),
                crate::source::Seg::Key("loss"),
            ],
            &format!(
                "loss = \"bce\" is for two-class data, but this dataset has {num_classes} classes"
            ),
            Some("add `cifar2 = true` under [data] to relabel a ten-class set as CIFAR-2"),
        ));
    }
    let train_data = Rc::new(splits.train);
    let test_data = Rc::new(splits.test);
    let state = RunState::new(
        num_classes,
        device,
        c.train.seed,
        train_data.clone(),
        c.train.batch_size,
        c.data.augment,
        normalize,
        run_dir,
        cfg.dir(),
    );
    if let Some(d) = dist {
        state.world.set((d.rank() as u32, d.world_size() as u32));
    }
    let host = RunHost(state.clone());
    let registry = Rc::new(load_registry(cfg, manifest)?);
    *state.registry.borrow_mut() = Some(registry.clone());
    let model = SharedModel::new(build_model(cfg, &registry, &host)?);
    state.set_model(model.clone());
    Ok(ModelSetup {
        state,
        host,
        registry,
        model,
        train_data,
        test_data,
        device,
    })
}

/// The network a run config describes, as initialised (plugin models through their plugins),
/// for loading a saved `model.safetensors` into.
pub(crate) fn build_run_model(
    cfg: &LoadedConfig,
    manifest: Option<&Path>,
) -> Result<Rc<SharedModel>> {
    Ok(setup_model(cfg, manifest, None, None)?.model)
}

/// `dist`: the other ranks of a data-parallel run; the trainer trains its shard with them.
pub(crate) fn prepare<'a>(
    cfg: &'a LoadedConfig,
    manifest: Option<&Path>,
    run_dir: Option<PathBuf>,
    dist: Option<Rc<Dist>>,
) -> Result<Prepared<'a>> {
    let c = &cfg.config;
    let ModelSetup {
        state,
        host,
        registry,
        model,
        train_data,
        test_data,
        device,
    } = setup_model(cfg, manifest, run_dir, dist.as_deref())?;
    let mut components = create_components(cfg, &registry, &host)?;

    // Parameter groups.
    let specs = match &mut components.scheduler {
        Some(s) => s.param_groups().map_err(sdk_error)?,
        None => Vec::new(),
    };
    let scheduled_groups = specs.len();
    let mut distiller_params = Vec::new();
    for (i, d) in components.distillers.iter_mut().enumerate() {
        let params = d.trainable_parameters().map_err(sdk_error)?;
        distiller_params.push((format!("distiller.{i}"), params));
    }
    let groups = build_groups(
        &model.net(),
        specs,
        &distiller_params,
        c.optimizer.lr,
        c.optimizer.weight_decay,
    )?;
    let group_names: Vec<(String, Vec<String>)> = groups
        .iter()
        .map(|g| {
            (
                g.name.clone(),
                g.params.iter().map(|(n, _)| n.clone()).collect(),
            )
        })
        .collect();
    let all_params: Vec<Tensor> = groups
        .iter()
        .flat_map(|g| g.params.iter().map(|(_, t)| t.shallow_clone()))
        .collect();
    *state.optimized.borrow_mut() = groups
        .iter()
        .flat_map(|g| g.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
        .collect();
    let initial_rates: Vec<f64> = groups.iter().map(|g| g.lr).collect();
    components
        .optimizer
        .set_param_groups(groups)
        .map_err(sdk_error)?;

    let steps_per_epoch =
        Loader::batches_per_epoch(train_data.len(), c.train.batch_size, c.train.drop_last) as u64;
    if steps_per_epoch == 0 {
        bail!(
            "the training set ({} images) gives no batch of {} with drop_last",
            train_data.len(),
            c.train.batch_size
        );
    }
    if let Some(d) = &dist {
        check_every_rank_gets_rows(cfg, train_data.len(), d.world_size())?;
    }
    let total_steps = steps_per_epoch * c.train.epochs as u64;
    let pruning = Pruning::setup(cfg, &registry, &host, total_steps)?;
    let trainer = Trainer {
        cfg,
        state,
        model: model.clone(),
        components,
        groups: group_names,
        scheduled_groups,
        rates: initial_rates,
        all_params,
        distiller_params,
        steps_per_epoch,
        step: 0,
        loader_data: resident(&train_data, device),
        next_loader: None,
        pruning,
        stop_when_pruned: false,
        show_progress: false,
        interrupt: None,
        dist,
    };
    Ok(Prepared {
        trainer,
        registry,
        model,
        test_data: resident(&test_data, device),
        train_data,
        device,
    })
}

/// Refuses a global batch (or a short last batch) with fewer rows than ranks: a rank without
/// rows would have no forward pass to take part in (sync batch norm's collectives) and no
/// gradient to contribute.
fn check_every_rank_gets_rows(cfg: &LoadedConfig, images: usize, world: usize) -> Result<()> {
    let t = &cfg.config.train;
    let last = images % t.batch_size;
    let (rows, what) = if t.batch_size < world {
        (t.batch_size, "train.batch_size".to_string())
    } else if !t.drop_last && last != 0 && last < world {
        (
            last,
            format!("the last batch of an epoch ({images} images)"),
        )
    } else {
        return Ok(());
    };
    Err(cfg.error_at(
        &[
            crate::source::Seg::Key("train"),
            crate::source::Seg::Key("batch_size"),
        ],
        &format!("{what} has {rows} rows, fewer than the {world} ranks: some would train on none"),
        Some(&format!(
            "use a batch of at least {world} rows (the global batch, split between the ranks){}",
            if t.batch_size >= world {
                ", or drop_last = true"
            } else {
                ""
            }
        )),
    ))
}

/// `data` where loaders for `device` read it: a GPU run keeps the u8 images on the device, where
/// its loaders crop, flip and normalise them.
fn resident(data: &Rc<Dataset>, device: Device) -> Rc<Dataset> {
    match device {
        Device::Cpu => data.clone(),
        _ => Rc::new(data.to_device(device)),
    }
}

/// What a callback that takes over the optimizer step drives: passes over the step's batch, and
/// the configured optimizer.
struct HostStep<'t, 'a> {
    trainer: &'t mut Trainer<'a>,
    batch: &'t Batch,
    replace_task_loss: bool,
    at: StepInfo,
}

impl StepControl for HostStep<'_, '_> {
    fn recompute(&mut self) -> trellis_sdk::Result<f64> {
        let trainer = &mut *self.trainer;
        let loss = trainer
            .forward_backward(self.batch, self.replace_task_loss, self.at)
            .map_err(|e| trellis_sdk::Error::msg(format!("{e:#}")))?;
        // The gradients the step will use get what every gradient gets (clipping, say).
        for h in trainer.callbacks_for(Events::AFTER_BACKWARD) {
            h.callback.after_backward(self.at)?;
        }
        Ok(loss.double_value(&[]))
    }

    fn base_step(&mut self) -> trellis_sdk::Result<()> {
        self.trainer.components.optimizer.step()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Tensor {
        Tensor::from_slice(&[2.0f32, 0.5, -1.0, 0.1, 0.3, 1.7]).view([2, 3])
    }

    /// −log softmax(z)[k], by hand.
    fn nll(z: &[f64], k: usize) -> f64 {
        let sum: f64 = z.iter().map(|v| v.exp()).sum();
        sum.ln() - z[k]
    }

    #[test]
    fn task_loss_takes_class_indices_and_soft_targets() {
        let rows = [[2.0, 0.5, -1.0], [0.1, 0.3, 1.7]];
        let hard = task_loss(Loss::Ce, &logits(), &Tensor::from_slice(&[0i64, 2])).unwrap();
        let expected = (nll(&rows[0], 0) + nll(&rows[1], 2)) / 2.0;
        assert!((hard.double_value(&[]) - expected).abs() < 1e-6);

        // One-hot soft targets give the same loss; a mix gives the mix of the two losses
        // (cross-entropy is linear in the targets), which is what mixup's loss is.
        let one_hot = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0]).view([2, 3]);
        let soft = task_loss(Loss::Ce, &logits(), &one_hot).unwrap();
        assert!((soft.double_value(&[]) - expected).abs() < 1e-6);
        let lambda = 0.7;
        let mixed = Tensor::from_slice(&[0.7f32, 0.3, 0.0, 0.0, 0.3, 0.7]).view([2, 3]);
        let got = task_loss(Loss::Ce, &logits(), &mixed)
            .unwrap()
            .double_value(&[]);
        let want = (lambda * nll(&rows[0], 0)
            + (1.0 - lambda) * nll(&rows[0], 1)
            + lambda * nll(&rows[1], 2)
            + (1.0 - lambda) * nll(&rows[1], 1))
            / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");

        let wrong = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let err = task_loss(Loss::Ce, &logits(), &wrong)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 4]") && err.contains("[2, 3]"), "{err}");
    }

    #[test]
    fn binary_loss_is_mean_sigmoid_cross_entropy_of_one_logit() {
        let z = [1.5f64, -0.5, 0.25];
        let y = [1i64, 1, 0];
        let logits = Tensor::from_slice(&z.map(|v| v as f32)).view([3, 1]);
        // −[y log σ(z) + (1 − y) log(1 − σ(z))], by hand.
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        let by_hand: f64 = z
            .iter()
            .zip(y)
            .map(|(&z, y)| {
                -if y == 1 {
                    sigmoid(z).ln()
                } else {
                    (1.0 - sigmoid(z)).ln()
                }
            })
            .sum::<f64>()
            / 3.0;
        let hard = task_loss(Loss::Bce, &logits, &Tensor::from_slice(&y)).unwrap();
        assert!((hard.double_value(&[]) - by_hand).abs() < 1e-6);
        // Two-class soft targets: the second column is the probability of label 1.
        let soft = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0, 1.0, 0.0]).view([3, 2]);
        let got = task_loss(Loss::Bce, &logits, &soft)
            .unwrap()
            .double_value(&[]);
        assert!((got - by_hand).abs() < 1e-6);

        let err = task_loss(Loss::Bce, &logits.repeat([1, 2]), &Tensor::from_slice(&y))
            .unwrap_err()
            .to_string();
        assert!(err.contains("outputs = 1"), "{err}");
    }
}
