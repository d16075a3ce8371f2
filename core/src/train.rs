//! `trellis run`: the training loop and everything around it (components, checkpoints, logs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use trellis_sdk::{
    Batch, Boundary, Distiller, EpochInfo, GroupRate, GroupSpec, Host, Metric, Optimizer, Outputs,
    ParamGroup, Role, SchedulePoint, Scheduler, State,
};

use crate::checkpoint::{self, TrainingState};
use crate::config::{component_text, DeviceChoice, LoadedConfig};
use crate::data::{self, Dataset, Loader, LoaderOptions, Normalize};
use crate::models::Network;
use crate::plugin_host::{Component, Registry};
use crate::prune::{self, Masks, Pruning};
use crate::report::{summary_table, table_map, EpochRecord, MetricsLog, Progress};
use crate::services::{RunHost, RunState, SharedModel};

/// How `trellis run` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    /// The run directory; default `runs/<config name>-<unix time>`.
    pub out: Option<PathBuf>,
    /// A manifest to use instead of the config's `plugins`.
    pub manifest: Option<PathBuf>,
    /// Continue from the run directory's checkpoint.
    pub resume: bool,
    /// Stop (with a checkpoint) after this many epochs in total, as if interrupted.
    pub stop_after: Option<usize>,
    /// Show a progress bar when stderr is a terminal.
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub records: Vec<EpochRecord>,
    /// Whether every configured epoch ran (not stopped early by `stop_after`).
    pub finished: bool,
}

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

/// The components of a run, created from the config.
pub struct Components {
    pub optimizer: Box<dyn Optimizer>,
    pub scheduler: Option<Box<dyn Scheduler>>,
    pub distillers: Vec<Box<dyn Distiller>>,
    pub metrics: Vec<Box<dyn Metric>>,
}

/// Loads the manifest and creates every component the config names.
pub fn create_components(
    cfg: &LoadedConfig,
    manifest: Option<&Path>,
    host: &RunHost,
) -> Result<(Registry, Components)> {
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
    let registry = Registry::load(&manifest)
        .with_context(|| format!("while loading the plugins of {}", cfg.source.path.display()))?;
    let mut optimizer = None;
    let mut scheduler = None;
    let mut distillers = Vec::new();
    let mut metrics = Vec::new();
    for (table, name, options) in cfg.components() {
        let role = table.role();
        if role == Role::Pruner {
            continue; // created when pruning happens (crate::prune)
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
            Component::Pruner(_) => {}
        }
    }
    let optimizer = optimizer.ok_or_else(|| anyhow!("no optimizer was created"))?;
    Ok((
        registry,
        Components {
            optimizer,
            scheduler,
            distillers,
            metrics,
        },
    ))
}

fn sdk_error(e: trellis_sdk::Error) -> anyhow::Error {
    anyhow!(e.message)
}

#[derive(Serialize)]
struct PluginRecord<'a> {
    name: &'a str,
    version: &'a str,
    path: String,
    sha256: &'a str,
    components: Vec<String>,
}

fn default_run_dir(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{stem}-{secs}"))
}

/// The resolved config: every default filled in and paths made absolute, so the file in the
/// run directory re-runs the same run from anywhere.
fn resolved_config(cfg: &LoadedConfig) -> Result<String> {
    let mut config = cfg.config.clone();
    if let Some(p) = &config.plugins {
        config.plugins = Some(absolute(&cfg.resolve(p)));
    }
    if let Some(p) = &config.data.path {
        config.data.path = Some(absolute(&cfg.resolve(p)));
    }
    Ok(toml::to_string(&config)?)
}

fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
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

/// The loop's state between steps.
struct Trainer<'a> {
    cfg: &'a LoadedConfig,
    state: Rc<RunState>,
    components: Components,
    groups: Vec<(String, Vec<String>)>,
    /// How many leading groups belong to the scheduler.
    scheduled_groups: usize,
    rates: Vec<f64>,
    all_params: Vec<Tensor>,
    distiller_params: Vec<(String, Vec<(String, Tensor)>)>,
    steps_per_epoch: u64,
    step: u64,
    /// The training set where the loader reads it: on the GPU for a GPU run, uploaded once.
    loader_data: Rc<Dataset>,
    /// The next epoch's loader, started before evaluation.
    next_loader: Option<(usize, Loader)>,
    pruning: Option<Pruning>,
    /// `trellis prune`: end the epoch as soon as the masks are in force.
    stop_when_pruned: bool,
}

