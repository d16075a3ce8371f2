//! Checkpoints: everything a resumed run needs to continue exactly as if it had never stopped.
//!
//! A checkpoint is a directory: `model.safetensors` (the network), `state.safetensors` (every
//! component's tensors and the distillers' extra parameters, each name prefixed by its owner)
//! and `trainer.json` (position in training, component metadata, and the sha256 of both files,
//! so truncation or corruption is detected instead of silently loaded). It is written next to
//! the old one and swapped in by renaming, so a crash mid-write leaves the previous intact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::plugin_host::sha256_of;

const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct TrainerFile {
    format: u32,
    epoch: usize,
    step: u64,
    /// Component key → its metadata string.
    meta: BTreeMap<String, String>,
    /// File name → sha256.
    files: BTreeMap<String, String>,
}

/// What a checkpoint holds besides the network.
#[derive(Debug, Default)]
pub struct TrainingState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: u64,
    /// Owner key (`optimizer`, `scheduler`, `distiller.0`, ...) → (tensors, metadata).
    pub parts: BTreeMap<String, (Vec<(String, Tensor)>, String)>,
}

pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

pub fn exists(run_dir: &Path) -> bool {
    dir(run_dir).join("trainer.json").is_file()
}

fn to_cpu(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect()
}

/// Writes a checkpoint for `state`, with the network's variables `model`.
pub fn save(run_dir: &Path, model: &[(String, Tensor)], state: &TrainingState) -> Result<()> {
    let final_dir = dir(run_dir);
    let tmp = run_dir.join("checkpoint.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;

    Tensor::write_safetensors(&to_cpu(model), tmp.join("model.safetensors"))
        .context("cannot write the model checkpoint")?;
    let mut tensors = Vec::new();
    let mut meta = BTreeMap::new();
    for (owner, (part, part_meta)) in &state.parts {
        for (name, t) in to_cpu(part) {
            tensors.push((format!("{owner}/{name}"), t));
        }
        meta.insert(owner.clone(), part_meta.clone());
    }
    Tensor::write_safetensors(&tensors, tmp.join("state.safetensors"))
        .context("cannot write the component state")?;

    let mut files = BTreeMap::new();
    for name in ["model.safetensors", "state.safetensors"] {
        files.insert(name.to_string(), sha256_of(&tmp.join(name))?);
    }
    let trainer = TrainerFile {
        format: FORMAT,
        epoch: state.epoch,
        step: state.step,
        meta,
        files,
    };
    std::fs::write(
        tmp.join("trainer.json"),
        serde_json::to_string_pretty(&trainer)?,
    )?;

    let old = run_dir.join("checkpoint.old");
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "the checkpoint in {} is corrupt: {what}\n  help: nothing was loaded; delete that directory to start \
         the run over, or restore it from a copy",
        path.display()
    )
}

/// Reads a checkpoint; the network's file path is returned for `Network::load`.
pub fn load(run_dir: &Path) -> Result<(PathBuf, TrainingState)> {
    let d = dir(run_dir);
    let text = std::fs::read_to_string(d.join("trainer.json"))
        .map_err(|e| corrupt(&d, format!("cannot read trainer.json: {e}")))?;
    let trainer: TrainerFile = serde_json::from_str(&text)
        .map_err(|e| corrupt(&d, format!("trainer.json does not parse: {e}")))?;
    if trainer.format != FORMAT {
        bail!(
            "the checkpoint in {} has format {}, this trellis reads format {FORMAT}",
            d.display(),
            trainer.format
        );
    }
    for (name, expected) in &trainer.files {
        let actual = sha256_of(&d.join(name)).map_err(|e| corrupt(&d, format!("{e:#}")))?;
        if &actual != expected {
            return Err(corrupt(
                &d,
                format!("{name} does not match the sha256 recorded when it was written (truncated or modified)"),
            ));
        }
    }
    let tensors = Tensor::read_safetensors(d.join("state.safetensors"))
        .map_err(|e| corrupt(&d, format!("state.safetensors: {e}")))?;
    let mut parts: BTreeMap<String, (Vec<(String, Tensor)>, String)> = trainer
        .meta
        .iter()
        .map(|(owner, meta)| (owner.clone(), (Vec::new(), meta.clone())))
        .collect();
    for (name, t) in tensors {
        let Some((owner, rest)) = name.split_once('/') else {
            return Err(corrupt(&d, format!("unexpected tensor name `{name}`")));
        };
        parts
            .entry(owner.to_string())
            .or_default()
            .0
            .push((rest.to_string(), t));
    }
    for (tensors, _) in parts.values_mut() {
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok((
        d.join("model.safetensors"),
        TrainingState {
            epoch: trainer.epoch,
            step: trainer.step,
            parts,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let model = vec![("w".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))];
        let mut state = TrainingState {
            epoch: 3,
            step: 30,
            ..Default::default()
        };
        state.parts.insert(
            "optimizer".into(),
            (
                vec![("momentum_buffer.w".into(), Tensor::from_slice(&[0.5f32]))],
                "m".into(),
            ),
        );
        save(dir.path(), &model, &state).unwrap();
        // Saving again replaces the checkpoint atomically.
        save(dir.path(), &model, &state).unwrap();
        let (model_path, loaded) = load(dir.path()).unwrap();
        assert!(model_path.is_file());
        assert_eq!((loaded.epoch, loaded.step), (3, 30));
        let (tensors, meta) = &loaded.parts["optimizer"];
        assert_eq!(meta, "m");
        assert_eq!(tensors[0].0, "momentum_buffer.w");
        assert_eq!(tensors[0].1.double_value(&[0]), 0.5);

        // Truncate the state file: loading must refuse, naming the file.
        let state_file = dir.path().join("checkpoint/state.safetensors");
        let bytes = std::fs::read(&state_file).unwrap();
        std::fs::write(&state_file, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(
            e.contains("corrupt") && e.contains("state.safetensors"),
            "{e}"
        );

        std::fs::write(dir.path().join("checkpoint/trainer.json"), "{").unwrap();
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("trainer.json does not parse"), "{e}");
    }
}
