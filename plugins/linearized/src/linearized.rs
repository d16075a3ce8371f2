//! The `linearized` model: θ, θ0 and the base, and how a forward pass combines them.

use std::cell::Cell;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use trellis_sdk::{Architecture, Component, Error, Host, Model, Outputs, Param, Result};

use crate::jvp::{self, Expansion};

/// The point θ0 the network is expanded around, when it is not a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum At {
    /// The base's initialisation.
    Init,
}

/// How J(θ0)·(θ − θ0) is computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jvp {
    /// Forward-mode AD (libtorch's dual tensors).
    #[default]
    Dual,
    /// Two reverse-mode passes, for ops without a forward-mode formula.
    DoubleVjp,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinearizedConfig {
    /// The `[model]` table of f, the network that is linearised.
    pub base: toml::Table,
    /// `"init"`: expand around the base's initialisation (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<At>,
    /// Expand around the weights of an earlier run instead (its `model.safetensors`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    pub jvp: Jvp,
}

pub struct Linearized {
    config: LinearizedConfig,
    base: Model,
    /// θ0: the base's own parameters, frozen; they carry the tangents during a forward pass.
    theta0: Vec<Param>,
    /// θ: what the optimizer trains, under the base's names.
    theta: Vec<Param>,
    training: Cell<bool>,
}

impl Component for Linearized {
    const NAME: &'static str = "linearized";
    const DESCRIPTION: &'static str =
        "f_lin(x; θ) = f(x; θ0) + J(θ0)·(θ − θ0) of the model in `base`, BatchNorm frozen at θ0";
    type Config = LinearizedConfig;

    fn new(config: LinearizedConfig, host: Host) -> Result<Self> {
        if config.base.is_empty() {
            return Err(Error::config(
                "base",
                "linearized needs the network to expand, e.g. `base = { arch = \"resnet18\" }`",
            ));
        }
        if config.at.is_some() && config.checkpoint.is_some() {
            return Err(Error::config(
                "checkpoint",
                "give θ0 as `at = \"init\"` or as `checkpoint = \"...\"`, not both",
            ));
        }
        let spec =
            toml::to_string(&config.base).map_err(|e| Error::config("base", e.to_string()))?;
        let checkpoint = config.checkpoint.as_ref().map(|p| host.resolve(p));
        if let Some(path) = &checkpoint {
            if !path.is_file() {
                return Err(Error::config(
                    "checkpoint",
                    format!(
                        "no file {} (θ0 is read from a run's model.safetensors)",
                        path.display()
                    ),
                ));
            }
        }
        let key = if checkpoint.is_some() {
            "checkpoint"
        } else {
            "base"
        };
        let base = host
            .build_model(&spec, checkpoint.as_deref())
            .map_err(|e| Error::config(key, e.message))?;
        // BatchNorm normalises with θ0's statistics and never updates them.
        base.set_training(false)?;
        let theta0 = base.parameters()?;
        let theta = tch::no_grad(|| {
            theta0
                .iter()
                .map(|p| {
                    let copy = p.tensor.copy().set_requires_grad(true);
                    let _frozen = p.tensor.set_requires_grad(false);
                    Param {
                        name: p.name.clone(),
                        module: p.module.clone(),
                        kind: p.kind,
                        tensor: copy,
                    }
                })
                .collect()
        });
        Ok(Linearized {
            config,
            base,
            theta0,
            theta,
            training: Cell::new(true),
        })
    }
}

/// Whether autograd records operations here (false under `tch::no_grad`).
fn grad_enabled() -> bool {
    let probe = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (&probe * 2.0).requires_grad()
}

impl Linearized {
    /// Runs `forward` on the base and returns y(θ0) + J_y(θ0)·(θ − θ0) for each output y.
    fn expand(&self, forward: impl FnOnce() -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
        let theta0: Vec<Tensor> = self
            .theta0
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .collect();
        let theta: Vec<Tensor> = self
            .theta
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .collect();
        let expansion = Expansion {
            theta0: &theta0,
            theta: &theta,
        };
        let pairs = match self.config.jvp {
            Jvp::Dual => jvp::dual(&expansion, forward)?,
            Jvp::DoubleVjp => {
                let recording = grad_enabled();
                let pairs = tch::with_grad(|| {
                    for t in &theta0 {
                        let _ = t.set_requires_grad(true);
                    }
                    let pairs = jvp::double_vjp(&expansion, forward);
                    // Switched back before any backward: autograd accumulates no gradient
                    // into a tensor that does not require one, so θ0 stays untouched.
                    for t in &theta0 {
                        let _ = t.set_requires_grad(false);
                    }
                    pairs
                })?;
                if recording {
                    pairs
                } else {
                    pairs
                        .into_iter()
                        .map(|(y, t)| (y.detach(), t.detach()))
                        .collect()
                }
            }
        };
        Ok(pairs.into_iter().map(|(y, t)| y + t).collect())
    }
}

