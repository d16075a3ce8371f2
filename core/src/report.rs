//! What a run tells its user: a progress bar (or plain lines when not on a terminal), one
//! `metrics.jsonl` record per epoch, and a summary table at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::style::ProgressTracker;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
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

/// `metrics.jsonl`: one line appended and synced per epoch, so a crash loses nothing written.
/// Lines are only ever appended. A resumed run cuts the file back to the length it had when its
/// checkpoint was written ([`LogMark`]): the lines of earlier epochs stay byte for byte as first
/// written, never parsed and written again (which could move a float by an ulp).
pub struct MetricsLog {
    path: PathBuf,
    /// The bytes written so far: their number and running sha256.
    len: u64,
    hasher: sha2::Sha256,
}

/// How far `metrics.jsonl` went when a checkpoint was written: its length and the sha256 of
/// those bytes, recorded with the checkpoint in the run directory's `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMark {
    pub bytes: u64,
    pub sha256: String,
}

impl MetricsLog {
    fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("metrics.jsonl")
    }

    /// Starts an empty log: a new run, or one started over.
    pub fn create(run_dir: &Path) -> Result<MetricsLog> {
        let path = Self::path(run_dir);
        std::fs::File::create(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(MetricsLog {
            path,
            len: 0,
            hasher: Default::default(),
        })
    }

    /// The first `mark.bytes` bytes of the log in `run_dir`, checked against `mark`; reads only.
    fn prefix(run_dir: &Path, mark: &LogMark) -> Result<(PathBuf, Vec<u8>)> {
        use sha2::Digest as _;
        let path = Self::path(run_dir);
        let mut bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if (bytes.len() as u64) < mark.bytes {
            anyhow::bail!(
                "{} is shorter ({} bytes) than when the run's checkpoint was written ({} bytes)\n  \
                 help: it was cut or edited; restore it from a copy, or start the run over in another --out",
                path.display(),
                bytes.len(),
                mark.bytes
            );
        }
        bytes.truncate(mark.bytes as usize);
        if format!("{:x}", sha2::Sha256::digest(&bytes)) != mark.sha256 {
            anyhow::bail!(
                "{}: its first {} bytes are not those written before the run's checkpoint (edited?)\n  \
                 help: restore it from a copy, or start the run over in another --out",
                path.display(),
                mark.bytes
            );
        }
        Ok((path, bytes))
    }

    /// The records of the log in `run_dir` up to `mark`, after checking that those bytes are
    /// the ones written; changes nothing.
    pub fn read_to(run_dir: &Path, mark: &LogMark) -> Result<Vec<EpochRecord>> {
        let (path, bytes) = Self::prefix(run_dir, mark)?;
        let text = String::from_utf8_lossy(&bytes);
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))
            })
            .collect()
    }

    /// Continues the log of a run resumed from a checkpoint taken at `mark`: the lines written
    /// after it (by epochs that checkpoint does not cover) are cut off, those before untouched.
    pub fn resume(run_dir: &Path, mark: &LogMark) -> Result<MetricsLog> {
        use sha2::Digest as _;
        let (path, bytes) = Self::prefix(run_dir, mark)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| {
                f.set_len(mark.bytes)?;
                f.sync_all()
            })
            .with_context(|| {
                format!("cannot cut {} back to {} bytes", path.display(), mark.bytes)
            })?;
        let mut hasher = sha2::Sha256::default();
        hasher.update(&bytes);
        Ok(MetricsLog {
            path,
            len: mark.bytes,
            hasher,
        })
    }

    /// Appends one record as a line and syncs it to the disk.
    pub fn append(&mut self, record: &EpochRecord) -> Result<()> {
        use sha2::Digest as _;
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_data())
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        self.len += line.len() as u64;
        self.hasher.update(line.as_bytes());
        Ok(())
    }

    /// Where the log is now, for a checkpoint to record.
    pub fn mark(&self) -> LogMark {
        use sha2::Digest as _;
        LogMark {
            bytes: self.len,
            sha256: format!("{:x}", self.hasher.clone().finalize()),
        }
    }
}

/// Per-step progress: a bar on a terminal, nothing between epoch lines otherwise. Training shows
/// steps, their rate and the running loss; evaluation shows its batches.
pub struct Progress {
    bar: Option<ProgressBar>,
}

