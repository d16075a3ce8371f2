//! The run config: one TOML file describes one run.
//!
//! Keys the core understands are typed and unknown ones are refused. A component table
//! (`[optimizer]`, `[[metrics]]`, ...) names its component with `use`; its other keys are the
//! component's own configuration, handed to the plugin as TOML text, and a key the plugin refuses
//! is reported at its line in this file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use trellis_sdk::abi::ErrorKind;
use trellis_sdk::Role;

use crate::data::DataConfig;
use crate::layers::{Layers, Part};
use crate::models::ModelSpec;
use crate::plugin_host::ComponentError;
use crate::schedule::ScheduleConfig;
use crate::source::{Seg, SourceFile};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The plugin manifest, relative to this file.
    #[serde(default)]
    pub plugins: Option<PathBuf>,
    pub model: ModelSpec,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub scheduler: Option<ComponentConfig>,
    #[serde(default)]
    pub pruner: Option<PrunerConfig>,
    #[serde(default)]
    pub distillers: Vec<ComponentConfig>,
    #[serde(default)]
    pub metrics: Vec<MetricConfig>,
    /// Called on the run's events, in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callbacks: Vec<ComponentConfig>,
    /// Where the record of each epoch goes besides `metrics.jsonl`.
    #[serde(default, skip_serializing_if = "LogConfig::is_default")]
    pub log: LogConfig,
    /// How the ranks of a data-parallel run talk (`trellis run --nproc N`, torchrun, srun).
    #[serde(default, skip_serializing_if = "DistributedConfig::is_default")]
    pub distributed: DistributedConfig,
}

/// `[distributed]`: the c10d process group of a data-parallel run. Ignored by a run of one
/// process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    pub backend: DistBackend,
    /// How long a collective (or the rendezvous) may wait for the other ranks before the run
    /// fails, naming the rank and the operation: a rank that died or hangs.
    pub timeout_s: f64,
    /// Gradients are all-reduced in buckets of about this many MiB (DistributedDataParallel's
    /// default is 25).
    pub bucket_mb: f64,
    /// Batch norm layers of the built-in architectures normalise over the global batch while
    /// training (PyTorch's SyncBatchNorm). Off, each rank normalises over its own rows, as
    /// DistributedDataParallel does, and evaluation uses rank 0's running statistics.
    pub sync_bn: bool,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            backend: DistBackend::Auto,
            timeout_s: 300.0,
            bucket_mb: 25.0,
            sync_bn: false,
        }
    }
}

impl DistributedConfig {
    pub fn is_default(&self) -> bool {
        *self == DistributedConfig::default()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// NCCL for a CUDA run, Gloo on the CPU.
    #[default]
    Auto,
    Gloo,
    Nccl,
}

/// `[log]`: the sinks each epoch's record is written to. `metrics.jsonl` is always written (a
/// resumed run and `trellis report` read it); `sinks` adds others.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub sinks: Vec<Sink>,
}

impl LogConfig {
    pub fn is_default(&self) -> bool {
        self.sinks.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sink {
    /// `metrics.csv`: one `epoch,step,key,value` row per number.
    Csv,
    /// `tensorboard/events.out.tfevents.*`: scalars and per-layer histograms.
    Tensorboard,
}

/// `[train] keep`: which model the run directory keeps besides the last checkpoint.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The final model only.
    #[default]
    Last,
    /// Also `model_best.safetensors`: the model of the evaluated epoch best by `best_metric`.
    Best,
}

/// Whether a larger or a smaller value of `best_metric` is better.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Max,
    Min,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when available, else the CPU.
    #[default]
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    /// Evaluate every N epochs (and always after the last).
    pub eval_every: usize,
    /// Drop the last incomplete training batch.
    pub drop_last: bool,
    /// CPU threads for libtorch; 0 (the default) takes libtorch's default, one per core, and
    /// [`LoadedConfig::load`] replaces it with that number, so that the resolved config in a run
    /// directory records the threads the run used (their number can change its float sums).
    pub threads: usize,
    /// Save a checkpoint every N epochs (and always after the last).
    pub checkpoint_every: usize,
    /// Mixed precision: convolutions and linear layers compute in bf16 (inputs and weights cast,
    /// gradients flowing back to the f32 weights), everything else in f32.
    #[serde(skip_serializing_if = "Autocast::is_off")]
    pub autocast: Autocast,
    /// The task loss the model is trained on.
    #[serde(skip_serializing_if = "Loss::is_default")]
    pub loss: Loss,
    /// `best`: also keep the model of the best evaluated epoch by `best_metric`.
    #[serde(skip_serializing_if = "Keep::is_last")]
    pub keep: Keep,
    /// The test metric `keep = "best"` ranks epochs by, e.g. `top1` or `loss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_metric: Option<String>,
    /// `max` (default) or `min`: which way `best_metric` is better.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_mode: Option<Direction>,
}

impl Keep {
    pub fn is_last(&self) -> bool {
        *self == Keep::Last
    }
}

/// `[train] loss`: cross-entropy over one logit per class, or binary cross-entropy on a single
/// logit (`[model] outputs = 1`, two classes; the prediction is the logit's sign).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    #[default]
    Ce,
    Bce,
}

impl Loss {
    pub fn is_default(&self) -> bool {
        *self == Loss::Ce
    }
}

/// `[train] autocast`: the reduced precision convolutions and linear layers compute in.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    #[default]
    Off,
    Bf16,
}

impl Autocast {
    pub fn is_off(&self) -> bool {
        *self == Autocast::Off
    }

    /// The kind for [`crate::models::autocast`].
    pub fn kind(self) -> Option<tch::Kind> {
        match self {
            Autocast::Off => None,
            Autocast::Bf16 => Some(tch::Kind::BFloat16),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 128,
            eval_batch_size: 500,
            seed: 0,
            device: DeviceChoice::Auto,
            eval_every: 1,
            drop_last: false,
            threads: 0,
            checkpoint_every: 1,
            autocast: Autocast::Off,
            loss: Loss::Ce,
            keep: Keep::Last,
            best_metric: None,
            best_mode: None,
        }
    }
}

