//! `sam`: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi & Neyshabur 2021,
//! "Sharpness-Aware Minimization for Efficiently Improving Generalization"; adaptive variant
//! ASAM: Kwon, Kim, Park & Choi 2021; reference implementation davda54/sam).
//!
//! SAM minimises max_{‖ε‖ ≤ ρ} L(w + ε) with the first-order solution ε̂ = ρ·g/‖g‖: it takes the
//! configured optimizer's step with the gradient at the perturbed weights w + ε̂ instead of at w.
//! The callback takes the optimizer step over (event `OPTIMIZER_STEP`). With g_p the gradient
//! the host computed at w for each tensor p the optimizer updates (`Host::optimized_parameters`,
//! those with a gradient):
//!
//!   ‖g‖ = ‖ ( ‖T_p·g_p‖₂ )_p ‖₂,   T_p = |w_p| (adaptive) or 1,
//!   e_p = T_p²·g_p · ρ / (‖g‖ + 1e-12),
//!   w_p ← w_p + e_p;   recompute the loss and gradients at w + e (`StepControl::recompute`);
//!   w_p ← the saved w_p (copied back exactly, not w + e − e, as the reference does);
//!   the configured optimizer's step with the gradients from w + e (`StepControl::base_step`).
//!
//! That is the reference's `first_step` / `second_step`; ρ is applied to the whole set of
//! parameters at once (the reference's single parameter group). The second pass runs on the
//! same batch, with the task loss, distillers' and other callbacks' loss terms and the pruning
//! masks on its gradients, and the other callbacks' `AFTER_BACKWARD` (gradient clipping clips both
//! gradients), so each step costs two forward and backward passes.
//!
//! BatchNorm: the second forward pass runs in training mode and would update the running
//! statistics a second time, at the perturbed weights. The buffers are saved before it and
//! copied back after, which is what the reference's training script does by setting the
//! BatchNorm momentum to 0 for the second pass (`disable_running_stats`); the statistics then
//! follow the unperturbed model only.
//!
//! Configuration (`[[callbacks]] use = "sam"`):
//! - `rho` (0.05): the neighbourhood radius ρ > 0 (the paper's CIFAR value; the reference
//!   recommends about 2.0 with `adaptive = true`).
//! - `adaptive` (false): ASAM's scale-invariant neighbourhood, T_p = |w_p|.
//!
//! No randomness and no state: the perturbation is rebuilt from each step's gradient.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use trellis_sdk::{
    Callback, Component, Error, Events, Host, Model, Plugin, Result, StepControl, StepInfo,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamConfig {
    /// Radius ρ of the neighbourhood the loss is maximised over.
    pub rho: f64,
    /// Use the adaptive (ASAM) perturbation w²·g instead of g.
    pub adaptive: bool,
}

impl Default for SamConfig {
    fn default() -> Self {
        SamConfig {
            rho: 0.05,
            adaptive: false,
        }
    }
}

pub struct Sam {
    host: Host,
    model: Model,
    rho: f64,
    adaptive: bool,
}

impl Sam {
    /// Moves every parameter (all have a gradient) to w + e; returns their values at w.
    fn ascend(&self, params: &[Tensor]) -> Result<Vec<Tensor>> {
        tch::no_grad(|| {
            let device = params[0].device();
            let scaled = |p: &Tensor| {
                let g = p.grad();
                if self.adaptive {
                    p.abs() * g
                } else {
                    g
                }
            };
            let norms = params
                .iter()
                .map(|p| Ok(scaled(p).f_norm()?.to_device(device)))
                .collect::<Result<Vec<Tensor>>>()?;
            let grad_norm = Tensor::f_stack(&norms, 0)?.f_norm()?;
            let scale = self.rho / (grad_norm + 1e-12);
            let mut saved = Vec::with_capacity(params.len());
            for p in params {
                saved.push(p.detach().copy());
                let g = p.grad();
                let e = if self.adaptive { p.square() * g } else { g };
                let e = e * scale.to_device(p.device());
                let _ = p.shallow_clone().f_add_(&e)?;
            }
            Ok(saved)
        })
    }
}

