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
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};
use trellis_sdk::{EpochInfo, Role};

use crate::checkpoint::{self, Record, TrainingState};
use crate::config::LoadedConfig;
use crate::data::Source;
use crate::plugin_host::Registry;
use crate::prune;
use crate::report::{summary_table, table_map, EpochRecord, LogMark, MetricsLog, Progress};
use crate::train::{prepare, resolve_device, Interrupted, Prepared, Trainer};

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
pub const NEUTRAL_KEYS: &[&str] = &["train.checkpoint_every"];

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
    resolve_device(c.train.device)?;
    let run_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| default_run_dir(&opts.config));
    let signals = Signals::install()?;
    let command = resume_command(opts, &run_dir);
    let mut dir = RunDir::open(&run_dir, opts.resume, command, c.train.epochs)?;
    let plan = dir.plan(opts.resume)?;
    if let (Plan::Continue(record, _), Some(stop)) = (&plan, opts.stop_after) {
        if stop <= record.epoch {
            bail!(
                "--stop-after {stop}: the run in {} is already checkpointed after epoch {} of {}\n  \
                 help: --stop-after counts the epochs of the whole run: pass more than {}, or leave it \
                 out to finish the run",
                run_dir.display(),
                record.epoch,
                c.train.epochs,
                record.epoch
            );
        }
    }

    // Everything that can refuse runs before anything is written.
    let set_up = (|| {
        let prepared = prepare(&cfg, opts.manifest.as_deref(), Some(run_dir.clone()))?;
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
    let (prepared, resolved, plugins) = match set_up {
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
    let (start_epoch, records) = match &plan {
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
            (resume(&run_dir, &mut trainer, record)?, records)
        }
        Plan::Fresh | Plan::Restart => (0, Vec::new()),
    };
    if signals.any.load(Ordering::SeqCst) {
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
        source_name(c.data.source),
        test_data.len(),
        count(epochs, "epoch"),
        if start_epoch > 0 {
            format!(" (from epoch {})", start_epoch + 1)
        } else {
            String::new()
        },
        trainer.steps_per_epoch,
        device_name(device),
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
            records.push(record);
            let done = epoch + 1;
            let interrupted = signals.any.load(Ordering::SeqCst);
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

enum Outcome {
    Finished,
    /// By `--stop-after`.
    Stopped,
    /// By a signal, in (or at the end of) epoch `in_epoch` (1-based).
    Interrupted {
        in_epoch: usize,
    },
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

/// What `state.json` calls each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    Started,
    Checkpointed,
    Finished,
    Failed,
}

const STATE_FORMAT: u32 = 1;

/// `state.json`: what the run directory holds, for people and for `trellis run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DirState {
    format: u32,
    state: Phase,
    /// Epochs completed and checkpointed: those of the checkpoint in force (0 without one).
    epoch: usize,
    epochs: usize,
    /// The state in words.
    summary: String,
    /// Why it stopped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The one command that goes on with this run; none when it is finished.
    resume: Option<String>,
    /// The checkpoint in force.
    checkpoint: Option<Record>,
    /// How far metrics.jsonl went when that checkpoint was written.
    metrics: Option<LogMark>,
    /// The result, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model_sha256: Option<String>,
}

impl DirState {
    fn describe(&self) -> String {
        let of = format!("epoch {} of {}", self.epoch, self.epochs);
        match (self.state, &self.checkpoint) {
            (Phase::Started, _) => "started; no checkpoint yet".into(),
            (Phase::Checkpointed, _) => format!("checkpointed after {of}"),
            (Phase::Finished, _) => format!("finished (all {} epochs)", self.epochs),
            (Phase::Failed, Some(_)) => format!("failed; its checkpoint after {of} is kept"),
            (Phase::Failed, None) => "failed before its first checkpoint".into(),
        }
    }
}

/// The files of a run: a directory with any of them but no `state.json` was not written by this
/// trellis, or not by a `trellis run`.
const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "config.toml",
    "plugins.json",
    "model.safetensors",
    "checkpoint",
    "checkpoints",
];

/// What a `trellis run` does with the run directory it found.
enum Plan {
    /// Nothing there yet: a new run.
    Fresh,
    /// `--resume` of a run without a checkpoint: it starts over.
    Restart,
    /// `--resume` from the checkpoint in force, with metrics.jsonl as far as it went then.
    Continue(Record, LogMark),
}

/// A run directory, locked for as long as this value lives.
struct RunDir {
    path: PathBuf,
    lock: File,
    /// Created by this process: removed again if the run ends before writing anything.
    created: bool,
    /// The same for the lock file, in a directory that existed before.
    lock_created: bool,
    written: bool,
    state: Option<DirState>,
    /// The command that resumes this run.
    command: String,
    epochs: usize,
    checkpoint: Option<Record>,
    mark: Option<LogMark>,
}

impl RunDir {
    /// Locks the directory (creating it for a new run) and reads its state; writes nothing else.
    fn open(path: &Path, resume: bool, command: String, epochs: usize) -> Result<RunDir> {
        let created = if path.is_dir() {
            false
        } else if path.exists() {
            bail!(
                "--out {} is a file, not a directory\n  help: choose another --out",
                path.display()
            );
        } else if resume {
            bail!(
                "--resume: {} does not exist\n  help: run without --resume to start a run there",
                path.display()
            );
        } else {
            std::fs::create_dir_all(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            true
        };
        let has_run_files = RUN_FILES
            .iter()
            .any(|f| path.join(f).symlink_metadata().is_ok());
        if !path.join("state.json").exists()
            && !path.join(".lock").exists()
            && (resume || has_run_files)
        {
            // Never a run directory of this trellis (a run's first act is to create `.lock`):
            // refused before even creating the lock file, so the directory stays as it was.
            return Err(no_state(path, resume));
        }
        let lock_path = path.join(".lock");
        let lock_created = !lock_path.exists();
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let (holder, stop) = match lock_holder(&lock, &lock_path) {
                    Some(pid) => (
                        format!("pid {pid}"),
                        format!("`kill -INT {pid}` (it checkpoints and can be resumed)"),
                    ),
                    None => ("pid unknown".into(), "Ctrl-C".into()),
                };
                bail!(
                    "{} is in use by another trellis ({holder})\n  help: wait for it to end, or stop it \
                     with {stop}; two runs never share a run directory",
                    path.display()
                );
            }
            Err(e) => bail!("cannot lock {}: {e}", lock_path.display()),
        }
        let state = read_state(path)?;
        Ok(RunDir {
            path: path.to_path_buf(),
            lock,
            created,
            lock_created,
            written: false,
            epochs,
            checkpoint: state.as_ref().and_then(|s| s.checkpoint.clone()),
            mark: state.as_ref().and_then(|s| s.metrics.clone()),
            state,
            command,
        })
    }

    /// What to do with the directory found, or why not.
    fn plan(&self, resume: bool) -> Result<Plan> {
        let d = self.path.display();
        let Some(state) = &self.state else {
            if RUN_FILES
                .iter()
                .any(|f| self.path.join(f).symlink_metadata().is_ok())
            {
                return Err(no_state(&self.path, resume));
            }
            // With `--resume`, only a directory whose run ended before it wrote anything (it has
            // the lock file, as `open` checked) starts as new.
            return Ok(Plan::Fresh);
        };
        let reason = state
            .reason
            .as_ref()
            .map_or(String::new(), |r| format!("\n  reason: {r}"));
        let command = state.resume.as_deref().unwrap_or(&self.command);
        if !resume {
            bail!(
                "{d} holds a run: {}{reason}\n  help: {}",
                state.describe(),
                match (state.state, &state.checkpoint) {
                    (Phase::Finished, _) => "its results are there (metrics.jsonl, model.safetensors); \
                                             choose another --out for a new run"
                        .to_string(),
                    (Phase::Started, _) | (Phase::Failed, None) => format!(
                        "`{command}` starts it over (it has no checkpoint yet); or choose another --out"
                    ),
                    (Phase::Checkpointed, _) => {
                        format!("`{command}` continues it; or choose another --out")
                    }
                    (Phase::Failed, Some(c)) => format!(
                        "`{command}` retries it from its checkpoint after epoch {} with the same config \
                         (it fails the same way unless the cause was outside the run); to change the \
                         config, start a new run with another --out",
                        c.epoch
                    ),
                }
            );
        }
        match (state.state, &state.checkpoint, &state.metrics) {
            (Phase::Finished, _, _) => bail!(
                "--resume: {d} holds a finished run (all {} epochs); there is nothing to resume\n  help: \
                 its results are there (metrics.jsonl, model.safetensors); choose another --out for a new run",
                state.epochs
            ),
            (Phase::Started | Phase::Failed, None, _) => {
                tracing::info!("{d} has no checkpoint ({}); starting it over", state.describe());
                Ok(Plan::Restart)
            }
            (Phase::Checkpointed | Phase::Failed, Some(record), Some(mark)) => {
                if state.state == Phase::Failed {
                    tracing::info!(
                        "{d} failed ({}); retrying from its checkpoint after epoch {}",
                        state.reason.as_deref().unwrap_or("no reason recorded"),
                        record.epoch
                    );
                }
                Ok(Plan::Continue(record.clone(), mark.clone()))
            }
            (Phase::Checkpointed, _, _) | (Phase::Started, Some(_), _) | (Phase::Failed, _, None) => {
                bail!(
                    "{}: the state `{:?}` does not go with its checkpoint record\n  help: it is written \
                     by trellis only; restore it from a copy, or start the run over in another --out",
                    self.path.join("state.json").display(),
                    state.state
                )
            }
        }
    }

    /// Removes what [`RunDir::open`] created, when the run ends before writing anything.
    fn abandon(&self) {
        if self.written {
            return;
        }
        // A run refused before its first write leaves an existing directory as it found it.
        if self.lock_created {
            let _ = std::fs::remove_file(self.path.join(".lock"));
        }
        if self.created {
            let _ = std::fs::remove_dir(&self.path);
        }
    }

    /// The first writes of a run: its state, provenance and log, as the plan says.
    fn begin(
        &mut self,
        plan: &Plan,
        resolved: &str,
        plugins: &[PluginRecord],
    ) -> Result<MetricsLog> {
        self.written = true;
        // The holder's pid, for the message of a second trellis where /proc/locks is not read.
        let _ = self.lock.set_len(0);
        let _ =
            std::io::Write::write_all(&mut &self.lock, std::process::id().to_string().as_bytes());
        match plan {
            Plan::Fresh | Plan::Restart => {
                self.checkpoint = None;
                self.mark = None;
                // A restart clears what the run it restarts had written.
                checkpoint::link(&self.path, None)?;
                checkpoint::remove_except(&self.path, None)?;
                remove_if_present(&self.path.join("model.safetensors"))?;
                self.write_state(Phase::Started, None, None)?;
                write_provenance(&self.path, resolved, plugins)?;
                MetricsLog::create(&self.path)
            }
            Plan::Continue(record, mark) => {
                let log = MetricsLog::resume(&self.path, mark)?;
                checkpoint::remove_except(&self.path, Some(record))?;
                checkpoint::link(&self.path, Some(record))?;
                remove_if_present(&self.path.join("model.safetensors"))?;
                self.write_state(Phase::Checkpointed, None, None)?;
                Ok(log)
            }
        }
    }

    fn write_state(
        &mut self,
        state: Phase,
        reason: Option<String>,
        model_sha256: Option<String>,
    ) -> Result<()> {
        let s = DirState {
            format: STATE_FORMAT,
            state,
            epoch: self.checkpoint.as_ref().map_or(0, |c| c.epoch),
            epochs: self.epochs,
            summary: String::new(),
            reason,
            resume: (state != Phase::Finished).then(|| self.command.clone()),
            checkpoint: self.checkpoint.clone(),
            metrics: self.mark.clone(),
            model_sha256,
        };
        let s = DirState {
            summary: s.describe(),
            ..s
        };
        let mut text = serde_json::to_string_pretty(&s)?;
        text.push('\n');
        checkpoint::write_atomic(&self.path.join("state.json"), text.as_bytes())?;
        self.state = Some(s);
        Ok(())
    }

    /// Writes a checkpoint and puts it in force (one rename of state.json); the one it replaces
    /// is removed after.
    fn commit(
        &mut self,
        model: &[(String, Tensor)],
        state: &TrainingState,
        mark: LogMark,
        reason: Option<String>,
    ) -> Result<()> {
        if self.checkpoint.as_ref().map(|c| c.epoch) == Some(state.epoch) {
            bail!(
                "internal error: a checkpoint after epoch {} is already in force",
                state.epoch
            );
        }
        let record = checkpoint::write(&self.path, model, state)?;
        self.checkpoint = Some(record.clone());
        self.mark = Some(mark);
        self.write_state(Phase::Checkpointed, reason, None)?;
        checkpoint::crash_point("checkpoint-committed");
        checkpoint::link(&self.path, Some(&record))?;
        checkpoint::remove_except(&self.path, Some(&record))
    }

    /// Writes the result and marks the run finished; its last checkpoint stays.
    fn finish(&mut self, net: &crate::models::Network) -> Result<()> {
        let path = self.path.join("model.safetensors");
        net.save(&path)?;
        checkpoint::sync_file(&path)?;
        checkpoint::sync_dir(&self.path)?;
        checkpoint::crash_point("model-written");
        let sha = checkpoint::sha256_of(&path)?;
        self.write_state(Phase::Finished, None, Some(sha))
    }

    /// Ends an interrupted run: the last completed epoch is checkpointed (from `snapshot` when
    /// its checkpoint was skipped), and the message says how to resume.
    fn interrupted(
        &mut self,
        signal: &str,
        in_epoch: usize,
        snapshot: Option<Snapshot>,
    ) -> anyhow::Error {
        let result = (|| -> Result<()> {
            if let Some(s) = snapshot {
                self.commit(&s.model, &s.state, s.mark, None)?;
            }
            let at = format!("by {signal} in epoch {in_epoch} of {}", self.epochs);
            match &self.checkpoint {
                Some(c) => {
                    let reason = if c.epoch >= in_epoch {
                        format!("interrupted {at}, after it ended")
                    } else {
                        format!("interrupted {at}; that epoch starts over on resume")
                    };
                    self.write_state(Phase::Checkpointed, Some(reason), None)
                }
                None => self.write_state(
                    Phase::Started,
                    Some(format!("interrupted {at}, before the first checkpoint")),
                    None,
                ),
            }
        })();
        if let Err(e) = result {
            return self.failed(e.context(format!("interrupted by {signal}")));
        }
        let kept = match &self.checkpoint {
            Some(c) => format!(
                "the checkpoint after epoch {} of {} is in force{}",
                c.epoch,
                self.epochs,
                if c.epoch < in_epoch {
                    format!(" (epoch {in_epoch} starts over)")
                } else {
                    String::new()
                }
            ),
            None => "there is no checkpoint yet (resuming starts the run over)".into(),
        };
        RunInterrupted {
            message: format!(
                "interrupted by {signal} in epoch {in_epoch} of {}; {kept}\ninterrupted: resume with `{}`",
                self.epochs, self.command
            ),
        }
        .into()
    }

    /// Marks the run failed (its checkpoint kept) and adds what to do to the error.
    fn failed(&mut self, e: anyhow::Error) -> anyhow::Error {
        let text = format!("{e:#}");
        let reason = text.lines().next().unwrap_or("").trim().to_string();
        if let Err(w) = self.write_state(Phase::Failed, Some(reason), None) {
            return anyhow!(
                "{text}\n  also: could not mark {} failed: {w:#}",
                self.path.display()
            );
        }
        let retry = match &self.checkpoint {
            Some(c) => format!("retries it from its checkpoint after epoch {}", c.epoch),
            None => "starts it over".into(),
        };
        anyhow!(
            "{text}\n  run directory: {} is marked failed; `{}` {retry} with the same config (which fails \
             the same way unless the cause was outside the run); to change the config, start a new \
             run with another --out",
            self.path.display(),
            self.command
        )
    }
}

