//! The `fc_augment` distiller: trains the Feature-Refiner branch beside the model and the model's
//! own head behind a gradient gate.

use std::rc::Rc;

use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};
use trellis_sdk::{Batch, Component, Distiller, Error, Host, Model, Outputs, Result};

use crate::refiner::{self, FeatureRefiner};

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

/// The distiller. It publishes its refiner when created ([`refiner::publish`]), so that a
/// `refiner_accuracy` metric in the same run evaluates the refiner it trains.
pub struct FcAugment {
    model: Model,
    pub(crate) refiner: Rc<FeatureRefiner>,
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
        let refiner = Rc::new(FeatureRefiner::new(
            features,
            config.d,
            config.n_inner,
            classes,
            host.device(),
        ));
        refiner::publish(&refiner);
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

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};
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
    fn the_refiner_reads_the_models_feature_dim() {
        let host = FakeHost::new(TwoLayer::new())
            .classes(2)
            .input_shape([3, 1, 1])
            .host();
        assert_eq!(host.model().unwrap().feature_dim().unwrap(), 5);
        let fc = FcAugment::new(config(0.0), host).unwrap();
        let params = fc.refiner.parameters();
        let shape = |name: &str| params.iter().find(|(n, _)| n == name).unwrap().1.size();
        assert_eq!(shape("refiner.input.weight"), [4, 5]);
        assert_eq!(shape("refiner.classifier.weight"), [2, 4]);
    }
}
