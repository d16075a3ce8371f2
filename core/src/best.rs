//! `[train] keep = "best"`: besides the last checkpoint, the run directory keeps the model of
//! the evaluated epoch best by `best_metric` (`model_best.safetensors`, and `best.json` saying
//! which epoch and value). Replaced atomically, so a kill leaves the old best or the new one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::Direction;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub metric: String,
    pub mode: Direction,
    pub epoch: usize,
    pub value: f64,
}

pub struct KeepBest {
    dir: PathBuf,
    metric: String,
    mode: Direction,
    best: Option<Best>,
}

impl KeepBest {
    /// Picks up the best so far of a resumed run (`best.json`), if any.
    pub fn open(run_dir: &Path, metric: &str, mode: Direction) -> Result<KeepBest> {
        let path = run_dir.join("best.json");
        let best = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                serde_json::from_str::<Best>(&text)
                    .with_context(|| format!("{} does not parse", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => bail!("cannot read {}: {e}", path.display()),
        };
        Ok(KeepBest {
            dir: run_dir.to_path_buf(),
            metric: metric.to_string(),
            mode,
            best: best.filter(|b| b.metric == metric && b.mode == mode),
        })
    }

    /// After an evaluation: keeps the model when `test[metric]` beats the best so far.
    pub fn consider(
        &mut self,
        epoch: usize,
        test: &std::collections::BTreeMap<String, f64>,
        net: &crate::models::Network,
    ) -> Result<()> {
        if test.is_empty() {
            return Ok(());
        }
        let Some(&value) = test.get(&self.metric) else {
            bail!(
                "[train] best_metric = \"{}\" is not among the run's test metrics ({})\n  help: \
                 set best_metric to one of them",
                self.metric,
                test.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        let better = match &self.best {
            None => value.is_finite(),
            Some(b) => match self.mode {
                Direction::Max => value > b.value,
                Direction::Min => value < b.value,
            },
        };
        if !better {
            return Ok(());
        }
        let model = self.dir.join("model_best.safetensors");
        let tmp = self.dir.join("model_best.safetensors.tmp");
        net.save(&tmp)?;
        crate::checkpoint::sync_file(&tmp)?;
        std::fs::rename(&tmp, &model)
            .with_context(|| format!("cannot write {}", model.display()))?;
        let best = Best {
            metric: self.metric.clone(),
            mode: self.mode,
            epoch,
            value,
        };
        let json = self.dir.join("best.json");
        let tmp = self.dir.join("best.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&best)?)
            .and_then(|()| std::fs::rename(&tmp, &json))
            .with_context(|| format!("cannot write {}", json.display()))?;
        crate::checkpoint::sync_dir(&self.dir)?;
        self.best = Some(best);
        Ok(())
    }
}
