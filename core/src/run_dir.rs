//! The run directory: what it holds (`state.json`), who works in it (`.lock`), and what a
//! `trellis run` may do with the one it finds. [`crate::commands::run`] documents the states and
//! drives a run through them.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use tch::Tensor;

use crate::checkpoint::{self, Record, TrainingState};
use crate::commands::run::RunInterrupted;
use crate::report::{LogMark, MetricsLog};
use crate::train::Trainer;

/// What `state.json` calls each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    Started,
    Checkpointed,
    Finished,
    Failed,
}

pub(crate) const STATE_FORMAT: u32 = 1;

/// `state.json`: what the run directory holds, for people and for `trellis run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DirState {
    pub(crate) format: u32,
    pub(crate) state: Phase,
    /// Epochs completed and checkpointed: those of the checkpoint in force (0 without one).
    pub(crate) epoch: usize,
    pub(crate) epochs: usize,
    /// The state in words.
    pub(crate) summary: String,
    /// Why it stopped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// The one command that goes on with this run; none when it is finished.
    pub(crate) resume: Option<String>,
    /// The checkpoint in force.
    pub(crate) checkpoint: Option<Record>,
    /// How far metrics.jsonl went when that checkpoint was written.
    pub(crate) metrics: Option<LogMark>,
    /// The result, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) model_sha256: Option<String>,
}

impl DirState {
    pub(crate) fn describe(&self) -> String {
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
pub(crate) const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "config.toml",
    "plugins.json",
    "model.safetensors",
    "checkpoint",
    "checkpoints",
];

/// What a `trellis run` does with the run directory it found.
pub(crate) enum Plan {
    /// Nothing there yet: a new run.
    Fresh,
    /// `--resume` of a run without a checkpoint: it starts over.
    Restart,
    /// `--resume` from the checkpoint in force, with metrics.jsonl as far as it went then.
    Continue(Record, LogMark),
}

/// A run directory, locked for as long as this value lives.
pub(crate) struct RunDir {
    pub(crate) path: PathBuf,
    pub(crate) lock: File,
    /// Created by this process: removed again if the run ends before writing anything.
    pub(crate) created: bool,
    /// The same for the lock file, in a directory that existed before.
    pub(crate) lock_created: bool,
    pub(crate) written: bool,
    pub(crate) state: Option<DirState>,
    /// The command that resumes this run.
    pub(crate) command: String,
    pub(crate) epochs: usize,
    pub(crate) checkpoint: Option<Record>,
    pub(crate) mark: Option<LogMark>,
}

impl RunDir {
    /// Locks the directory (creating it for a new run) and reads its state; writes nothing else.
    pub(crate) fn open(
        path: &Path,
        resume: bool,
        command: String,
        epochs: usize,
    ) -> Result<RunDir> {
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
    pub(crate) fn plan(&self, resume: bool) -> Result<Plan> {
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
    pub(crate) fn abandon(&self) {
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
    pub(crate) fn begin(
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

    pub(crate) fn write_state(
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
    pub(crate) fn commit(
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
    pub(crate) fn finish(&mut self, net: &crate::models::Network) -> Result<()> {
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
    pub(crate) fn interrupted(
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
    pub(crate) fn failed(&mut self, e: anyhow::Error) -> anyhow::Error {
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

pub(crate) fn no_state(path: &Path, resume: bool) -> anyhow::Error {
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

pub(crate) fn read_state(run_dir: &Path) -> Result<Option<DirState>> {
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

pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The process holding the flock on `lock`: from /proc/locks (matched by device and inode), or
/// else the pid the holder wrote into the file, if that process is alive.
pub(crate) fn lock_holder(lock: &File, path: &Path) -> Option<u32> {
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

/// A checkpoint's content held in memory (deep copies on the CPU), for an epoch that
/// `checkpoint_every` did not checkpoint: an interrupt in the next epoch writes it.
pub(crate) struct Snapshot {
    pub(crate) model: Vec<(String, Tensor)>,
    pub(crate) state: TrainingState,
    pub(crate) mark: LogMark,
}

impl Snapshot {
    pub(crate) fn take(
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
pub(crate) struct PluginRecord {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) path: String,
    pub(crate) sha256: String,
    pub(crate) components: Vec<String>,
}

/// `config.toml` (the resolved config) and `plugins.json` (each plugin's file, sha256 and the
/// components the run used): what re-runs the same run later, and proves what ran.
pub(crate) fn write_provenance(
    run_dir: &Path,
    resolved: &str,
    plugins: &[PluginRecord],
) -> Result<()> {
    checkpoint::write_atomic(&run_dir.join("config.toml"), resolved.as_bytes())?;
    checkpoint::write_atomic(
        &run_dir.join("plugins.json"),
        serde_json::to_string_pretty(plugins)?.as_bytes(),
    )
}
