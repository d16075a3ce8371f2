//! `cutmix`: training on images with a patch of another image pasted in (Yun, Han, Oh, Chun,
//! Choe & Yoo 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
//! Features"; reference clovaai/CutMix-PyTorch, `rand_bbox` in train.py).
//!
//! For each training batch (event `BATCH_START`) of images `[B, C, H, W]`, with probability
//! `prob`:
//!
//!   λ ~ Beta(α, α),   π a uniformly random permutation of the batch,
//!   cut_w = ⌊W·√(1 − λ)⌋,  cut_h = ⌊H·√(1 − λ)⌋,  c_x ~ U{0, …, W−1},  c_y ~ U{0, …, H−1},
//!   x₁ = clip(c_x − ⌊cut_w/2⌋, 0, W),  x₂ = clip(c_x + ⌊cut_w/2⌋, 0, W)   (y₁, y₂ alike with H),
//!   x̃ = x  with  x̃[:, :, y₁:y₂, x₁:x₂] = x[π][:, :, y₁:y₂, x₁:x₂],
//!   λ' = 1 − (x₂ − x₁)(y₂ − y₁) / (W·H),
//!   ỹ = λ'·onehot(y) + (1 − λ')·onehot(y[π])      (float, `[B, classes]`)
//!
//! As in the reference, one box per batch, the box is clipped to the image (so it can be smaller
//! than the area λ asked for, which is why the targets use the adjusted λ'), and its sides are
//! 2·⌊cut/2⌋ before clipping. The reference names the axes the other way round (its `W` is
//! dimension 2); on square images that is the same thing, here W is the width (last dimension)
//! and H the height. Soft targets (`[B, C]` float) are mixed with λ' the same way; a batch that
//! is not mixed is passed on unchanged. Because the host's soft cross-entropy is linear in the
//! targets, it equals λ'·CE(z, y) + (1 − λ')·CE(z, y[π]), the reference's loss.
//!
//! Configuration (`[[callbacks]] use = "cutmix"`):
//! - `alpha` (1.0): the Beta concentration α > 0 (the reference's `beta`).
//! - `prob` (1.0): the probability of mixing a batch, in [0, 1] (the reference's `cutmix_prob`;
//!   its ImageNet and CIFAR scripts use 1.0 and 0.5).
//!
//! Randomness: the coin, λ, π and the box centre come from a SplitMix64 generator keyed by
//! (`[train] seed`, the number of batches this callback has seen), not from libtorch's
//! generator, so the host's own random stream is untouched and a resumed run (the counter is the
//! callback's checkpointed state) cuts exactly as the uninterrupted run.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use trellis_sdk::{
    bail, Batch, Callback, Component, Error, Events, Host, Plugin, Result, State, StepInfo,
};

use trellis_mix_common::rng::Rng;
use trellis_mix_common::{check_probability, soft_targets};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CutmixConfig {
    /// Concentration α of the symmetric Beta(α, α) that λ is drawn from.
    pub alpha: f64,
    /// Probability of mixing a batch.
    pub prob: f64,
}

impl Default for CutmixConfig {
    fn default() -> Self {
        CutmixConfig {
            alpha: 1.0,
            prob: 1.0,
        }
    }
}

/// Keeps CutMix's draws unrelated to those of other callbacks keyed by the same run seed.
const STREAM: u64 = u64::from_le_bytes(*b"cutmix\0\0");

/// One batch's cut: what was drawn, and the box and weight that follow from it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CutDraw {
    /// λ as drawn from Beta(α, α), before the box is clipped.
    pub(crate) lam_drawn: f64,
    pub(crate) perm: Vec<i64>,
    pub(crate) cx: i64,
    pub(crate) cy: i64,
    /// The box: columns x1..x2, rows y1..y2 (half-open).
    pub(crate) x1: i64,
    pub(crate) x2: i64,
    pub(crate) y1: i64,
    pub(crate) y2: i64,
    /// 1 − box area / image area: the share of each mixed image that is its own.
    pub(crate) lam: f64,
}