/// `[optimizer]`: the component plus the rate and decay every parameter group starts from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptimizerConfig {
    #[serde(rename = "use")]
    pub component: String,
    /// The base learning rate the `[schedule]` scales.
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(flatten)]
    pub options: toml::Table,
}

/// A component table: `use = "name"` plus the component's own keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ComponentConfig {
    #[serde(rename = "use")]
    pub component: String,
    #[serde(flatten)]
    pub options: toml::Table,
}

/// A `[[metrics]]` table: a component table plus when the host computes it. Other components
/// keep `every` as their own key (TempBalance's recompute interval is one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricConfig {
    #[serde(rename = "use")]
    pub component: String,
    /// Compute every N epochs (at evaluations on multiples of N, and always after the last
    /// epoch), for a metric too costly for every evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<usize>,
    #[serde(flatten)]
    pub options: toml::Table,
}

impl MetricConfig {
    /// Whether the metric is computed after epoch `epoch` (1-based) of `epochs`.
    pub fn due(&self, epoch: u64, epochs: u64) -> bool {
        self.every
            .is_none_or(|n| epoch == epochs || (n > 0 && epoch.is_multiple_of(n as u64)))
    }
}

/// `[pruner]`: the component, the target, and when and on what it scores. Keys not listed here
/// are the pruner's own (`bn_mode`, `rounds`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrunerConfig {
    #[serde(rename = "use", default)]
    pub component: Option<String>,
    #[serde(default)]
    pub sparsity: Option<f64>,
    #[serde(default)]
    pub density: Option<f64>,
    #[serde(default)]
    pub compression: Option<f64>,
    #[serde(default)]
    pub scope: ScopeChoice,
    /// How many weights the density prunes. The host checks the masks by it and, when it is
    /// `floor`, passes it on to the pruner as its `count` key (a pruner without one refuses it).
    #[serde(default, skip_serializing_if = "CountChoice::is_default")]
    pub count: CountChoice,
    /// 0 prunes at initialisation; N prunes after N training iterations.
    #[serde(default)]
    pub at_step: u64,
    #[serde(default = "default_samples_per_class")]
    pub samples_per_class: usize,
    /// Number of scoring batches the scoring sample is split into.
    #[serde(default = "default_scoring_batches")]
    pub batches: usize,
    /// How the scoring images are drawn: `samples_per_class` of every class, or that many times
    /// the classes at random.
    #[serde(default, skip_serializing_if = "ScoringChoice::is_default")]
    pub scoring: ScoringChoice,
    /// The scoring images go through the run's training augmentation, as Synaptic-Flow's do.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scoring_augment: bool,
    /// Start from a saved mask file instead of running a pruner.
    #[serde(default)]
    pub masks: Option<PathBuf>,
    #[serde(flatten)]
    pub options: toml::Table,
}

fn default_samples_per_class() -> usize {
    10
}

fn default_scoring_batches() -> usize {
    1
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScopeChoice {
    #[default]
    Global,
    Layer,
}

/// `[pruner] scoring`: the scoring sample METHODS.md takes by default, or Synaptic-Flow's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScoringChoice {
    /// `samples_per_class` images of every class, drawn with the run's seed (the original
    /// GraSP code's sample).
    #[default]
    Balanced,
    /// `samples_per_class × classes` training images drawn uniformly with the run's seed,
    /// whatever their classes (Synaptic-Flow's 100 random images).
    Random,
}

impl ScoringChoice {
    pub fn is_default(&self) -> bool {
        *self == ScoringChoice::Balanced
    }
}

/// `[pruner] count`: k = round((1 − d)·N) weights pruned (exact to the density asked for), or
/// Synaptic-Flow's ⌊(1 − d)·N⌋ to reproduce its masks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CountChoice {
    #[default]
    Round,
    Floor,
}

impl CountChoice {
    pub fn is_default(&self) -> bool {
        *self == CountChoice::Round
    }

    /// How many of `n` weights density `density` prunes.
    pub fn pruned(self, density: f64, n: i64) -> i64 {
        let k = (1.0 - density) * n as f64;
        let k = match self {
            CountChoice::Round => k.round(),
            CountChoice::Floor => k.floor(),
        };
        (k as i64).clamp(0, n)
    }
}

/// Where a component's table sits in the file, for pointing at its keys.
#[derive(Debug, Clone, PartialEq)]
pub enum TablePath {
    Model,
    Optimizer,
    Scheduler,
    Pruner,
    Distiller(usize),
    Metric(usize),
    Callback(usize),
}

impl TablePath {
    pub fn segs(&self) -> Vec<Seg<'static>> {
        match self {
            TablePath::Model => vec![Seg::Key("model")],
            TablePath::Optimizer => vec![Seg::Key("optimizer")],
            TablePath::Scheduler => vec![Seg::Key("scheduler")],
            TablePath::Pruner => vec![Seg::Key("pruner")],
            TablePath::Distiller(i) => vec![Seg::Key("distillers"), Seg::Index(*i)],
            TablePath::Metric(i) => vec![Seg::Key("metrics"), Seg::Index(*i)],
            TablePath::Callback(i) => vec![Seg::Key("callbacks"), Seg::Index(*i)],
        }
    }

    pub fn role(&self) -> Role {
        match self {
            TablePath::Model => Role::Model,
            TablePath::Optimizer => Role::Optimizer,
            TablePath::Scheduler => Role::Scheduler,
            TablePath::Pruner => Role::Pruner,
            TablePath::Distiller(_) => Role::Distiller,
            TablePath::Metric(_) => Role::Metric,
            TablePath::Callback(_) => Role::Callback,
        }
    }
}

