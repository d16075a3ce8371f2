//! `metrics.csv`: one `epoch,step,key,value` row per number of each epoch's record, in long
//! form, so that epochs with and without evaluation and per-layer tables share one header.
//! Keys are those of TensorBoard's tags (`test/top1`) and, for tables, `table/row/column`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::report::EpochRecord;

pub const HEADER: &str = "epoch,step,key,value";

pub struct CsvSink {
    path: PathBuf,
}

impl CsvSink {
    pub fn create(path: &Path, earlier: &[EpochRecord]) -> Result<CsvSink> {
        let mut text = format!("{HEADER}\n");
        for r in earlier {
            text.push_str(&rows(r));
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(CsvSink {
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, record: &EpochRecord) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        f.write_all(rows(record).as_bytes())
            .and_then(|()| f.sync_data())
            .with_context(|| format!("cannot append to {}", self.path.display()))
    }
}

fn rows(r: &EpochRecord) -> String {
    let mut out = String::new();
    let mut row = |key: &str, value: f64| {
        out.push_str(&format!("{},{},{},{value}\n", r.epoch, r.step, field(key)));
    };
    for (key, value) in super::scalars(r) {
        row(&key, value);
    }
    for (table, rows) in &r.tables {
        for (label, columns) in rows {
            for (column, value) in columns {
                row(&format!("{table}/{label}/{column}"), *value);
            }
        }
    }
    out
}

/// RFC 4180 quoting for keys that need it (a layer name with a comma).
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_hold_every_number_of_a_record() {
        let mut r = EpochRecord {
            epoch: 2,
            step: 20,
            train_loss: 0.5,
            ..Default::default()
        };
        r.test.insert("top1".into(), 0.75);
        r.lr.insert("all".into(), 0.1);
        r.tables.insert(
            "density".into(),
            [("a,b".to_string(), [("density".to_string(), 0.25)].into())].into(),
        );
        let text = rows(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "2,20,train/loss,0.5");
        assert!(lines.contains(&"2,20,test/top1,0.75"), "{text}");
        assert!(lines.contains(&"2,20,lr/all,0.1"), "{text}");
        assert!(
            lines.contains(&"2,20,\"density/a,b/density\",0.25"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        let mut sink = CsvSink::create(&path, std::slice::from_ref(&r)).unwrap();
        sink.append(&r).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("epoch,step,key,value\n2,20,train/loss,0.5\n"));
        assert_eq!(text.matches("train/loss").count(), 2);
    }
}
