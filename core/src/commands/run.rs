//! `trellis run`: one config end to end — the run directory and its state, provenance, resuming,
//! interruption, and the record of every epoch around the training loop of [`crate::train`].
//!
//! # The run directory
//!
//! `state.json` says what the directory holds, with the one command that goes on with it:
//!
//! | `state`        | what it means                                         | `resume` does           |
//! |----------------|-------------------------------------------------------|-------------------------|
//! | `started`      | training began, no checkpoint yet (stopped or killed  | starts the run over     |
//! |                | in its first epochs)                                  |                         |
//! | `checkpointed` | the checkpoint after `epoch` of `epochs` is in force  | continues from it       |
//! |                | (stopped by `--stop-after`, a signal, or a kill)      |                         |
//! | `finished`     | every epoch ran; `model.safetensors` is the result    | (nothing: it is done)   |
//! | `failed`       | an error ended it (`reason`); its last checkpoint, if | retries from that       |
//! |                | any, is kept                                          | checkpoint, or restarts |
//!
//! `trellis run CONFIG --out DIR` over an existing run refuses and prints the state and that
//! command. Every change of `state.json` is one atomic rename (written beside it, fsync'd,
//! renamed, the directory fsync'd), and putting a checkpoint in force *is* such a change:
//! `state.json` names the checkpoint's directory with the sha256 of each of its files (its
//! `trainer.json` included) and the length and sha256 of `metrics.jsonl` at that point
//! ([`crate::checkpoint`] writes and fsyncs the directory before). A kill at any instant thus
//! leaves a state that `--resume` takes up, and a resumed run cuts `metrics.jsonl` back to the
//! recorded length, never re-writing the lines before it.
//!
//! `.lock` in the directory is flock'd for as long as a trellis works there: a second process
//! refuses, naming the first one's pid.
//!
//! `--resume` checks everything before it writes anything: the state, the checkpoint's
//! hashes, `metrics.jsonl`, and the config and plugins against those the run started with
//! (`config.toml`, `plugins.json`). A resumed run must be the run it continues: any key that
//! changes results is refused, with the list of differences. Only [`NEUTRAL_KEYS`] may change,
//! and `plugins` (the manifest's location) as long as every plugin the run uses is the same file
//! (same sha256). Deliberately not neutral: `train.threads` (libtorch's CPU kernels split their
//! reductions by thread, so the float results change), `train.device`, `train.eval_every` and
//! `train.eval_batch_size` (which epochs evaluate, and the order metrics sum in), `data.path`
//! (the data behind it cannot be checked cheaply).
//!
//! # Interruption
//!
//! SIGINT or SIGTERM sets a flag; the training step under way finishes and the epoch stops
//! before its next step. The checkpoint after the last completed epoch is then in force: written
//! at its time, or now from the copy kept in memory when `checkpoint_every` skipped that epoch.
//! The run exits with 130 and prints the command that resumes it; the interrupted epoch is
//! trained again on resume, exactly as it would have been. (A checkpoint inside an epoch is not
//! written: continuing there would need the loader's position, the epoch's running loss and
//! every plugin's state in the middle of an epoch, which plugins are not asked to save.) A
//! signal during evaluation lets that epoch finish and checkpoint first. A second signal exits
//! at once, with 130: what is in force on the disk stays a valid state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::Device;
use trellis_sdk::{EpochInfo, Role};

use crate::best::KeepBest;
use crate::checkpoint::{self, Record};
use crate::config::LoadedConfig;
use crate::distributed::{Dist, World};
use crate::plugin_host::Registry;
use crate::prune;
use crate::report::{summary_table, table_map, EpochRecord, MetricsLog, Progress};
use crate::run_dir::{Plan, PluginRecord, RunDir, Snapshot};
use crate::sinks::Sinks;
use crate::train::{prepare, resolve_device, Interrupted, Prepared, Trainer};
use crate::train_log;

/// How `trellis run` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    /// The run directory; default `runs/<config name>-<unix time>`.
    pub out: Option<PathBuf>,
    /// A manifest to use instead of the config's `plugins`.
    pub manifest: Option<PathBuf>,
    /// Continue the run in the run directory: from its checkpoint, or from the start if it has
    /// none yet.
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

/// How `trellis run` ends after SIGINT or SIGTERM: with a checkpoint in force (or none yet) and
/// the command that resumes; `main` prints it and exits with 130.
#[derive(Debug)]
pub struct RunInterrupted {
    pub message: String,
}