/// A run config with the text it came from (after `--set` overrides).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: RunConfig,
    /// The files (the given one and its bases) and overrides the config was merged from.
    pub source: Layers,
    pub overrides: Vec<String>,
}

impl LoadedConfig {
    /// Reads `path` (and the configs it inherits from with `base`), applies `key.path=value`
    /// overrides, and checks the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedConfig> {
        let source = Layers::load(path, overrides)?;
        if !overrides.is_empty() {
            // A list written as a table (or the reverse) by an override: every file was checked.
            let merged: toml_edit::DocumentMut = source
                .merged
                .text
                .parse()
                .context("the config after --set does not parse")?;
            if let Some(e) = bracket_error(&source.merged, Some(&merged)) {
                return Err(e.context(format!(
                    "in the config after applying --set {}",
                    overrides.join(" --set ")
                )));
            }
        }
        let mut config: RunConfig = source.parse()?;
        if config.train.threads == 0 {
            config.train.threads = default_threads();
        }
        let loaded = LoadedConfig {
            config,
            source,
            overrides: overrides.to_vec(),
        };
        loaded.validate()?;
        Ok(loaded)
    }

    pub fn dir(&self) -> PathBuf {
        self.source.dir()
    }

    /// Resolves a path written in the config relative to the config's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir().join(path)
        }
    }

    /// An error about the value at `path`, pointing at it where it was written: a line of the
    /// config or of a base it inherits, or the `--set` that gave it.
    pub fn error_at(&self, path: &[Seg<'_>], message: &str, help: Option<&str>) -> anyhow::Error {
        self.source.error_at(path, Part::Value, message, help)
    }

    fn validate(&self) -> Result<()> {
        let c = &self.config;
        let key = |table: &'static str, k: &'static str| [Seg::Key(table), Seg::Key(k)];
        c.model
            .validate()
            .map_err(|e| self.error_at(&[Seg::Key("model")], &format!("{e:#}"), None))?;
        if c.train.epochs == 0 {
            return Err(self.error_at(
                &key("train", "epochs"),
                "train.epochs must be at least 1",
                None,
            ));
        }
        if c.train.batch_size == 0 {
            return Err(self.error_at(
                &key("train", "batch_size"),
                "train.batch_size must be at least 1",
                None,
            ));
        }
        if c.train.eval_batch_size == 0 {
            return Err(self.error_at(
                &key("train", "eval_batch_size"),
                "train.eval_batch_size must be at least 1",
                None,
            ));
        }
        let d = &c.distributed;
        if d.sync_bn {
            if let ModelSpec::Plugin(m) = &c.model {
                return Err(self.error_at(
                    &key("distributed", "sync_bn"),
                    &format!(
                        "distributed.sync_bn applies to the built-in architectures' batch norm; \
                         model `{}` is a plugin's",
                        m.component
                    ),
                    Some("remove sync_bn, or use a built-in `arch`"),
                ));
            }
        }
        for (name, value) in [("timeout_s", d.timeout_s), ("bucket_mb", d.bucket_mb)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(self.error_at(
                    &key("distributed", name),
                    &format!("distributed.{name} must be a positive number, not {value}"),
                    None,
                ));
            }
        }
        if c.train.eval_every == 0 || c.train.checkpoint_every == 0 {
            return Err(self.error_at(
                &key(
                    "train",
                    if c.train.eval_every == 0 {
                        "eval_every"
                    } else {
                        "checkpoint_every"
                    },
                ),
                "eval_every and checkpoint_every count epochs and must be at least 1",
                None,
            ));
        }
        if !(c.optimizer.lr.is_finite() && c.optimizer.lr >= 0.0) {
            return Err(self.error_at(
                &key("optimizer", "lr"),
                "optimizer.lr must be a finite number >= 0",
                None,
            ));
        }
        if !(c.optimizer.weight_decay.is_finite() && c.optimizer.weight_decay >= 0.0) {
            return Err(self.error_at(
                &key("optimizer", "weight_decay"),
                "optimizer.weight_decay must be a finite number >= 0",
                None,
            ));
        }
        self.validate_data()?;
        if let ModelSpec::Builtin(model) = &c.model {
            self.check_model_fits(model)?;
            let single_logit = model.outputs == Some(1);
            if single_logit != (c.train.loss == Loss::Bce) {
                let (path, message, help) = if single_logit {
                    (
                        key("model", "outputs"),
                        "a model with a single output needs [train] loss = \"bce\": cross-entropy \
                         over one logit is always 0",
                        "add `loss = \"bce\"` under [train], or drop `outputs = 1`",
                    )
                } else {
                    (
                        key("train", "loss"),
                        "loss = \"bce\" trains a single logit, but the model has one per class",
                        "add `outputs = 1` under [model] (and `cifar2 = true` under [data] for \
                         CIFAR-10)",
                    )
                };
                return Err(self.error_at(&path, message, Some(help)));
            }
        }
        c.schedule
            .validate(c.train.epochs)
            .map_err(|(k, message)| {
                self.error_at(&[Seg::Key("schedule"), Seg::Key(k)], &message, None)
            })?;
        if let Some(p) = &c.pruner {
            self.validate_pruner(p)?;
        }
        self.validate_every()?;
        self.validate_keep()
    }

    /// `channels` and `image_size` say how to decode an image folder; every other source has
    /// one fixed shape, so there they would be ignored, silently.
    fn validate_data(&self) -> Result<()> {
        let d = &self.config.data;
        let key = |k: &'static str| [Seg::Key("data"), Seg::Key(k)];
        for (name, set) in [("channels", d.channels), ("image_size", d.image_size)] {
            if set.is_some() && d.source != crate::data::Source::ImageFolder {
                return Err(self.error_at(
                    &key(name),
                    &format!(
                        "data.{name} is used only with source = \"image_folder\"; {} images \
                         have one fixed shape",
                        d.source.in_words()
                    ),
                    Some(&format!("remove `{name}`")),
                ));
            }
        }
        if d.channels.is_some_and(|c| c != 1 && c != 3) {
            return Err(self.error_at(
                &key("channels"),
                "data.channels must be 1 (grey) or 3 (RGB)",
                None,
            ));
        }
        if d.image_size.is_some_and(|s| !(4..=1024).contains(&s)) {
            return Err(self.error_at(
                &key("image_size"),
                "data.image_size must be between 4 and 1024 pixels",
                None,
            ));
        }
        Ok(())
    }

    fn validate_every(&self) -> Result<()> {
        let c = &self.config;
        for (i, m) in c.metrics.iter().enumerate() {
            if m.every == Some(0) {
                return Err(self.error_at(
                    &[Seg::Key("metrics"), Seg::Index(i), Seg::Key("every")],
                    "`every` counts epochs and must be at least 1",
                    None,
                ));
            }
        }
        Ok(())
    }

    fn validate_keep(&self) -> Result<()> {
        let t = &self.config.train;
        let key = |k: &'static str| [Seg::Key("train"), Seg::Key(k)];
        match (t.keep, &t.best_metric) {
            (Keep::Best, None) => Err(self.error_at(
                &key("keep"),
                "keep = \"best\" needs the metric that decides which epoch is best",
                Some("add e.g. `best_metric = \"top1\"` (and `best_mode = \"min\"` for a loss) under [train]"),
            )),
            (Keep::Last, Some(_)) => Err(self.error_at(
                &key("best_metric"),
                "best_metric is used only with keep = \"best\"",
                Some("add `keep = \"best\"` under [train], or remove best_metric"),
            )),
            _ if t.keep == Keep::Last && t.best_mode.is_some() => Err(self.error_at(
                &key("best_mode"),
                "best_mode is used only with keep = \"best\"",
                Some("add `keep = \"best\"` under [train], or remove best_mode"),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses, before anything is read or created, a built-in model the machine cannot train
    /// (`model.width = 64` is 46 billion parameters for resnet18).
    fn check_model_fits(&self, model: &crate::models::ModelConfig) -> Result<()> {
        let (classes, channels, side) = self.config.data.shape(&self.dir());
        let device = match self.config.train.device {
            DeviceChoice::Cpu => tch::Device::Cpu,
            DeviceChoice::Cuda => tch::Device::Cuda(0),
            DeviceChoice::Auto => tch::Device::cuda_if_available(),
        };
        let purpose = crate::models::Purpose::Train;
        crate::models::check_fits(model, classes, channels, side, device, purpose).map_err(|e| {
            match e.downcast_ref::<crate::models::DoesNotFit>() {
                Some(refusal) => self.error_at(
                    &self.key_or_table(&[Seg::Key("model"), Seg::Key("width")]),
                    &refusal.message,
                    Some(&refusal.help),
                ),
                None => e,
            }
        })
    }

    fn validate_pruner(&self, p: &PrunerConfig) -> Result<()> {
        let error = |k: &str, message: &str, help: Option<&str>| {
            self.error_at(
                &self.key_or_table(&[Seg::Key("pruner"), Seg::Key(k)]),
                message,
                help,
            )
        };
        match (&p.component, &p.masks) {
            (Some(_), Some(_)) => return Err(error(
                "masks",
                "[pruner] takes either `use` (a pruner) or `masks` (a saved mask file), not both",
                None,
            )),
            (None, None) => {
                return Err(error(
                    "use",
                    "[pruner] needs `use = \"<pruner>\"` or `masks = \"<file>\"`",
                    Some("run `trellis plugins` to list the pruners (snip, grasp, synflow, ...)"),
                ))
            }
            (None, Some(_)) => {
                if let Some(key) = p.options.keys().next() {
                    return Err(error(
                        key,
                        &format!("unknown key `{key}` in [pruner]: with `masks` there is no pruner to take it"),
                        None,
                    ));
                }
            }
            (Some(_), None) => {}
        }
        let density = p
            .density()
            .map_err(|(k, message)| error(k, &message, None))?;
        if density == 0.0 {
            let key = if p.sparsity.is_some() {
                "sparsity"
            } else if p.density.is_some() {
                "density"
            } else {
                "compression"
            };
            return Err(error(
                key,
                "this target keeps no weight at all: the pruned network could only output its biases",
                Some("sparsity and density are fractions, e.g. sparsity = 0.98 keeps 2 %"),
            ));
        }
        if p.samples_per_class == 0 {
            return Err(error(
                "samples_per_class",
                "[pruner] samples_per_class must be at least 1",
                None,
            ));
        }
        if p.batches == 0 {
            return Err(error(
                "batches",
                "[pruner] batches must be at least 1",
                None,
            ));
        }
        if p.scoring_augment && !self.config.data.augment {
            return Err(error(
                "scoring_augment",
                "[pruner] scoring_augment = true, but [data] augment = false: the run has no \
                 training augmentation to apply to the scoring images",
                Some("set augment = true under [data], or leave scoring_augment out"),
            ));
        }
        Ok(())
    }

    /// `path` when the file has it, else the table it would be in (for keys left to defaults).
    fn key_or_table<'p>(&self, path: &[Seg<'p>]) -> Vec<Seg<'p>> {
        if self.source.has(path) || path.len() < 2 {
            path.to_vec()
        } else {
            path[..path.len() - 1].to_vec()
        }
    }

    /// The components the config asks for, with their tables' locations.
    pub fn components(&self) -> Vec<(TablePath, &str, toml::Table)> {
        let c = &self.config;
        let mut out = Vec::new();
        if let ModelSpec::Plugin(m) = &c.model {
            out.push((TablePath::Model, m.component.as_str(), m.options.clone()));
        }
        out.push((
            TablePath::Optimizer,
            c.optimizer.component.as_str(),
            c.optimizer.options.clone(),
        ));
        if let Some(s) = &c.scheduler {
            out.push((
                TablePath::Scheduler,
                s.component.as_str(),
                s.options.clone(),
            ));
        }
        if let Some(p) = &c.pruner {
            if let Some(name) = &p.component {
                out.push((TablePath::Pruner, name.as_str(), p.options.clone()));
            }
        }
        for (i, d) in c.distillers.iter().enumerate() {
            out.push((
                TablePath::Distiller(i),
                d.component.as_str(),
                d.options.clone(),
            ));
        }
        for (i, m) in c.metrics.iter().enumerate() {
            out.push((
                TablePath::Metric(i),
                m.component.as_str(),
                m.options.clone(),
            ));
        }
        for (i, cb) in c.callbacks.iter().enumerate() {
            out.push((
                TablePath::Callback(i),
                cb.component.as_str(),
                cb.options.clone(),
            ));
        }
        out
    }

    /// Turns a component's error into one pointing at the config line it is about.
    pub fn component_error(&self, table: &TablePath, error: anyhow::Error) -> anyhow::Error {
        let Some(component_error) = error.downcast_ref::<ComponentError>() else {
            return error;
        };
        let mut path = table.segs();
        match (&component_error.error.kind, &component_error.error.key) {
            (ErrorKind::Config, Some(key)) => {
                let key: &str = key;
                path.push(Seg::Key(key));
                if !self.source.has(&path) {
                    path = table.segs();
                }
                let message = crate::source::plain_words(&component_error.to_string());
                self.source.error_at(
                    &path,
                    Part::Key,
                    &message,
                    Some("see `trellis plugins` for the component's keys and defaults"),
                )
            }
            _ => error,
        }
    }

    /// The `use = ...` value of a table, for errors about the component it names.
    pub fn use_error(&self, table: &TablePath, message: &str) -> anyhow::Error {
        let mut path = table.segs();
        path.push(Seg::Key("use"));
        self.error_at(
            &path,
            message,
            Some("run `trellis plugins` to list the components"),
        )
    }
}

