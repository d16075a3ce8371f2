//! Datasets, subsets and the batch pipeline.
//!
//! Images stay as u8 `[N, C, H, W]` on the CPU until a batch is built: that is 4× less memory
//! than floats and lets the loader thread crop, flip and normalise in one pass per batch.

mod augment;
mod cifar;
mod idx;
mod image_folder;
mod loader;
pub mod rng;
mod subset;
mod synthetic;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use augment::{augment_batch, augment_into, lookup_table_tensor, normalize_batch, Normalize};
pub use cifar::{read_cifar10, read_cifar100};
pub use idx::{read_idx_dataset, IdxDataset, FASHION_MNIST, FASHION_MNIST_DIR, KMNIST, MNIST};
pub use image_folder::{class_names, read_image_folder};
pub use loader::{Batch, Loader, LoaderOptions, Shard, PREFETCH};
#[cfg(test)]
pub use subset::class_balanced_batch;
pub use subset::{cifar2, class_balanced_indices, random_indices, stratified_subset};
pub use synthetic::synthetic;

/// Per-channel statistics of the CIFAR training sets (pixel values scaled to [0, 1]), as used
/// throughout the literature; recomputing them on every run would cost a pass over 150 MB.
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
pub const CIFAR100_MEAN: [f32; 3] = [0.5071, 0.4865, 0.4409];
pub const CIFAR100_STD: [f32; 3] = [0.2673, 0.2564, 0.2762];

/// A labelled image set held in memory: images u8 `[N, C, H, W]` on CPU, labels i64 `[N]` on CPU.
///
/// `Dataset` is `Send` but not `Sync` (tch's `Tensor` is not `Sync`); the [`Loader`] therefore
/// takes shallow clones of the tensors on the caller's thread and moves those to its worker.
#[derive(Debug)]
pub struct Dataset {
    pub images: Tensor,
    pub labels: Tensor,
    pub num_classes: i64,
}