impl std::fmt::Display for RunInterrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunInterrupted {}

/// The exit status of a run ended by a signal (128 + SIGINT, as shells report Ctrl-C).
pub const INTERRUPTED_EXIT: u8 = 130;

/// Config keys a resumed run may change: they change nothing that the run computes.
pub const NEUTRAL_KEYS: &[&str] = &["train.checkpoint_every", "distributed.timeout_s"];

/// Runs one config end to end.
pub fn run(opts: &RunOptions) -> Result<RunSummary> {
    if opts.stop_after == Some(0) {
        bail!(
            "--stop-after 0 would stop before the first epoch, with nothing to checkpoint\n  help: \
             --stop-after counts the epochs of the whole run: pass 1 or more"
        );
    }
    let cfg = LoadedConfig::load(&opts.config, &opts.overrides)?;
    let c = &cfg.config;
    // Before the run directory exists, so a bad device leaves nothing behind.
    let device = resolve_device(c.train.device)?;
    let dist = match World::from_env()? {
        Some(world) => {
            let device = match device {
                Device::Cuda(_) => Device::Cuda(world.local_rank),
                other => other,
            };
            Some(Rc::new(Dist::connect(world, &c.distributed, device)?))
        }
        None => None,
    };
    if let Some(d) = dist.as_ref().filter(|d| d.rank() > 0) {
        return follow(opts, &cfg, d.clone());
    }
    let run_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| default_run_dir(&opts.config));
    let signals = Signals::install()?;
    let command = resume_command(opts, &run_dir);
    let opened = open_run_dir(opts, &run_dir, command, c.train.epochs);
    let (mut dir, plan) = agree(dist.as_deref(), opened, "opening the run directory")?;

    // Everything that can refuse runs before anything is written.
    let set_up = (|| {
        let prepared = prepare(
            &cfg,
            opts.manifest.as_deref(),
            Some(run_dir.clone()),
            dist.clone(),
        )?;
        let resolved = resolved_config(&cfg)?;
        let plugins = plugin_records(&cfg, &prepared.registry);
        if !matches!(plan, Plan::Fresh) {
            check_same_run(
                &run_dir,
                &resolved,
                &plugins,
                matches!(plan, Plan::Continue(..)),
            )?;
        }
        Ok((prepared, resolved, plugins))
    })();
    let (prepared, resolved, plugins) = match agree(dist.as_deref(), set_up, "setting up") {
        Ok(set_up) => set_up,
        Err(e) => {
            dir.abandon();
            return Err(e);
        }
    };
    let Prepared {
        mut trainer,
        model,
        train_data,
        test_data,
        device,
        ..
    } = prepared;
    if let Some(d) = &dist {
        // The other ranks load the same checkpoint from the run directory.
        let record = match &plan {
            Plan::Continue(record, _) => serde_json::to_vec(record)?,
            Plan::Fresh | Plan::Restart => Vec::new(),
        };
        d.broadcast_bytes(&record)?;
    }
    let resumed = (|| match &plan {
        Plan::Continue(record, mark) => {
            let records = MetricsLog::read_to(&run_dir, mark)?;
            if record.epoch > 0 && records.last().map(|r| r.epoch) != Some(record.epoch) {
                bail!(
                    "{}: its records end at epoch {}, but the run's checkpoint is after epoch {}\n  help: \
                     restore it from a copy, or start the run over in another --out",
                    run_dir.join("metrics.jsonl").display(),
                    records.last().map_or(0, |r| r.epoch),
                    record.epoch
                );
            }
            Ok((resume(&run_dir, &mut trainer, record)?, records))
        }
        Plan::Fresh | Plan::Restart => Ok((0, Vec::new())),
    })();
    let (start_epoch, records) = agree(dist.as_deref(), resumed, "loading the checkpoint")?;
    trainer.synchronize("at the start")?;
    if any_rank(dist.as_deref(), &signals)? {
        dir.abandon();
        return Err(RunInterrupted {
            message: format!(
                "interrupted by {} before training began; {} was not changed",
                signals.name(),
                run_dir.display()
            ),
        }
        .into());
    }

    // From here on the run directory changes; each step leaves a state `--resume` takes up.
    let mut log = dir.begin(&plan, &resolved, &plugins)?;
    let _train_log = TrainLog::start(&run_dir);
    let mut sinks = Sinks::open(&run_dir, &c.log, &records)?;
    let mut best = match (c.train.keep, &c.train.best_metric) {
        (crate::config::Keep::Best, Some(metric)) => Some(KeepBest::open(
            &run_dir,
            metric,
            c.train.best_mode.unwrap_or_default(),
        )?),
        _ => None,
    };
    trainer.interrupt = Some(signals.any.clone());
    let epochs = c.train.epochs;
    let last_epoch = opts.stop_after.map_or(epochs, |s| s.min(epochs));
    let mut records = records;
    tracing::info!(
        "training {} ({} parameters) on {} {} training images ({} test) for {}{}, {} steps each, on \
         {}; writing {}",
        c.model.name(),
        thousands(model.net().num_parameters()),
        train_data.len(),
        c.data.source.in_words(),
        test_data.len(),
        count(epochs, "epoch"),
        if start_epoch > 0 {
            format!(" (from epoch {})", start_epoch + 1)
        } else {
            String::new()
        },
        trainer.steps_per_epoch,
        device_in_words(device),
        run_dir.display()
    );
    let mut progress = Progress::new(opts.progress);
    let started = Instant::now();
    let mut snapshot: Option<Snapshot> = None;
    let outcome = (|| -> Result<Outcome> {
        trainer.prune_if_due()?;
        for epoch in start_epoch..last_epoch {
            let record =
                match train_and_record(&mut trainer, &test_data, epoch, &mut progress, started) {
                    Err(e) if e.downcast_ref::<Interrupted>().is_some() => {
                        return Ok(Outcome::Interrupted {
                            in_epoch: epoch + 1,
                        })
                    }
                    record => record?,
                };
            log.append(&record)?;
            sinks.write(&record)?;
            if let Some(best) = &mut best {
                best.consider(record.epoch, &record.test, &model.net())?;
            }
            records.push(record);
            let done = epoch + 1;
            let interrupted = any_rank(trainer.dist.as_deref(), &signals)?;
            let stopped = done == last_epoch && last_epoch < epochs;
            if done.is_multiple_of(c.train.checkpoint_every)
                || done == epochs
                || stopped
                || interrupted
            {
                let state = trainer.training_state(done)?;
                let reason = stopped.then(|| format!("stopped after epoch {done} by --stop-after"));
                dir.commit(&model.net().state_dict(), &state, log.mark(), reason)?;
                snapshot = None;
            } else {
                // Kept so that an interrupt in the next epoch can still checkpoint this one.
                snapshot = Some(Snapshot::take(
                    &trainer,
                    &model.net().state_dict(),
                    done,
                    &log,
                )?);
            }
            if interrupted && done < last_epoch {
                return Ok(Outcome::Interrupted { in_epoch: done });
            }
        }
        if last_epoch < epochs {
            return Ok(Outcome::Stopped);
        }
        dir.finish(&model.net())?;
        Ok(Outcome::Finished)
    })();
    let finished = match outcome {
        Ok(Outcome::Finished) => true,
        Ok(Outcome::Stopped) => {
            tracing::info!(
                "stopped after epoch {last_epoch} of {epochs}; continue with `{}`",
                dir.command
            );
            false
        }
        Ok(Outcome::Interrupted { in_epoch }) => {
            return Err(dir.interrupted(signals.name(), in_epoch, snapshot.take()))
        }
        Err(e) => return Err(dir.failed(e)),
    };
    train_log::println(&format!("\n{}", summary_table(&records)));
    if let Some(masks) = trainer.masks() {
        train_log::println(&prune::density_table(masks));
    }
    train_log::println(&format!("run directory: {}", run_dir.display()));
    Ok(RunSummary {
        run_dir,
        records,
        finished,
    })
}

