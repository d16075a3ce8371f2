//! `trellis run`: one config end to end — the run directory, its provenance, resuming, and the
//! record of every epoch around the training loop of [`crate::train`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use trellis_sdk::{EpochInfo, Role};

use crate::checkpoint;
use crate::config::LoadedConfig;
use crate::plugin_host::Registry;
use crate::prune;
use crate::report::{summary_table, table_map, EpochRecord, MetricsLog, Progress};
use crate::train::{prepare, resolve_device, Prepared, Trainer};

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
    open_run_dir(&run_dir, opts.resume)?;

    let Prepared {
        mut trainer,
        registry,
        model,
        train_data,
        test_data,
        device,
    } = prepare(&cfg, opts.manifest.as_deref(), Some(run_dir.clone()))?;
    write_provenance(&run_dir, &cfg, &registry)?;

    let start_epoch = if opts.resume {
        resume(&run_dir, &mut trainer)?
    } else {
        0
    };
    trainer.prune_if_due()?;
    let (log, mut records) = MetricsLog::open(&run_dir, start_epoch)?;

    tracing::info!(
        "training {} ({} parameters) on {} {:?} images for {} epochs, {} steps each, on {:?}; writing {}",
        c.model.name(),
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
        let record = train_and_record(&mut trainer, &test_data, epoch, &mut progress, started)?;
        log.append(&record)?;
        records.push(record);
        let done = epoch + 1;
        if done.is_multiple_of(c.train.checkpoint_every) || done == epochs || done == last_epoch {
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

/// Refuses to start over a finished or started run (unless resuming one that has a checkpoint),
/// then creates the directory.
fn open_run_dir(run_dir: &Path, resume: bool) -> Result<()> {
    if resume && !checkpoint::exists(run_dir) {
        bail!(
            "--resume: {} has no checkpoint to continue from\n  help: run without --resume to start it",
            run_dir.display()
        );
    }
    if !resume && run_dir.join("metrics.jsonl").exists() {
        bail!(
            "{} already holds a run\n  help: pass --resume to continue it, or choose another --out",
            run_dir.display()
        );
    }
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))
}

#[derive(Serialize)]
struct PluginRecord<'a> {
    name: &'a str,
    version: &'a str,
    path: String,
    sha256: &'a str,
    components: Vec<String>,
}

/// `config.toml` (the resolved config) and `plugins.json` (each plugin's file, sha256 and the
/// components the run used): what re-runs the same run later, and proves what ran.
fn write_provenance(run_dir: &Path, cfg: &LoadedConfig, registry: &Registry) -> Result<()> {
    std::fs::write(run_dir.join("config.toml"), resolved_config(cfg)?)?;
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
    Ok(())
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

/// Loads the checkpoint into the model and every component; returns the epochs it had done.
fn resume(run_dir: &Path, trainer: &mut Trainer<'_>) -> Result<usize> {
    let (model_file, saved) = checkpoint::load(run_dir)?;
    trainer.model.net_mut().load(&model_file)?;
    let start_epoch = saved.epoch;
    trainer.restore(saved)?;
    tracing::info!("resuming {} after epoch {start_epoch}", run_dir.display());
    Ok(start_epoch)
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
