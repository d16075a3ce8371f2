//! The Feature-Refiner branch FR, and where the distiller that trains it leaves it for the
//! `refiner_accuracy` metric.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use tch::{Device, Kind, Tensor};

/// A Linear layer's weight and bias with PyTorch's default initialisation: both
/// U(−1/√fan_in, 1/√fan_in) (what `kaiming_uniform_(a=√5)` gives for the weight).
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(fan_in: i64, fan_out: i64, device: Device) -> Linear {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let uniform = |shape: &[i64]| {
            Tensor::empty(shape, (Kind::Float, device))
                .uniform_(-bound, bound)
                .set_requires_grad(true)
        };
        Linear {
            weight: uniform(&[fan_out, fan_in]),
            bias: uniform(&[fan_out]),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// LayerNorm over the last dimension: weight 1, bias 0, ε = 1e-5 (PyTorch's defaults).
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(dim: i64, device: Device) -> LayerNorm {
        LayerNorm {
            weight: Tensor::ones([dim], (Kind::Float, device)).set_requires_grad(true),
            bias: Tensor::zeros([dim], (Kind::Float, device)).set_requires_grad(true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *self.weight.size().last().expect("1-d weight");
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

/// The Feature-Refiner branch:
///
///   Linear(feat→d) → LayerNorm(d) → [Linear(d→d) → ReLU] × n_inner → Linear(d→d) → LayerNorm(d)
///   → Linear(d→C)
///
/// It has no layer that behaves differently in training and evaluation, so the same forward
/// serves the distiller's loss and the metric's predictions.
pub struct FeatureRefiner {
    input: Linear,
    input_norm: LayerNorm,
    inner: Vec<Linear>,
    output: Linear,
    output_norm: LayerNorm,
    classifier: Linear,
}

impl FeatureRefiner {
    pub fn new(
        feature_dim: i64,
        d: i64,
        n_inner: i64,
        classes: i64,
        device: Device,
    ) -> FeatureRefiner {
        tch::no_grad(|| FeatureRefiner {
            input: Linear::new(feature_dim, d, device),
            input_norm: LayerNorm::new(d, device),
            inner: (0..n_inner).map(|_| Linear::new(d, d, device)).collect(),
            output: Linear::new(d, d, device),
            output_norm: LayerNorm::new(d, device),
            classifier: Linear::new(d, classes, device),
        })
    }

    /// Logits `[B, C]` from features `[B, feature_dim]`.
    pub fn forward(&self, features: &Tensor) -> Tensor {
        let mut x = self.input_norm.forward(&self.input.forward(features));
        for layer in &self.inner {
            x = layer.forward(&x).relu();
        }
        let x = self.output_norm.forward(&self.output.forward(&x));
        self.classifier.forward(&x)
    }

    /// Every parameter with a name in the order of the forward pass. The tensors are the
    /// refiner's own (shallow handles), so the host's optimizer and checkpoint restore change
    /// the refiner in place.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut add = |prefix: String, weight: &Tensor, bias: &Tensor| {
            out.push((format!("{prefix}.weight"), weight.shallow_clone()));
            out.push((format!("{prefix}.bias"), bias.shallow_clone()));
        };
        add("refiner.input".into(), &self.input.weight, &self.input.bias);
        let norm = &self.input_norm;
        add("refiner.input_norm".into(), &norm.weight, &norm.bias);
        for (i, layer) in self.inner.iter().enumerate() {
            add(format!("refiner.inner.{i}"), &layer.weight, &layer.bias);
        }
        add(
            "refiner.output".into(),
            &self.output.weight,
            &self.output.bias,
        );
        let norm = &self.output_norm;
        add("refiner.output_norm".into(), &norm.weight, &norm.bias);
        let head = &self.classifier;
        add("refiner.classifier".into(), &head.weight, &head.bias);
        out
    }
}

// The host creates a run's components one after the other and never tells one about another,
// so the distiller leaves its refiner here for the metric to find. Per thread, because the host
// creates and calls a run's components on one thread (`Host` is not `Send`) and tensors are not
// `Sync`; runs (and unit tests) on other threads stay apart. Weak, so a refiner whose distiller
// is gone (an earlier run on this thread) is never found.
thread_local! {
    static LIVE: RefCell<Vec<Weak<FeatureRefiner>>> = const { RefCell::new(Vec::new()) };
}

/// Makes `refiner` findable by [`live_refiners`] for as long as it lives.
pub fn publish(refiner: &Rc<FeatureRefiner>) {
    LIVE.with(|live| {
        let mut live = live.borrow_mut();
        live.retain(|r| r.strong_count() > 0);
        live.push(Rc::downgrade(refiner));
    });
}

/// The refiners of the `fc_augment` distillers alive on this thread, oldest first.
pub fn live_refiners() -> Vec<Rc<FeatureRefiner>> {
    LIVE.with(|live| live.borrow().iter().filter_map(Weak::upgrade).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refiner_has_the_papers_layers_and_pytorch_default_init() {
        let fr = FeatureRefiner::new(512, 64, 1, 10, Device::Cpu);
        let params = fr.parameters();
        let count: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
        let linear = |i: i64, o: i64| i * o + o;
        let expected =
            linear(512, 64) + 2 * 64 + linear(64, 64) + linear(64, 64) + 2 * 64 + linear(64, 10);
        assert_eq!(count, expected);
        let shapes: Vec<Vec<i64>> = params.iter().map(|(_, t)| t.size()).collect();
        assert_eq!(shapes[0], [64, 512]);
        assert_eq!(shapes.last().unwrap(), &[10]);
        for (name, t) in &params {
            assert!(t.requires_grad(), "{name} must be trainable");
            let max = t.abs().max().double_value(&[]);
            if name.contains("norm") {
                let value = if name.ends_with("weight") { 1.0 } else { 0.0 };
                assert!(t.eq(value).all().int64_value(&[]) == 1, "{name}");
            } else {
                let fan_in = if name.starts_with("refiner.input.") {
                    512.0
                } else {
                    64.0
                };
                assert!(max <= 1.0 / f64::sqrt(fan_in) + 1e-7, "{name}: {max}");
                assert!(max > 0.5 / f64::sqrt(fan_in), "{name} looks uninitialised");
            }
        }
        let out = fr.forward(&Tensor::randn([3, 512], (Kind::Float, Device::Cpu)));
        assert_eq!(out.size(), [3, 10]);
    }

    #[test]
    fn a_published_refiner_is_found_only_while_it_lives() {
        let first = Rc::new(FeatureRefiner::new(4, 2, 0, 3, Device::Cpu));
        publish(&first);
        let found = live_refiners();
        assert_eq!(found.len(), 1);
        assert!(Rc::ptr_eq(&found[0], &first));
        drop(found);
        drop(first);
        assert!(live_refiners().is_empty());

        let second = Rc::new(FeatureRefiner::new(4, 2, 0, 3, Device::Cpu));
        publish(&second);
        let on_another_thread = std::thread::spawn(|| live_refiners().len()).join().unwrap();
        assert_eq!(on_another_thread, 0);
        assert_eq!(live_refiners().len(), 1);
    }
}