/// `RunDir::open` and its plan, refusing a `--stop-after` the run is already past.
fn open_run_dir(
    opts: &RunOptions,
    run_dir: &Path,
    command: String,
    epochs: usize,
) -> Result<(RunDir, Plan)> {
    let dir = RunDir::open(run_dir, opts.resume, command, epochs)?;
    let plan = dir.plan(opts.resume)?;
    if let (Plan::Continue(record, _), Some(stop)) = (&plan, opts.stop_after) {
        if stop <= record.epoch {
            bail!(
                "--stop-after {stop}: the run in {} is already checkpointed after epoch {} of {}\n  \
                 help: --stop-after counts the epochs of the whole run: pass more than {}, or leave it \
                 out to finish the run",
                run_dir.display(),
                record.epoch,
                epochs,
                record.epoch
            );
        }
    }
    Ok((dir, plan))
}

/// `outcome` when every rank (or the one process) succeeded; see [`Dist::agree`].
fn agree<T>(dist: Option<&Dist>, outcome: Result<T>, what: &str) -> Result<T> {
    match dist {
        Some(d) => d.agree(outcome, what),
        None => outcome,
    }
}

/// Whether this process, or any rank, was sent SIGINT or SIGTERM: all ranks stop together.
fn any_rank(dist: Option<&Dist>, signals: &Signals) -> Result<bool> {
    let here = signals.any.load(Ordering::SeqCst);
    match dist {
        Some(d) => d.any(here),
        None => Ok(here),
    }
}

