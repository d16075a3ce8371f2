//! `label_smoothing`: training against targets that keep a little probability on every class
//! (Szegedy, Vanhoucke, Ioffe, Shlens & Wojna 2016, "Rethinking the Inception Architecture for
//! Computer Vision", section 7).
//!
//! For each training batch (event `BATCH_START`), with K = the run's number of classes:
//!
//!   ỹ = (1 − ε)·onehot(y) + ε/K                  (class indices y → float `[B, K]`)
//!   ỹ = (1 − ε)·t + ε/K                          (soft targets t `[B, K]`, e.g. from mixup)
//!
//! The uniform share ε/K goes to every class, the true one included, as in the paper and in
//! PyTorch's `cross_entropy(label_smoothing = ε)`: with the host's soft cross-entropy the loss is
//! exactly PyTorch's. Only training batches are smoothed; evaluation sees the labels.
//! Applying it after mixup or CutMix in `[[callbacks]]` smooths the mixed targets; the result is
//! the same in either order, since both maps are affine in the targets and smoothing keeps rows
//! summing to 1.
//!
//! Configuration (`[[callbacks]] use = "label_smoothing"`):
//! - `epsilon` (0.1): the smoothing ε, in [0, 1].
//!
//! No randomness and no state.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_sdk::{
    bail, Batch, Callback, Component, Error, Events, Host, Plugin, Result, StepInfo,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LabelSmoothingConfig {
    /// The probability mass ε spread uniformly over all classes.
    pub epsilon: f64,
}

impl Default for LabelSmoothingConfig {
    fn default() -> Self {
        // The paper's ImageNet value.
        LabelSmoothingConfig { epsilon: 0.1 }
    }
}

pub struct LabelSmoothing {
    epsilon: f64,
    classes: i64,
}

/// (1 − ε)·t + ε/K for class indices (as one-hot rows) or soft targets.
pub fn smooth(targets: &Tensor, epsilon: f64, classes: i64) -> Result<Tensor> {
    let soft = match targets.dim() {
        1 => targets.f_one_hot(classes)?.to_kind(Kind::Float),
        2 if targets.is_floating_point() => {
            let width = targets.size()[1];
            if width != classes {
                bail!("soft targets have {width} columns but the run has {classes} classes");
            }
            targets.shallow_clone()
        }
        _ => bail!(
            "targets must be class indices [B] or float probabilities [B, classes], got {:?} {:?}",
            targets.kind(),
            targets.size()
        ),
    };
    Ok(soft * (1.0 - epsilon) + epsilon / classes as f64)
}

impl Component for LabelSmoothing {
    const NAME: &'static str = "label_smoothing";
    const DESCRIPTION: &'static str = "label smoothing: targets (1−ε)·onehot(y) + ε/K";
    type Config = LabelSmoothingConfig;

    fn new(config: LabelSmoothingConfig, host: Host) -> Result<Self> {
        if !(0.0..=1.0).contains(&config.epsilon) {
            return Err(Error::config(
                "epsilon",
                format!("epsilon must be in [0, 1], got {}", config.epsilon),
            ));
        }
        let classes = host.num_classes();
        if classes < 1 {
            bail!("label smoothing needs at least one class, the run has {classes}");
        }
        Ok(LabelSmoothing {
            epsilon: config.epsilon,
            classes,
        })
    }
}

impl Callback for LabelSmoothing {
    fn events(&self) -> Events {
        Events::BATCH_START
    }

