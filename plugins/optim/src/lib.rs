//! `sgd` and `adamw`: PyTorch's update rules written with tensor operations, so that their
//! state (momentum buffers, moment estimates, step counts) can be saved into checkpoints —
//! tch's built-in optimizers cannot export theirs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use trellis_sdk::{bail, Component, Error, Host, Optimizer, ParamGroup, Plugin, Result, State};

/// Parameter groups as the host hands them over; updates happen in place on the shared tensors.
struct Groups {
    groups: Vec<ParamGroup>,
}

impl Groups {
    fn set_rates(&mut self, rates: &[f64]) -> Result<()> {
        if rates.len() != self.groups.len() {
            bail!(
                "got {} learning rates for {} parameter groups",
                rates.len(),
                self.groups.len()
            );
        }
        for (group, &lr) in self.groups.iter_mut().zip(rates) {
            group.lr = lr;
        }
        Ok(())
    }

    /// (group, parameter name, parameter, gradient) for every parameter that has a gradient.
    fn with_grads(&self) -> impl Iterator<Item = (&ParamGroup, &str, &Tensor, Tensor)> {
        self.groups.iter().flat_map(|g| {
            g.params.iter().filter_map(move |(name, p)| {
                let grad = p.grad();
                grad.defined().then_some((g, name.as_str(), p, grad))
            })
        })
    }
}

fn check_non_negative(key: &str, value: f64) -> Result<()> {
    if value.is_nan() || value < 0.0 {
        return Err(Error::config(
            key,
            format!("{key} must be >= 0, got {value}"),
        ));
    }
    Ok(())
}

fn buffers_state(buffers: &HashMap<String, Tensor>, prefix: &str) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = buffers
        .iter()
        .map(|(name, t)| (format!("{prefix}.{name}"), t.shallow_clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

/// torch.optim.SGD: d = g + λw; b = μb + (1 − τ)d (b = d on the first step);
/// d = d + μb with Nesterov, else d = b; w −= η d.
///
/// Each term is one fused `x + y · s` kernel (`addcmul` with a 0-dim coefficient tensor): three
/// passes over the parameters per step without Nesterov, where PyTorch's `foreach` path takes
/// four and a plain one multiply then add takes seven. The momentum buffer is replaced by the new
/// value rather than updated in place, which saves a pass; the products and sums are the same as
/// PyTorch's, so results differ from it only by float rounding.
pub struct Sgd {
    config: SgdConfig,
    groups: Groups,
    /// Per group, in the order of `groups`.
    coefficients: Vec<Coefficients>,
    momentum_buffers: HashMap<String, Tensor>,
}

/// A group's hyper-parameters as 0-dim tensors of its parameters' kind, on their device: kernel
/// operands, so changing the learning rate is a device-side fill and never a host round trip.
struct Coefficients {
    weight_decay: Tensor,
    momentum: Tensor,
    neg_lr: Tensor,
}

impl Coefficients {
    fn new(group: &ParamGroup, momentum: f64) -> Result<Self> {
        let (kind, device) = group
            .params
            .first()
            .map_or((tch::Kind::Float, tch::Device::Cpu), |(_, p)| {
                (p.kind(), p.device())
            });
        let full = |v: f64| Tensor::f_full([] as [i64; 0], v, (kind, device));
        Ok(Coefficients {
            weight_decay: full(group.weight_decay)?,
            momentum: full(momentum)?,
            neg_lr: full(-group.lr)?,
        })
    }
}

/// `c` in the kind of `like`, should a group mix kinds.
fn same_kind(c: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(if c.kind() == like.kind() {
        c.shallow_clone()
    } else {
        c.f_to_kind(like.kind())?
    })
}

impl Component for Sgd {
    const NAME: &'static str = "sgd";
    const DESCRIPTION: &'static str =
        "stochastic gradient descent with momentum, Nesterov and weight decay (torch.optim.SGD)";
    type Config = SgdConfig;

    fn new(config: SgdConfig, _host: Host) -> Result<Self> {
        check_non_negative("momentum", config.momentum)?;
        check_non_negative("dampening", config.dampening)?;
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::config(
                "nesterov",
                "Nesterov momentum needs momentum > 0 and dampening = 0",
            ));
        }
        Ok(Sgd {
            config,
            groups: Groups { groups: Vec::new() },
            coefficients: Vec::new(),
            momentum_buffers: HashMap::new(),
        })
    }
}

