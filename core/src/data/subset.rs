//! Class-aware views of a dataset: stratified subsets, the CIFAR-2 relabelling, and the
//! scoring samples of pruners (class-balanced or random indices).

use anyhow::bail;
#[cfg(test)]
use tch::{Device, Tensor};

#[cfg(test)]
use super::augment::{normalize_batch, Normalize};
use super::rng::Rng;
use super::{Dataset, Subset};

/// Stream ids, so that the subset and the scoring batches never share draws with each other or
/// with the loader for the same seed.
const SUBSET_STREAM: u64 = 0x5355_4253; // "SUBS"
const BALANCED_STREAM: u64 = 0x4241_4C41; // "BALA"
const RANDOM_STREAM: u64 = 0x5241_4E44; // "RAND"

/// The indices of each class, in dataset order.
fn indices_by_class(ds: &Dataset) -> Vec<Vec<i64>> {
    let mut by_class = vec![Vec::new(); ds.num_classes as usize];
    for (i, label) in ds.label_vec().into_iter().enumerate() {
        by_class[label as usize].push(i as i64);
    }
    by_class
}

/// Draws the same number of samples from every class (`per_class`, or `round(fraction × class
/// size)` per class) with `seed`. The result keeps the dataset's order, so it depends only on
/// which samples were drawn.
pub fn stratified_subset(ds: &Dataset, subset: &Subset, seed: u64) -> anyhow::Result<Dataset> {
    let by_class = indices_by_class(ds);
    if let Subset::Fraction(f) = *subset {
        if !(f > 0.0 && f <= 1.0) {
            bail!("data.subset.fraction = {f} is outside (0, 1]: use e.g. fraction = 0.1 for 10 % of each class");
        }
    }
    let mut chosen = Vec::new();
    for (class, mut indices) in by_class.into_iter().enumerate() {
        let available = indices.len();
        let take = match *subset {
            Subset::PerClass(n) => {
                if n == 0 {
                    bail!("data.subset.per_class = 0 would leave no training data: use at least 1");
                }
                if n > available {
                    bail!(
                        "data.subset.per_class = {n}, but class {class} has only {available} \
                         training samples: lower per_class to at most the smallest class size"
                    );
                }
                n
            }
            Subset::Fraction(f) => {
                let n = (f * available as f64).round() as usize;
                if n == 0 && available > 0 {
                    bail!(
                        "data.subset.fraction = {f} rounds to 0 samples for class {class} \
                         ({available} samples): raise the fraction or use per_class"
                    );
                }
                n
            }
        };
        // Per-class streams keep one class's draw independent of the other classes' sizes.
        let mut rng = Rng::derive(seed, &[SUBSET_STREAM, class as u64]);
        // A partial Fisher–Yates: only the first `take` positions are needed.
        for i in 0..take {
            let j = i + rng.below((available - i) as u64) as usize;
            indices.swap(i, j);
        }
        chosen.extend_from_slice(&indices[..take]);
    }
    chosen.sort_unstable();
    Ok(ds.select(&chosen))
}

/// CIFAR-2: classes 0..=4 become 1, the others 0 (for CIFAR-10: airplane, automobile, bird,
/// cat, deer against dog, frog, horse, ship, truck).
pub fn cifar2(ds: &Dataset) -> Dataset {
    Dataset {
        images: ds.images.shallow_clone(),
        labels: ds.labels.le(4).to_kind(tch::Kind::Int64),
        num_classes: 2,
    }
}

/// `samples_per_class` samples of every class (fewer for a class that does not have that many),
/// drawn with `seed`, grouped by class in class order, normalised but not augmented: a fixed,
/// balanced batch for pruners' saliency scores. Returns `(inputs f32 [B, C, H, W], targets i64
/// [B])` on `device`. The scoring batches are built from [`class_balanced_indices`] now; this
/// stays as the tests' record of the batch they must still equal.
#[cfg(test)]
pub fn class_balanced_batch(
    ds: &Dataset,
    samples_per_class: usize,
    seed: u64,
    norm: &Normalize,
    device: Device,
) -> (Tensor, Tensor) {
    let chosen = class_balanced_indices(ds, samples_per_class, seed);
    let batch = ds.select(&chosen);
    (
        normalize_batch(&batch.images, norm, device),
        batch.labels.to_device(device),
    )
}

/// The dataset indices [`class_balanced_batch`] takes, in its order.
pub fn class_balanced_indices(ds: &Dataset, samples_per_class: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::derive(seed, &[BALANCED_STREAM]);
    let mut chosen = Vec::new();
    for mut indices in indices_by_class(ds) {
        let take = samples_per_class.min(indices.len());
        for i in 0..take {
            let j = i + rng.below((indices.len() - i) as u64) as usize;
            indices.swap(i, j);
        }
        chosen.extend_from_slice(&indices[..take]);
    }
    chosen
}

