//! `grad_clip`: gradient clipping by total norm or by value, as PyTorch's
//! `torch.nn.utils.clip_grad_norm_` and `clip_grad_value_` (Pascanu, Mikolov & Bengio 2013,
//! "On the difficulty of training recurrent neural networks", for clipping by norm).
//!
//! After backward (event `AFTER_BACKWARD`, after the pruning masks, so pruned gradients stay
//! zero), on every tensor the optimizer updates (`Host::optimized_parameters`: the model's
//! parameters and any a distiller added) that has a gradient g_p:
//!
//! - `mode = "norm"`:  N = ‖(‖g_1‖₂, …, ‖g_n‖₂)‖₂ = √(Σ_p ‖g_p‖₂²),
//!   g_p ← g_p · min(1, max_norm / (N + 1e-6)).
//!   Exactly PyTorch's arithmetic: the coefficient is clamped rather than tested with
//!   `if N > max_norm`, so the whole computation stays on the device, with no transfer to the
//!   host per step; gradients below the threshold are multiplied by exactly 1. (The two forms
//!   differ only for N within 1e-6 of max_norm.)
//! - `mode = "value"`:  g_p ← clamp(g_p, −max_value, max_value) elementwise.
//!
//! Configuration (`[[callbacks]] use = "grad_clip"`):
//! - `mode` ("norm"): `"norm"` or `"value"`.
//! - `max_norm` (1.0): the largest total 2-norm, > 0 (used when mode = "norm").
//! - `max_value` (1.0): the largest absolute gradient entry, > 0 (used when mode = "value").
//!
//! No randomness and no state. With a callback that takes the optimizer step over (SAM), both
//! gradients are clipped: the host's `StepControl::recompute` calls `AFTER_BACKWARD` again.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use trellis_sdk::{Callback, Component, Error, Events, Host, Plugin, Result, StepInfo};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Rescale all gradients together so their total 2-norm is at most `max_norm`.
    Norm,
    /// Clamp every gradient entry to [−max_value, max_value].
    Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GradClipConfig {
    pub mode: Mode,
    pub max_norm: f64,
    pub max_value: f64,
}

impl Default for GradClipConfig {
    fn default() -> Self {
        GradClipConfig {
            mode: Mode::Norm,
            max_norm: 1.0,
            max_value: 1.0,
        }
    }
}

/// PyTorch's `clip_grad_norm_` with norm_type 2 on gradients in place; returns the total norm
/// before clipping (a 0-dim tensor on the first gradient's device).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor> {
    let Some(first) = grads.first() else {
        return Ok(Tensor::from(0.0f32));
    };
    let device = first.device();
    let norms = grads
        .iter()
        .map(|g| Ok(g.f_norm()?.to_device(device)))
        .collect::<Result<Vec<Tensor>>>()?;
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
    let coef = (max_norm / (&total + 1e-6)).f_clamp_max(1.0)?;
    tch::no_grad(|| -> Result<()> {
        for g in grads {
            let _ = g.shallow_clone().f_mul_(&coef.to_device(g.device()))?;
        }
        Ok(())
    })?;
    Ok(total)
}

/// PyTorch's `clip_grad_value_` on gradients in place.
pub fn clip_grad_value(grads: &[Tensor], max_value: f64) -> Result<()> {
    tch::no_grad(|| {
        for g in grads {
            let _ = g.shallow_clone().f_clamp_(-max_value, max_value)?;
        }
        Ok(())
    })
}

pub struct GradClip {
    host: Host,
    mode: Mode,
    max_norm: f64,
    max_value: f64,
}

fn check_positive(key: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::config(
            key,
            format!("{key} must be a finite number > 0, got {value}"),
        ));
    }
    Ok(())
}

impl Component for GradClip {
    const NAME: &'static str = "grad_clip";
    const DESCRIPTION: &'static str =
        "gradient clipping: rescale to a total 2-norm of max_norm, or clamp to ±max_value";
    type Config = GradClipConfig;

    fn new(config: GradClipConfig, host: Host) -> Result<Self> {
        check_positive("max_norm", config.max_norm)?;
        check_positive("max_value", config.max_value)?;
        Ok(GradClip {
            host,
            mode: config.mode,
            max_norm: config.max_norm,
            max_value: config.max_value,
        })
    }
}

impl Callback for GradClip {
    fn events(&self) -> Events {
        Events::AFTER_BACKWARD
    }