impl Sgd {
    /// One parameter's update; `grad` is its gradient, which is never written to.
    fn update(
        &mut self,
        name: &str,
        param: &Tensor,
        grad: Tensor,
        weight_decay: bool,
        c: &Coefficients,
    ) -> Result<()> {
        let SgdConfig {
            momentum,
            dampening,
            nesterov,
        } = self.config;
        // `owned`: `d` is a tensor of our own, free to become the momentum buffer or be updated
        // in place; otherwise it is the gradient itself.
        let (mut d, mut owned) = if weight_decay {
            (
                grad.f_addcmul(param, &same_kind(&c.weight_decay, param)?)?,
                true,
            )
        } else {
            (grad, false)
        };
        if momentum != 0.0 {
            let mu = same_kind(&c.momentum, param)?;
            let buffer = match self.momentum_buffers.get_mut(name) {
                None => {
                    let b = if owned && !nesterov {
                        d.shallow_clone()
                    } else {
                        d.f_detach_copy()?
                    };
                    self.momentum_buffers
                        .insert(name.to_string(), b.shallow_clone());
                    b
                }
                Some(slot) => {
                    if dampening != 0.0 {
                        // Nesterov is refused with dampening, so `d` is not needed unscaled.
                        d = if owned {
                            d.f_mul_scalar_(1.0 - dampening)?
                        } else {
                            d.f_mul_scalar(1.0 - dampening)?
                        };
                        owned = true;
                    }
                    // b ← d + μ·b, as a new tensor unless `d` is ours and no longer needed.
                    let b = if owned && !nesterov {
                        d.f_addcmul_(slot, &mu)?
                    } else {
                        d.f_addcmul(slot, &mu)?
                    };
                    *slot = b.shallow_clone();
                    b
                }
            };
            d = if nesterov {
                if owned {
                    d.f_addcmul_(&buffer, &mu)?
                } else {
                    d.f_addcmul(&buffer, &mu)?
                }
            } else {
                buffer
            };
        }
        let _ = param
            .shallow_clone()
            .f_addcmul_(&d, &same_kind(&c.neg_lr, param)?)?;
        Ok(())
    }
}

impl Optimizer for Sgd {
    fn set_param_groups(&mut self, groups: Vec<ParamGroup>) -> Result<()> {
        self.coefficients = groups
            .iter()
            .map(|g| Coefficients::new(g, self.config.momentum))
            .collect::<Result<_>>()?;
        self.groups.groups = groups;
        Ok(())
    }

    fn set_learning_rates(&mut self, rates: &[f64]) -> Result<()> {
        self.groups.set_rates(rates)?;
        for (c, &lr) in self.coefficients.iter_mut().zip(rates) {
            let _ = c.neg_lr.f_fill_(-lr)?;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        // The groups are moved out for the loop so that `update` can borrow the buffers.
        let groups = std::mem::take(&mut self.groups.groups);
        let coefficients = std::mem::take(&mut self.coefficients);
        let mut result = Ok(());
        'groups: for (group, c) in groups.iter().zip(&coefficients) {
            for (name, param) in &group.params {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                result = self.update(name, param, grad, group.weight_decay != 0.0, c);
                if result.is_err() {
                    break 'groups;
                }
            }
        }
        self.groups.groups = groups;
        self.coefficients = coefficients;
        result
    }