impl PrunerConfig {
    /// The density to keep, from exactly one of sparsity, density, compression.
    pub fn density(&self) -> Result<f64, (&'static str, String)> {
        let given: Vec<(&'static str, f64)> = [
            ("sparsity", self.sparsity),
            ("density", self.density),
            ("compression", self.compression),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        let (key, value) = match given.as_slice() {
            [one] => *one,
            [] if self.masks.is_some() => return Ok(f64::NAN),
            [] => {
                return Err((
                    "use",
                    "[pruner] needs exactly one of sparsity, density or compression".to_string(),
                ))
            }
            [_, (second, _), ..] => {
                return Err((
                    second,
                    "give only one of sparsity, density or compression in [pruner]".to_string(),
                ))
            }
        };
        let density = match key {
            "sparsity" => 1.0 - value,
            "density" => value,
            _ => 10f64.powf(-value),
        };
        if !value.is_finite()
            || !(0.0..=1.0).contains(&density)
            || (key == "compression" && value < 0.0)
        {
            return Err((
                key,
                format!("{key} = {value} is out of range: sparsity and density are in [0, 1], compression is >= 0"),
            ));
        }
        Ok(density)
    }
}

/// libtorch's number of CPU threads when the config leaves it to libtorch.
fn default_threads() -> usize {
    usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
}

/// The keys that hold a list of tables, with what one entry is called.
const LISTS: [(&str, &str); 3] = [
    ("metrics", "metric"),
    ("callbacks", "callback"),
    ("distillers", "distiller"),
];

/// The keys that hold one table.
const TABLES: [&str; 7] = [
    "model",
    "data",
    "train",
    "optimizer",
    "schedule",
    "scheduler",
    "pruner",
];

/// `[metrics]` where `[[metrics]]` is meant (and `[[model]]` for `[model]`): TOML's own words
/// for it are "duplicate key" or serde's "invalid type: map, expected a sequence". With `doc`,
/// looks at what each key holds; without (the text did not parse), at the headers alone.
pub(crate) fn bracket_error(
    source: &SourceFile,
    doc: Option<&toml_edit::DocumentMut>,
) -> Option<anyhow::Error> {
    let at = |name: &str, double: bool| {
        source
            .header_span(name, double)
            .or_else(|| source.key_span(&[Seg::Key(name)]))
    };
    let error = |span: Option<std::ops::Range<usize>>, message: &str, help: &str| match span {
        Some(span) => source.error_at(span, message, Some(help)),
        None => source.error(&format!("{message}\n  help: {help}")),
    };
    for (key, one) in LISTS {
        let single = match doc {
            Some(doc) => match doc.get(key) {
                Some(toml_edit::Item::Table(_)) => true,
                Some(toml_edit::Item::Value(v)) => v.is_inline_table(),
                _ => false,
            },
            None => source.header_span(key, false).is_some(),
        };
        if single {
            return Some(error(
                at(key, false),
                &format!("`{key}` is a list of tables, but this is a single table"),
                &format!("write [[{key}]] (two brackets): each {one} is its own table"),
            ));
        }
    }
    for key in TABLES {
        let list = match doc {
            Some(doc) => match doc.get(key) {
                Some(toml_edit::Item::ArrayOfTables(_)) => true,
                Some(toml_edit::Item::Value(v)) => v.is_array(),
                _ => false,
            },
            None => source.header_span(key, true).is_some(),
        };
        if list {
            return Some(error(
                at(key, true),
                &format!("`{key}` is a single table, but this is a list of tables"),
                &format!("write [{key}] (one bracket): a run has one {key} table"),
            ));
        }
    }
    None
}

/// Applies one `--set key.path=value`. The value is read as TOML (`0.1`, `true`, `"sgd"`,
/// `[1, 2]`); anything that does not parse as TOML is taken as a string.
pub fn apply_override(doc: &mut toml_edit::DocumentMut, assignment: &str) -> Result<()> {
    let Some((path, value)) = assignment.split_once('=') else {
        bail!("--set expects key.path=value, got `{assignment}`");
    };
    let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--set expects key.path=value, got `{assignment}`");
    }
    let value_text = value.trim();
    let value: toml_edit::Value = value_text
        .parse()
        .unwrap_or_else(|_| toml_edit::Value::from(value_text));
    let (last, parents) = keys.split_last().expect("checked non-empty");
    let mut table = doc.as_table_mut();
    let mut segments = parents.iter().peekable();
    while let Some(k) = segments.next() {
        let item = table
            .entry(k)
            .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
        // `subset = { per_class = 100 }` is a table too, written on one line.
        if item.is_inline_table() {
            let inline = std::mem::take(item);
            *item = inline
                .into_table()
                .map_or_else(|other| other, toml_edit::Item::Table);
        }
        table = match item {
            toml_edit::Item::Table(t) => t,
            // `[[metrics]]` and `[[distillers]]`: the next segment picks one by position.
            toml_edit::Item::ArrayOfTables(array) => {
                let Some(index) = segments.next().and_then(|s| s.parse::<usize>().ok()) else {
                    bail!(
                        "--set {assignment}: `{k}` is a list of tables; name one by its position, \
                         e.g. `{k}.0.key=value`"
                    );
                };
                let len = array.len();
                let entries = if len == 1 { "entry" } else { "entries" };
                array.get_mut(index).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--set {assignment}: `{k}` has {len} {entries}, there is no `{k}.{index}` \
                         (they count from 0)"
                    )
                })?
            }
            _ => bail!(
                "--set {assignment}: `{k}` is not a table, so `{}` cannot be set inside it",
                path.trim()
            ),
        };
    }
    table.insert(last, toml_edit::Item::Value(value));
    Ok(())
}