/// A rank after the first of a data-parallel run: it trains its shard beside rank 0 and writes
/// nothing; rank 0 keeps the run directory. It goes through the same collectives as rank 0 in
/// [`run`], in the same order.
fn follow(opts: &RunOptions, cfg: &LoadedConfig, dist: Rc<Dist>) -> Result<RunSummary> {
    let c = &cfg.config;
    let signals = Signals::install()?;
    dist.agree(Ok(()), "opening the run directory")?;
    let prepared = prepare(cfg, opts.manifest.as_deref(), None, Some(dist.clone()));
    let Prepared {
        mut trainer,
        test_data,
        ..
    } = dist.agree(prepared, "setting up")?;
    let record = dist.broadcast_bytes(&[])?;
    let resumed = (|| -> Result<usize> {
        if record.is_empty() {
            return Ok(0);
        }
        let record: Record = serde_json::from_slice(&record)
            .context("rank 0 sent a checkpoint record this rank cannot read")?;
        let Some(run_dir) = &opts.out else {
            bail!("rank {} resumes without --out", dist.rank());
        };
        resume(run_dir, &mut trainer, &record)
    })();
    let start_epoch = dist.agree(resumed, "loading the checkpoint")?;
    trainer.synchronize("at the start")?;
    let stopped = || RunInterrupted {
        message: format!(
            "rank {} of {} stopped with the others on {}",
            dist.rank(),
            dist.world_size(),
            signals.name()
        ),
    };
    if any_rank(Some(&dist), &signals)? {
        return Err(stopped().into());
    }
    trainer.interrupt = Some(signals.any.clone());
    let epochs = c.train.epochs;
    let last_epoch = opts.stop_after.map_or(epochs, |s| s.min(epochs));
    let mut progress = Progress::new(false);
    let started = Instant::now();
    trainer.prune_if_due()?;
    for epoch in start_epoch..last_epoch {
        match train_and_record(&mut trainer, &test_data, epoch, &mut progress, started) {
            Err(e) if e.downcast_ref::<Interrupted>().is_some() => return Err(stopped().into()),
            record => record?,
        };
        if any_rank(Some(&dist), &signals)? && epoch + 1 < last_epoch {
            return Err(stopped().into());
        }
    }
    Ok(RunSummary {
        run_dir: opts.out.clone().unwrap_or_default(),
        records: Vec::new(),
        finished: last_epoch == epochs,
    })
}

/// `train.log` is appended to for as long as this value lives.
struct TrainLog;

impl TrainLog {
    fn start(run_dir: &Path) -> TrainLog {
        if let Err(e) = train_log::start(&run_dir.join("train.log")) {
            tracing::warn!("cannot write {}: {e}", run_dir.join("train.log").display());
        }
        TrainLog
    }
}

impl Drop for TrainLog {
    fn drop(&mut self) {
        train_log::stop();
    }
}

enum Outcome {
    Finished,
    /// By `--stop-after`.
    Stopped,
    /// By a signal, in (or at the end of) epoch `in_epoch` (1-based).
    Interrupted {
        in_epoch: usize,
    },
}