/// The reference's `rand_bbox`, with the centre already drawn.
pub(crate) fn cut_box(lam: f64, h: i64, w: i64, cx: i64, cy: i64) -> (i64, i64, i64, i64) {
    let cut_rat = (1.0 - lam).sqrt();
    // Truncation, like the reference's `int(W * cut_rat)`.
    let cut_w = (w as f64 * cut_rat) as i64;
    let cut_h = (h as f64 * cut_rat) as i64;
    let x1 = (cx - cut_w / 2).clamp(0, w);
    let x2 = (cx + cut_w / 2).clamp(0, w);
    let y1 = (cy - cut_h / 2).clamp(0, h);
    let y2 = (cy + cut_h / 2).clamp(0, h);
    (x1, x2, y1, y2)
}

pub struct Cutmix {
    alpha: f64,
    prob: f64,
    classes: i64,
    seed: u64,
    /// Batches seen so far: the key of the next draw, and all the state a resume needs.
    draws: u64,
}

impl Cutmix {
    /// The cut for the next batch of `batch_size` images of `h`×`w` pixels; `None` when the
    /// `prob` coin says to leave it alone.
    pub(crate) fn next_draw(&self, batch_size: usize, h: i64, w: i64) -> Option<CutDraw> {
        let mut rng = Rng::keyed(self.seed, STREAM, self.draws);
        // Everything is drawn whatever the coin says, so the cut does not depend on prob.
        let coin = rng.uniform();
        let lam_drawn = rng.beta(self.alpha, self.alpha);
        let perm = rng.permutation(batch_size);
        let cx = rng.below(w.max(1) as u64) as i64;
        let cy = rng.below(h.max(1) as u64) as i64;
        let (x1, x2, y1, y2) = cut_box(lam_drawn, h, w, cx, cy);
        let lam = 1.0 - ((x2 - x1) * (y2 - y1)) as f64 / (w * h).max(1) as f64;
        (coin < self.prob).then_some(CutDraw {
            lam_drawn,
            perm,
            cx,
            cy,
            x1,
            x2,
            y1,
            y2,
            lam,
        })
    }
}

impl Component for Cutmix {
    const NAME: &'static str = "cutmix";
    const DESCRIPTION: &'static str =
        "CutMix: paste a box of x[π] into x, targets mixed by the box's area";
    type Config = CutmixConfig;

    fn new(config: CutmixConfig, host: Host) -> Result<Self> {
        if !(config.alpha.is_finite() && config.alpha > 0.0) {
            return Err(Error::config(
                "alpha",
                format!("alpha must be a finite number > 0, got {}", config.alpha),
            ));
        }
        check_probability("prob", config.prob)?;
        Ok(Cutmix {
            alpha: config.alpha,
            prob: config.prob,
            classes: host.num_classes(),
            seed: host.seed(),
            draws: 0,
        })
    }
}

impl Callback for Cutmix {
    fn events(&self) -> Events {
        Events::BATCH_START
    }

