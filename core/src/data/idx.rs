//! Reader for the IDX files of MNIST, Fashion-MNIST and KMNIST
//! (<http://yann.lecun.com/exdb/mnist/>), plain or gzipped.
//!
//! An IDX file is two zero bytes, a type byte (0x08: unsigned bytes, the only type these
//! datasets use), the number of dimensions, each dimension as a big-endian u32, then the data
//! in row-major order: images are u8 `[N, 28, 28]`, labels u8 `[N]`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tch::Tensor;

use super::Dataset;

/// Where the Debian package `dataset-fashion-mnist` installs its four files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

const UNSIGNED_BYTE: u8 = 0x08;

/// One of the IDX datasets: its name in errors and how to get its files.
#[derive(Clone, Copy, Debug)]
pub struct IdxDataset {
    pub name: &'static str,
    pub fix: &'static str,
    pub num_classes: i64,
}

pub const MNIST: IdxDataset = IdxDataset {
    name: "MNIST",
    fix: "download the four *-ubyte.gz files from http://yann.lecun.com/exdb/mnist/ \
          (or torchvision's MNIST/raw directory) and point data.path at their directory",
    num_classes: 10,
};

pub const FASHION_MNIST: IdxDataset = IdxDataset {
    name: "Fashion-MNIST",
    fix: "install it with `apt-get install dataset-fashion-mnist` (it puts the four files in \
          /usr/share/datasets/fashion-mnist, the default data.path), or point data.path at a \
          directory holding train-images-idx3-ubyte.gz and the other three files",
    num_classes: 10,
};

pub const KMNIST: IdxDataset = IdxDataset {
    name: "KMNIST",
    fix: "download the four *-ubyte.gz files of Kuzushiji-MNIST from \
          https://github.com/rois-codh/kmnist and point data.path at their directory",
    num_classes: 10,
};

/// Reads the training (`train-*`, 60,000 images for these datasets) and test (`t10k-*`,
/// 10,000) splits from `dir`. File names may carry a prefix (`kmnist-train-...`), use the
/// dot of some mirrors (`train-images.idx3-ubyte`), and may be gzipped.
pub fn read_idx_dataset(dir: &Path, dataset: IdxDataset) -> anyhow::Result<(Dataset, Dataset)> {
    let split = |prefix: &str| -> anyhow::Result<Dataset> {
        let images = find(dir, &format!("{prefix}-images"), "idx3-ubyte", dataset)?;
        let labels = find(dir, &format!("{prefix}-labels"), "idx1-ubyte", dataset)?;
        read_pair(&images, &labels, dataset)
    };
    Ok((split("train")?, split("t10k")?))
}

