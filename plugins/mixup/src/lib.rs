//! `mixup`: training on convex combinations of pairs of examples (Zhang, Cisse, Dauphin &
//! Lopez-Paz 2018, "mixup: Beyond Empirical Risk Minimization"; reference
//! facebookresearch/mixup-cifar10).
//!
//! For each training batch (event `BATCH_START`), with probability `prob`:
//!
//!   λ ~ Beta(α, α),   π a uniformly random permutation of the batch,
//!   x̃ = λ·x + (1 − λ)·x[π],
//!   ỹ = λ·onehot(y) + (1 − λ)·onehot(y[π])      (float, `[B, classes]`)
//!
//! One λ and one π per batch, as in the reference. Targets that are already soft (`[B, C]`
//! float, e.g. from label smoothing placed before this callback) are mixed the same way. The
//! host's cross-entropy against soft targets, −Σ_c ỹ_c·log softmax(z)_c, is linear in ỹ, so it
//! equals λ·CE(z, y) + (1 − λ)·CE(z, y[π]): the reference's `mixup_criterion`. A batch that is
//! not mixed (probability 1 − `prob`) is passed on unchanged, class indices and all.
//!
//! Configuration (`[[callbacks]] use = "mixup"`):
//! - `alpha` (1.0): the Beta concentration α > 0; α = 1 draws λ uniformly on [0, 1].
//! - `prob` (1.0): the probability of mixing a batch, in [0, 1].
//!
//! Randomness: λ, π and the `prob` coin come from a SplitMix64 generator keyed by
//! (`[train] seed`, the number of batches this callback has seen), not from libtorch's
//! generator, so the host's own random stream is untouched and a resumed run (the counter is the
//! callback's checkpointed state) mixes exactly as the uninterrupted run. Beta draws are two
//! Marsaglia–Tsang Gamma draws, X / (X + Y).

use serde::{Deserialize, Serialize};
use tch::Tensor;
use trellis_sdk::{
    Batch, Callback, Component, Error, Events, Host, Plugin, Result, State, StepInfo,
};

use trellis_mix_common::mix;
use trellis_mix_common::rng::Rng;
use trellis_mix_common::{check_probability, soft_targets};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MixupConfig {
    /// Concentration α of the symmetric Beta(α, α) that λ is drawn from.
    pub alpha: f64,
    /// Probability of mixing a batch.
    pub prob: f64,
}

impl Default for MixupConfig {
    fn default() -> Self {
        // The reference's CIFAR-10 setting.
        MixupConfig {
            alpha: 1.0,
            prob: 1.0,
        }
    }
}

/// Keeps mixup's draws unrelated to those of other callbacks keyed by the same run seed.
const STREAM: u64 = u64::from_le_bytes(*b"mixup\0\0\0");

/// One batch's mixing: the weight of the batch itself and the partner of each example.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MixDraw {
    pub(crate) lam: f64,
    pub(crate) perm: Vec<i64>,
}

pub struct Mixup {
    alpha: f64,
    prob: f64,
    classes: i64,
    seed: u64,
    /// Batches seen so far: the key of the next draw, and all the state a resume needs.
    draws: u64,
}

impl Mixup {
    /// What the next batch of `batch_size` examples will be mixed with; `None` when the `prob`
    /// coin says to leave it alone.
    pub(crate) fn next_draw(&self, batch_size: usize) -> Option<MixDraw> {
        let mut rng = Rng::keyed(self.seed, STREAM, self.draws);
        // The coin is drawn even when prob = 1, so that λ and π do not depend on prob.
        let coin = rng.uniform();
        let lam = rng.beta(self.alpha, self.alpha);
        let perm = rng.permutation(batch_size);
        (coin < self.prob).then_some(MixDraw { lam, perm })
    }
}

impl Component for Mixup {
    const NAME: &'static str = "mixup";
    const DESCRIPTION: &'static str =
        "mixup: train on λ·x + (1−λ)·x[π] with targets mixed alike, λ ~ Beta(α, α)";
    type Config = MixupConfig;

    fn new(config: MixupConfig, host: Host) -> Result<Self> {
        if !(config.alpha.is_finite() && config.alpha > 0.0) {
            return Err(Error::config(
                "alpha",
                format!("alpha must be a finite number > 0, got {}", config.alpha),
            ));
        }
        check_probability("prob", config.prob)?;
        Ok(Mixup {
            alpha: config.alpha,
            prob: config.prob,
            classes: host.num_classes(),
            seed: host.seed(),
            draws: 0,
        })
    }
}

impl Callback for Mixup {
    fn events(&self) -> Events {
        Events::BATCH_START
    }

