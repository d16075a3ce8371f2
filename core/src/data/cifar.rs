//! Readers for the binary versions of CIFAR-10 and CIFAR-100
//! (<https://www.cs.toronto.edu/~kriz/cifar.html>).
//!
//! Each record is the label byte(s) followed by 3072 pixel bytes: the 1024 red values of the
//! 32×32 image row by row, then green, then blue, which is exactly u8 `[3, 32, 32]`.

use std::path::Path;

use anyhow::{bail, Context};
use tch::Tensor;

use super::{Cifar100Labels, Dataset};

const PIXELS: usize = 3 * 32 * 32;
const CIFAR10_FIX: &str = "download cifar-10-binary.tar.gz from \
    https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and point data.path at the \
    extracted cifar-10-batches-bin directory";
const CIFAR100_FIX: &str = "download cifar-100-binary.tar.gz from \
    https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and point data.path at the \
    extracted cifar-100-binary directory";

/// The layout of one dataset's files.
struct Format {
    /// Bytes before the pixels.
    label_bytes: usize,
    /// Which of those bytes is the label, and how many classes it has.
    label_index: usize,
    num_classes: i64,
    fix: &'static str,
}

impl Format {
    fn record_size(&self) -> usize {
        self.label_bytes + PIXELS
    }
}

/// Reads CIFAR-10 from `dir` (`data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`):
/// 50,000 training and 10,000 test images.
pub fn read_cifar10(dir: &Path) -> anyhow::Result<(Dataset, Dataset)> {
    read_cifar10_expecting(dir, Some(10_000))
}

/// `records_per_file: None` accepts any record count, for tests with small files.
pub(crate) fn read_cifar10_expecting(
    dir: &Path,
    records_per_file: Option<usize>,
) -> anyhow::Result<(Dataset, Dataset)> {
    let format = Format {
        label_bytes: 1,
        label_index: 0,
        num_classes: 10,
        fix: CIFAR10_FIX,
    };
    let train_files: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    let train = read_files(dir, &train_files, &format, records_per_file)?;
    let test = read_files(
        dir,
        &["test_batch.bin".to_string()],
        &format,
        records_per_file,
    )?;
    Ok((train, test))
}

/// Reads CIFAR-100 from `dir` (`train.bin`, `test.bin`): 50,000 training and 10,000 test
/// images, labelled with the 100 fine classes or the 20 coarse superclasses.
pub fn read_cifar100(dir: &Path, labels: Cifar100Labels) -> anyhow::Result<(Dataset, Dataset)> {
    read_cifar100_expecting(dir, labels, Some((50_000, 10_000)))
}

pub(crate) fn read_cifar100_expecting(
    dir: &Path,
    labels: Cifar100Labels,
    records: Option<(usize, usize)>,
) -> anyhow::Result<(Dataset, Dataset)> {
    // Records start with the coarse label, then the fine one.
    let format = match labels {
        Cifar100Labels::Coarse => Format {
            label_bytes: 2,
            label_index: 0,
            num_classes: 20,
            fix: CIFAR100_FIX,
        },
        Cifar100Labels::Fine => Format {
            label_bytes: 2,
            label_index: 1,
            num_classes: 100,
            fix: CIFAR100_FIX,
        },
    };
    let train = read_files(
        dir,
        &["train.bin".to_string()],
        &format,
        records.map(|r| r.0),
    )?;
    let test = read_files(
        dir,
        &["test.bin".to_string()],
        &format,
        records.map(|r| r.1),
    )?;
    Ok((train, test))
}