impl Trainer<'_> {
    /// Prunes if the plan says so before training step `self.step`.
    fn prune_if_due(&mut self) -> Result<()> {
        if let Some(p) = &mut self.pruning {
            if p.due(self.step) {
                p.prune(&self.state, self.step)?;
            }
        }
        Ok(())
    }

    fn masks(&self) -> Option<&Masks> {
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
    fn train_epoch(&mut self, epoch: usize, progress: &mut Progress) -> Result<(f64, usize)> {
        let c = &self.cfg.config;
        let per_step = self.components.scheduler.is_some()
            || c.schedule.granularity() == crate::schedule::Granularity::Step
            || c.schedule.warmup_epochs > 0;
        self.update_rates(Boundary::EpochStart, epoch)?;
        self.state.model.set_training(true);
        for d in &mut self.components.distillers {
            d.set_training(true);
        }
        let mut loader = match self.next_loader.take() {
            Some((e, loader)) if e == epoch => loader,
            _ => self.train_loader(epoch),
        };
        progress.start_epoch(epoch + 1, c.train.epochs, self.steps_per_epoch);
        let replace_task_loss = self
            .components
            .distillers
            .iter()
            .any(|d| d.replaces_task_loss());
        // Accumulated on the device and read once per log interval: no sync per step.
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.state.device));
        let mut samples = 0i64;
        let mut since_check = 0;
        let has_next_epoch = epoch + 1 < c.train.epochs && !self.stop_when_pruned;
        for (i, batch) in loader.by_ref().enumerate() {
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
            let batch = Batch {
                inputs: batch.inputs,
                targets: batch.targets,
            };
            let (logits, features) = crate::models::autocast(c.train.autocast.kind(), || {
                self.state.model.forward(&batch.inputs)
            });
            let mut loss = if replace_task_loss {
                Tensor::zeros([], (Kind::Float, self.state.device))
            } else {
                logits.cross_entropy_for_logits(&batch.targets)
            };
            if !self.components.distillers.is_empty() {
                let outputs = Outputs { logits, features };
                for d in &mut self.components.distillers {
                    for (_, term) in d.loss(&batch, &outputs).map_err(sdk_error)? {
                        loss = &loss + term;
                    }
                }
            }
            self.zero_grad();
            loss.backward();
            if let Some(masks) = self.masks() {
                masks.mask_gradients();
            }
            self.components.optimizer.step().map_err(sdk_error)?;
            // Momentum and weight decay move pruned weights off zero; put them back.
            if let Some(masks) = self.masks() {
                masks.apply();
            }
            self.step += 1;
            let n = batch.targets.size()[0];
            samples += n;
            loss_sum += loss.detach().to_kind(Kind::Double) * n as f64;
            progress.step();
            since_check += 1;
            if since_check == 50 {
                since_check = 0;
                let mean = loss_sum.double_value(&[]) / samples as f64;
                check_finite(mean, epoch, self.step)?;
                progress.message(format!("loss {mean:.4}"));
            }
        }
        progress.finish_epoch();
        let mean = loss_sum.double_value(&[]) / samples.max(1) as f64;
        check_finite(mean, epoch, self.step)?;
        Ok((mean, loader.waits()))
    }

    fn train_loader(&self, epoch: usize) -> Loader {
        let c = &self.cfg.config;
        Loader::new(
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
        )
    }

    fn evaluate(
        &mut self,
        test: &Rc<Dataset>,
        info: EpochInfo,
    ) -> Result<(BTreeMap<String, f64>, Vec<trellis_sdk::Table>)> {
        let c = &self.cfg.config;
        self.state.model.set_training(false);
        for d in &mut self.components.distillers {
            d.set_training(false);
        }
        for m in &mut self.components.metrics {
            m.reset().map_err(sdk_error)?;
        }
        if self.components.metrics.iter().any(|m| m.wants_batches()) {
            let _no_grad = tch::no_grad_guard();
            let loader = Loader::new(
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
            );
            for batch in loader {
                let (logits, features) = crate::models::autocast(c.train.autocast.kind(), || {
                    self.state.model.forward(&batch.inputs)
                });
                let batch = Batch {
                    inputs: batch.inputs,
                    targets: batch.targets,
                };
                let outputs = Outputs { logits, features };
                for m in self
                    .components
                    .metrics
                    .iter_mut()
                    .filter(|m| m.wants_batches())
                {
                    m.update(&batch, &outputs).map_err(sdk_error)?;
                }
            }
        }
        let mut scalars = BTreeMap::new();
        let mut tables = Vec::new();
        for m in &mut self.components.metrics {
            let values = m.compute(info).map_err(sdk_error)?;
            scalars.extend(values.scalars);
            tables.extend(values.tables);
        }
        Ok((scalars, tables))
    }

    fn training_state(&self, epoch: usize) -> Result<TrainingState> {
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

    fn restore(&mut self, mut state: TrainingState) -> Result<()> {
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
struct Prepared<'a> {
    trainer: Trainer<'a>,
    registry: Registry,
    model: Rc<SharedModel>,
    train_data: Rc<Dataset>,
    test_data: Rc<Dataset>,
    device: Device,
}

fn prepare<'a>(
    cfg: &'a LoadedConfig,
    manifest: Option<&Path>,
    run_dir: Option<PathBuf>,
) -> Result<Prepared<'a>> {
    let c = &cfg.config;
    if c.train.threads > 0 {
        tch::set_num_threads(c.train.threads as i32);
    }
    let device = resolve_device(c.train.device)?;

    tch::manual_seed(c.train.seed as i64);
    let splits = data::load(&c.data, &cfg.dir(), c.train.seed)?;
    let normalize: Normalize = splits.normalize();
    let num_classes = splits.train.num_classes;
    let [in_channels, image_size, _] = splits.train.image_shape();
    let train_data = Rc::new(splits.train);
    let test_data = Rc::new(splits.test);
    let net = Network::build(&c.model, num_classes, in_channels, image_size, device)
        .map_err(|e| cfg.error_at(&[crate::source::Seg::Key("model")], &format!("{e:#}"), None))?;
    let model = SharedModel::new(net);
    let state = RunState::new(
        model.clone(),
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
    let host = RunHost(state.clone());
    let (registry, mut components) = create_components(cfg, manifest, &host)?;

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
    let total_steps = steps_per_epoch * c.train.epochs as u64;
    let pruning = Pruning::setup(cfg, &registry, &host, total_steps)?;
    let trainer = Trainer {
        cfg,
        state,
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

/// `data` where loaders for `device` read it: a GPU run keeps the u8 images on the device, where
/// its loaders crop, flip and normalise them.
fn resident(data: &Rc<Dataset>, device: Device) -> Rc<Dataset> {
    match device {
        Device::Cpu => data.clone(),
        _ => Rc::new(data.to_device(device)),
    }
}

/// `trellis prune`'s run: set up exactly as `trellis run` would, trained up to the pruning point
/// (not at all for `at_step = 0`), pruned, and stopped. Returns the pruning with its masks.
pub(crate) fn run_until_pruned(
    cfg: &LoadedConfig,
    manifest: Option<&Path>,
    inspect: bool,
) -> Result<Pruning> {
    let Prepared { mut trainer, .. } = prepare(cfg, manifest, None)?;
    let Some(pruning) = &mut trainer.pruning else {
        bail!("the config has no [pruner] table");
    };
    pruning.inspect = inspect;
    if pruning.at_step > 0 {
        tracing::info!("training {} steps before pruning", pruning.at_step);
    }
    trainer.stop_when_pruned = true;
    trainer.prune_if_due()?;
    let mut progress = Progress::new(false);
    let mut epoch = 0;
    while trainer.masks().is_none() {
        trainer.train_epoch(epoch, &mut progress)?;
        epoch += 1;
    }
    trainer
        .pruning
        .take()
        .ok_or_else(|| anyhow!("internal error: the pruning vanished"))
}

/// Runs one config end to end.
pub fn run(opts: &RunOptions) -> Result<RunSummary> {
    let cfg = LoadedConfig::load(&opts.config, &opts.overrides)?;
    let c = &cfg.config;
    // Before the run directory exists, so a bad device leaves nothing behind.
    resolve_device(c.train.device)?;

    let run_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| default_run_dir(&opts.config));
    if opts.resume && !checkpoint::exists(&run_dir) {
        bail!(
            "--resume: {} has no checkpoint to continue from\n  help: run without --resume to start it",
            run_dir.display()
        );
    }
    if !opts.resume && run_dir.join("metrics.jsonl").exists() {
        bail!(
            "{} already holds a run\n  help: pass --resume to continue it, or choose another --out",
            run_dir.display()
        );
    }
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;

    let Prepared {
        mut trainer,
        registry,
        model,
        train_data,
        test_data,
        device,
    } = prepare(&cfg, opts.manifest.as_deref(), Some(run_dir.clone()))?;

    std::fs::write(run_dir.join("config.toml"), resolved_config(&cfg)?)?;
    let used: Vec<(Role, &str)> = cfg
        .components()
        .iter()
        .map(|(t, n, _)| (t.role(), *n))
        .collect();
    let plugin_records: Vec<PluginRecord<'_>> = registry
        .libraries
        .iter()
        .map(|l| PluginRecord {
            name: &l.info.name,
            version: &l.info.version,
            path: l.path.display().to_string(),
            sha256: &l.sha256,
            components: l
                .info
                .components
                .iter()
                .filter(|comp| used.iter().any(|(r, n)| *r == comp.role && *n == comp.name))
                .map(|comp| format!("{} {}", comp.role, comp.name))
                .collect(),
        })
        .collect();
    std::fs::write(
        run_dir.join("plugins.json"),
        serde_json::to_string_pretty(&plugin_records)?,
    )?;

    let mut start_epoch = 0;
    if opts.resume {
        let (model_file, saved) = checkpoint::load(&run_dir)?;
        model.net_mut().load(&model_file)?;
        start_epoch = saved.epoch;
        trainer.restore(saved)?;
        tracing::info!("resuming {} after epoch {start_epoch}", run_dir.display());
    }
    trainer.prune_if_due()?;
    let (log, mut records) = MetricsLog::open(&run_dir, start_epoch)?;

    tracing::info!(
        "training {} ({} parameters) on {} {:?} images for {} epochs, {} steps each, on {:?}; writing {}",
        c.model.arch,
        model.net().num_parameters(),
        train_data.len(),
        c.data.source,
        c.train.epochs,
        trainer.steps_per_epoch,
        device,
        run_dir.display()
    );
    let mut progress = Progress::new(opts.progress);
    let started = Instant::now();
    let epochs = c.train.epochs;
    let last_epoch = opts.stop_after.map_or(epochs, |s| s.min(epochs));
    for epoch in start_epoch..last_epoch {
        let epoch_started = Instant::now();
        let (train_loss, data_waits) = trainer.train_epoch(epoch, &mut progress)?;
        let train_seconds = epoch_started.elapsed().as_secs_f64();
        let done = epoch + 1;
        let info = EpochInfo {
            epoch: done as u64,
            epochs: epochs as u64,
            step: trainer.step,
        };
        let (test, mut tables) = if done % c.train.eval_every == 0 || done == epochs {
            trainer.evaluate(&test_data, info)?
        } else {
            Default::default()
        };
        if let Some(p) = &mut trainer.pruning {
            tables.extend(p.take_tables());
        }
        let record = EpochRecord {
            epoch: done,
            step: trainer.step,
            train_loss,
            test,
            tables: table_map(&tables),
            lr: trainer
                .groups
                .iter()
                .zip(&trainer.rates)
                .map(|((name, _), lr)| (name.clone(), *lr))
                .collect(),
            data_waits,
            train_seconds,
            epoch_seconds: epoch_started.elapsed().as_secs_f64(),
            elapsed_seconds: started.elapsed().as_secs_f64(),
        };
        log.append(&record)?;
        let shown: Vec<String> = record
            .test
            .iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect();
        tracing::info!(
            "epoch {done}/{epochs}: train loss {train_loss:.4}{}{} ({:.1}s)",
            if shown.is_empty() { "" } else { ", " },
            shown.join(", "),
            record.epoch_seconds
        );
        records.push(record);
        if done % c.train.checkpoint_every == 0 || done == epochs || done == last_epoch {
            let state = trainer.training_state(done)?;
            checkpoint::save(&run_dir, &model.net().state_dict(), &state)?;
        }
    }
    let finished = last_epoch == epochs;
    if finished {
        model.net().save(&run_dir.join("model.safetensors"))?;
    } else {
        tracing::info!(
            "stopped after epoch {last_epoch} of {epochs}; continue with `trellis run {} --out {} --resume`",
            opts.config.display(),
            run_dir.display()
        );
    }
    println!("\n{}", summary_table(&records));
    if let Some(masks) = trainer.masks() {
        println!("{}", prune::density_table(masks));
    }
    println!("run directory: {}", run_dir.display());
    Ok(RunSummary {
        run_dir,
        records,
        finished,
    })
}