    fn batch_start(&mut self, batch: Batch, _at: StepInfo) -> Result<Batch> {
        let n = batch.inputs.size().first().copied().unwrap_or(0);
        let draw = self.next_draw(n as usize);
        self.draws += 1;
        let Some(MixDraw { lam, perm }) = draw else {
            return Ok(batch);
        };
        let perm = Tensor::from_slice(&perm).to_device(batch.inputs.device());
        let targets = soft_targets(&batch.targets, self.classes)?;
        Ok(Batch {
            inputs: mix(&batch.inputs, lam, &perm)?,
            targets: mix(&targets, lam, &perm)?,
        })
    }

    fn state(&self) -> Result<State> {
        Ok(State {
            tensors: Vec::new(),
            meta: self.draws.to_string(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        // Empty meta: a checkpoint from before this callback was added; start counting afresh.
        self.draws = match state.meta.trim() {
            "" => 0,
            meta => meta
                .parse()
                .map_err(|_| Error::msg(format!("mixup state `{meta}` is not a batch count")))?,
        };
        Ok(())
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "mixup data augmentation (Zhang et al. 2018)"
)
.callback::<Mixup>());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;
    use trellis_sdk::abi::ErrorKind;
    use trellis_sdk::parse_config;
    use trellis_sdk::testing::{FakeHost, TinyNet};

    const B: usize = 4;
    const CLASSES: i64 = 3;
    const LABELS: [i64; B] = [0, 1, 2, 1];
    /// Pixels of a 4×1×2×2 batch, four per image.
    const PIXELS: [f32; 16] = [
        1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 2.5, 0.0, 7.0, -3.0, 1.5, 2.0, 0.25, 0.75, -2.0, 5.0,
    ];
    /// Logits of the four images over three classes.
    const LOGITS: [f32; 12] = [
        2.0, -1.0, 0.5, 0.1, 1.2, -0.7, -2.0, 0.3, 1.9, 0.0, 0.0, 3.0,
    ];

    fn batch() -> Batch {
        Batch {
            inputs: Tensor::from_slice(&PIXELS).view([B as i64, 1, 2, 2]),
            targets: Tensor::from_slice(&LABELS),
        }
    }

    fn mixup(config: &str, seed: u64) -> Mixup {
        let host = FakeHost::new(TinyNet::new(1, CLASSES))
            .classes(CLASSES)
            .seed(seed)
            .host();
        Mixup::new(parse_config(config).unwrap(), host).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// −Σ_c t_c log softmax(z)_c averaged over the batch, by hand.
    fn soft_ce(logits: &[f32], targets: &[f32]) -> f64 {
        let k = CLASSES as usize;
        let mut total = 0.0;
        for (z, t) in logits.chunks(k).zip(targets.chunks(k)) {
            let max = z.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            total -= z
                .iter()
                .zip(t)
                .map(|(&zc, &tc)| tc as f64 * (zc as f64 - lse))
                .sum::<f64>();
        }
        total / (logits.len() / k) as f64
    }

    fn one_hot(labels: &[i64]) -> Vec<f32> {
        labels
            .iter()
            .flat_map(|&y| (0..CLASSES).map(move |c| if c == y { 1.0 } else { 0.0 }))
            .collect()
    }

    #[test]
    fn mixes_inputs_and_targets_with_the_drawn_lambda_and_permutation() {
        let mut m = mixup("alpha = 0.4\n", 11);
        let draw = m.next_draw(B).expect("prob = 1 always mixes");
        let MixDraw { lam, ref perm } = draw;
        // Away from 1/2, so that swapping λ and 1 − λ fails the test.
        assert!(
            lam > 0.0 && lam < 1.0 && (lam - 0.5).abs() > 0.05,
            "λ = {lam}"
        );
        assert_ne!(perm, &[0, 1, 2, 3], "seed 11 must give a real permutation");
        let out = m.batch_start(batch(), StepInfo::default()).unwrap();

        let lam32 = lam as f32;
        let mut inputs = Vec::new();
        for i in 0..B {
            let j = perm[i] as usize;
            for p in 0..4 {
                inputs.push(lam32 * PIXELS[4 * i + p] + (1.0 - lam32) * PIXELS[4 * j + p]);
            }
        }
        assert_eq!(out.inputs.size(), [4, 1, 2, 2]);
        assert_close(&values(&out.inputs), &inputs, "inputs");

        let permuted: Vec<i64> = perm.iter().map(|&j| LABELS[j as usize]).collect();
        let (own, other) = (one_hot(&LABELS), one_hot(&permuted));
        let targets: Vec<f32> = own
            .iter()
            .zip(&other)
            .map(|(a, b)| lam32 * a + (1.0 - lam32) * b)
            .collect();
        assert_eq!(out.targets.size(), [4, 3]);
        assert_eq!(out.targets.kind(), Kind::Float);
        assert_close(&values(&out.targets), &targets, "targets");

        // The soft cross-entropy is the λ-weighted pair of hard ones (the reference's
        // mixup_criterion), checked through the host's formula on tensors.
        let logits = Tensor::from_slice(&LOGITS).view([4, 3]);
        let host_ce = -(&out.targets * logits.log_softmax(-1, Kind::Float))
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        let expected = lam * soft_ce(&LOGITS, &own) + (1.0 - lam) * soft_ce(&LOGITS, &other);
        assert!((host_ce.double_value(&[]) - expected).abs() < 1e-5);
        assert!((soft_ce(&LOGITS, &targets) - expected).abs() < 1e-5);
        let hard = logits.cross_entropy_for_logits(&Tensor::from_slice(&LABELS));
        assert!((hard.double_value(&[]) - soft_ce(&LOGITS, &own)).abs() < 1e-5);
    }

    #[test]
    fn soft_targets_are_mixed_alike() {
        let mut m = mixup("", 3);
        let soft: Vec<f32> = vec![0.7, 0.2, 0.1, 0.0, 1.0, 0.0, 0.3, 0.3, 0.4, 0.5, 0.5, 0.0];
        let b = Batch {
            inputs: batch().inputs,
            targets: Tensor::from_slice(&soft).view([4, 3]),
        };
        let MixDraw { lam, perm } = m.next_draw(B).unwrap();
        let out = m.batch_start(b, StepInfo::default()).unwrap();
        let lam = lam as f32;
        let expected: Vec<f32> = (0..12)
            .map(|k| {
                let (i, c) = (k / 3, k % 3);
                lam * soft[k] + (1.0 - lam) * soft[3 * perm[i] as usize + c]
            })
            .collect();
        assert_close(&values(&out.targets), &expected, "soft targets");
    }

    #[test]
    fn prob_zero_leaves_batches_alone_and_draws_advance() {
        let mut m = mixup("prob = 0.0\n", 0);
        for _ in 0..5 {
            let out = m.batch_start(batch(), StepInfo::default()).unwrap();
            assert!(out.inputs.equal(&batch().inputs));
            assert!(out.targets.equal(&batch().targets));
        }
        assert_eq!(m.state().unwrap().meta, "5");
        // prob = 0.5 mixes some batches and not others.
        let mut half = mixup("prob = 0.5\n", 0);
        let mixed = (0..200)
            .filter(|_| {
                let d = half.next_draw(B);
                half.draws += 1;
                d.is_some()
            })
            .count();
        assert!((70..130).contains(&mixed), "{mixed} of 200 mixed");
    }

    #[test]
    fn resumed_state_mixes_the_next_batch_identically() {
        let mut a = mixup("", 5);
        a.batch_start(batch(), StepInfo::default()).unwrap();
        let state = a.state().unwrap();
        let mut b = mixup("", 5);
        b.load_state(state).unwrap();
        let next_a = a.batch_start(batch(), StepInfo::default()).unwrap();
        let next_b = b.batch_start(batch(), StepInfo::default()).unwrap();
        assert!(next_a.inputs.equal(&next_b.inputs));
        assert!(next_a.targets.equal(&next_b.targets));
        // Without the state a fresh instance would repeat the first batch's draw.
        let mut fresh = mixup("", 5);
        let first = fresh.batch_start(batch(), StepInfo::default()).unwrap();
        assert!(!first.inputs.equal(&next_a.inputs));
        assert!(b
            .load_state(State {
                tensors: Vec::new(),
                meta: "many".into()
            })
            .is_err());
    }

    #[test]
    fn the_draw_depends_on_the_seed() {
        assert_ne!(mixup("", 1).next_draw(8), mixup("", 2).next_draw(8));
        assert_eq!(mixup("", 1).next_draw(8), mixup("", 1).next_draw(8));
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let host = || FakeHost::new(TinyNet::new(1, 3)).host();
        for (text, key) in [
            ("alpha = 0.0\n", "alpha"),
            ("alpha = -1.0\n", "alpha"),
            ("prob = 1.5\n", "prob"),
            ("prob = -0.1\n", "prob"),
        ] {
            let err = match Mixup::new(parse_config(text).unwrap(), host()) {
                Ok(_) => panic!("{text} was accepted"),
                Err(e) => e,
            };
            assert_eq!(
                (err.kind, err.key.as_deref()),
                (ErrorKind::Config, Some(key))
            );
        }
        let err = parse_config::<MixupConfig>("alpah = 1.0\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("alpah"));
    }
}