fn read_files(
    dir: &Path,
    names: &[String],
    format: &Format,
    records_per_file: Option<usize>,
) -> anyhow::Result<Dataset> {
    let record = format.record_size();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for name in names {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).with_context(|| {
            format!("cannot read CIFAR file {}: {}", path.display(), format.fix)
        })?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            bail!(
                "CIFAR file {} is {} bytes, not a whole number of {record}-byte records \
                 (truncated or not the binary version?): {}",
                path.display(),
                bytes.len(),
                format.fix
            );
        }
        let count = bytes.len() / record;
        if let Some(expected) = records_per_file {
            if count != expected {
                bail!(
                    "CIFAR file {} holds {count} records of {record} bytes ({} bytes), \
                     expected {expected} ({} bytes): {}",
                    path.display(),
                    bytes.len(),
                    expected * record,
                    format.fix
                );
            }
        }
        pixels.reserve(count * PIXELS);
        labels.reserve(count);
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[format.label_index] as i64;
            if label >= format.num_classes {
                bail!(
                    "CIFAR file {} record {i} has label {label}, outside 0..{}: the file is \
                     corrupt or from another dataset; {}",
                    path.display(),
                    format.num_classes,
                    format.fix
                );
            }
            labels.push(label);
            pixels.extend_from_slice(&rec[format.label_bytes..]);
        }
    }
    let n = labels.len() as i64;
    Dataset::new(
        Tensor::from_slice(&pixels).view([n, 3, 32, 32]),
        Tensor::from_slice(&labels),
        format.num_classes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record's pixels: a pattern that differs per record and per position.
    fn pixels(seed: usize) -> Vec<u8> {
        (0..PIXELS)
            .map(|p| ((p * 7 + seed * 31) % 256) as u8)
            .collect()
    }

    fn write(path: &Path, records: &[(Vec<u8>, Vec<u8>)]) {
        let mut bytes = Vec::new();
        for (head, px) in records {
            bytes.extend_from_slice(head);
            bytes.extend_from_slice(px);
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn data_cifar10_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for f in 1..=5usize {
            let recs: Vec<_> = (0..3)
                .map(|r| (vec![((f * 3 + r) % 10) as u8], pixels(f * 3 + r)))
                .collect();
            write(&dir.path().join(format!("data_batch_{f}.bin")), &recs);
        }
        write(
            &dir.path().join("test_batch.bin"),
            &[(vec![9], pixels(100)), (vec![0], pixels(101))],
        );
        let (train, test) = read_cifar10_expecting(dir.path(), None).unwrap();
        assert_eq!((train.len(), test.len(), train.num_classes), (15, 2, 10));
        let expected: Vec<i64> = (3..18).map(|i| (i % 10) as i64).collect();
        assert_eq!(train.label_vec(), expected);
        assert_eq!(test.label_vec(), vec![9, 0]);
        assert_eq!(train.images.size(), [15, 3, 32, 32]);
        // Record 4 of the training set is data_batch_2's second record (seed 7).
        let img = Vec::<u8>::try_from(&train.images.get(4).flatten(0, -1)).unwrap();
        assert_eq!(img, pixels(7));
        // Channel-major layout: the first green pixel is byte 1024 of the record.
        assert_eq!(
            train.images.int64_value(&[4, 1, 0, 0]),
            pixels(7)[1024] as i64
        );
        assert_eq!(
            test.images.int64_value(&[1, 2, 31, 31]),
            pixels(101)[3071] as i64
        );
    }

    #[test]
    fn data_cifar100_fine_and_coarse_labels() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("train.bin"),
            &[(vec![3, 77], pixels(1)), (vec![19, 99], pixels(2))],
        );
        write(&dir.path().join("test.bin"), &[(vec![0, 5], pixels(3))]);
        let (train, test) =
            read_cifar100_expecting(dir.path(), Cifar100Labels::Fine, None).unwrap();
        assert_eq!(train.label_vec(), vec![77, 99]);
        assert_eq!(test.label_vec(), vec![5]);
        assert_eq!(train.num_classes, 100);
        let (train, _) = read_cifar100_expecting(dir.path(), Cifar100Labels::Coarse, None).unwrap();
        assert_eq!(train.label_vec(), vec![3, 19]);
        assert_eq!(train.num_classes, 20);
        let img = Vec::<u8>::try_from(&train.images.get(1).flatten(0, -1)).unwrap();
        assert_eq!(img, pixels(2));
    }

    #[test]
    fn data_cifar_errors_name_file_size_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        // Missing files.
        let msg = format!("{:#}", read_cifar10(dir.path()).unwrap_err());
        assert!(
            msg.contains("data_batch_1.bin") && msg.contains("cifar-10-binary.tar.gz"),
            "{msg}"
        );
        let msg = format!(
            "{:#}",
            read_cifar100(dir.path(), Cifar100Labels::Fine).unwrap_err()
        );
        assert!(
            msg.contains("train.bin") && msg.contains("cifar-100-binary"),
            "{msg}"
        );
        // A truncated file.
        write(
            &dir.path().join("train.bin"),
            &[
                (vec![1, 2], pixels(0)),
                (vec![1, 2], pixels(1)[..100].to_vec()),
            ],
        );
        let msg = format!(
            "{:#}",
            read_cifar100(dir.path(), Cifar100Labels::Fine).unwrap_err()
        );
        assert!(
            msg.contains("train.bin")
                && msg.contains(&format!("{} bytes", 3074 + 102))
                && msg.contains("3074-byte records")
                && msg.contains("cifar-100-binary.tar.gz"),
            "{msg}"
        );
        // Whole records, but not as many as the real file has.
        for f in 1..=5 {
            write(
                &dir.path().join(format!("data_batch_{f}.bin")),
                &[(vec![1], pixels(0))],
            );
        }
        let msg = format!("{:#}", read_cifar10(dir.path()).unwrap_err());
        assert!(
            msg.contains("data_batch_1.bin")
                && msg.contains("holds 1 records")
                && msg.contains("expected 10000")
                && msg.contains("cifar-10-batches-bin"),
            "{msg}"
        );
        // A label out of range.
        write(
            &dir.path().join("data_batch_3.bin"),
            &[(vec![10], pixels(0))],
        );
        let msg = format!(
            "{:#}",
            read_cifar10_expecting(dir.path(), None).unwrap_err()
        );
        assert!(
            msg.contains("data_batch_3.bin") && msg.contains("label 10"),
            "{msg}"
        );
    }
}