    fn after_backward(&mut self, _at: StepInfo) -> Result<()> {
        // Asked every step: the optimizer's groups may change (a distiller's parameters, pruning).
        let grads: Vec<Tensor> = self
            .host
            .optimized_parameters()
            .into_iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        match self.mode {
            Mode::Norm => clip_grad_norm(&grads, self.max_norm).map(drop),
            Mode::Value => clip_grad_value(&grads, self.max_value),
        }
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "gradient clipping by total norm or by value"
)
.callback::<GradClip>());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};
    use trellis_sdk::abi::ErrorKind;
    use trellis_sdk::parse_config;
    use trellis_sdk::testing::{FakeHost, TinyNet};
    use trellis_sdk::State;

    /// A leaf tensor of `len` zeros whose gradient is `grad`, plus one without a gradient.
    fn with_grad(grad: &[f32]) -> Tensor {
        let p =
            Tensor::zeros([grad.len() as i64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * Tensor::from_slice(grad)).sum(Kind::Float).backward();
        p
    }

    /// A callback over params `a` (grad [3, 4]) and `b` (grad [12, 0, 0]) and a gradient-less `c`.
    fn clip(config: &str) -> (GradClip, Tensor, Tensor) {
        let a = with_grad(&[3.0, 4.0]);
        let b = with_grad(&[12.0, 0.0, 0.0]);
        let c = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let host = FakeHost::new(TinyNet::new(3, 2))
            .optimized_parameters(vec![
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
                ("c".into(), c),
            ])
            .host();
        let clip = GradClip::new(parse_config(config).unwrap(), host).unwrap();
        (clip, a, b)
    }

    fn grad(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.grad()).unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn rescales_to_the_total_norm() {
        // ‖(‖(3, 4)‖, ‖(12, 0, 0)‖)‖ = ‖(5, 12)‖ = 13; max_norm 6.5 halves (almost) everything.
        let (mut c, a, b) = clip("max_norm = 6.5\n");
        c.after_backward(StepInfo::default()).unwrap();
        let coef = (6.5 / (13.0 + 1e-6)) as f32;
        assert_close(&grad(&a), &[3.0 * coef, 4.0 * coef]);
        assert_close(&grad(&b), &[12.0 * coef, 0.0, 0.0]);
        let total = (grad(&a).iter().chain(&grad(&b)).map(|g| g * g).sum::<f32>()).sqrt();
        assert!((total - 6.5).abs() < 1e-5, "clipped norm {total}");
        // Already below: left exactly as is.
        let (mut c, a, b) = clip("max_norm = 13.5\n");
        c.after_backward(StepInfo::default()).unwrap();
        assert_eq!((grad(&a), grad(&b)), (vec![3.0, 4.0], vec![12.0, 0.0, 0.0]));
        let total = clip_grad_norm(&[a.grad(), b.grad()], 100.0).unwrap();
        assert!((total.double_value(&[]) - 13.0).abs() < 1e-5);
    }

    #[test]
    fn clamps_by_value() {
        let (mut c, a, b) = clip("mode = \"value\"\nmax_value = 3.5\nmax_norm = 0.1\n");
        c.after_backward(StepInfo::default()).unwrap();
        assert_eq!(grad(&a), [3.0, 3.5]);
        assert_eq!(grad(&b), [3.5, 0.0, 0.0]);
        let n = with_grad(&[-7.0, 0.25]);
        clip_grad_value(&[n.grad()], 1.0).unwrap();
        assert_eq!(grad(&n), [-1.0, 0.25]);
    }

    #[test]
    fn a_resumed_instance_clips_identically() {
        let (mut a1, ga, gb) = clip("max_norm = 2.0\n");
        let (mut a2, ha, hb) = clip("max_norm = 2.0\n");
        a2.load_state(a1.state().unwrap()).unwrap();
        a2.load_state(State::default()).unwrap();
        a1.after_backward(StepInfo::default()).unwrap();
        a2.after_backward(StepInfo::default()).unwrap();
        assert_eq!((grad(&ga), grad(&gb)), (grad(&ha), grad(&hb)));
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (text, key) in [
            ("max_norm = 0.0\n", "max_norm"),
            ("max_value = -1.0\n", "max_value"),
            ("max_norm = inf\n", "max_norm"),
        ] {
            let host = FakeHost::new(TinyNet::new(3, 2)).host();
            let err = match GradClip::new(parse_config(text).unwrap(), host) {
                Ok(_) => panic!("{text} was accepted"),
                Err(e) => e,
            };
            assert_eq!(
                (err.kind, err.key.as_deref()),
                (ErrorKind::Config, Some(key))
            );
        }
        let err = parse_config::<GradClipConfig>("mode = \"l1\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("mode"));
    }
}
