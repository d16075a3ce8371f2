//! TensorBoard event files, written directly: a TFRecord stream of `Event` protocol buffers.
//! Only the handful of fields TensorBoard reads for scalars and histograms are encoded, by hand,
//! so the core needs neither protobuf nor TensorFlow. The layout (TensorFlow's
//! `core/util/event.proto`, `summary.proto`, `record_writer.cc`):
//!
//! - record: `u64 len` (LE), masked CRC-32C of those 8 bytes, `len` bytes, masked CRC-32C of them;
//! - `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5 }`;
//! - `Summary { value = 1 }`, `Value { tag = 1, simple_value = 2 (float), histo = 5 }`;
//! - `HistogramProto { min = 1, max = 2, num = 3, sum = 4, sum_squares = 5,
//!   bucket_limit = 6 (packed), bucket = 7 (packed) }`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir`, named as TensorBoard expects (`events.out.tfevents.<time>.<host>`
    /// plus the process id, so a resumed run adds a file beside the earlier one).
    pub fn create(dir: &Path) -> io::Result<EventWriter> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let name = format!(
            "events.out.tfevents.{}.{host}.{}",
            now.as_secs(),
            std::process::id()
        );
        let path = dir.join(name);
        let mut writer = EventWriter {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        let mut event = Vec::new();
        field_double(&mut event, 1, now.as_secs_f64());
        field_bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        writer.sync()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding every scalar of a step.
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)], wall: f64) -> io::Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            field_bytes(&mut v, 1, tag.as_bytes());
            key(&mut v, 2, 5);
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &v);
        }
        self.event(step, wall, &summary)
    }

    /// A histogram of `values` (e.g. one column of a per-layer table) with 30 equal buckets.
    pub fn histogram(&mut self, tag: &str, step: i64, values: &[f64], wall: f64) -> io::Result<()> {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            return Ok(());
        }
        let (limits, counts) = buckets(&finite, 30);
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut histo = Vec::new();
        field_double(&mut histo, 1, min);
        field_double(&mut histo, 2, max);
        field_double(&mut histo, 3, finite.len() as f64);
        field_double(&mut histo, 4, finite.iter().sum());
        field_double(&mut histo, 5, finite.iter().map(|v| v * v).sum());
        field_bytes(&mut histo, 6, &packed_doubles(&limits));
        field_bytes(&mut histo, 7, &packed_doubles(&counts));
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        field_bytes(&mut v, 5, &histo);
        let mut summary = Vec::new();
        field_bytes(&mut summary, 1, &v);
        self.event(step, wall, &summary)
    }

    /// Flushes to the file, so TensorBoard shows the epoch and a crash loses nothing written.
    pub fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }

    fn event(&mut self, step: i64, wall: f64, summary: &[u8]) -> io::Result<()> {
        let mut event = Vec::new();
        field_double(&mut event, 1, wall);
        key(&mut event, 2, 0);
        varint(&mut event, step as u64);
        field_bytes(&mut event, 5, summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }
}