/// A rate with its unit: "4.2 steps/s", or "2.5 s/step" when slower than one a second.
fn rate_text(per_sec: f64, one: &str, many: &str) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        format!("- {many}/s")
    } else if per_sec >= 1.0 {
        format!("{per_sec:.1} {many}/s")
    } else {
        format!("{:.1} s/{one}", 1.0 / per_sec)
    }
}

fn rate(one: &'static str, many: &'static str) -> impl ProgressTracker {
    move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = w.write_str(&rate_text(state.per_sec(), one, many));
    }
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            bar: (enabled && std::io::stderr().is_terminal()).then(ProgressBar::hidden),
        }
    }

    /// Whether anything is shown (on a terminal and not `--quiet`).
    pub fn is_shown(&self) -> bool {
        self.bar.is_some()
    }

    fn replace(
        &mut self,
        len: u64,
        template: &str,
        key: &'static str,
        unit: (&'static str, &'static str),
    ) {
        if let Some(bar) = &mut self.bar {
            let new = ProgressBar::new(len);
            new.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .with_key(key, rate(unit.0, unit.1))
                    .progress_chars("=> "),
            );
            bar.finish_and_clear();
            *bar = new;
        }
    }

    pub fn start_epoch(&mut self, epoch: usize, epochs: usize, steps: u64) {
        self.replace(
            steps,
            "epoch {prefix} [{bar:20}] {pos}/{len} steps, {rate}, eta {eta} {msg}",
            "rate",
            ("step", "steps"),
        );
        if let Some(bar) = &self.bar {
            bar.set_prefix(format!("{epoch}/{epochs}"));
        }
    }

    /// A bar for an evaluation of `batches` test batches; [`step`](Self::step) per batch,
    /// [`finish_epoch`](Self::finish_epoch) at the end.
    pub fn start_evaluation(&mut self, batches: u64) {
        self.replace(
            batches,
            "evaluating [{bar:20}] {pos}/{len} batches, {rate}, eta {eta}",
            "rate",
            ("batch", "batches"),
        );
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

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn rates_carry_their_unit() {
        assert_eq!(rate_text(4.21, "step", "steps"), "4.2 steps/s");
        assert_eq!(rate_text(0.4, "step", "steps"), "2.5 s/step");
        assert_eq!(rate_text(0.0, "batch", "batches"), "- batches/s");
        assert_eq!(rate_text(f64::NAN, "batch", "batches"), "- batches/s");
        // Off a terminal nothing is shown, and every call is a no-op.
        let mut p = Progress::new(true);
        assert!(!p.is_shown() || std::io::stderr().is_terminal());
        p.start_evaluation(3);
        p.step();
        p.finish_epoch();
        assert!(!Progress::new(false).is_shown());
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
    fn a_resumed_log_keeps_earlier_lines_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::create(dir.path()).unwrap();
        let record = |epoch: usize| EpochRecord {
            epoch,
            train_loss: 0.1 + epoch as f64 / 3.0,
            ..Default::default()
        };
        let mut marks = Vec::new();
        for epoch in 1..=3 {
            log.append(&record(epoch)).unwrap();
            marks.push(log.mark());
        }
        let path = dir.path().join("metrics.jsonl");
        let written = std::fs::read(&path).unwrap();
        let kept = MetricsLog::read_to(dir.path(), &marks[1]).unwrap();
        assert_eq!(kept.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            written,
            "read_to changed the log"
        );

        // Resumed after epoch 2: epoch 3's line goes, the others stay byte for byte, and the
        // same record appended again gives the same file and mark.
        let mut log = MetricsLog::resume(dir.path(), &marks[1]).unwrap();
        assert_eq!(log.mark(), marks[1]);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            written[..marks[1].bytes as usize]
        );
        log.append(&record(3)).unwrap();
        assert_eq!(log.mark(), marks[2]);
        assert_eq!(std::fs::read(&path).unwrap(), written);

        // Edited or cut before the mark: refused, naming the file, and left alone.
        let mut edited = written.clone();
        edited[2] ^= 1;
        std::fs::write(&path, &edited).unwrap();
        let e = format!(
            "{:#}",
            MetricsLog::resume(dir.path(), &marks[1]).err().unwrap()
        );
        assert!(e.contains("metrics.jsonl") && e.contains("edited"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), edited);
        std::fs::write(&path, &written[..10]).unwrap();
        let e = format!(
            "{:#}",
            MetricsLog::read_to(dir.path(), &marks[0]).unwrap_err()
        );
        assert!(e.contains("shorter"), "{e}");
    }
}