/// The component's table as TOML text for its plugin (without `use` and the core's keys).
pub fn component_text(options: &toml::Table) -> Result<String> {
    toml::to_string(options).context("cannot serialise a component's configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
arch = "mlp"

[train]
epochs = 2

[optimizer]
use = "sgd"
lr = 0.1
momentum = 0.9
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn err(text: &str, overrides: &[&str]) -> String {
        let (_dir, path) = write(text);
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", LoadedConfig::load(&path, &overrides).unwrap_err())
    }

    #[test]
    fn train_autocast_is_off_unless_asked_for() {
        let (_dir, path) = write(BASE);
        let c = LoadedConfig::load(&path, &[]).unwrap();
        assert_eq!(c.config.train.autocast.kind(), None);
        // Left out of the resolved config when off, so older run directories read the same.
        assert!(!toml::to_string(&c.config).unwrap().contains("autocast"));
        let on = LoadedConfig::load(&path, &["train.autocast=\"bf16\"".to_string()]).unwrap();
        assert_eq!(on.config.train.autocast.kind(), Some(tch::Kind::BFloat16));
        let back: RunConfig = toml::from_str(&toml::to_string(&on.config).unwrap()).unwrap();
        assert_eq!(back.train.autocast, Autocast::Bf16);
        let e = err(BASE, &["train.autocast=\"fp8\""]);
        assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn loads_and_keeps_component_keys_for_the_plugin() {
        let (_dir, path) = write(BASE);
        let c = LoadedConfig::load(&path, &[]).unwrap();
        assert_eq!(c.config.optimizer.component, "sgd");
        assert_eq!(c.config.optimizer.lr, 0.1);
        assert_eq!(
            component_text(&c.config.optimizer.options).unwrap().trim(),
            "momentum = 0.9"
        );
        assert_eq!(c.config.train.epochs, 2);
        assert_eq!(c.config.train.batch_size, 128);
    }

    #[test]
    fn unknown_key_names_its_line() {
        let text = BASE.replace("epochs = 2", "epochs = 2\nepocs = 3");
        let e = err(&text, &[]);
        assert!(e.contains("unknown field `epocs`"), "{e}");
        assert!(e.contains("run.toml:7:1"), "{e}");
    }

    #[test]
    fn malformed_toml_names_its_line() {
        let e = err(&BASE.replace("lr = 0.1", "lr = = 0.1"), &[]);
        assert!(e.contains("run.toml:10:6"), "{e}");
    }

    #[test]
    fn wrong_type_names_its_line_and_column() {
        let e = err(&BASE.replace("epochs = 2", "epochs = \"two\""), &[]);
        assert!(e.contains("run.toml:6:10"), "{e}");
    }

    #[test]
    fn threads_left_to_libtorch_are_recorded_as_the_number_used() {
        let (_dir, path) = write(BASE);
        let c = LoadedConfig::load(&path, &[]).unwrap();
        assert_eq!(c.config.train.threads, default_threads());
        assert!(c.config.train.threads >= 1);
        let text = toml::to_string(&c.config).unwrap();
        assert!(
            text.contains(&format!("threads = {}", default_threads())),
            "{text}"
        );
        let c = LoadedConfig::load(&path, &["train.threads=0".into()]).unwrap();
        assert_eq!(c.config.train.threads, default_threads());
        let c = LoadedConfig::load(&path, &["train.threads=3".into()]).unwrap();
        assert_eq!(c.config.train.threads, 3);
    }

    #[test]
    fn one_bracket_for_a_list_and_two_for_a_table_are_explained() {
        let single = format!("{BASE}\n[metrics]\nuse = \"accuracy\"\n");
        let e = err(&single, &[]);
        assert!(
            e.contains("write [[metrics]] (two brackets): each metric is its own table")
                && e.contains("run.toml:13:1"),
            "{e}"
        );
        // Twice is a duplicate key to TOML.
        let e = err(&format!("{single}\n[metrics]\nuse = \"loss\"\n"), &[]);
        assert!(
            e.contains("write [[metrics]] (two brackets)") && !e.contains("duplicate key"),
            "{e}"
        );
        let e = err(&format!("callbacks = {{ use = \"ema\" }}\n{BASE}"), &[]);
        assert!(
            e.contains("write [[callbacks]] (two brackets): each callback"),
            "{e}"
        );
        let e = err(&format!("{BASE}\n[ distillers ] # kd\nuse = \"kd\"\n"), &[]);
        assert!(
            e.contains("each distiller is its own table") && e.contains(":13:1"),
            "{e}"
        );
        let e = err(&BASE.replace("[optimizer]", "[[optimizer]]"), &[]);
        assert!(
            e.contains("write [optimizer] (one bracket)") && e.contains("run.toml:8:1"),
            "{e}"
        );
        let e = err(BASE, &["metrics.use=accuracy"]);
        assert!(e.contains("write [[metrics]] (two brackets)"), "{e}");
        // Written right, nothing is said.
        let (_d, path) = write(&format!(
            "{BASE}\n[[metrics]]\nuse = \"a\"\n[metrics.sub]\nk = 1\n"
        ));
        assert!(LoadedConfig::load(&path, &[]).is_ok());
    }

    #[test]
    fn serde_words_become_toml_words() {
        for (value, expected) in [
            ("epochs = -1", "expected a whole number ≥ 0"),
            ("epochs = 1.5", "expected a whole number ≥ 0"),
            ("seed = -2", "expected a whole number ≥ 0"),
            ("drop_last = 1", "expected true or false"),
            ("epochs = 99999999999999999999", "the number is too large"),
        ] {
            let e = err(&BASE.replace("epochs = 2", value), &[]);
            assert!(e.contains(expected), "{value}: {e}");
            for rust in ["usize", "u64", "integer number overflowed", "a boolean"] {
                assert!(!e.contains(rust), "{value}: {e}");
            }
        }
        let e = err(&BASE.replace("lr = 0.1", "lr = \"fast\""), &[]);
        assert!(e.contains("expected a number") && !e.contains("f64"), "{e}");
        assert_eq!(
            crate::source::plain_words("invalid type: map, expected struct TrainConfig; u8x"),
            "invalid type: table, expected a table; u8x"
        );
        assert_eq!(
            crate::source::plain_words("expected u8, expected u8x, expected a sequence"),
            "expected a whole number ≥ 0, expected u8x, expected a list"
        );
    }

    #[test]
    fn a_model_the_machine_cannot_train_is_refused_at_its_width() {
        let e = err(
            &BASE.replace("arch = \"mlp\"", "arch = \"resnet18\"\nwidth = 1000"),
            &[],
        );
        assert!(
            e.contains("model.width = 1000 makes resnet18 a model of")
                && e.contains("run.toml:4:9")
                && e.contains("help: lower model.width"),
            "{e}"
        );
        let e = err(BASE, &["model.hidden=[100000000000]"]);
        assert!(
            e.contains("makes mlp a model of") && e.contains("run.toml:3"),
            "{e}"
        );
    }

    #[test]
    fn overrides_reach_into_lists_of_tables() {
        let text =
            format!("{BASE}\n[[metrics]]\nuse = \"accuracy\"\n\n[[metrics]]\nuse = \"ece\"\n");
        let (_dir, path) = write(&text);
        let c = LoadedConfig::load(&path, &["metrics.1.bins=5".into()]).unwrap();
        assert_eq!(c.config.metrics[1].options["bins"].as_integer(), Some(5));
        assert!(c.config.metrics[0].options.is_empty());
        let e = err(&text, &["metrics.2.bins=5"]);
        assert!(e.contains("has 2 entries"), "{e}");
        let e = err(&text, &["metrics.bins=5"]);
        assert!(e.contains("name one by its position"), "{e}");
    }

    #[test]
    fn overrides_reach_into_inline_tables() {
        let text = format!("{BASE}\n[data]\nsubset = {{ per_class = 100 }}\n");
        let (_dir, path) = write(&text);
        let c = LoadedConfig::load(&path, &["data.subset.per_class=500".into()]).unwrap();
        let subset = toml::to_string(&c.config.data.subset).unwrap();
        assert!(subset.contains("per_class = 500"), "{subset}");
        let e = err(&text, &["data.subset.fraction=0.5"]);
        assert!(
            e.contains("exactly one of `per_class` or `fraction`"),
            "{e}"
        );
    }

    #[test]
    fn every_is_the_hosts_key_in_metrics_and_the_components_own_elsewhere() {
        let text = format!(
            "{BASE}\n[scheduler]\nuse = \"tempbalance\"\nevery = 2\n\n\
             [[metrics]]\nuse = \"accuracy\"\n\n[[metrics]]\nuse = \"ece\"\nevery = 3\n"
        );
        let (_dir, path) = write(&text);
        let c = LoadedConfig::load(&path, &[]).unwrap();
        // TempBalance's recompute interval reaches the plugin untouched.
        let scheduler = c.config.scheduler.as_ref().unwrap();
        assert_eq!(scheduler.options["every"].as_integer(), Some(2));
        let [accuracy, ece] = &c.config.metrics[..] else {
            panic!()
        };
        assert!(
            ece.options.is_empty(),
            "the host keeps `every` from the metric"
        );
        let due = |m: &MetricConfig| (1..=7).filter(|&e| m.due(e, 7)).collect::<Vec<_>>();
        assert_eq!(due(accuracy), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(due(ece), [3, 6, 7], "multiples of 3 and the last epoch");
        let e = err(&text.replace("every = 3", "every = 0"), &[]);
        assert!(e.contains("must be at least 1"), "{e}");
    }

    #[test]
    fn overrides_apply_and_errors_still_point_at_lines() {
        let (_dir, path) = write(BASE);
        let c = LoadedConfig::load(
            &path,
            &[
                "train.epochs=5".into(),
                "optimizer.momentum=0.5".into(),
                "data.source=synthetic".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.config.train.epochs, 5);
        assert_eq!(c.config.optimizer.options["momentum"].as_float(), Some(0.5));
        // An override's error names the override, not a line of the file it replaced.
        let e = err(BASE, &["train.epochs=0"]);
        assert!(
            e.contains("--> --set train.epochs=0") && !e.contains("run.toml:6"),
            "{e}"
        );
        let e = err(BASE, &["train.epochs=\"two\""]);
        assert!(e.contains("--> --set train.epochs=\"two\""), "{e}");
        // The file's own errors still name its lines.
        let e = err(
            &BASE.replace("epochs = 2", "epochs = 0"),
            &["optimizer.lr=0.5"],
        );
        assert!(e.contains("run.toml:6:10"), "{e}");
        let e = err(BASE, &["train.epochs"]);
        assert!(e.contains("--set expects key.path=value"), "{e}");
    }

    #[test]
    fn a_single_logit_goes_with_binary_cross_entropy() {
        let bce = BASE.replace("epochs = 2", "epochs = 2\nloss = \"bce\"");
        let e = err(&bce, &[]);
        assert!(e.contains("outputs = 1") && e.contains(":7:"), "{e}");
        let e = err(
            &BASE.replace("arch = \"mlp\"", "arch = \"mlp\"\noutputs = 1"),
            &[],
        );
        assert!(e.contains("loss = \"bce\"") && e.contains(":4:"), "{e}");
        let both = bce.replace("arch = \"mlp\"", "arch = \"mlp\"\noutputs = 1");
        let (_d, path) = write(&both);
        let c = LoadedConfig::load(&path, &[]).unwrap();
        assert_eq!(c.config.train.loss, Loss::Bce);
    }

    #[test]
    fn pruner_targets_are_checked() {
        let pruner = |body: &str| format!("{BASE}\n[pruner]\nuse = \"snip\"\n{body}\n");
        assert!(err(&pruner("sparsity = 1.2"), &[]).contains("out of range"));
        let e = err(&pruner("sparsity = 0.9\ndensity = 0.1"), &[]);
        assert!(e.contains("only one of"), "{e}");
        assert!(e.contains(":16:"), "{e}");
        let (_d, path) = write(&pruner("compression = 2"));
        let c = LoadedConfig::load(&path, &[]).unwrap();
        assert!((c.config.pruner.unwrap().density().unwrap() - 0.01).abs() < 1e-12);
    }

    #[test]
    fn image_shape_keys_belong_to_the_image_folder() {
        let table = |body: &str| format!("{BASE}\n[data]\n{body}\n");
        let e = err(&table("channels = 1"), &[]);
        assert!(
            e.contains("only with source = \"image_folder\"") && e.contains(":14:"),
            "{e}"
        );
        let e = err(&table("source = \"fashion_mnist\"\nimage_size = 28"), &[]);
        assert!(
            e.contains("Fashion-MNIST images") && e.contains(":15:"),
            "{e}"
        );
        let e = err(&table("source = \"image_folder\"\nchannels = 2"), &[]);
        assert!(
            e.contains("1 (grey) or 3 (RGB)") && e.contains(":15:"),
            "{e}"
        );
        let e = err(&table("source = \"image_folder\"\nimage_size = 2"), &[]);
        assert!(
            e.contains("between 4 and 1024") && e.contains(":15:"),
            "{e}"
        );
    }

    #[test]
    fn pruner_scoring_keys_are_checked() {
        // The body starts on line 16.
        let table =
            |body: &str| format!("{BASE}\n[pruner]\nuse = \"snip\"\nsparsity = 0.9\n{body}\n");
        let e = err(&table("scoring = \"uniform\""), &[]);
        assert!(
            e.contains("`balanced`") && e.contains("`random`") && e.contains(":16:"),
            "{e}"
        );
        let no_augment = format!(
            "{}\n[data]\naugment = false\n",
            table("scoring_augment = true")
        );
        let e = err(&no_augment, &[]);
        assert!(e.contains("augment = false") && e.contains(":16:"), "{e}");
        let (_d, path) = write(&table("scoring = \"random\"\nscoring_augment = true"));
        let p = LoadedConfig::load(&path, &[])
            .unwrap()
            .config
            .pruner
            .unwrap();
        assert_eq!(
            (p.scoring, p.scoring_augment),
            (ScoringChoice::Random, true)
        );
        assert!(p.options.is_empty(), "host keys, not the pruner's");
        // Left out of the resolved config at their defaults, so older run directories read the
        // same.
        let (_d, path) = write(&table(""));
        let c = LoadedConfig::load(&path, &[]).unwrap();
        let p = c.config.pruner.as_ref().unwrap();
        assert_eq!(
            (p.scoring, p.scoring_augment),
            (ScoringChoice::Balanced, false)
        );
        assert!(!toml::to_string(&c.config).unwrap().contains("scoring"));
    }

    #[test]
    fn pruner_sources_and_sizes_are_checked() {
        let table = |body: &str| format!("{BASE}\n[pruner]\n{body}\n");
        let e = err(&table("use = \"snip\"\nmasks = \"m.safetensors\""), &[]);
        assert!(e.contains("not both") && e.contains(":15:"), "{e}");
        let e = err(&table("sparsity = 0.9"), &[]);
        assert!(e.contains("needs `use"), "{e}");
        let e = err(
            &table("masks = \"m.safetensors\"\nbn_mode = \"train\""),
            &[],
        );
        assert!(
            e.contains("unknown key `bn_mode`") && e.contains(":15:"),
            "{e}"
        );
        let e = err(&table("use = \"snip\"\nsparsity = 1.0"), &[]);
        assert!(e.contains("keeps no weight") && e.contains(":15:"), "{e}");
        let e = err(&table("use = \"snip\"\nsparsity = 0.9\nbatches = 0"), &[]);
        assert!(
            e.contains("batches must be at least 1") && e.contains(":16:"),
            "{e}"
        );
        let (_d, path) = write(&table("masks = \"m.safetensors\""));
        assert!(LoadedConfig::load(&path, &[]).is_ok());
    }
}