/// The file in `dir` whose name ends in `{stem}-{kind}` or `{stem}.{kind}`, with or without
/// `.gz`.
fn find(dir: &Path, stem: &str, kind: &str, dataset: IdxDataset) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot read the {} directory {}: {}",
            dataset.name,
            dir.display(),
            dataset.fix
        )
    })?;
    let wanted = [format!("{stem}-{kind}"), format!("{stem}.{kind}")];
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let name = name.strip_suffix(".gz").unwrap_or(name);
            wanted.iter().any(|w| name.ends_with(w.as_str()))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "no {} file named *{}[.gz] in {}: {}",
            dataset.name,
            wanted[0],
            dir.display(),
            dataset.fix
        ),
        _ => bail!(
            "{} files in {} all look like *{}[.gz]: {}; keep one of them",
            found.len(),
            dir.display(),
            wanted[0],
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn read_pair(images: &Path, labels: &Path, dataset: IdxDataset) -> anyhow::Result<Dataset> {
    let (image_dims, pixels) = read_idx(images, 3, dataset)?;
    let (label_dims, label_bytes) = read_idx(labels, 1, dataset)?;
    if image_dims[0] != label_dims[0] {
        bail!(
            "{} holds {} images but {} holds {} labels: the two files are from different \
             datasets or splits; {}",
            images.display(),
            image_dims[0],
            labels.display(),
            label_dims[0],
            dataset.fix
        );
    }
    let mut label_values = Vec::with_capacity(label_bytes.len());
    for (i, &label) in label_bytes.iter().enumerate() {
        if i64::from(label) >= dataset.num_classes {
            bail!(
                "{} label {i} is {label}, outside 0..{} for {}: the file is corrupt or from \
                 another dataset",
                labels.display(),
                dataset.num_classes,
                dataset.name
            );
        }
        label_values.push(i64::from(label));
    }
    let [n, h, w] = [image_dims[0], image_dims[1], image_dims[2]].map(|d| d as i64);
    Dataset::new(
        Tensor::from_slice(&pixels).view([n, 1, h, w]),
        Tensor::from_slice(&label_values),
        dataset.num_classes,
    )
}

/// The dimensions and bytes of one IDX file of unsigned bytes with `ndim` dimensions.
fn read_idx(
    path: &Path,
    ndim: usize,
    dataset: IdxDataset,
) -> anyhow::Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path)
        .with_context(|| format!("cannot read {} file {}", dataset.name, path.display()))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| {
                format!(
                    "{} is not a valid gzip file (truncated or corrupt download?): {}",
                    path.display(),
                    dataset.fix
                )
            })?;
        out
    } else {
        raw
    };
    let header = 4 + 4 * ndim;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!(
            "{} is not an IDX file (it does not start with two zero bytes): {}",
            path.display(),
            dataset.fix
        );
    }
    if bytes[2] != UNSIGNED_BYTE || usize::from(bytes[3]) != ndim {
        bail!(
            "{} is an IDX file of type 0x{:02x} with {} dimensions; {} {} are type 0x08 \
             (unsigned bytes) with {ndim}: is it the {} file?",
            path.display(),
            bytes[2],
            bytes[3],
            dataset.name,
            if ndim == 3 { "images" } else { "labels" },
            if ndim == 3 { "labels" } else { "images" },
        );
    }
    if bytes.len() < header {
        bail!(
            "{} is truncated: {} bytes, shorter than its {header}-byte header",
            path.display(),
            bytes.len()
        );
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims.iter().product::<usize>();
    let data = bytes.len() - header;
    if data != expected {
        bail!(
            "{} holds {data} bytes of data, but its header says {} = {expected}: the file is {}; {}",
            path.display(),
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" × "),
            if data < expected { "truncated" } else { "longer than its header says" },
            dataset.fix
        );
    }
    let mut bytes = bytes;
    bytes.drain(..header);
    Ok((dims, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0, 0, UNSIGNED_BYTE, dims.len() as u8];
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(data);
        bytes
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn pixels(n: usize) -> Vec<u8> {
        (0..n * 4 * 3).map(|i| (i * 11 % 256) as u8).collect()
    }

    /// Train: 3 images of 4 × 3 (plain files); test: 2 (gzipped, with a prefix).
    fn write_dataset(dir: &Path) {
        std::fs::write(
            dir.join("train-images-idx3-ubyte"),
            idx(&[3, 4, 3], &pixels(3)),
        )
        .unwrap();
        std::fs::write(dir.join("train-labels-idx1-ubyte"), idx(&[3], &[7, 0, 9])).unwrap();
        let test_images = gz(&idx(&[2, 4, 3], &pixels(2)));
        std::fs::write(dir.join("x-t10k-images-idx3-ubyte.gz"), test_images).unwrap();
        std::fs::write(
            dir.join("x-t10k-labels.idx1-ubyte.gz"),
            gz(&idx(&[2], &[1, 2])),
        )
        .unwrap();
    }

    #[test]
    fn data_idx_reads_plain_and_gzipped_files() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path());
        let (train, test) = read_idx_dataset(dir.path(), MNIST).unwrap();
        assert_eq!(train.images.size(), [3, 1, 4, 3]);
        assert_eq!(train.label_vec(), [7, 0, 9]);
        assert_eq!(test.label_vec(), [1, 2]);
        assert_eq!(train.num_classes, 10);
        // Row-major: image 1, row 2, column 1 is byte 12 + 2 × 3 + 1.
        assert_eq!(
            train.images.int64_value(&[1, 0, 2, 1]),
            pixels(3)[12 + 7] as i64
        );
        let all = Vec::<u8>::try_from(&test.images.flatten(0, -1)).unwrap();
        assert_eq!(all, pixels(2));
    }

    #[test]
    fn data_idx_errors_name_the_file_and_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let msg = |ds| format!("{:#}", read_idx_dataset(dir.path(), ds).unwrap_err());
        let m = msg(FASHION_MNIST);
        assert!(
            m.contains("train-images-idx3-ubyte[.gz]")
                && m.contains("apt-get install dataset-fashion-mnist"),
            "{m}"
        );
        write_dataset(dir.path());
        let images = dir.path().join("train-images-idx3-ubyte");
        let labels = dir.path().join("train-labels-idx1-ubyte");
        let expect = |needles: &[&str]| {
            let m = msg(MNIST);
            for n in needles {
                assert!(m.contains(n), "{n:?} not in {m}");
            }
        };
        // Truncated data.
        let mut short = idx(&[3, 4, 3], &pixels(3));
        short.truncate(short.len() - 5);
        std::fs::write(&images, &short).unwrap();
        expect(&[
            "train-images-idx3-ubyte",
            "31 bytes of data",
            "3 × 4 × 3 = 36",
            "truncated",
        ]);
        // Truncated header.
        std::fs::write(&images, &idx(&[3, 4, 3], &[])[..9]).unwrap();
        expect(&["truncated", "16-byte header"]);
        // Wrong magic, and labels where images belong.
        std::fs::write(&images, b"\x1f\x8bnot idx").unwrap();
        expect(&["not an IDX file"]);
        std::fs::write(&images, idx(&[3], &[1, 2, 3])).unwrap();
        expect(&["1 dimensions", "is it the labels file?"]);
        // Count mismatch between images and labels.
        std::fs::write(&images, idx(&[2, 4, 3], &pixels(2))).unwrap();
        expect(&["holds 2 images", "holds 3 labels"]);
        // A label out of range.
        std::fs::write(&images, idx(&[3, 4, 3], &pixels(3))).unwrap();
        std::fs::write(&labels, idx(&[3], &[7, 10, 9])).unwrap();
        expect(&["train-labels-idx1-ubyte label 1 is 10", "outside 0..10"]);
        // A corrupt gzip file.
        std::fs::write(&labels, idx(&[3], &[7, 0, 9])).unwrap();
        let test_labels = dir.path().join("x-t10k-labels.idx1-ubyte.gz");
        let mut broken = gz(&idx(&[2], &[1, 2]));
        broken.truncate(broken.len() / 2);
        std::fs::write(&test_labels, broken).unwrap();
        expect(&["x-t10k-labels.idx1-ubyte.gz is not a valid gzip file"]);
        // Two candidates for one file.
        std::fs::write(&test_labels, gz(&idx(&[2], &[1, 2]))).unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx(&[2], &[1, 2]),
        )
        .unwrap();
        expect(&["2 files in", "keep one of them"]);
    }
}
