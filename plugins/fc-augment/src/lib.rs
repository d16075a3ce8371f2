//! `fc_augment`: FC augmentation for low-data regimes (Kocsis et al. NeurIPS 2022, "Feature
//! Refiner"), METHODS.md section 7.
//!
//! A branch FR on the backbone's pooled features φ:
//!
//!   Linear(feat→d) → LayerNorm(d) → [Linear(d→d) → ReLU] × n_inner → Linear(d→d) → LayerNorm(d)
//!   → Linear(d→C)
//!
//! and the model's own head W behind a gradient gate of factor m (identity forward, gradient × m
//! backward; m = 0: the backbone learns only through FR, while W still learns to read φ). The
//! loss is L = CE(FR(φ), y) + CE(W·gate_m(φ), y), both weight 1, no KL term, and it replaces the
//! host's cross-entropy.
//!
//! FR's parameters go to the host as the distiller's trainable parameters: the run's optimizer
//! trains them and the run's checkpoint keeps them for resuming, but they are not part of the
//! model, so the exported `model.safetensors` has the original architecture, and evaluation
//! (backbone + W) never sees FR.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};
use trellis_sdk::{Batch, Component, Distiller, Error, Host, Model, Outputs, Plugin, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FcAugmentConfig {
    /// Width d of the refiner (64 for CIFAR).
    pub d: i64,
    /// Number n_inner of inner Linear(d→d) → ReLU blocks.
    pub n_inner: i64,
    /// Gradient gate factor m in front of the original head: 0 stops the head's gradient at the
    /// features, 1 lets it through unchanged.
    pub m: f64,
}

impl Default for FcAugmentConfig {
    fn default() -> Self {
        FcAugmentConfig {
            d: 64,
            n_inner: 1,
            m: 0.0,
        }
    }
}

/// Identity in the forward pass; the gradient flowing back through it is multiplied by `m`.
///
/// Written as φ̄ + m·(φ − φ̄) with φ̄ = φ detached: φ − φ̄ is exactly zero, so the forward value is
/// φ bit for bit, and the only path the gradient takes back to φ is scaled by m.
pub fn gradient_gate(features: &Tensor, m: f64) -> Tensor {
    let detached = features.detach();
    if m == 0.0 {
        return detached;
    }
    if m == 1.0 {
        return features.shallow_clone();
    }
    &detached + (features - &detached) * m
}

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

/// The Feature-Refiner branch.
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

    /// Every parameter with a name in the order of the forward pass.
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

pub struct FcAugment {
    model: Model,
    refiner: FeatureRefiner,
    m: f64,
}

impl Component for FcAugment {
    const NAME: &'static str = "fc_augment";
    const DESCRIPTION: &'static str =
        "Feature-Refiner branch on the pooled features plus the original head behind a gradient gate (×m)";
    type Config = FcAugmentConfig;

    fn new(config: FcAugmentConfig, host: Host) -> Result<Self> {
        if config.d < 1 {
            return Err(Error::config(
                "d",
                format!("d must be >= 1, got {}", config.d),
            ));
        }
        if config.n_inner < 0 {
            return Err(Error::config(
                "n_inner",
                format!("n_inner must be >= 0, got {}", config.n_inner),
            ));
        }
        if !config.m.is_finite() {
            return Err(Error::config(
                "m",
                "m must be a finite number (0 by default)",
            ));
        }
        let model = host.model()?;
        let classes = host.num_classes();
        let features = model.feature_dim()?;
        let refiner =
            FeatureRefiner::new(features, config.d, config.n_inner, classes, host.device());
        Ok(FcAugment {
            model,
            refiner,
            m: config.m,
        })
    }
}

impl Distiller for FcAugment {
    fn trainable_parameters(&mut self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.refiner.parameters())
    }

    fn replaces_task_loss(&self) -> Result<bool> {
        Ok(true)
    }

    fn loss(&mut self, batch: &Batch, outputs: &Outputs) -> Result<Vec<(String, Tensor)>> {
        let refined = self.refiner.forward(&outputs.features);
        let head = self.model.head(&gradient_gate(&outputs.features, self.m))?;
        Ok(vec![
            (
                "refiner_ce".to_string(),
                cross_entropy(&refined, &batch.targets)?,
            ),
            ("head_ce".to_string(), cross_entropy(&head, &batch.targets)?),
        ])
    }
}

fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(logits.f_cross_entropy_loss::<Tensor>(targets, None, Reduction::Mean, -100, 0.0)?)
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "FC augmentation: Feature-Refiner branch and gradient gate for low-data training"
)
.distiller::<FcAugment>());

#[cfg(test)]
mod tests {
    use trellis_sdk::testing::{FakeHost, TinyNet};
    use trellis_sdk::{Architecture, LayerKind, Param};

    use super::*;

    /// features = relu(x·W1ᵀ) of width 5, logits = features·W2ᵀ + b2: a backbone parameter (W1)
    /// and a head, on inputs of 3 values.
    struct TwoLayer {
        w1: Tensor,
        w2: Tensor,
        b2: Tensor,
    }

    impl TwoLayer {
        fn new() -> TwoLayer {
            tch::manual_seed(7);
            TwoLayer {
                w1: Tensor::randn([5, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                w2: Tensor::randn([2, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                b2: Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            }
        }
    }

    impl Architecture for TwoLayer {
        fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
            let features = inputs.linear::<Tensor>(&self.w1, None).relu();
            Ok(Outputs {
                logits: self.head(&features)?,
                features,
            })
        }
        fn head(&self, features: &Tensor) -> Result<Tensor> {
            Ok(features.linear(&self.w2, Some(&self.b2)))
        }
        fn parameters(&self) -> Result<Vec<Param>> {
            let param = |name: &str, module: &str, t: &Tensor| Param {
                name: name.into(),
                module: module.into(),
                kind: LayerKind::Linear,
                tensor: t.shallow_clone(),
            };
            Ok(vec![
                param("body.weight", "body", &self.w1),
                param("head.weight", "head", &self.w2),
                param("head.bias", "head", &self.b2),
            ])
        }
        fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
            Ok(Vec::new())
        }
        fn set_training(&self, _train: bool) -> Result<()> {
            Ok(())
        }
        fn is_training(&self) -> Result<bool> {
            Ok(true)
        }
        fn set_double(&self, _double: bool) -> Result<()> {
            Ok(())
        }
        fn feature_dim(&self) -> Result<i64> {
            Ok(5)
        }
        fn spec(&self) -> Result<String> {
            Ok("use = \"two_layer\"\n".into())
        }
    }

    fn config(m: f64) -> FcAugmentConfig {
        FcAugmentConfig {
            d: 4,
            n_inner: 1,
            m,
        }
    }

    /// The SDK's tiny conv net (2 classes) seen through a fake host, fc_augment on it, and a
    /// batch of six 3×6×6 images.
    fn setup(m: f64) -> (Model, FcAugment, Batch) {
        tch::manual_seed(7);
        let host = FakeHost::new(TinyNet::new(3, 2))
            .classes(2)
            .input_shape([3, 6, 6])
            .host();
        let net = host.model().unwrap();
        let fc = FcAugment::new(config(m), host).unwrap();
        let batch = Batch {
            inputs: Tensor::randn([6, 3, 6, 6], (Kind::Float, Device::Cpu)),
            targets: Tensor::from_slice(&[0i64, 1, 1, 0, 1, 0]),
        };
        (net, fc, batch)
    }

    fn param(net: &Model, name: &str) -> Tensor {
        let params = net.parameters().unwrap();
        params.into_iter().find(|p| p.name == name).unwrap().tensor
    }

    /// The gradient of the backbone's conv and the head's weight from the chosen loss terms.
    fn grads(net: &Model, fc: &mut FcAugment, batch: &Batch, terms: &[&str]) -> (Tensor, Tensor) {
        for p in net.parameters().unwrap() {
            p.tensor.shallow_clone().zero_grad();
        }
        for (_, p) in fc.refiner.parameters() {
            p.shallow_clone().zero_grad();
        }
        let outputs = net.forward(&batch.inputs).unwrap();
        let loss = fc
            .loss(batch, &outputs)
            .unwrap()
            .into_iter()
            .filter(|(n, _)| terms.contains(&n.as_str()))
            .map(|(_, t)| t)
            .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
        loss.backward();
        let grad = |t: &Tensor| {
            let g = t.grad();
            if g.defined() {
                g.copy()
            } else {
                t.zeros_like()
            }
        };
        (
            grad(&param(net, "conv1.weight")),
            grad(&param(net, "linear.weight")),
        )
    }

    fn norm(t: &Tensor) -> f64 {
        t.abs().sum(Kind::Double).double_value(&[])
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        a.allclose(b, 1e-5, 1e-6, false)
    }

    #[test]
    fn with_m_zero_the_backbone_learns_only_through_the_refiner() {
        let (net, mut fc, batch) = setup(0.0);
        let (backbone_all, head_all) = grads(&net, &mut fc, &batch, &["refiner_ce", "head_ce"]);
        let (backbone_refiner, _) = grads(&net, &mut fc, &batch, &["refiner_ce"]);
        let (backbone_head, head_head) = grads(&net, &mut fc, &batch, &["head_ce"]);
        assert!(norm(&backbone_refiner) > 1e-6);
        assert!(close(&backbone_all, &backbone_refiner));
        assert_eq!(norm(&backbone_head), 0.0);
        // The gate only stops the gradient at the features: the head itself still learns.
        assert!(norm(&head_head) > 1e-6);
        assert!(close(&head_all, &head_head));
    }

    #[test]
    fn with_m_one_the_backbone_learns_through_both_and_m_scales_the_head_path() {
        let (net, mut fc, batch) = setup(1.0);
        let (backbone_all, _) = grads(&net, &mut fc, &batch, &["refiner_ce", "head_ce"]);
        let (backbone_refiner, _) = grads(&net, &mut fc, &batch, &["refiner_ce"]);
        let (backbone_head, _) = grads(&net, &mut fc, &batch, &["head_ce"]);
        assert!(norm(&backbone_head) > 1e-6);
        assert!(close(&backbone_all, &(&backbone_refiner + &backbone_head)));
        assert!(!close(&backbone_all, &backbone_refiner));

        fc.m = 0.25;
        let (backbone_quarter, _) = grads(&net, &mut fc, &batch, &["head_ce"]);
        assert!(close(&backbone_quarter, &(&backbone_head * 0.25)));
    }

    #[test]
    fn the_gate_is_the_identity_in_the_forward_pass() {
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        for m in [0.0, 0.3, 1.0, 2.0] {
            assert!(gradient_gate(&x, m).equal(&x));
        }
    }

    #[test]
    fn the_head_term_is_the_models_own_head_on_the_features() {
        let (net, mut fc, batch) = setup(0.0);
        let outputs = net.forward(&batch.inputs).unwrap();
        let terms = fc.loss(&batch, &outputs).unwrap();
        let head_ce = outputs.logits.cross_entropy_for_logits(&batch.targets);
        let (_, value) = terms.iter().find(|(n, _)| n == "head_ce").unwrap();
        assert!(close(value, &head_ce));
    }

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
    fn the_refiner_reads_the_models_feature_dim() {
        let host = FakeHost::new(TwoLayer::new())
            .classes(2)
            .input_shape([3, 1, 1])
            .host();
        assert_eq!(host.model().unwrap().feature_dim().unwrap(), 5);
        let fc = FcAugment::new(config(0.0), host).unwrap();
        assert_eq!(fc.refiner.input.weight.size(), [4, 5]);
        assert_eq!(fc.refiner.classifier.weight.size(), [2, 4]);
    }
}
