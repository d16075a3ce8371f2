//! Checkpoints: everything a resumed run needs to continue exactly as if it had never stopped,
//! and the file-system steps that make writing one safe against a kill at any instant.
//!
//! A checkpoint is a directory `checkpoints/<epoch>/` of the run directory: `model.safetensors`
//! (the network), `state.safetensors` (every component's tensors and the distillers' extra
//! parameters, each name prefixed by its owner) and `trainer.json` (position in training and
//! component metadata). [`write`] writes it completely and fsyncs each file and the directories
//! above it; it then is only a candidate. It becomes the run's checkpoint when the run
//! directory's `state.json` names it together with the sha256 of all three files: one atomic
//! rename of that file, done by `trellis run` ([`crate::commands::run`]). Until then the previous
//! checkpoint is the one in force, untouched; after it the older directories are removed
//! ([`remove_except`]). A kill at any point therefore leaves either the old or the new
//! checkpoint in force, both complete, and a candidate left over is removed by the next write.
//!
//! `checkpoint` in the run directory is a symbolic link to the checkpoint in force, for people
//! and scripts ([`link`]); trellis itself reads only `state.json`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

const FORMAT: u32 = 1;

/// The files of a checkpoint directory, in the order they are written.
pub const FILES: [&str; 3] = ["model.safetensors", "state.safetensors", "trainer.json"];

#[derive(Debug, Serialize, Deserialize)]
struct TrainerFile {
    format: u32,
    epoch: usize,
    step: u64,
    /// Component key → its metadata string.
    meta: BTreeMap<String, String>,
    /// File name → sha256 of the two tensor files (`state.json` holds those of all three).
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

/// A complete checkpoint directory, as `state.json` records the one in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Relative to the run directory, e.g. `checkpoints/3`.
    pub dir: String,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: u64,
    /// File name → sha256, for every file of the directory (`trainer.json` included).
    pub files: BTreeMap<String, String>,
}

/// The directory every checkpoint of a run lives in.
pub fn root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The link to the checkpoint in force.
pub fn link_path(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// A deep copy on the CPU (a CPU tensor is copied, not aliased, so training on does not change
/// it); contiguous, as safetensors wants.
pub fn cpu_copy(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| {
            let t = t.detach();
            let copy = if t.device() == Device::Cpu {
                t.copy()
            } else {
                t.to_device(Device::Cpu)
            };
            (n.clone(), copy.contiguous())
        })
        .collect()
}

fn to_cpu(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect()
}

/// Writes the checkpoint of `state` (with the network's variables `model`) into
/// `checkpoints/<epoch>/`, every file fsync'd, and returns what `state.json` must record to put
/// it in force. A directory of that name left by an earlier, killed attempt is replaced; the
/// checkpoint in force must be another epoch's.
pub fn write(run_dir: &Path, model: &[(String, Tensor)], state: &TrainingState) -> Result<Record> {
    let root = root(run_dir);
    let rel = format!("checkpoints/{}", state.epoch);
    let dir = run_dir.join(&rel);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let model_file = dir.join(FILES[0]);
    Tensor::write_safetensors(&to_cpu(model), &model_file)
        .with_context(|| format!("cannot write {}", model_file.display()))?;
    sync_file(&model_file)?;
    crash_point("checkpoint-model");

    let mut tensors = Vec::new();
    let mut meta = BTreeMap::new();
    for (owner, (part, part_meta)) in &state.parts {
        for (name, t) in to_cpu(part) {
            tensors.push((format!("{owner}/{name}"), t));
        }
        meta.insert(owner.clone(), part_meta.clone());
    }
    let state_file = dir.join(FILES[1]);
    Tensor::write_safetensors(&tensors, &state_file)
        .with_context(|| format!("cannot write {}", state_file.display()))?;
    sync_file(&state_file)?;

    let mut files = BTreeMap::new();
    for name in &FILES[..2] {
        files.insert(name.to_string(), sha256_of(&dir.join(name))?);
    }
    let trainer = TrainerFile {
        format: FORMAT,
        epoch: state.epoch,
        step: state.step,
        meta,
        files: files.clone(),
    };
    let trainer_file = dir.join(FILES[2]);
    write_synced(
        &trainer_file,
        serde_json::to_string_pretty(&trainer)?.as_bytes(),
    )?;
    files.insert(FILES[2].to_string(), sha256_of(&trainer_file)?);
    sync_dir(&dir)?;
    sync_dir(&root)?;
    sync_dir(run_dir)?;
    crash_point("checkpoint-written");
    Ok(Record {
        dir: rel,
        epoch: state.epoch,
        step: state.step,
        files,
    })
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "the checkpoint in {} is corrupt: {what}\n  help: nothing was loaded or changed; restore that \
         directory from a copy, or start the run over in another --out",
        path.display()
    )
}