/// `n` distinct dataset indices (all of them when the dataset is smaller) drawn uniformly with
/// `seed`, in the order drawn, whatever their classes: Synaptic-Flow's scoring sample.
pub fn random_indices(ds: &Dataset, n: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::derive(seed, &[RANDOM_STREAM]);
    let mut indices: Vec<i64> = (0..ds.len() as i64).collect();
    let take = n.min(indices.len());
    // A partial Fisher–Yates: only the first `take` positions are needed.
    for i in 0..take {
        let j = i + rng.below((indices.len() - i) as u64) as usize;
        indices.swap(i, j);
    }
    indices.truncate(take);
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 classes with 10, 20 and 30 samples, each image filled with its own index.
    fn toy() -> Dataset {
        let labels: Vec<i64> = (0..60)
            .map(|i| {
                if i < 10 {
                    0
                } else if i < 30 {
                    1
                } else {
                    2
                }
            })
            .collect();
        // Interleave the classes so that order and class are not aligned.
        let mut order: Vec<usize> = (0..60).collect();
        Rng::new(9).shuffle(&mut order);
        let labels: Vec<i64> = order.iter().map(|&i| labels[i]).collect();
        let images = Tensor::arange(60, (tch::Kind::Uint8, Device::Cpu))
            .view([60, 1, 1, 1])
            .repeat([1, 1, 2, 2]);
        Dataset::new(images, Tensor::from_slice(&labels), 3).unwrap()
    }

    fn ids(ds: &Dataset) -> Vec<i64> {
        Vec::<i64>::try_from(
            &ds.images
                .select(1, 0)
                .select(1, 0)
                .select(1, 0)
                .to_kind(tch::Kind::Int64),
        )
        .unwrap()
    }

    #[test]
    fn data_subset_per_class_and_fraction_counts() {
        let ds = toy();
        assert_eq!(ds.class_counts(), vec![10, 20, 30]);
        let sub = stratified_subset(&ds, &Subset::PerClass(7), 1).unwrap();
        assert_eq!(sub.class_counts(), vec![7, 7, 7]);
        let sub = stratified_subset(&ds, &Subset::Fraction(0.25), 1).unwrap();
        // round(2.5) = 3 (half away from zero), 5, round(7.5) = 8.
        assert_eq!(sub.class_counts(), vec![3, 5, 8]);
        // Images travel with their labels, and the result keeps dataset order.
        let labels = ds.label_vec();
        let picked = ids(&sub);
        assert!(picked.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            sub.label_vec(),
            picked
                .iter()
                .map(|&i| labels[i as usize])
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn data_subset_is_a_function_of_the_seed() {
        let ds = toy();
        let a = ids(&stratified_subset(&ds, &Subset::PerClass(5), 1).unwrap());
        let b = ids(&stratified_subset(&ds, &Subset::PerClass(5), 1).unwrap());
        let c = ids(&stratified_subset(&ds, &Subset::PerClass(5), 2).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let all = ids(&stratified_subset(&ds, &Subset::Fraction(1.0), 3).unwrap());
        assert_eq!(all, (0..60).collect::<Vec<_>>());
    }

    #[test]
    fn data_subset_refuses_impossible_requests() {
        let ds = toy();
        let msg = stratified_subset(&ds, &Subset::PerClass(11), 0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("class 0 has only 10"), "{msg}");
        assert!(stratified_subset(&ds, &Subset::PerClass(0), 0).is_err());
        assert!(stratified_subset(&ds, &Subset::Fraction(0.0), 0).is_err());
        assert!(stratified_subset(&ds, &Subset::Fraction(1.5), 0).is_err());
        assert!(stratified_subset(&ds, &Subset::Fraction(0.01), 0).is_err());
    }

    #[test]
    fn data_cifar2_relabels() {
        let images = Tensor::zeros([10, 3, 2, 2], (tch::Kind::Uint8, Device::Cpu));
        let ds = Dataset::new(
            images,
            Tensor::arange(10, (tch::Kind::Int64, Device::Cpu)),
            10,
        )
        .unwrap();
        let two = cifar2(&ds);
        assert_eq!(two.num_classes, 2);
        assert_eq!(two.label_vec(), vec![1, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(two.class_counts(), vec![5, 5]);
    }

    #[test]
    fn data_class_balanced_batch() {
        let ds = toy();
        let norm = Normalize::identity();
        let (x, y) = class_balanced_batch(&ds, 4, 5, &norm, Device::Cpu);
        assert_eq!(x.size(), [12, 1, 2, 2]);
        assert_eq!(
            Vec::<i64>::try_from(&y).unwrap(),
            vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
        );
        let (x2, y2) = class_balanced_batch(&ds, 4, 5, &norm, Device::Cpu);
        assert!(x.equal(&x2) && y.equal(&y2));
        let (x3, _) = class_balanced_batch(&ds, 4, 6, &norm, Device::Cpu);
        assert!(!x.equal(&x3));
        // Labels match the images drawn: each image holds its dataset index / 255.
        let labels = ds.label_vec();
        let idx = Vec::<f32>::try_from(&x.flatten(1, -1).select(1, 0)).unwrap();
        let y = Vec::<i64>::try_from(&y).unwrap();
        for (v, label) in idx.iter().zip(y) {
            let i = (v * 255.0).round() as usize;
            assert_eq!(labels[i], label);
        }
        // A class smaller than requested contributes all it has.
        let (x, _) = class_balanced_batch(&ds, 15, 0, &norm, Device::Cpu);
        assert_eq!(x.size()[0], 10 + 15 + 15);
    }
}