impl Architecture for Linearized {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let mut out = self.expand(|| {
            let o = self.base.forward(inputs)?;
            Ok(vec![o.logits, o.features])
        })?;
        let features = out.pop().expect("two outputs");
        let logits = out.pop().expect("two outputs");
        Ok(Outputs { logits, features })
    }

    fn forward_with_feature_map(&self, inputs: &Tensor) -> Result<(Outputs, Tensor)> {
        let mut out = self.expand(|| {
            let (o, map) = self.base.forward_with_feature_map(inputs)?;
            Ok(vec![o.logits, o.features, map])
        })?;
        let map = out.pop().expect("three outputs");
        let features = out.pop().expect("three outputs");
        let logits = out.pop().expect("three outputs");
        Ok((Outputs { logits, features }, map))
    }

    fn head(&self, _features: &Tensor) -> Result<Tensor> {
        Err(Error::msg(
            "a linearized model has no classifier head of its own: its linearised head depends on \
             the base's features at θ0 as well as on the features it is given, so methods that \
             apply the head to other features (fc_augment) cannot use it",
        ))
    }

    fn parameters(&self) -> Result<Vec<Param>> {
        Ok(self.theta.iter().map(Param::shallow_clone).collect())
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut buffers = self.base.buffers()?;
        buffers.extend(
            self.theta0
                .iter()
                .map(|p| (format!("theta0.{}", p.name), p.tensor.shallow_clone())),
        );
        Ok(buffers)
    }

    fn set_training(&self, train: bool) -> Result<()> {
        // Only remembered: the base stays in evaluation mode, which is what f_lin is.
        self.training.set(train);
        Ok(())
    }

    fn is_training(&self) -> Result<bool> {
        Ok(self.training.get())
    }

    fn set_double(&self, double: bool) -> Result<()> {
        self.base.set_double(double)?;
        let kind = if double { Kind::Double } else { Kind::Float };
        tch::no_grad(|| {
            for p in &self.theta {
                let mut t = p.tensor.shallow_clone();
                t.set_data(&p.tensor.to_kind(kind));
            }
        });
        Ok(())
    }

    fn feature_dim(&self) -> Result<i64> {
        self.base.feature_dim()
    }

    fn spec(&self) -> Result<String> {
        let mut table = toml::Table::new();
        table.insert("use".into(), Self::NAME.into());
        let own = toml::Table::try_from(&self.config).map_err(|e| Error::msg(e.to_string()))?;
        table.extend(own);
        toml::to_string(&table).map_err(|e| Error::msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use trellis_sdk::testing::{FakeHost, TinyNet};

    use super::*;

    /// Deterministic values without libtorch's generator, which tests running in parallel share.
    fn wave(shape: &[i64], phase: f64, kind: Kind) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.731 + phase)
            .sin()
            .view(shape)
            .to_kind(kind)
    }

    /// A linearised TinyNet (single logit) and an untouched copy of its base, with the same
    /// weights, to compare against.
    fn linearized(jvp: Jvp, double: bool) -> (Linearized, TinyNet) {
        let host = FakeHost::without_model()
            .build_model(|_, _| Ok(Model::new(TinyNet::new(3, 1))))
            .host();
        let config = LinearizedConfig {
            base: toml::from_str("arch = \"tiny\"").unwrap(),
            jvp,
            ..LinearizedConfig::default()
        };
        let model = Linearized::new(config, host).unwrap();
        let reference = TinyNet::new(3, 1);
        // The same weights everywhere: θ0, θ = θ0, and the reference.
        tch::no_grad(|| {
            let theirs = reference.parameters().unwrap().into_iter();
            for (i, ((theta0, theta), theirs)) in model
                .theta0
                .iter()
                .zip(&model.theta)
                .zip(theirs)
                .enumerate()
            {
                let weights = wave(&theta0.tensor.size(), 10.0 + i as f64, Kind::Float) * 0.5;
                for t in [&theta0.tensor, &theta.tensor, &theirs.tensor] {
                    t.shallow_clone().copy_(&weights);
                }
            }
        });
        if double {
            model.set_double(true).unwrap();
            reference.set_double(true).unwrap();
        }
        (model, reference)
    }

    fn inputs(kind: Kind) -> Tensor {
        wave(&[5, 3, 6, 6], 0.3, kind)
    }

    /// Moves θ by `scale`·δ for a fixed δ.
    fn step(model: &Linearized, scale: f64) {
        tch::no_grad(|| {
            for (i, p) in model.theta.iter().enumerate() {
                let direction = wave(&p.tensor.size(), i as f64, p.tensor.kind()) * 0.1;
                let _ = p.tensor.shallow_clone().g_add_(&(direction * scale));
            }
        });
    }

    fn reference_at(reference: &TinyNet, model: &Linearized, scale: f64) -> Tensor {
        // θ0 + scale·(θ − θ0) in the reference's parameters.
        let saved: Vec<Tensor> = reference
            .parameters()
            .unwrap()
            .iter()
            .map(|p| p.tensor.detach().copy())
            .collect();
        tch::no_grad(|| {
            for ((p, p0), theta) in reference
                .parameters()
                .unwrap()
                .iter()
                .zip(&saved)
                .zip(&model.theta)
            {
                p.tensor
                    .shallow_clone()
                    .copy_(&(p0 + (&theta.tensor - p0) * scale));
            }
        });
        let out = tch::no_grad(|| reference.forward(&inputs(Kind::Double)).unwrap().logits);
        tch::no_grad(|| {
            for (p, p0) in reference.parameters().unwrap().iter().zip(&saved) {
                p.tensor.shallow_clone().copy_(p0);
            }
        });
        out
    }

    #[test]
    fn at_theta0_it_is_the_base_exactly() {
        for jvp in [Jvp::Dual, Jvp::DoubleVjp] {
            let (model, reference) = linearized(jvp, false);
            let x = inputs(Kind::Float);
            let lin = model.forward(&x).unwrap();
            let base = reference.forward(&x).unwrap();
            assert!(lin.logits.equal(&base.logits), "{jvp:?}");
            assert!(lin.features.equal(&base.features), "{jvp:?}");
        }
    }

    #[test]
    fn the_jvp_is_the_central_finite_difference_in_float64() {
        for jvp in [Jvp::Dual, Jvp::DoubleVjp] {
            let (model, reference) = linearized(jvp, true);
            step(&model, 1.0);
            let x = inputs(Kind::Double);
            let f0 = tch::no_grad(|| reference.forward(&x).unwrap().logits);
            let jv = tch::no_grad(|| model.forward(&x).unwrap().logits) - &f0;
            let h = 1e-5;
            let fd = (reference_at(&reference, &model, h) - reference_at(&reference, &model, -h))
                / (2.0 * h);
            let err = (&jv - &fd).abs().max().double_value(&[]);
            assert!(err < 1e-8, "{jvp:?}: |J·v − FD| = {err}");
            assert!(
                jv.abs().max().double_value(&[]) > 1e-3,
                "{jvp:?}: J·v is not trivial"
            );
        }
    }

    #[test]
    fn dual_and_double_vjp_agree_on_outputs_and_gradients() {
        let run = |jvp| {
            let (model, _) = linearized(jvp, true);
            step(&model, 1.0);
            let out = model.forward(&inputs(Kind::Double)).unwrap();
            (out.logits.square().sum(Kind::Double) + out.features.sum(Kind::Double)).backward();
            let grads: Vec<Tensor> = model.theta.iter().map(|p| p.tensor.grad()).collect();
            (out.logits.detach(), grads, model)
        };
        let (dual, dual_grads, model) = run(Jvp::Dual);
        let (vjp, vjp_grads, _) = run(Jvp::DoubleVjp);
        assert!((&dual - &vjp).abs().max().double_value(&[]) < 1e-12);
        for (a, b) in dual_grads.iter().zip(&vjp_grads) {
            assert!((a - b).abs().max().double_value(&[]) < 1e-12);
        }
        // θ0 is frozen: the backward reached θ only.
        assert!(model.theta0.iter().all(|p| !p.tensor.grad().defined()));
    }

    #[test]
    fn it_is_linear_in_theta_minus_theta0_and_its_gradient_is_the_bases_at_theta0() {
        let (model, reference) = linearized(Jvp::Dual, true);
        let x = inputs(Kind::Double);
        let f0 = tch::no_grad(|| reference.forward(&x).unwrap().logits);
        step(&model, 1.0);
        let once = tch::no_grad(|| model.forward(&x).unwrap().logits) - &f0;
        step(&model, 1.0);
        let twice = tch::no_grad(|| model.forward(&x).unwrap().logits) - &f0;
        assert!((twice - once * 2.0).abs().max().double_value(&[]) < 1e-12);

        // ∂ Σ f_lin / ∂θ = J(θ0)ᵀ·1 = ∂ Σ f / ∂θ at θ0, wherever θ is.
        model
            .forward(&x)
            .unwrap()
            .logits
            .sum(Kind::Double)
            .backward();
        reference
            .forward(&x)
            .unwrap()
            .logits
            .sum(Kind::Double)
            .backward();
        for (lin, base) in model.theta.iter().zip(reference.parameters().unwrap()) {
            let diff = (lin.tensor.grad() - base.tensor.grad()).abs().max();
            assert!(diff.double_value(&[]) < 1e-12, "{}", lin.name);
        }
    }

    #[test]
    fn batchnorm_statistics_stay_at_theta0_in_training_mode() {
        let (model, _) = linearized(Jvp::Dual, false);
        let before: Vec<Tensor> = model
            .buffers()
            .unwrap()
            .iter()
            .map(|(_, t)| t.copy())
            .collect();
        model.set_training(true).unwrap();
        step(&model, 1.0);
        let _ = model.forward(&inputs(Kind::Float)).unwrap();
        assert!(model.is_training().unwrap() && !model.base.is_training().unwrap());
        for ((name, after), before) in model.buffers().unwrap().iter().zip(&before) {
            assert!(after.equal(before), "{name} changed");
        }
    }

    #[test]
    fn theta0_is_a_buffer_and_parameters_carry_the_bases_names() {
        let (model, reference) = linearized(Jvp::Dual, false);
        let names: Vec<String> = model
            .parameters()
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        let base: Vec<String> = reference
            .parameters()
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, base);
        let buffers: Vec<String> = model.buffers().unwrap().into_iter().map(|b| b.0).collect();
        assert!(buffers.contains(&"bn1.running_mean".to_string()));
        assert!(buffers.contains(&"theta0.conv1.weight".to_string()));
        // Training θ leaves θ0 where it was.
        let theta0 = model.theta0[0].tensor.copy();
        step(&model, 1.0);
        assert!(model.theta0[0].tensor.equal(&theta0));
        assert!(!model.theta[0].tensor.equal(&theta0));
    }

    #[test]
    fn without_grad_recording_nothing_is_recorded() {
        for jvp in [Jvp::Dual, Jvp::DoubleVjp] {
            let (model, _) = linearized(jvp, false);
            step(&model, 1.0);
            let out = tch::no_grad(|| model.forward(&inputs(Kind::Float)).unwrap());
            assert!(!out.logits.requires_grad(), "{jvp:?}");
            let recorded = model.forward(&inputs(Kind::Float)).unwrap();
            assert!(recorded.logits.requires_grad(), "{jvp:?}");
            assert!(out
                .logits
                .allclose(&recorded.logits.detach(), 1e-6, 1e-6, false));
        }
    }

    #[test]
    fn the_spec_builds_the_same_model_and_bad_keys_are_named() {
        let (model, _) = linearized(Jvp::DoubleVjp, false);
        let spec: toml::Table = toml::from_str(&model.spec().unwrap()).unwrap();
        assert_eq!(spec["use"].as_str(), Some("linearized"));
        assert_eq!(spec["jvp"].as_str(), Some("double_vjp"));
        assert_eq!(spec["base"]["arch"].as_str(), Some("tiny"));
        assert!(model
            .head(&Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)))
            .is_err());

        let refuse = |config: LinearizedConfig, key: &str| {
            let host = FakeHost::without_model()
                .build_model(|_, _| Ok(Model::new(TinyNet::new(3, 1))))
                .host();
            let err = Linearized::new(config, host).err().expect("refused");
            assert!(format!("{err:?}").contains(key), "{err:?}");
        };
        refuse(LinearizedConfig::default(), "base");
        let base: toml::Table = toml::from_str("arch = \"tiny\"").unwrap();
        refuse(
            LinearizedConfig {
                base: base.clone(),
                at: Some(At::Init),
                checkpoint: Some("run/model.safetensors".into()),
                ..LinearizedConfig::default()
            },
            "not both",
        );
        refuse(
            LinearizedConfig {
                base,
                checkpoint: Some("no/such/model.safetensors".into()),
                ..LinearizedConfig::default()
            },
            "no/such/model.safetensors",
        );
    }
}