    fn state(&self) -> Result<State> {
        Ok(State {
            tensors: buffers_state(&self.momentum_buffers, "momentum_buffer"),
            meta: String::new(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        self.momentum_buffers.clear();
        for (name, tensor) in state.tensors {
            let Some(param) = name.strip_prefix("momentum_buffer.") else {
                bail!("unexpected tensor `{name}` in sgd state");
            };
            // A copy: the state may come from another live optimizer, not only from a file.
            self.momentum_buffers
                .insert(param.to_string(), tensor.f_detach_copy()?);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// torch.optim.AdamW: w −= ηλw; m = β₁m + (1 − β₁)g; v = β₂v + (1 − β₂)g²;
/// w −= η/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε).
pub struct AdamW {
    config: AdamWConfig,
    groups: Groups,
    /// Per parameter: (step count, first moment, second moment).
    moments: HashMap<String, (i64, Tensor, Tensor)>,
}

impl Component for AdamW {
    const NAME: &'static str = "adamw";
    const DESCRIPTION: &'static str = "Adam with decoupled weight decay (torch.optim.AdamW)";
    type Config = AdamWConfig;

    fn new(config: AdamWConfig, _host: Host) -> Result<Self> {
        for (key, beta) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::config(
                    key,
                    format!("{key} must be in [0, 1), got {beta}"),
                ));
            }
        }
        if config.eps.is_nan() || config.eps <= 0.0 {
            return Err(Error::config("eps", "eps must be > 0"));
        }
        Ok(AdamW {
            config,
            groups: Groups { groups: Vec::new() },
            moments: HashMap::new(),
        })
    }
}

impl Optimizer for AdamW {
    fn set_param_groups(&mut self, groups: Vec<ParamGroup>) -> Result<()> {
        self.groups.groups = groups;
        Ok(())
    }

    fn set_learning_rates(&mut self, rates: &[f64]) -> Result<()> {
        self.groups.set_rates(rates)
    }

    fn step(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let AdamWConfig { beta1, beta2, eps } = self.config;
        for (group, name, param, grad) in self.groups.with_grads() {
            let mut param = param.shallow_clone();
            if group.weight_decay != 0.0 {
                let _ = param.f_mul_scalar_(1.0 - group.lr * group.weight_decay)?;
            }
            let entry = match self.moments.get_mut(name) {
                Some(e) => e,
                None => self.moments.entry(name.to_string()).or_insert((
                    0,
                    param.f_zeros_like()?,
                    param.f_zeros_like()?,
                )),
            };
            entry.0 += 1;
            let (step, mut m, mut v) = (entry.0, entry.1.shallow_clone(), entry.2.shallow_clone());
            let _ = m.f_mul_scalar_(beta1)?.f_add_(&(&grad * (1.0 - beta1)))?;
            let _ = v
                .f_mul_scalar_(beta2)?
                .f_add_(&(grad.f_mul(&grad)? * (1.0 - beta2)))?;
            let bias1 = 1.0 - beta1.powi(step as i32);
            let bias2 = 1.0 - beta2.powi(step as i32);
            let denom = v.f_sqrt()?.f_div_scalar(bias2.sqrt())?.f_add_scalar(eps)?;
            let _ = param.f_sub_(&(m.f_div(&denom)? * (group.lr / bias1)))?;
        }
        Ok(())
    }

    fn state(&self) -> Result<State> {
        let mut tensors = Vec::new();
        let mut names: Vec<&String> = self.moments.keys().collect();
        names.sort();
        for name in names {
            let (step, m, v) = &self.moments[name];
            tensors.push((format!("step.{name}"), Tensor::from(*step)));
            tensors.push((format!("exp_avg.{name}"), m.shallow_clone()));
            tensors.push((format!("exp_avg_sq.{name}"), v.shallow_clone()));
        }
        Ok(State {
            tensors,
            meta: String::new(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        let mut steps = HashMap::new();
        let mut firsts = HashMap::new();
        let mut seconds = HashMap::new();
        for (name, tensor) in state.tensors {
            if let Some(p) = name.strip_prefix("step.") {
                steps.insert(p.to_string(), tensor.int64_value(&[]));
            } else if let Some(p) = name.strip_prefix("exp_avg.") {
                firsts.insert(p.to_string(), tensor.f_detach_copy()?);
            } else if let Some(p) = name.strip_prefix("exp_avg_sq.") {
                seconds.insert(p.to_string(), tensor.f_detach_copy()?);
            } else {
                bail!("unexpected tensor `{name}` in adamw state");
            }
        }
        self.moments.clear();
        for (name, step) in steps {
            let (Some(m), Some(v)) = (firsts.remove(&name), seconds.remove(&name)) else {
                bail!("adamw state for `{name}` is incomplete");
            };
            self.moments.insert(name, (step, m, v));
        }
        Ok(())
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "optimizers written with tensor operations, so their state checkpoints"
)
.optimizer::<Sgd>()
.optimizer::<AdamW>());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// w = [1, -2] with gradient [0.5, 0.25] (from the linear loss 0.5·w₀ + 0.25·w₁).
    fn param() -> Tensor {
        Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true)
    }

    fn set_grad(w: &Tensor) {
        set_grad_to(w, [0.5, 0.25]);
    }

    /// Zeroes w's gradient in place and accumulates `g` into it, as the trainer does.
    fn set_grad_to(w: &Tensor, g: [f64; 2]) {
        let mut w = w.shallow_clone();
        w.zero_grad();
        (&w * Tensor::from_slice(&g)).sum(Kind::Double).backward();
    }

    fn group(w: &Tensor, lr: f64, weight_decay: f64) -> Vec<ParamGroup> {
        vec![ParamGroup {
            name: "all".into(),
            params: vec![("w".into(), w.shallow_clone())],
            lr,
            weight_decay,
        }]
    }

    fn values(w: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&w.detach()).unwrap()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "got {got:?}, want {want:?}");
        }
    }

    fn sgd(config: SgdConfig) -> Sgd {
        Sgd {
            config,
            groups: Groups { groups: Vec::new() },
            coefficients: Vec::new(),
            momentum_buffers: HashMap::new(),
        }
    }

    #[test]
    fn sgd_momentum_and_weight_decay_match_hand_computed_steps() {
        let w = param();
        let mut opt = sgd(SgdConfig::default());
        opt.set_param_groups(group(&w, 0.1, 0.01)).unwrap();
        set_grad(&w);
        opt.step().unwrap();
        // d = g + 0.01 w = [0.51, 0.23]; b = d; w -= 0.1 b.
        assert_close(&values(&w), &[0.949, -2.023]);
        set_grad(&w);
        opt.step().unwrap();
        // d = [0.50949, 0.22977]; b = 0.9 [0.51, 0.23] + d = [0.96849, 0.43677].
        assert_close(&values(&w), &[0.852151, -2.066677]);
    }

    #[test]
    fn sgd_nesterov_matches_hand_computed_step() {
        let w = param();
        let mut opt = sgd(SgdConfig {
            nesterov: true,
            ..SgdConfig::default()
        });
        opt.set_param_groups(group(&w, 0.1, 0.01)).unwrap();
        set_grad(&w);
        opt.step().unwrap();
        // d = [0.51, 0.23]; b = d; d += 0.9 b → 1.9 d = [0.969, 0.437].
        assert_close(&values(&w), &[0.9031, -2.0437]);
        set_grad(&w);
        opt.step().unwrap();
        // d = [0.509031, 0.229563]; b = 0.9 [0.51, 0.23] + d = [0.968031, 0.436563];
        // d += 0.9 b = [1.3802589, 0.6224697].
        assert_close(&values(&w), &[0.76507411, -2.10594697]);
    }

    #[test]
    fn sgd_dampening_matches_hand_computed_steps() {
        let w = param();
        let mut opt = sgd(SgdConfig {
            dampening: 0.5,
            ..SgdConfig::default()
        });
        opt.set_param_groups(group(&w, 0.1, 0.01)).unwrap();
        set_grad(&w);
        opt.step().unwrap();
        // The first step takes b = d undamped: w = [0.949, -2.023].
        assert_close(&values(&w), &[0.949, -2.023]);
        set_grad(&w);
        opt.step().unwrap();
        // d = [0.50949, 0.22977]; b = 0.9 [0.51, 0.23] + 0.5 d = [0.713745, 0.321885].
        assert_close(&values(&w), &[0.8776255, -2.0551885]);
    }

    #[test]
    fn sgd_without_weight_decay_keeps_its_buffer_apart_from_the_gradient() {
        let w = param();
        let mut opt = sgd(SgdConfig::default());
        opt.set_param_groups(group(&w, 0.1, 0.0)).unwrap();
        set_grad_to(&w, [0.5, 0.25]);
        opt.step().unwrap();
        assert_close(&values(&w), &[0.95, -2.025]);
        // The trainer zeroes gradients in place: a buffer sharing the gradient's storage would
        // hold the new gradient here instead of the old one.
        set_grad_to(&w, [1.0, -1.0]);
        opt.step().unwrap();
        // b = 0.9 [0.5, 0.25] + [1, -1] = [1.45, -0.775].
        assert_close(&values(&w), &[0.805, -1.9475]);
        assert_close(&values(&w.grad()), &[1.0, -1.0]);
    }

    #[test]
    fn sgd_steps_with_the_latest_learning_rate() {
        let w = param();
        let mut opt = sgd(SgdConfig {
            momentum: 0.0,
            ..SgdConfig::default()
        });
        opt.set_param_groups(group(&w, 0.1, 0.0)).unwrap();
        opt.set_learning_rates(&[0.5]).unwrap();
        set_grad(&w);
        opt.step().unwrap();
        assert_close(&values(&w), &[0.75, -2.125]);
    }

    #[test]
    fn sgd_state_round_trip_continues_identically() {
        let (w1, w2) = (param(), param());
        let mut a = sgd(SgdConfig::default());
        a.set_param_groups(group(&w1, 0.1, 0.01)).unwrap();
        set_grad(&w1);
        a.step().unwrap();
        w2.detach().copy_(&w1.detach());
        let mut b = sgd(SgdConfig::default());
        b.set_param_groups(group(&w2, 0.1, 0.01)).unwrap();
        b.load_state(a.state().unwrap()).unwrap();
        for (w, opt) in [(&w1, &mut a), (&w2, &mut b)] {
            set_grad(w);
            opt.step().unwrap();
        }
        assert_close(&values(&w2), &values(&w1));
        assert_close(&values(&w1), &[0.852151, -2.066677]);
    }

    fn adamw() -> AdamW {
        AdamW {
            config: AdamWConfig::default(),
            groups: Groups { groups: Vec::new() },
            moments: HashMap::new(),
        }
    }

    #[test]
    fn adamw_matches_hand_computed_steps() {
        let w = param();
        let mut opt = adamw();
        opt.set_param_groups(group(&w, 0.1, 0.01)).unwrap();
        set_grad(&w);
        opt.step().unwrap();
        // w ← w(1 − 0.001) = [0.999, −1.998]; m = 0.1 g; v = 0.001 g²;
        // m̂ / (√v̂ + ε) = g / (|g| + ε) ≈ 1 → w −= 0.1 · 0.05 / (0.5 + 1e-8) (and 0.025/(0.25+1e-8)).
        let first = [
            0.999 - 0.1 * 0.05 / 0.1 / (0.5 + 1e-8),
            -1.998 - 0.1 * 0.025 / 0.1 / (0.25 + 1e-8),
        ];
        assert_close(&values(&w), &first);
        set_grad(&w);
        opt.step().unwrap();
        // Step 2 by the formula, written out.
        let g = [0.5, 0.25];
        let mut expected = [0.0; 2];
        for i in 0..2 {
            let w0 = first[i] * (1.0 - 0.1 * 0.01);
            let m = 0.9 * (0.1 * g[i]) + 0.1 * g[i];
            let v = 0.999 * (0.001 * g[i] * g[i]) + 0.001 * g[i] * g[i];
            let (b1, b2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
            expected[i] = w0 - 0.1 / b1 * m / (v.sqrt() / b2.sqrt() + 1e-8);
        }
        assert_close(&values(&w), &expected);
        let state = opt.state().unwrap();
        assert_eq!(state.tensors.len(), 3);
        let mut restored = adamw();
        restored.load_state(state).unwrap();
        assert_eq!(restored.moments["w"].0, 2);
    }

    #[test]
    fn rates_follow_groups() {
        let w = param();
        let mut opt = sgd(SgdConfig::default());
        opt.set_param_groups(group(&w, 0.1, 0.0)).unwrap();
        assert!(opt.set_learning_rates(&[0.1, 0.2]).is_err());
        opt.set_learning_rates(&[0.5]).unwrap();
        assert_eq!(opt.groups.groups[0].lr, 0.5);
    }
}