/// Bucket right edges and counts: TensorBoard draws bucket i over (limit[i-1], limit[i]].
fn buckets(values: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max <= min {
        return (vec![min, f64::MAX], vec![0.0, values.len() as f64]);
    }
    let width = (max - min) / n as f64;
    let limits: Vec<f64> = (1..=n).map(|i| min + width * i as f64).collect();
    let mut counts = vec![0.0; n];
    for v in values {
        let i = (((v - min) / width).ceil() as usize).clamp(1, n) - 1;
        counts[i] += 1.0;
    }
    (limits, counts)
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_double(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn packed_doubles(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// CRC-32C (Castagnoli), bitwise: records are a few hundred bytes an epoch.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// What a reader of an event file sees, for tests and `trellis report`'s checks: every scalar
/// and histogram with its step. Fails on a bad length or data CRC, as TensorBoard would skip.
#[derive(Debug, Default, PartialEq)]
pub struct Events {
    pub file_version: Option<String>,
    pub scalars: Vec<(i64, String, f32)>,
    /// (step, tag, num, bucket counts)
    pub histograms: Vec<(i64, String, f64, Vec<f64>)>,
}

pub fn read_events(path: &Path) -> anyhow::Result<Events> {
    use anyhow::{bail, ensure};
    let bytes = std::fs::read(path)?;
    let mut events = Events::default();
    let mut at = 0;
    while at < bytes.len() {
        ensure!(
            bytes.len() - at >= 12,
            "{}: truncated record header",
            path.display()
        );
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?);
        ensure!(
            masked_crc(len_bytes) == len_crc,
            "{}: bad length CRC",
            path.display()
        );
        let start = at + 12;
        ensure!(
            bytes.len() >= start + len + 4,
            "{}: truncated record",
            path.display()
        );
        let data = &bytes[start..start + len];
        let data_crc = u32::from_le_bytes(bytes[start + len..start + len + 4].try_into()?);
        ensure!(
            masked_crc(data) == data_crc,
            "{}: bad data CRC",
            path.display()
        );
        at = start + len + 4;
        let mut step = 0;
        let mut summary = None;
        for (field, value) in fields(data)? {
            match (field, value) {
                (2, Field::Varint(v)) => step = v as i64,
                (3, Field::Bytes(b)) => events.file_version = Some(String::from_utf8(b.to_vec())?),
                (5, Field::Bytes(b)) => summary = Some(b),
                (1, Field::Fixed64(_)) => {}
                (f, _) => bail!("unexpected Event field {f}"),
            }
        }
        let Some(summary) = summary else { continue };
        for (_, value) in fields(summary)? {
            let Field::Bytes(value) = value else {
                bail!("Summary.value is not a message")
            };
            let mut tag = String::new();
            for (field, v) in fields(value)? {
                match (field, v) {
                    (1, Field::Bytes(b)) => tag = String::from_utf8(b.to_vec())?,
                    (2, Field::Fixed32(x)) => {
                        events.scalars.push((step, tag.clone(), f32::from_bits(x)))
                    }
                    (5, Field::Bytes(h)) => {
                        let mut num = 0.0;
                        let mut counts = Vec::new();
                        for (f, v) in fields(h)? {
                            match (f, v) {
                                (3, Field::Fixed64(x)) => num = f64::from_bits(x),
                                (7, Field::Bytes(b)) => {
                                    counts = b
                                        .chunks_exact(8)
                                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                                        .collect()
                                }
                                _ => {}
                            }
                        }
                        events.histograms.push((step, tag.clone(), num, counts));
                    }
                    (f, _) => bail!("unexpected Summary.Value field {f}"),
                }
            }
        }
    }
    Ok(events)
}

enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

fn fields(mut data: &[u8]) -> anyhow::Result<Vec<(u32, Field<'_>)>> {
    fn read_varint(data: &mut &[u8]) -> anyhow::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = data
                .split_first()
                .ok_or_else(|| anyhow::anyhow!("truncated"))?;
            *data = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        anyhow::bail!("varint too long")
    }
    fn take<'a>(data: &mut &'a [u8], n: usize) -> anyhow::Result<&'a [u8]> {
        anyhow::ensure!(data.len() >= n, "truncated field");
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !data.is_empty() {
        let k = read_varint(&mut data)?;
        let field = (k >> 3) as u32;
        let value = match k & 7 {
            0 => Field::Varint(read_varint(&mut data)?),
            1 => Field::Fixed64(u64::from_le_bytes(take(&mut data, 8)?.try_into()?)),
            2 => {
                let n = read_varint(&mut data)? as usize;
                Field::Bytes(take(&mut data, n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(take(&mut data, 4)?.try_into()?)),
            w => anyhow::bail!("unsupported wire type {w}"),
        };
        out.push((field, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn an_event_file_reads_back_with_its_scalars_and_histograms() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(
            1,
            &[("test/top1".into(), 0.5), ("train/loss".into(), 2.25)],
            1.0,
        )
        .unwrap();
        w.histogram("density/density", 1, &[0.1, 0.2, 0.2, 0.9], 1.0)
            .unwrap();
        w.scalars(2, &[("test/top1".into(), 0.75)], 2.0).unwrap();
        w.sync().unwrap();
        let events = read_events(w.path()).unwrap();
        assert_eq!(events.file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(
            events.scalars,
            [
                (1, "test/top1".into(), 0.5),
                (1, "train/loss".into(), 2.25),
                (2, "test/top1".into(), 0.75)
            ]
        );
        let (step, tag, num, counts) = &events.histograms[0];
        assert_eq!((*step, tag.as_str(), *num), (1, "density/density", 4.0));
        assert_eq!(counts.len(), 30);
        assert_eq!(counts.iter().sum::<f64>(), 4.0);
        assert_eq!(
            (counts[0], counts[29]),
            (1.0, 1.0),
            "min and max in the end buckets"
        );

        // A flipped byte is caught by the record's CRC.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_events(w.path())
            .unwrap_err()
            .to_string()
            .contains("CRC"));
    }
}