impl Dataset {
    /// Checks the shapes and kinds the rest of the pipeline relies on.
    pub fn new(images: Tensor, labels: Tensor, num_classes: i64) -> anyhow::Result<Dataset> {
        if images.kind() != Kind::Uint8 || images.dim() != 4 {
            bail!(
                "dataset images must be u8 [N, C, H, W], got {:?} {:?}",
                images.kind(),
                images.size()
            );
        }
        if labels.kind() != Kind::Int64 || labels.size() != [images.size()[0]] {
            bail!(
                "dataset labels must be i64 [N] with N = {} images, got {:?} {:?}",
                images.size()[0],
                labels.kind(),
                labels.size()
            );
        }
        if num_classes < 1 {
            bail!("dataset num_classes must be at least 1, got {num_classes}");
        }
        Ok(Dataset {
            images,
            labels,
            num_classes,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[C, H, W]` of one image.
    pub fn image_shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    /// The labels as a Rust vector (one copy; the pipeline indexes them many times).
    pub fn label_vec(&self) -> Vec<i64> {
        Vec::<i64>::try_from(&self.labels).expect("dataset labels are i64 [N]")
    }

    /// Number of samples of each class, indexed by class id (length `num_classes`).
    pub fn class_counts(&self) -> Vec<i64> {
        let mut counts = vec![0i64; self.num_classes as usize];
        for label in self.label_vec() {
            let slot = usize::try_from(label)
                .ok()
                .and_then(|l| counts.get_mut(l))
                .unwrap_or_else(|| {
                    panic!(
                        "label {label} is outside 0..{} (num_classes)",
                        self.num_classes
                    )
                });
            *slot += 1;
        }
        counts
    }

    /// The samples at `indices`, in that order (copies the data).
    pub fn select(&self, indices: &[i64]) -> Dataset {
        let idx = Tensor::from_slice(indices);
        Dataset {
            images: self.images.index_select(0, &idx),
            labels: self.labels.index_select(0, &idx),
            num_classes: self.num_classes,
        }
    }

    /// The same samples on `device`, a copy unless they are already there. A [`Loader`] for a GPU
    /// reads a dataset resident there instead of uploading the images every epoch.
    pub fn to_device(&self, device: tch::Device) -> Dataset {
        Dataset {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
            num_classes: self.num_classes,
        }
    }

    /// Another handle to the same storage: cheap, and `Send`, unlike `&Dataset`.
    pub fn shallow_clone(&self) -> Dataset {
        Dataset {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            num_classes: self.num_classes,
        }
    }

    /// Per-channel mean and (population) standard deviation of the pixels scaled to [0, 1].
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let [c, h, w] = self.image_shape().map(|d| d as usize);
        let plane = h * w;
        let n = self.len();
        if n == 0 || plane == 0 {
            return (vec![0.0; c], vec![1.0; c]);
        }
        // Integer sums are exact and order-independent; chunks bound the copy to ~12 MB
        // however large the dataset is.
        let mut sum = vec![0u64; c];
        let mut sum_sq = vec![0u64; c];
        let chunk = (4096 * 3072 / (c * plane)).max(1);
        let mut bytes = Vec::new();
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            bytes.resize(len * c * plane, 0u8);
            self.images
                .narrow(0, start as i64, len as i64)
                .copy_data(&mut bytes, len * c * plane);
            for (k, p) in bytes.chunks_exact(plane).enumerate() {
                let ch = k % c;
                sum[ch] += p.iter().map(|&v| v as u64).sum::<u64>();
                sum_sq[ch] += p.iter().map(|&v| (v as u64) * (v as u64)).sum::<u64>();
            }
        }
        let count = (n * plane) as f64;
        let mean: Vec<f64> = sum.iter().map(|&s| s as f64 / count).collect();
        let std = sum_sq
            .iter()
            .zip(&mean)
            .map(|(&sq, m)| ((sq as f64 / count - m * m).max(0.0).sqrt() / 255.0) as f32)
            .collect();
        (mean.iter().map(|m| (m / 255.0) as f32).collect(), std)
    }
}

/// Which of the two disjoint synthetic streams to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Where the images come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Procedurally generated, CIFAR-shaped; needs no files.
    #[default]
    Synthetic,
    Cifar10,
    Cifar100,
    /// IDX files, 1 × 28 × 28 grey images in 10 classes.
    Mnist,
    FashionMnist,
    Kmnist,
    /// `path/train/<class>/*.png|jpg` and `path/test/...`, resized to `image_size`.
    ImageFolder,
}

impl Source {
    /// As written in a config: `synthetic`, `cifar10`, `fashion_mnist`, ...
    pub fn name(self) -> &'static str {
        match self {
            Source::Synthetic => "synthetic",
            Source::Cifar10 => "cifar10",
            Source::Cifar100 => "cifar100",
            Source::Mnist => "mnist",
            Source::FashionMnist => "fashion_mnist",
            Source::Kmnist => "kmnist",
            Source::ImageFolder => "image_folder",
        }
    }

    /// As said in a sentence: `CIFAR-10`, `Fashion-MNIST`, ...
    pub fn in_words(self) -> &'static str {
        match self {
            Source::Synthetic => "synthetic",
            Source::Cifar10 => "CIFAR-10",
            Source::Cifar100 => "CIFAR-100",
            Source::Mnist => MNIST.name,
            Source::FashionMnist => FASHION_MNIST.name,
            Source::Kmnist => KMNIST.name,
            Source::ImageFolder => "image folder",
        }
    }

    fn idx(self) -> Option<IdxDataset> {
        match self {
            Source::Mnist => Some(MNIST),
            Source::FashionMnist => Some(FASHION_MNIST),
            Source::Kmnist => Some(KMNIST),
            _ => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// CIFAR-100 has 20 coarse superclasses and 100 fine classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cifar100Labels {
    #[default]
    Fine,
    Coarse,
}

/// A per-class stratified subset of the training split.
///
/// Written in TOML as `{ per_class = 100 }` or `{ fraction = 0.1 }`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SubsetRepr", into = "SubsetRepr")]
pub enum Subset {
    /// The same number of samples from every class.
    PerClass(usize),
    /// `round(fraction × class size)` samples from every class.
    Fraction(f64),
}

/// The TOML shape of [`Subset`]: a table with exactly one of two keys. An untagged enum would
/// also parse it, but its error for a bad table is "did not match any variant", which does not
/// tell the user what to write.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsetRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_class: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fraction: Option<f64>,
}

impl TryFrom<SubsetRepr> for Subset {
    type Error = String;
    fn try_from(r: SubsetRepr) -> Result<Subset, String> {
        match (r.per_class, r.fraction) {
            (Some(n), None) => Ok(Subset::PerClass(n)),
            (None, Some(f)) => Ok(Subset::Fraction(f)),
            _ => Err(
                "data.subset takes exactly one of `per_class` or `fraction`, \
                 e.g. `subset = { per_class = 100 }` or `subset = { fraction = 0.1 }`"
                    .to_string(),
            ),
        }
    }
}

impl From<Subset> for SubsetRepr {
    fn from(s: Subset) -> SubsetRepr {
        match s {
            Subset::PerClass(n) => SubsetRepr {
                per_class: Some(n),
                fraction: None,
            },
            Subset::Fraction(f) => SubsetRepr {
                per_class: None,
                fraction: Some(f),
            },
        }
    }
}

/// The `[data]` table of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub source: Source,
    /// Directory of the dataset's files (`cifar-10-batches-bin`, the four IDX files, the image
    /// folder's root); a relative path is resolved against the `base_dir` given to [`load`].
    /// Fashion-MNIST defaults to where `apt-get install dataset-fashion-mnist` puts it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Image folder only: 3 (RGB, the default) or 1 (grey).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels: Option<i64>,
    /// Image folder only: the side every image is resized to (default 32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<i64>,
    /// Synthetic only.
    pub train_size: usize,
    /// Synthetic only.
    pub test_size: usize,
    /// Seed of the synthetic generator; separate from the run seed so that every run of a
    /// sweep sees the same data.
    pub data_seed: u64,
    /// CIFAR-100 only.
    pub labels: Cifar100Labels,
    /// Drawn from the training split with the run seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<Subset>,
    /// Relabel class <= 4 as 1 and the rest as 0, in both splits.
    pub cifar2: bool,
    /// Random crop (zero-pad 4) and horizontal flip on training batches.
    pub augment: bool,
    /// Per-channel standardisation; when false the inputs are only scaled to [0, 1].
    pub normalize: bool,
}

impl Default for DataConfig {
    fn default() -> DataConfig {
        DataConfig {
            source: Source::Synthetic,
            path: None,
            channels: None,
            image_size: None,
            train_size: 5000,
            test_size: 1000,
            data_seed: 0,
            labels: Cifar100Labels::Fine,
            subset: None,
            cifar2: false,
            augment: true,
            normalize: true,
        }
    }
}

pub const DEFAULT_IMAGE_SIZE: i64 = 32;
pub const DEFAULT_CHANNELS: i64 = 3;

impl DataConfig {
    /// The classes, channels and image side of the data this config gives, known before any
    /// of it is read or generated. An image folder's classes are its folders; when they cannot
    /// be listed (the error comes when the data is read), a guess of 10 sizes the classifier.
    pub fn shape(&self, base_dir: &Path) -> (i64, i64, i64) {
        let classes = match (self.cifar2, self.source, self.labels) {
            (true, ..) => 2,
            (false, Source::Cifar100, Cifar100Labels::Fine) => 100,
            (false, Source::Cifar100, Cifar100Labels::Coarse) => 20,
            (false, Source::ImageFolder, _) => self
                .resolved_path(base_dir)
                .and_then(|root| class_names(&root).ok())
                .map_or(10, |names| names.len() as i64),
            (false, ..) => 10,
        };
        match self.source {
            Source::Synthetic | Source::Cifar10 | Source::Cifar100 => (classes, 3, 32),
            Source::Mnist | Source::FashionMnist | Source::Kmnist => (classes, 1, 28),
            Source::ImageFolder => (
                classes,
                self.channels.unwrap_or(DEFAULT_CHANNELS),
                self.image_size.unwrap_or(DEFAULT_IMAGE_SIZE),
            ),
        }
    }

    /// `path` resolved against `base_dir`, or the source's default directory.
    fn resolved_path(&self, base_dir: &Path) -> Option<PathBuf> {
        match &self.path {
            Some(path) if path.is_absolute() => Some(path.clone()),
            Some(path) => Some(base_dir.join(path)),
            None if self.source == Source::FashionMnist => Some(FASHION_MNIST_DIR.into()),
            None => None,
        }
    }
}

/// The train and test splits of a run, with the per-channel statistics to normalise them.
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
    /// One per channel.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Splits {
    /// The normalisation every batch of this run should use.
    pub fn normalize(&self) -> Normalize {
        Normalize {
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}

/// Loads the splits described by `cfg`: reads or generates the data, draws the training subset
/// with `run_seed`, applies the CIFAR-2 relabelling, and picks the normalisation statistics.
///
/// The subset is drawn before relabelling so that `per_class` counts original classes.
/// CIFAR uses the published constants (a pass over its 150 MB would cost more than it tells);
/// every other source is measured on its full training split. Either way the statistics are
/// independent of the subset and the run seed.
pub fn load(cfg: &DataConfig, base_dir: &Path, run_seed: u64) -> anyhow::Result<Splits> {
    let dir = || -> anyhow::Result<PathBuf> {
        cfg.resolved_path(base_dir).with_context(|| {
            format!(
                "data.path is required for source = \"{}\": set it to the directory of {}",
                cfg.source,
                match cfg.source {
                    Source::Cifar100 => "the extracted cifar-100-binary.tar.gz (cifar-100-binary)",
                    Source::Cifar10 =>
                        "the extracted cifar-10-binary.tar.gz (cifar-10-batches-bin)",
                    Source::ImageFolder => "the images, holding train/<class>/ and test/<class>/",
                    _ => "the four *-ubyte[.gz] files",
                }
            )
        })
    };
    let (train, test, stats) = match cfg.source {
        Source::Synthetic => {
            if cfg.path.is_some() {
                tracing::warn!("data.path is ignored for source = \"synthetic\"");
            }
            if cfg.train_size == 0 || cfg.test_size == 0 {
                bail!(
                    "data.train_size = {} and data.test_size = {}: both synthetic splits need \
                     at least one image (the defaults are 5000 and 1000)",
                    cfg.train_size,
                    cfg.test_size
                );
            }
            let train = synthetic(cfg.train_size, cfg.data_seed, Split::Train);
            let test = synthetic(cfg.test_size, cfg.data_seed, Split::Test);
            let stats = train.channel_stats();
            (train, test, stats)
        }
        Source::Cifar10 => {
            let (train, test) = read_cifar10(&dir()?)?;
            let stats = (CIFAR10_MEAN.to_vec(), CIFAR10_STD.to_vec());
            (train, test, stats)
        }
        Source::Cifar100 => {
            let (train, test) = read_cifar100(&dir()?, cfg.labels)?;
            let stats = (CIFAR100_MEAN.to_vec(), CIFAR100_STD.to_vec());
            (train, test, stats)
        }
        Source::Mnist | Source::FashionMnist | Source::Kmnist => {
            let dataset = cfg.source.idx().expect("an IDX source");
            let (train, test) = read_idx_dataset(&dir()?, dataset)?;
            let stats = train.channel_stats();
            (train, test, stats)
        }
        Source::ImageFolder => {
            let (_, channels, side) = cfg.shape(base_dir);
            let (train, test) = read_image_folder(&dir()?, channels, side as u32)?;
            let stats = train.channel_stats();
            (train, test, stats)
        }
    };
    let (mean, std) = stats;
    let mut train = match &cfg.subset {
        Some(subset) => stratified_subset(&train, subset, run_seed)
            .context("while drawing data.subset from the training split")?,
        None => train,
    };
    let mut test = test;
    if cfg.cifar2 {
        train = cifar2(&train);
        test = cifar2(&test);
    }
    let channels = train.image_shape()[0] as usize;
    let (mean, std) = if cfg.normalize {
        (mean, std)
    } else {
        (vec![0.0; channels], vec![1.0; channels])
    };
    Ok(Splits {
        train,
        test,
        mean,
        std,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DataConfig, toml::de::Error> {
        #[derive(Deserialize)]
        struct Run {
            data: DataConfig,
        }
        toml::from_str::<Run>(text).map(|r| r.data)
    }

    #[test]
    fn data_config_defaults_and_round_trip() {
        let cfg = parse("[data]\n").unwrap();
        assert_eq!(cfg, DataConfig::default());
        let cfg = parse(
            "[data]\nsource = \"cifar100\"\npath = \"cifar-100-binary\"\nlabels = \"coarse\"\n\
             subset = { fraction = 0.25 }\ncifar2 = true\naugment = false\nnormalize = false\n",
        )
        .unwrap();
        assert_eq!(cfg.source, Source::Cifar100);
        assert_eq!(cfg.labels, Cifar100Labels::Coarse);
        assert_eq!(cfg.subset, Some(Subset::Fraction(0.25)));
        assert!(cfg.cifar2 && !cfg.augment && !cfg.normalize);
        let text = toml::to_string(&cfg).unwrap();
        let back: DataConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(
            parse("[data]\nsubset = { per_class = 100 }\n")
                .unwrap()
                .subset,
            Some(Subset::PerClass(100))
        );
    }

    #[test]
    fn data_config_rejects_bad_tables() {
        let err = parse("[data]\nsubset = { per_class = 1, fraction = 0.5 }\n").unwrap_err();
        assert!(err.to_string().contains("exactly one of"), "{err}");
        let err = parse("[data]\nsubset = {}\n").unwrap_err();
        assert!(err.to_string().contains("exactly one of"), "{err}");
        assert!(parse("[data]\nsubset = { percent = 5 }\n").is_err());
        assert!(parse("[data]\nsorce = \"cifar10\"\n").is_err());
        assert!(parse("[data]\nsource = \"svhn\"\n").is_err());
    }

    #[test]
    fn data_load_synthetic_with_subset_and_cifar2() {
        let cfg = DataConfig {
            train_size: 300,
            test_size: 100,
            subset: Some(Subset::PerClass(10)),
            cifar2: true,
            ..DataConfig::default()
        };
        let splits = load(&cfg, Path::new("."), 1).unwrap();
        assert_eq!(splits.train.len(), 100);
        assert_eq!(splits.train.class_counts(), vec![50, 50]);
        assert_eq!(splits.test.len(), 100);
        assert_eq!(splits.test.num_classes, 2);
        // Statistics of the full synthetic training split: plausible image statistics.
        for c in 0..3 {
            assert!((0.2..0.8).contains(&splits.mean[c]), "{:?}", splits.mean);
            assert!((0.05..0.5).contains(&splits.std[c]), "{:?}", splits.std);
        }
        let plain = load(
            &DataConfig {
                normalize: false,
                ..cfg.clone()
            },
            Path::new("."),
            1,
        )
        .unwrap();
        assert_eq!((plain.mean, plain.std), (vec![0.0; 3], vec![1.0; 3]));
        // The subset follows the run seed.
        let other = load(&cfg, Path::new("."), 2).unwrap();
        assert!(!other.train.images.equal(&splits.train.images));
    }

    #[test]
    fn data_channel_stats_match_tensor_maths() {
        let images = Tensor::arange(2 * 3 * 4 * 5, (Kind::Int64, tch::Device::Cpu))
            .multiply_scalar(37)
            .remainder(256)
            .to_kind(Kind::Uint8)
            .view([2, 3, 4, 5]);
        let ds = Dataset::new(images, Tensor::from_slice(&[0i64, 1]), 2).unwrap();
        let (mean, std) = ds.channel_stats();
        let x = ds.images.to_kind(Kind::Double) / 255.0;
        for c in 0..3 {
            let xc = x.select(1, c);
            let m = xc.mean(Kind::Double).double_value(&[]) as f32;
            let s = xc.std(false).double_value(&[]) as f32;
            assert!((mean[c as usize] - m).abs() < 1e-6, "{mean:?}");
            assert!((std[c as usize] - s).abs() < 1e-6, "{std:?}");
        }
        let empty = synthetic(0, 0, Split::Train);
        assert!(empty.is_empty());
        assert_eq!(empty.channel_stats(), (vec![0.0; 3], vec![1.0; 3]));
    }

    #[test]
    fn data_load_cifar_needs_a_path() {
        let cfg = DataConfig {
            source: Source::Cifar10,
            ..DataConfig::default()
        };
        let err = load(&cfg, Path::new("/nonexistent"), 0).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("data.path") && msg.contains("cifar-10-batches-bin"),
            "{msg}"
        );
        // A relative path is resolved against the base directory and named in the error.
        let cfg = DataConfig {
            path: Some("cifar-10-batches-bin".into()),
            ..cfg
        };
        let err = load(&cfg, Path::new("/nonexistent/base"), 0).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("/nonexistent/base/cifar-10-batches-bin/data_batch_1.bin"),
            "{msg}"
        );
    }
}
