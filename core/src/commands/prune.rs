//! `trellis prune`: a config's pruning masks without training on — the run set up exactly as
//! `trellis run` would, trained up to `[pruner] at_step`, pruned, and stopped — and, on request,
//! what the pruner was given and returned.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::config::LoadedConfig;
use crate::prune::{Masks, Pruning};
use crate::report::Progress;
use crate::train::{prepare, Prepared};

/// How `trellis prune` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    pub manifest: Option<PathBuf>,
    /// The masks, as safetensors named by parameter.
    pub out: PathBuf,
    /// The raw scores the pruner returned.
    pub scores: Option<PathBuf>,
    /// The network's variables at the pruning point, before masking (a `model.safetensors`).
    pub weights: Option<PathBuf>,
    /// The scoring batches: `inputs`, `targets` and `batch_sizes`.
    pub batch: Option<PathBuf>,
}

fn write(path: &Path, tensors: &[(String, Tensor)], what: &str) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    crate::models::write_safetensors(&cpu, path).with_context(|| format!("cannot save the {what}"))
}

/// `trellis prune`: the run's setup up to its pruning point (training first when `at_step` >
/// 0), then the masks and, on request, what the pruner was given and returned.
pub fn prune(opts: &PruneOptions) -> Result<Masks> {
    let cfg = LoadedConfig::load(&opts.config, &opts.overrides)?;
    if cfg.config.pruner.is_none() {
        return Err(cfg.source.error(
            "`trellis prune` needs a [pruner] table in the config\n  help: add one, e.g.\n\n      \
             [pruner]\n      use = \"snip\"\n      sparsity = 0.9",
        ));
    }
    // Before any work: an output that cannot be written would waste the whole run.
    for path in [
        Some(&opts.out),
        opts.scores.as_ref(),
        opts.weights.as_ref(),
        opts.batch.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            bail!(
                "cannot write {}: the directory {} does not exist",
                path.display(),
                parent.display()
            );
        }
        if path.is_dir() {
            bail!("cannot write {}: it is a directory", path.display());
        }
    }
    let wants_inspection = opts.scores.is_some() || opts.weights.is_some() || opts.batch.is_some();
    let mut pruning = run_until_pruned(&cfg, opts.manifest.as_deref(), wants_inspection)?;
    let masks = pruning
        .masks
        .take()
        .ok_or_else(|| anyhow!("internal error: the run stopped before pruning"))?;
    write(&opts.out, &masks.tensors(), "masks")?;
    if wants_inspection {
        let Some(inspection) = pruning.inspection.take() else {
            bail!("the masks came from a file, so there are no scores, weights or scoring batches to save");
        };
        if let Some(path) = &opts.scores {
            write(path, &inspection.scores, "scores")?;
        }
        if let Some(path) = &opts.weights {
            write(path, &inspection.weights, "weights")?;
        }
        if let Some(path) = &opts.batch {
            let inputs: Vec<&Tensor> = inspection.batches.iter().map(|b| &b.inputs).collect();
            let targets: Vec<&Tensor> = inspection.batches.iter().map(|b| &b.targets).collect();
            let sizes: Vec<i64> = inspection
                .batches
                .iter()
                .map(|b| b.targets.size()[0])
                .collect();
            write(
                path,
                &[
                    ("inputs".into(), Tensor::cat(&inputs, 0)),
                    ("targets".into(), Tensor::cat(&targets, 0)),
                    (
                        "batch_sizes".into(),
                        Tensor::from_slice(&sizes).to_kind(Kind::Int64),
                    ),
                ],
                "scoring batches",
            )?;
        }
    }
    Ok(masks)
}

/// `trellis prune`'s run: set up exactly as `trellis run` would, trained up to the pruning point
/// (not at all for `at_step = 0`), pruned, and stopped. Returns the pruning with its masks.
fn run_until_pruned(cfg: &LoadedConfig, manifest: Option<&Path>, inspect: bool) -> Result<Pruning> {
    let Prepared { mut trainer, .. } = prepare(cfg, manifest, None, None)?;
    let Some(pruning) = &mut trainer.pruning else {
        bail!("the config has no [pruner] table");
    };
    pruning.inspect = inspect;
    if pruning.at_step > 0 {
        let steps = if pruning.at_step == 1 {
            "step"
        } else {
            "steps"
        };
        tracing::info!("training {} {steps} before pruning", pruning.at_step);
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