/// Reads the checkpoint `record` names, after checking every file against the sha256 recorded
/// when it was put in force; the network's file path is returned for `Network::load`.
pub fn load(run_dir: &Path, record: &Record) -> Result<(PathBuf, TrainingState)> {
    let d = run_dir.join(&record.dir);
    if !d.is_dir() {
        return Err(corrupt(&d, "the directory is missing"));
    }
    for name in FILES {
        let Some(expected) = record.files.get(name) else {
            return Err(corrupt(
                &d,
                format!("state.json records no sha256 for {name}"),
            ));
        };
        let path = d.join(name);
        let actual = sha256_of(&path).map_err(|e| corrupt(&d, format!("{e:#}")))?;
        if &actual != expected {
            return Err(corrupt(
                &d,
                format!(
                    "{} does not match the sha256 recorded when it was written (truncated or modified)",
                    path.display()
                ),
            ));
        }
    }
    let text = std::fs::read_to_string(d.join(FILES[2]))
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
    if (trainer.epoch, trainer.step) != (record.epoch, record.step) {
        return Err(corrupt(
            &d,
            format!(
                "trainer.json is at epoch {} (step {}) but state.json records epoch {} (step {})",
                trainer.epoch, trainer.step, record.epoch, record.step
            ),
        ));
    }
    let tensors = crate::models::read_safetensors(&d.join(FILES[1]))
        .map_err(|e| corrupt(&d, format!("state.safetensors: {e:#}")))?;
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
        d.join(FILES[0]),
        TrainingState {
            epoch: trainer.epoch,
            step: trainer.step,
            parts,
        },
    ))
}

/// Points the `checkpoint` link at `record`'s directory (or removes it, for none), atomically.
pub fn link(run_dir: &Path, record: Option<&Record>) -> Result<()> {
    let link = link_path(run_dir);
    let Some(record) = record else {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)
                .with_context(|| format!("cannot remove {}", link.display()))?;
        }
        return Ok(());
    };
    let tmp = run_dir.join("checkpoint.link.tmp");
    if tmp.symlink_metadata().is_ok() {
        std::fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    std::os::unix::fs::symlink(&record.dir, &tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    std::fs::rename(&tmp, &link).with_context(|| format!("cannot replace {}", link.display()))
}

/// Removes every checkpoint directory but `keep` (all of them for none), e.g. the one replaced
/// by a new checkpoint, or a candidate that a kill left before it was put in force.
pub fn remove_except(run_dir: &Path, keep: Option<&Record>) -> Result<()> {
    let root = root(run_dir);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    let keep = keep.map(|r| run_dir.join(&r.dir));
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", root.display()))?
            .path();
        if Some(&path) == keep.as_ref() {
            continue;
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot remove {}", path.display()))?;
    }
    if keep.is_none() {
        std::fs::remove_dir(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    Ok(())
}

/// The sha256 of a file, in hex.
pub fn sha256_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// Flushes a file's bytes to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// Flushes a directory's entries (names created, renamed or removed in it) to the disk.
pub fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync the directory {}", path.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Replaces `path` by `bytes` atomically: written beside it as `<name>.tmp`, fsync'd, renamed
/// over it, and the directory fsync'd; a kill leaves the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// For the kill tests (tests/tests/run_dir.rs, scripts/kill_test.sh): with
/// `TRELLIS_KILL_AT=<point>` (or `<point>@<n>`, the n-th time), the process sends itself
/// SIGKILL at that point of writing its run directory, exactly as a `kill -9` landing there.
/// The points, in the order a checkpoint passes them: `checkpoint-model` (its model file
/// written), `checkpoint-written` (its directory complete, not yet in force),
/// `checkpoint-committed` (in force, the older one not yet removed) and, at the end of a run,
/// `model-written` (the final model.safetensors in place, the run not yet marked finished).
pub fn crash_point(point: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let Ok(spec) = std::env::var("TRELLIS_KILL_AT") else {
        return;
    };
    let (name, nth) = match spec.split_once('@') {
        Some((name, n)) => (name, n.parse().unwrap_or(1)),
        None => (spec.as_str(), 1),
    };
    if name == point && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
    }
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
        let old = write(dir.path(), &model, &state).unwrap();
        assert_eq!(old.dir, "checkpoints/3");
        assert_eq!(old.files.len(), 3);
        state.epoch = 4;
        state.step = 40;
        let record = write(dir.path(), &model, &state).unwrap();
        link(dir.path(), Some(&record)).unwrap();
        remove_except(dir.path(), Some(&record)).unwrap();
        assert!(!dir.path().join("checkpoints/3").exists());
        assert!(dir.path().join("checkpoint/trainer.json").is_file());
        let (model_path, loaded) = load(dir.path(), &record).unwrap();
        assert!(model_path.is_file());
        assert_eq!((loaded.epoch, loaded.step), (4, 40));
        let (tensors, meta) = &loaded.parts["optimizer"];
        assert_eq!(meta, "m");
        assert_eq!(tensors[0].0, "momentum_buffer.w");
        assert_eq!(tensors[0].1.double_value(&[0]), 0.5);

        // trainer.json is covered too: an edit that still parses is refused.
        let trainer = dir.path().join("checkpoints/4/trainer.json");
        let text = std::fs::read_to_string(&trainer).unwrap();
        std::fs::write(&trainer, text.replace("\"epoch\": 4", "\"epoch\": 5")).unwrap();
        let e = format!("{:#}", load(dir.path(), &record).unwrap_err());
        assert!(e.contains("corrupt") && e.contains("trainer.json"), "{e}");
        std::fs::write(&trainer, text).unwrap();

        // Truncate the state file: loading must refuse, naming the file.
        let state_file = dir.path().join("checkpoints/4/state.safetensors");
        let bytes = std::fs::read(&state_file).unwrap();
        std::fs::write(&state_file, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", load(dir.path(), &record).unwrap_err());
        assert!(
            e.contains("corrupt") && e.contains("state.safetensors"),
            "{e}"
        );

        remove_except(dir.path(), None).unwrap();
        link(dir.path(), None).unwrap();
        assert!(!root(dir.path()).exists() && !link_path(dir.path()).exists());
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("state.json.tmp").exists());
    }
}