    fn batch_start(&mut self, batch: Batch, _at: StepInfo) -> Result<Batch> {
        Ok(Batch {
            targets: smooth(&batch.targets, self.epsilon, self.classes)?,
            inputs: batch.inputs,
        })
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "label smoothing of the training targets (Szegedy et al. 2016)"
)
.callback::<LabelSmoothing>());

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_sdk::abi::ErrorKind;
    use trellis_sdk::parse_config;
    use trellis_sdk::testing::{FakeHost, TinyNet};
    use trellis_sdk::State;

    fn smoother(config: &str) -> LabelSmoothing {
        let host = FakeHost::new(TinyNet::new(3, 3)).classes(3).host();
        LabelSmoothing::new(parse_config(config).unwrap(), host).unwrap()
    }

    fn rows(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    fn batch(targets: Tensor) -> Batch {
        Batch {
            inputs: Tensor::zeros(
                [targets.size()[0], 3, 2, 2],
                (Kind::Float, tch::Device::Cpu),
            ),
            targets,
        }
    }

    #[test]
    fn smooths_three_class_labels_exactly() {
        // ε = 0.1, K = 3: the true class gets 0.9 + 0.1/3, the others 0.1/3.
        let mut s = smoother("");
        let out = s
            .batch_start(batch(Tensor::from_slice(&[0i64, 2])), StepInfo::default())
            .unwrap();
        assert_eq!(out.targets.size(), [2, 3]);
        assert_eq!(out.targets.kind(), Kind::Float);
        let (hi, lo) = (0.9 + 0.1 / 3.0, 0.1 / 3.0);
        assert_close(&rows(&out.targets), &[hi, lo, lo, lo, lo, hi]);

        // ε = 0.3 on soft targets: 0.7·t + 0.1.
        let mut s = smoother("epsilon = 0.3\n");
        let soft = Tensor::from_slice(&[0.5f32, 0.5, 0.0, 0.2, 0.3, 0.5]).view([2, 3]);
        let out = s.batch_start(batch(soft), StepInfo::default()).unwrap();
        assert_close(&rows(&out.targets), &[0.45, 0.45, 0.1, 0.24, 0.31, 0.45]);
    }

    #[test]
    fn the_loss_is_pytorch_label_smoothing() {
        // −Σ ỹ log p = (1 − ε)·CE(y) + ε·mean_c(−log p_c), the formula of PyTorch's
        // cross_entropy(label_smoothing = ε), evaluated by hand.
        let logits = [1.0f64, -0.5, 2.0, 0.3, 0.3, -1.0];
        let labels = [2usize, 0];
        let eps = 0.2;
        let mut s = smoother("epsilon = 0.2\n");
        let targets = s
            .batch_start(batch(Tensor::from_slice(&[2i64, 0])), StepInfo::default())
            .unwrap()
            .targets;
        let z = Tensor::from_slice(&logits)
            .view([2, 3])
            .to_kind(Kind::Float);
        let host_ce = -(&targets * z.log_softmax(-1, Kind::Float))
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        let mut expected = 0.0;
        for (row, &y) in logits.chunks(3).zip(&labels) {
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            let nll: Vec<f64> = row.iter().map(|v| lse - v).collect();
            expected += (1.0 - eps) * nll[y] + eps * nll.iter().sum::<f64>() / 3.0;
        }
        expected /= 2.0;
        assert!((host_ce.double_value(&[]) - expected).abs() < 1e-5);
    }

    #[test]
    fn epsilon_zero_is_one_hot_and_one_is_uniform() {
        let labels = || batch(Tensor::from_slice(&[1i64]));
        let out = smoother("epsilon = 0.0\n")
            .batch_start(labels(), StepInfo::default())
            .unwrap();
        assert_close(&rows(&out.targets), &[0.0, 1.0, 0.0]);
        let out = smoother("epsilon = 1.0\n")
            .batch_start(labels(), StepInfo::default())
            .unwrap();
        assert_close(&rows(&out.targets), &[1.0 / 3.0; 3]);
    }

    #[test]
    fn a_resumed_instance_smooths_identically() {
        let mut a = smoother("epsilon = 0.25\n");
        let labels = || batch(Tensor::from_slice(&[0i64, 1, 2]));
        a.batch_start(labels(), StepInfo::default()).unwrap();
        let mut b = smoother("epsilon = 0.25\n");
        b.load_state(a.state().unwrap()).unwrap();
        b.load_state(State::default()).unwrap();
        let (x, y) = (
            a.batch_start(labels(), StepInfo::default()).unwrap(),
            b.batch_start(labels(), StepInfo::default()).unwrap(),
        );
        assert!(x.targets.equal(&y.targets));
        assert!(x.inputs.equal(&y.inputs));
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for text in ["epsilon = -0.1\n", "epsilon = 1.5\n", "epsilon = nan\n"] {
            let host = FakeHost::new(TinyNet::new(3, 3)).host();
            let err = match LabelSmoothing::new(parse_config(text).unwrap(), host) {
                Ok(_) => panic!("{text} was accepted"),
                Err(e) => e,
            };
            assert_eq!(
                (err.kind, err.key.as_deref()),
                (ErrorKind::Config, Some("epsilon"))
            );
        }
        let mut s = smoother("");
        let wrong = batch(Tensor::ones([2, 4], (Kind::Float, tch::Device::Cpu)));
        assert!(s.batch_start(wrong, StepInfo::default()).is_err());
    }
}