fn no_state(path: &Path, resume: bool) -> anyhow::Error {
    let d = path.display();
    let has_run_files = RUN_FILES
        .iter()
        .any(|f| path.join(f).symlink_metadata().is_ok());
    match (resume, has_run_files) {
        (true, false) => anyhow!(
            "--resume: {d} holds no run to resume\n  help: run without --resume to start one there"
        ),
        _ => anyhow!(
            "{}{d} holds files of a run but no state.json: an older trellis wrote it, or it was changed \
             by hand, and it cannot be taken up safely\n  help: choose another --out, or move those files away",
            if resume { "--resume: " } else { "" }
        ),
    }
}

fn read_state(run_dir: &Path) -> Result<Option<DirState>> {
    let path = run_dir.join("state.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let state: DirState = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{} does not parse: {e}\n  help: trellis alone writes it; restore it from a copy, or start \
             the run over in another --out",
            path.display()
        )
    })?;
    if state.format != STATE_FORMAT {
        bail!(
            "{} has format {}, this trellis reads format {STATE_FORMAT}",
            path.display(),
            state.format
        );
    }
    Ok(Some(state))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The process holding the flock on `lock`: from /proc/locks (matched by device and inode), or
/// else the pid the holder wrote into the file, if that process is alive.
fn lock_holder(lock: &File, path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = lock.metadata().ok()?;
    let (major, minor) = (
        rustix::fs::major(meta.dev() as _),
        rustix::fs::minor(meta.dev() as _),
    );
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    for line in locks.lines() {
        // `1: FLOCK  ADVISORY  WRITE 12345 fe:00:5529810 0 EOF`; waiters read `1: -> FLOCK ...`.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[1] != "FLOCK" {
            continue;
        }
        let id: Vec<&str> = fields[5].split(':').collect();
        let matches = id.len() == 3
            && id[2].parse::<u64>() == Ok(meta.ino())
            && u32::from_str_radix(id[0], 16) == Ok(major)
            && u32::from_str_radix(id[1], 16) == Ok(minor);
        if let (true, Ok(pid)) = (matches, fields[4].parse::<u32>()) {
            return Some(pid);
        }
    }
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
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