/// Copies `saved` back into `tensors`, element for element.
fn restore(tensors: &[Tensor], saved: &[Tensor]) -> Result<()> {
    tch::no_grad(|| {
        for (t, s) in tensors.iter().zip(saved) {
            t.shallow_clone().f_copy_(s)?;
        }
        Ok(())
    })
}

impl Component for Sam {
    const NAME: &'static str = "sam";
    const DESCRIPTION: &'static str =
        "sharpness-aware minimization: step with the gradient at w + ρ·g/‖g‖";
    type Config = SamConfig;

    fn new(config: SamConfig, host: Host) -> Result<Self> {
        if !(config.rho.is_finite() && config.rho > 0.0) {
            return Err(Error::config(
                "rho",
                format!("rho must be a finite number > 0, got {}", config.rho),
            ));
        }
        Ok(Sam {
            model: host.model()?,
            host,
            rho: config.rho,
            adaptive: config.adaptive,
        })
    }
}

impl Callback for Sam {
    fn events(&self) -> Events {
        Events::OPTIMIZER_STEP
    }

    fn optimizer_step(&mut self, control: &mut dyn StepControl, _at: StepInfo) -> Result<bool> {
        let params: Vec<Tensor> = self
            .host
            .optimized_parameters()
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| p.grad().defined())
            .collect();
        if params.is_empty() {
            // Nothing to perturb: the host's own step is the same thing.
            return Ok(false);
        }
        let buffers: Vec<Tensor> = self.model.buffers()?.into_iter().map(|(_, t)| t).collect();
        let saved_buffers: Vec<Tensor> = buffers.iter().map(|t| t.detach().copy()).collect();
        let saved = self.ascend(&params)?;
        let second = control.recompute();
        // Put w back even when the second pass failed, so the error leaves the model as it was.
        restore(&params, &saved)?;
        restore(&buffers, &saved_buffers)?;
        second?;
        control.base_step()?;
        Ok(true)
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "sharpness-aware minimization (Foret et al. 2021)"
)
.callback::<Sam>());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};
    use trellis_sdk::abi::ErrorKind;
    use trellis_sdk::parse_config;
    use trellis_sdk::testing::{random_batch, FakeHost, TinyNet};
    use trellis_sdk::{Architecture, State};

    const A: [f64; 2] = [0.5, -1.5];
    const B: f64 = 2.0;
    const Y: f64 = 0.7;
    const U0: [f64; 2] = [0.3, 0.8];
    const V0: f64 = -0.4;
    const LR: f64 = 0.1;

    /// L(u, v) = (u·a + v·b − y)² and its gradient, by hand.
    fn grad_by_hand(u: [f64; 2], v: f64) -> ([f64; 2], f64) {
        let r = 2.0 * (u[0] * A[0] + u[1] * A[1] + v * B - Y);
        ([r * A[0], r * A[1]], r * B)
    }

    /// The host's side of the test: the loss above on two parameter tensors, plain SGD.
    struct Quadratic {
        u: Tensor,
        v: Tensor,
        seen_at_recompute: Vec<Vec<f64>>,
        seen_at_step: Vec<Vec<f64>>,
    }

    impl Quadratic {
        fn new() -> Quadratic {
            let f = |v: &[f64]| Tensor::from_slice(v).set_requires_grad(true);
            let mut q = Quadratic {
                u: f(&U0),
                v: f(&[V0]),
                seen_at_recompute: Vec::new(),
                seen_at_step: Vec::new(),
            };
            q.backward();
            q
        }

        fn weights(&self) -> Vec<f64> {
            let mut w = Vec::<f64>::try_from(&self.u).unwrap();
            w.extend(Vec::<f64>::try_from(&self.v).unwrap());
            w
        }

        fn backward(&mut self) -> f64 {
            for p in [&self.u, &self.v] {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let a = Tensor::from_slice(&A);
            let r = (&self.u * a).sum(Kind::Double) + &self.v.sum(Kind::Double) * B - Y;
            let loss = &r * &r;
            loss.backward();
            loss.double_value(&[])
        }

        fn params(&self) -> Vec<(String, Tensor)> {
            vec![
                ("u".into(), self.u.shallow_clone()),
                ("v".into(), self.v.shallow_clone()),
            ]
        }
    }

    impl StepControl for Quadratic {
        fn recompute(&mut self) -> Result<f64> {
            self.seen_at_recompute.push(self.weights());
            Ok(self.backward())
        }
        fn base_step(&mut self) -> Result<()> {
            self.seen_at_step.push(self.weights());
            tch::no_grad(|| {
                for p in [&self.u, &self.v] {
                    let _ = p.shallow_clone().f_sub_(&(p.grad() * LR))?;
                }
                Ok(())
            })
        }
    }

    fn sam(config: &str, params: Vec<(String, Tensor)>) -> Sam {
        let host = FakeHost::new(TinyNet::new(3, 2))
            .optimized_parameters(params)
            .host();
        Sam::new(parse_config(config).unwrap(), host).unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{what}: {a:?} vs {b:?}");
        }
    }

    /// w − lr·∇L(w + e) with e from `perturbation`, by hand.
    fn expected(perturbation: impl Fn([f64; 2], f64) -> ([f64; 2], f64)) -> (Vec<f64>, Vec<f64>) {
        let (e_u, e_v) = perturbation(U0, V0);
        let u1 = [U0[0] + e_u[0], U0[1] + e_u[1]];
        let v1 = V0 + e_v;
        let (gu, gv) = grad_by_hand(u1, v1);
        (
            vec![u1[0], u1[1], v1],
            vec![U0[0] - LR * gu[0], U0[1] - LR * gu[1], V0 - LR * gv],
        )
    }

    #[test]
    fn steps_with_the_gradient_at_the_perturbed_weights() {
        let rho = 0.05;
        let mut q = Quadratic::new();
        let mut s = sam("", q.params());
        assert!(s.optimizer_step(&mut q, StepInfo::default()).unwrap());
        let (at_recompute, after) = expected(|u, v| {
            let (gu, gv) = grad_by_hand(u, v);
            // Per-tensor norms, then the norm of those: ‖(‖g_u‖, |g_v|)‖.
            let norm = ((gu[0] * gu[0] + gu[1] * gu[1]).sqrt().powi(2) + gv * gv).sqrt();
            let scale = rho / (norm + 1e-12);
            ([gu[0] * scale, gu[1] * scale], gv * scale)
        });
        assert_eq!(q.seen_at_recompute.len(), 1);
        assert_close(&q.seen_at_recompute[0], &at_recompute, "w + e");
        // The base step starts from w exactly, not from w + e − e.
        assert_eq!(q.seen_at_step, [vec![U0[0], U0[1], V0]]);
        assert_close(&q.weights(), &after, "w − lr·∇L(w + e)");
        // ‖e‖ = ρ.
        let e: Vec<f64> = at_recompute
            .iter()
            .zip([U0[0], U0[1], V0])
            .map(|(a, b)| a - b)
            .collect();
        assert!((e.iter().map(|x| x * x).sum::<f64>().sqrt() - rho).abs() < 1e-12);
    }

    #[test]
    fn adaptive_scales_the_neighbourhood_by_the_weights() {
        let rho = 0.5;
        let mut q = Quadratic::new();
        let mut s = sam("rho = 0.5\nadaptive = true\n", q.params());
        assert!(s.optimizer_step(&mut q, StepInfo::default()).unwrap());
        let (at_recompute, after) = expected(|u, v| {
            let (gu, gv) = grad_by_hand(u, v);
            let tu = [u[0].abs() * gu[0], u[1].abs() * gu[1]];
            let norm = (tu[0] * tu[0] + tu[1] * tu[1] + (v.abs() * gv).powi(2)).sqrt();
            let scale = rho / (norm + 1e-12);
            (
                [u[0] * u[0] * gu[0] * scale, u[1] * u[1] * gu[1] * scale],
                v * v * gv * scale,
            )
        });
        assert_close(&q.seen_at_recompute[0], &at_recompute, "w + e");
        assert_close(&q.weights(), &after, "w − lr·∇L(w + e)");
    }

    #[test]
    fn restores_the_weights_and_the_batchnorm_statistics_after_the_second_pass() {
        // The second pass is a real TinyNet pass in training mode; its running statistics
        // must not survive it.
        tch::manual_seed(0);
        struct NetPass<'a> {
            host: &'a Host,
            batch: trellis_sdk::Batch,
        }
        impl StepControl for NetPass<'_> {
            fn recompute(&mut self) -> Result<f64> {
                let model = self.host.model()?;
                for (_, p) in self.host.optimized_parameters() {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                let out = model.forward(&self.batch.inputs)?;
                let loss = out.logits.cross_entropy_for_logits(&self.batch.targets);
                loss.backward();
                Ok(loss.double_value(&[]))
            }
            fn base_step(&mut self) -> Result<()> {
                Ok(())
            }
        }
        let net = TinyNet::new(3, 4);
        net.set_training(true).unwrap();
        let unused = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        // The net's parameters (sharing its storage) and one the loss does not reach.
        let mut params: Vec<(String, Tensor)> = net
            .parameters()
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.tensor))
            .collect();
        params.push(("unused".into(), unused));
        let shared = params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let (host, progress) = FakeHost::new(net).optimized_parameters(shared).shared();
        let model = host.model().unwrap();
        let mut pass = NetPass {
            host: &host,
            batch: random_batch(6, [3, 5, 5], 4),
        };
        pass.recompute().unwrap();
        let mut s = Sam::new(SamConfig::default(), progress.host()).unwrap();
        let weights: Vec<Tensor> = params.iter().map(|(_, t)| t.copy()).collect();
        let stats: Vec<Tensor> = model
            .buffers()
            .unwrap()
            .iter()
            .map(|(_, t)| t.copy())
            .collect();
        assert!(s.optimizer_step(&mut pass, StepInfo::default()).unwrap());
        for ((_, t), w) in params.iter().zip(&weights) {
            assert!(t.equal(w));
        }
        for ((name, t), before) in model.buffers().unwrap().iter().zip(&stats) {
            assert!(t.equal(before), "{name} changed by the second pass");
        }
        // Without the restore, a pass does move them.
        pass.recompute().unwrap();
        assert!(!model.buffers().unwrap()[0].1.equal(&stats[0]));
    }

    #[test]
    fn without_gradients_the_host_steps() {
        let p = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut s = sam("", vec![("p".into(), p)]);
        let mut q = Quadratic::new();
        assert!(!s.optimizer_step(&mut q, StepInfo::default()).unwrap());
        assert!(q.seen_at_recompute.is_empty() && q.seen_at_step.is_empty());
    }

    #[test]
    fn a_resumed_instance_steps_identically() {
        let (mut q1, mut q2) = (Quadratic::new(), Quadratic::new());
        let mut a = sam("rho = 0.2\n", q1.params());
        let mut b = sam("rho = 0.2\n", q2.params());
        b.load_state(a.state().unwrap()).unwrap();
        b.load_state(State::default()).unwrap();
        for _ in 0..3 {
            a.optimizer_step(&mut q1, StepInfo::default()).unwrap();
            q1.backward();
            b.optimizer_step(&mut q2, StepInfo::default()).unwrap();
            q2.backward();
        }
        assert_eq!(q1.weights(), q2.weights());
    }

    #[test]
    fn bad_rho_is_refused_naming_the_key() {
        for text in ["rho = 0.0\n", "rho = -0.05\n", "rho = inf\n"] {
            let host = FakeHost::new(TinyNet::new(3, 2)).host();
            let err = match Sam::new(parse_config(text).unwrap(), host) {
                Ok(_) => panic!("{text} was accepted"),
                Err(e) => e,
            };
            assert_eq!(
                (err.kind, err.key.as_deref()),
                (ErrorKind::Config, Some("rho"))
            );
        }
    }
}
