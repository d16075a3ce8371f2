//! What a run tells its user: a progress bar (or plain lines when not on a terminal), one
//! `metrics.jsonl` record per epoch, and a summary table at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use trellis_sdk::Table;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct EpochRecord {
    /// Epochs completed (1 after the first).
    pub epoch: usize,
    pub step: u64,
    pub train_loss: f64,
    /// Evaluation scalars by name (empty in epochs without evaluation).
    #[serde(default)]
    pub test: BTreeMap<String, f64>,
    /// Per-row tables from metrics, e.g. per-layer values: table → row → column → value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tables: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// Learning rate per parameter group at the end of the epoch.
    pub lr: BTreeMap<String, f64>,
    /// Training steps that found no batch ready (the data pipeline fell behind).
    pub data_waits: usize,
    /// The training steps alone: `epoch_seconds` less evaluation and checkpointing.
    #[serde(default)]
    pub train_seconds: f64,
    pub epoch_seconds: f64,
    pub elapsed_seconds: f64,
}

pub fn table_map(tables: &[Table]) -> BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> {
    tables
        .iter()
        .map(|t| {
            let rows = t
                .rows
                .iter()
                .map(|(label, values)| {
                    let row = t
                        .columns
                        .iter()
                        .cloned()
                        .zip(values.iter().copied())
                        .collect();
                    (label.clone(), row)
                })
                .collect();
            (t.name.clone(), rows)
        })
        .collect()
}

/// `metrics.jsonl`, appended and flushed once per epoch so a crash loses nothing written.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log, keeping only records up to `keep_epochs` (a resumed run rewrites the
    /// epochs after its checkpoint).
    pub fn open(run_dir: &Path, keep_epochs: usize) -> Result<(MetricsLog, Vec<EpochRecord>)> {
        let path = run_dir.join("metrics.jsonl");
        let mut kept = Vec::new();
        if keep_epochs > 0 {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if let Ok(r) = serde_json::from_str::<EpochRecord>(line) {
                    if r.epoch <= keep_epochs {
                        kept.push(r);
                    }
                }
            }
        }
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok((MetricsLog { path }, kept))
    }

    pub fn append(&self, record: &EpochRecord) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(record)?)?;
        f.sync_data().ok();
        Ok(())
    }
}

/// Per-step progress: a bar on a terminal, nothing between epoch lines otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            bar: (enabled && std::io::stderr().is_terminal()).then(ProgressBar::hidden),
        }
    }

    pub fn start_epoch(&mut self, epoch: usize, epochs: usize, steps: u64) {
        if let Some(bar) = &mut self.bar {
            let new = ProgressBar::new(steps);
            new.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} steps, {per_sec}, eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            new.set_prefix(format!("{epoch}/{epochs}"));
            *bar = new;
        }
    }

    pub fn step(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    pub fn message(&self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message);
        }
    }

    pub fn finish_epoch(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The table printed at the end of a run: one row per epoch.
pub fn summary_table(records: &[EpochRecord]) -> String {
    let mut metric_names: Vec<&String> = records.iter().flat_map(|r| r.test.keys()).collect();
    metric_names.sort();
    metric_names.dedup();
    let mut header = vec!["epoch".to_string(), "train loss".to_string()];
    header.extend(metric_names.iter().map(|m| m.to_string()));
    header.push("lr".to_string());
    header.push("time".to_string());
    let mut rows = vec![header];
    for r in records {
        let mut row = vec![r.epoch.to_string(), format!("{:.4}", r.train_loss)];
        for m in &metric_names {
            row.push(
                r.test
                    .get(*m)
                    .map_or("-".to_string(), |v| format!("{v:.3}")),
            );
        }
        let lr =
            r.lr.values()
                .copied()
                .fold(None, |acc: Option<(f64, f64)>, v| {
                    Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
                });
        row.push(match lr {
            Some((lo, hi)) if (hi - lo).abs() > 1e-15 => format!("{lo:.3e}..{hi:.3e}"),
            Some((lo, _)) => format!("{lo:.3e}"),
            None => "-".into(),
        });
        row.push(format!("{:.1}s", r.epoch_seconds));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:>w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let _ = writeln!(
                out,
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_a_row_per_epoch_and_a_column_per_metric() {
        let mut r = EpochRecord {
            epoch: 1,
            train_loss: 2.0,
            ..Default::default()
        };
        r.test.insert("top1".into(), 41.5);
        r.lr.insert("all".into(), 0.1);
        let mut r2 = r.clone();
        r2.epoch = 2;
        r2.test.insert("top1".into(), 55.25);
        let text = summary_table(&[r, r2]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("top1"));
        assert!(lines[3].contains("55.250"), "{text}");
    }

    #[test]
    fn log_keeps_only_epochs_before_a_resume_point() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = MetricsLog::open(dir.path(), 0).unwrap();
        for epoch in 1..=3 {
            log.append(&EpochRecord {
                epoch,
                ..Default::default()
            })
            .unwrap();
        }
        let (_, kept) = MetricsLog::open(dir.path(), 2).unwrap();
        assert_eq!(kept.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2]);
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