pub(crate) fn default_run_dir(config: &Path) -> PathBuf {
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

/// SIGINT and SIGTERM, caught for the length of a run: the first sets `any` (and the flag of
/// its own signal), the second exits at once with [`INTERRUPTED_EXIT`].
struct Signals {
    any: Arc<AtomicBool>,
    sigint: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    fn install() -> Result<Signals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let any = Arc::new(AtomicBool::new(false));
        let sigint = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for signal in [SIGINT, SIGTERM] {
            // The exit goes first: it fires only when an earlier signal has set `any`.
            ids.push(flag::register_conditional_shutdown(
                signal,
                INTERRUPTED_EXIT.into(),
                any.clone(),
            )?);
            ids.push(flag::register(signal, any.clone())?);
        }
        ids.push(flag::register(SIGINT, sigint.clone())?);
        Ok(Signals { any, sigint, ids })
    }

    fn name(&self) -> &'static str {
        if self.sigint.load(Ordering::SeqCst) {
            "SIGINT"
        } else {
            "SIGTERM"
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// The command that resumes this run, as the user would type it.
fn resume_command(opts: &RunOptions, run_dir: &Path) -> String {
    let mut args = vec![
        "trellis".to_string(),
        "run".into(),
        opts.config.display().to_string(),
    ];
    for o in &opts.overrides {
        args.push("--set".into());
        args.push(o.clone());
    }
    if let Some(m) = &opts.manifest {
        args.push("--manifest".into());
        args.push(m.display().to_string());
    }
    args.push("--out".into());
    args.push(run_dir.display().to_string());
    // A rank of `--nproc N` tells how to go on with as many ranks (any number would do).
    if let Ok(nproc) = std::env::var(super::launch::NPROC_ENV) {
        args.push("--nproc".into());
        args.push(nproc);
    }
    args.push("--resume".into());
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Each plugin's file, sha256 and the components the run uses.
fn plugin_records(cfg: &LoadedConfig, registry: &Registry) -> Vec<PluginRecord> {
    let used: Vec<(Role, &str)> = cfg
        .components()
        .iter()
        .map(|(t, n, _)| (t.role(), *n))
        .collect();
    registry
        .libraries
        .iter()
        .map(|l| PluginRecord {
            name: l.info.name.clone(),
            version: l.info.version.clone(),
            path: l.path.display().to_string(),
            sha256: l.sha256.clone(),
            components: l
                .info
                .components
                .iter()
                .filter(|comp| used.iter().any(|(r, n)| *r == comp.role && *n == comp.name))
                .map(|comp| format!("{} {}", comp.role, comp.name))
                .collect(),
        })
        .collect()
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

/// Refuses a `--resume` whose config or plugins would make another run than the one in
/// `run_dir` (see the module documentation); reads only.
fn check_same_run(
    run_dir: &Path,
    resolved: &str,
    plugins: &[PluginRecord],
    required: bool,
) -> Result<()> {
    let config_path = run_dir.join("config.toml");
    let recorded = match std::fs::read_to_string(&config_path) {
        Ok(text) => text,
        // Killed before its provenance was written: nothing to compare, nothing to continue.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(()),
        Err(e) => bail!("cannot read {}: {e}", config_path.display()),
    };
    let was: toml::Value = toml::from_str(&recorded)
        .with_context(|| format!("{} does not parse", config_path.display()))?;
    let now: toml::Value =
        toml::from_str(resolved).context("the resolved config does not parse")?;
    let mut changes = Vec::new();
    differences("", &was, &now, &mut changes);
    changes.retain(|(key, _, _)| !NEUTRAL_KEYS.contains(&key.as_str()) && key != "plugins");
    let mut lines: Vec<String> = changes
        .iter()
        .map(|(key, was, now)| {
            format!(
                "  {key}: {} when the run started, {} now",
                was.as_deref().unwrap_or("not set"),
                now.as_deref().unwrap_or("not set")
            )
        })
        .collect();

    let plugins_path = run_dir.join("plugins.json");
    let recorded_plugins: Vec<PluginRecord> = match std::fs::read_to_string(&plugins_path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} does not parse", plugins_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Vec::new(),
        Err(e) => bail!("cannot read {}: {e}", plugins_path.display()),
    };
    let used = |records: &[PluginRecord]| -> Vec<(String, String, String, Vec<String>)> {
        let mut used: Vec<_> = records
            .iter()
            .filter(|p| !p.components.is_empty())
            .map(|p| {
                (
                    p.name.clone(),
                    p.version.clone(),
                    p.sha256.clone(),
                    p.components.clone(),
                )
            })
            .collect();
        used.sort();
        used
    };
    let (was_used, now_used) = (used(&recorded_plugins), used(plugins));
    if !recorded_plugins.is_empty() && was_used != now_used {
        let show = |u: &[(String, String, String, Vec<String>)]| {
            u.iter()
                .map(|(name, version, sha, _)| {
                    format!("{name} {version} ({})", &sha[..sha.len().min(12)])
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        lines.push(format!(
            "  plugins used: {} when the run started, {} now",
            show(&was_used),
            show(&now_used)
        ));
    }
    if lines.is_empty() {
        return Ok(());
    }
    let d = run_dir.display();
    bail!(
        "--resume: the run in {d} started with another config or plugins; resuming would make another \
         run:\n{}\n  help: a run continues with the config it started with (only {} may change): resume \
         with `trellis run {} --out {d} --resume`, or start a new run with another --out",
        lines.join("\n"),
        NEUTRAL_KEYS.join(", "),
        shell_quote(&config_path.display().to_string())
    )
}

/// Collects `(key, was, now)` for each leaf that differs between two config documents.
fn differences(
    prefix: &str,
    was: &toml::Value,
    now: &toml::Value,
    out: &mut Vec<(String, Option<String>, Option<String>)>,
) {
    use toml::Value;
    match (was, now) {
        (Value::Table(a), Value::Table(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => differences(&path, x, y, out),
                    (x, y) => out.push((path, x.map(show_value), y.map(show_value))),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{prefix}[{i}]"), x, y, out);
            }
        }
        _ if was != now => out.push((
            prefix.to_string(),
            Some(show_value(was)),
            Some(show_value(now)),
        )),
        _ => {}
    }
}

fn show_value(v: &toml::Value) -> String {
    v.to_string()
}

/// Loads the checkpoint into the model and every component; returns the epochs it had done.
fn resume(run_dir: &Path, trainer: &mut Trainer<'_>, record: &Record) -> Result<usize> {
    let (model_file, saved) = checkpoint::load(run_dir, record)?;
    trainer.model.net_mut().load(&model_file)?;
    let start_epoch = saved.epoch;
    trainer.restore(saved)?;
    tracing::info!(
        "resuming {} from its checkpoint after epoch {start_epoch}",
        run_dir.display()
    );
    Ok(start_epoch)
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

fn device_in_words(device: Device) -> String {
    match device {
        Device::Cpu => "the CPU".into(),
        Device::Cuda(i) => format!("CUDA device {i}"),
        Device::Mps => "the MPS device".into(),
        Device::Vulkan => "the Vulkan device".into(),
    }
}

/// Trains one epoch, evaluates when due, and returns what `metrics.jsonl` records of it.
fn train_and_record(
    trainer: &mut Trainer<'_>,
    test_data: &std::rc::Rc<crate::data::Dataset>,
    epoch: usize,
    progress: &mut Progress,
    started: Instant,
) -> Result<EpochRecord> {
    let c = &trainer.cfg.config;
    let epochs = c.train.epochs;
    let epoch_started = Instant::now();
    let (train_loss, data_waits) = trainer.train_epoch(epoch, progress)?;
    let train_seconds = epoch_started.elapsed().as_secs_f64();
    let done = epoch + 1;
    let info = EpochInfo {
        epoch: done as u64,
        epochs: epochs as u64,
        step: trainer.step,
    };
    let (test, mut tables) = if done.is_multiple_of(c.train.eval_every) || done == epochs {
        trainer.evaluate(test_data, info)?
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
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_commands_are_quoted_for_the_shell() {
        let opts = RunOptions {
            config: "my runs/a.toml".into(),
            overrides: vec!["optimizer.use=\"adamw\"".into(), "train.epochs=3".into()],
            ..Default::default()
        };
        assert_eq!(
            resume_command(&opts, Path::new("out")),
            "trellis run 'my runs/a.toml' --set 'optimizer.use=\"adamw\"' --set train.epochs=3 \
             --out out --resume"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn config_differences_are_listed_by_key() {
        let was: toml::Value = toml::from_str(
            "a = 1\n[optimizer]\nlr = 0.05\nuse = \"sgd\"\n[[metrics]]\nuse = \"x\"\n",
        )
        .unwrap();
        let now: toml::Value = toml::from_str(
            "a = 1\nb = 2\n[optimizer]\nlr = 0.5\nuse = \"sgd\"\n[[metrics]]\nuse = \"y\"\n",
        )
        .unwrap();
        let mut out = Vec::new();
        differences("", &was, &now, &mut out);
        let keys: Vec<&str> = out.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "metrics[0].use", "optimizer.lr"]);
        assert_eq!(out[2].1.as_deref(), Some("0.05"));
        assert_eq!(out[0].1, None);
    }

    #[test]
    fn numbers_read_as_words() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(count(1, "epoch"), "1 epoch");
        assert_eq!(count(2, "epoch"), "2 epochs");
        assert_eq!(device_in_words(Device::Cpu), "the CPU");
    }
}
