//! Where each epoch's record goes besides `metrics.jsonl` (`[log] sinks`): a CSV file for
//! spreadsheets and pandas, TensorBoard event files for TensorBoard and W&B. Both are derived
//! from the records: `metrics.jsonl` stays the record a resumed run and `trellis report` read.

pub mod csv;
pub mod tensorboard;

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::{LogConfig, Sink};
use crate::report::EpochRecord;

pub struct Sinks {
    csv: Option<csv::CsvSink>,
    tensorboard: Option<tensorboard::EventWriter>,
}

impl Sinks {
    /// Opens the configured sinks of a run; `earlier` are the records a resumed run keeps, which
    /// the CSV file is rewritten from (epochs trained again after the checkpoint are cut, as in
    /// `metrics.jsonl`). TensorBoard gets a new event file, and drops the steps that went back.
    pub fn open(run_dir: &Path, log: &LogConfig, earlier: &[EpochRecord]) -> Result<Sinks> {
        let csv = if log.sinks.contains(&Sink::Csv) {
            Some(csv::CsvSink::create(&run_dir.join("metrics.csv"), earlier)?)
        } else {
            None
        };
        let tensorboard = if log.sinks.contains(&Sink::Tensorboard) {
            let dir = run_dir.join("tensorboard");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Some(
                tensorboard::EventWriter::create(&dir)
                    .with_context(|| format!("cannot write an event file in {}", dir.display()))?,
            )
        } else {
            None
        };
        Ok(Sinks { csv, tensorboard })
    }

    pub fn write(&mut self, record: &EpochRecord) -> Result<()> {
        if let Some(csv) = &mut self.csv {
            csv.append(record)?;
        }
        if let Some(tb) = &mut self.tensorboard {
            let step = record.epoch as i64;
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let path = tb.path().to_path_buf();
            let failed =
                |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", path.display());
            tb.scalars(step, &scalars(record), wall).map_err(failed)?;
            for (tag, values) in histograms(record) {
                tb.histogram(&tag, step, &values, wall).map_err(failed)?;
            }
            tb.sync().map_err(failed)?;
        }
        Ok(())
    }
}

/// Every number of a record by a tag: `train/loss`, `test/top1`, `lr/layer1.0.conv1`, ...
pub fn scalars(r: &EpochRecord) -> Vec<(String, f64)> {
    let mut out = vec![("train/loss".to_string(), r.train_loss)];
    out.extend(r.test.iter().map(|(k, v)| (format!("test/{k}"), *v)));
    out.extend(r.lr.iter().map(|(k, v)| (format!("lr/{k}"), *v)));
    out.push(("time/train_seconds".into(), r.train_seconds));
    out.push(("time/epoch_seconds".into(), r.epoch_seconds));
    out.push(("data/waits".into(), r.data_waits as f64));
    out
}

/// One histogram per column of each per-row table (e.g. `density/density` over the layers).
pub fn histograms(r: &EpochRecord) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    for (table, rows) in &r.tables {
        let mut columns: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        for row in rows.values() {
            for (column, value) in row {
                columns.entry(column).or_default().push(*value);
            }
        }
        out.extend(
            columns
                .into_iter()
                .map(|(c, v)| (format!("{table}/{c}"), v)),
        );
    }
    out
}