    fn batch_start(&mut self, batch: Batch, _at: StepInfo) -> Result<Batch> {
        let size = batch.inputs.size();
        let &[n, _, h, w] = size.as_slice() else {
            bail!("cutmix needs images [B, C, H, W], got inputs of shape {size:?}");
        };
        let draw = self.next_draw(n as usize, h, w);
        self.draws += 1;
        let Some(d) = draw else {
            return Ok(batch);
        };
        let perm = Tensor::from_slice(&d.perm).to_device(batch.inputs.device());
        let inputs = batch.inputs.copy();
        let (bw, bh) = (d.x2 - d.x1, d.y2 - d.y1);
        if bw > 0 && bh > 0 {
            let patch = batch
                .inputs
                .f_index_select(0, &perm)?
                .narrow(2, d.y1, bh)
                .narrow(3, d.x1, bw);
            inputs
                .narrow(2, d.y1, bh)
                .narrow(3, d.x1, bw)
                .f_copy_(&patch)?;
        }
        let targets = soft_targets(&batch.targets, self.classes)?;
        let targets = &targets * d.lam + targets.f_index_select(0, &perm)? * (1.0 - d.lam);
        Ok(Batch { inputs, targets })
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
                .map_err(|_| Error::msg(format!("cutmix state `{meta}` is not a batch count")))?,
        };
        Ok(())
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "CutMix data augmentation (Yun et al. 2019)"
)
.callback::<Cutmix>());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;
    use trellis_sdk::abi::ErrorKind;
    use trellis_sdk::parse_config;
    use trellis_sdk::testing::{FakeHost, TinyNet};

    const B: i64 = 4;
    const C: i64 = 2;
    // Not square, so that swapping the axes fails the test.
    const H: i64 = 6;
    const W: i64 = 8;
    const CLASSES: i64 = 3;
    const LABELS: [i64; 4] = [0, 1, 2, 2];
    const LOGITS: [f32; 12] = [
        2.0, -1.0, 0.5, 0.1, 1.2, -0.7, -2.0, 0.3, 1.9, 0.0, 0.0, 3.0,
    ];

    /// Every pixel of every image distinct: 1000·image + 100·channel + 10·row + column / 10.
    fn pixel(b: i64, c: i64, y: i64, x: i64) -> f32 {
        (1000 * b + 100 * c + 10 * y) as f32 + x as f32 / 10.0
    }

    fn batch() -> Batch {
        let mut v = Vec::new();
        for b in 0..B {
            for c in 0..C {
                for y in 0..H {
                    for x in 0..W {
                        v.push(pixel(b, c, y, x));
                    }
                }
            }
        }
        Batch {
            inputs: Tensor::from_slice(&v).view([B, C, H, W]),
            targets: Tensor::from_slice(&LABELS),
        }
    }

    fn cutmix(config: &str, seed: u64) -> Cutmix {
        let host = FakeHost::new(TinyNet::new(C, CLASSES))
            .classes(CLASSES)
            .input_shape([C, H, W])
            .seed(seed)
            .host();
        Cutmix::new(parse_config(config).unwrap(), host).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
    }

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
    fn box_follows_the_reference_rand_bbox() {
        // λ = 0.75: cut ratio 1/2, an 4×3 cut on an 8×6 image; centred at (4, 3) it fits.
        assert_eq!(cut_box(0.75, 6, 8, 4, 3), (2, 6, 2, 4));
        // Near a corner it is clipped: x from 0 to 0 + 2, y from 0 to 1.
        assert_eq!(cut_box(0.75, 6, 8, 0, 0), (0, 2, 0, 1));
        assert_eq!(cut_box(0.75, 6, 8, 7, 5), (5, 8, 4, 6));
        // λ = 0: the cut is the whole image, centred it covers it all.
        assert_eq!(cut_box(0.0, 6, 8, 4, 3), (0, 8, 0, 6));
        // λ = 1: no cut.
        let (x1, x2, y1, y2) = cut_box(1.0, 6, 8, 4, 3);
        assert_eq!((x2 - x1) * (y2 - y1), 0);
    }

    #[test]
    fn pastes_the_partners_box_and_mixes_targets_by_its_area() {
        let mut m = cutmix("", 2);
        let d = m
            .next_draw(B as usize, H, W)
            .expect("prob = 1 always mixes");
        let area = (d.x2 - d.x1) * (d.y2 - d.y1);
        assert!(
            area > 0 && area < H * W,
            "seed 2 must cut a proper box: {d:?}"
        );
        // Away from 1/2, so that swapping λ and 1 − λ fails the test.
        assert!((d.lam - 0.5).abs() > 0.05, "{d:?}");
        assert_ne!(d.perm, [0, 1, 2, 3], "seed 2 must give a real permutation");
        assert!(d
            .perm
            .iter()
            .enumerate()
            .any(|(i, &j)| LABELS[i] != LABELS[j as usize]));
        // The box is the reference's, recomputed from the raw draws.
        let cut_w = (W as f64 * (1.0 - d.lam_drawn).sqrt()) as i64;
        let cut_h = (H as f64 * (1.0 - d.lam_drawn).sqrt()) as i64;
        assert!((0..W).contains(&d.cx) && (0..H).contains(&d.cy));
        assert_eq!(d.x1, (d.cx - cut_w / 2).clamp(0, W));
        assert_eq!(d.x2, (d.cx + cut_w / 2).clamp(0, W));
        assert_eq!(d.y1, (d.cy - cut_h / 2).clamp(0, H));
        assert_eq!(d.y2, (d.cy + cut_h / 2).clamp(0, H));
        let lam = 1.0 - area as f64 / (W * H) as f64;
        assert_eq!(d.lam, lam);

        let out = m.batch_start(batch(), StepInfo::default()).unwrap();
        assert_eq!(out.inputs.size(), [B, C, H, W]);
        let got = values(&out.inputs);
        let mut k = 0;
        for b in 0..B {
            for c in 0..C {
                for y in 0..H {
                    for x in 0..W {
                        let inside = (d.y1..d.y2).contains(&y) && (d.x1..d.x2).contains(&x);
                        let source = if inside { d.perm[b as usize] } else { b };
                        assert_eq!(got[k], pixel(source, c, y, x), "b{b} c{c} y{y} x{x}");
                        k += 1;
                    }
                }
            }
        }

        let permuted: Vec<i64> = d.perm.iter().map(|&j| LABELS[j as usize]).collect();
        let (own, other) = (one_hot(&LABELS), one_hot(&permuted));
        let lam32 = lam as f32;
        let targets: Vec<f32> = own
            .iter()
            .zip(&other)
            .map(|(a, b)| lam32 * a + (1.0 - lam32) * b)
            .collect();
        let got = values(&out.targets);
        assert_eq!(out.targets.size(), [B, CLASSES]);
        for (g, t) in got.iter().zip(&targets) {
            assert!((g - t).abs() < 1e-6, "{got:?} vs {targets:?}");
        }
        let logits = Tensor::from_slice(&LOGITS).view([B, CLASSES]);
        let host_ce = -(&out.targets * logits.log_softmax(-1, Kind::Float))
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        let expected = lam * soft_ce(&LOGITS, &own) + (1.0 - lam) * soft_ce(&LOGITS, &other);
        assert!((host_ce.double_value(&[]) - expected).abs() < 1e-5);
    }

    #[test]
    fn soft_targets_are_mixed_with_the_adjusted_lambda() {
        let mut m = cutmix("alpha = 0.5\n", 8);
        let soft: Vec<f32> = vec![0.7, 0.2, 0.1, 0.0, 1.0, 0.0, 0.3, 0.3, 0.4, 0.5, 0.5, 0.0];
        let b = Batch {
            inputs: batch().inputs,
            targets: Tensor::from_slice(&soft).view([B, CLASSES]),
        };
        let d = m.next_draw(B as usize, H, W).unwrap();
        let out = m.batch_start(b, StepInfo::default()).unwrap();
        let lam = d.lam as f32;
        let got = values(&out.targets);
        for k in 0..12 {
            let (i, c) = (k / 3, k % 3);
            let t = lam * soft[k] + (1.0 - lam) * soft[3 * d.perm[i] as usize + c];
            assert!((got[k] - t).abs() < 1e-6);
        }
    }

    #[test]
    fn prob_zero_leaves_batches_alone() {
        let mut m = cutmix("prob = 0.0\n", 1);
        for _ in 0..3 {
            let out = m.batch_start(batch(), StepInfo::default()).unwrap();
            assert!(out.inputs.equal(&batch().inputs));
            assert!(out.targets.equal(&batch().targets));
        }
        assert_eq!(m.state().unwrap().meta, "3");
        let flat = Batch {
            inputs: Tensor::zeros([4, 10], (Kind::Float, tch::Device::Cpu)),
            targets: Tensor::from_slice(&LABELS),
        };
        assert!(m.batch_start(flat, StepInfo::default()).is_err());
    }

    #[test]
    fn resumed_state_cuts_the_next_batch_identically() {
        let mut a = cutmix("", 4);
        a.batch_start(batch(), StepInfo::default()).unwrap();
        let mut b = cutmix("", 4);
        b.load_state(a.state().unwrap()).unwrap();
        assert_eq!(a.next_draw(4, H, W), b.next_draw(4, H, W));
        let next_a = a.batch_start(batch(), StepInfo::default()).unwrap();
        let next_b = b.batch_start(batch(), StepInfo::default()).unwrap();
        assert!(next_a.inputs.equal(&next_b.inputs));
        assert!(next_a.targets.equal(&next_b.targets));
        let fresh = cutmix("", 4);
        assert_ne!(fresh.next_draw(4, H, W), b.next_draw(4, H, W));
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let host = || FakeHost::new(TinyNet::new(3, 3)).host();
        for (text, key) in [
            ("alpha = 0.0\n", "alpha"),
            ("alpha = nan\n", "alpha"),
            ("prob = 2.0\n", "prob"),
        ] {
            let err = match Cutmix::new(parse_config(text).unwrap(), host()) {
                Ok(_) => panic!("{text} was accepted"),
                Err(e) => e,
            };
            assert_eq!(
                (err.kind, err.key.as_deref()),
                (ErrorKind::Config, Some(key))
            );
        }
    }
}