/// A checkpoint's content held in memory (deep copies on the CPU), for an epoch that
/// `checkpoint_every` did not checkpoint: an interrupt in the next epoch writes it.
struct Snapshot {
    model: Vec<(String, Tensor)>,
    state: TrainingState,
    mark: LogMark,
}

impl Snapshot {
    fn take(
        trainer: &Trainer<'_>,
        model: &[(String, Tensor)],
        done: usize,
        log: &MetricsLog,
    ) -> Result<Snapshot> {
        let mut state = trainer.training_state(done)?;
        for (tensors, _) in state.parts.values_mut() {
            *tensors = checkpoint::cpu_copy(tensors);
        }
        Ok(Snapshot {
            model: checkpoint::cpu_copy(model),
            state,
            mark: log.mark(),
        })
    }
}

/// One line of `plugins.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PluginRecord {
    name: String,
    version: String,
    path: String,
    sha256: String,
    components: Vec<String>,
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

/// `config.toml` (the resolved config) and `plugins.json` (each plugin's file, sha256 and the
/// components the run used): what re-runs the same run later, and proves what ran.
fn write_provenance(run_dir: &Path, resolved: &str, plugins: &[PluginRecord]) -> Result<()> {
    checkpoint::write_atomic(&run_dir.join("config.toml"), resolved.as_bytes())?;
    checkpoint::write_atomic(
        &run_dir.join("plugins.json"),
        serde_json::to_string_pretty(plugins)?.as_bytes(),
    )
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

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Synthetic => "synthetic",
        Source::Cifar10 => "CIFAR-10",
        Source::Cifar100 => "CIFAR-100",
    }
}

fn device_name(device: Device) -> String {
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
        assert_eq!(device_name(Device::Cpu), "the CPU");
    }
}
