//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as a Trellis plugin
//! written against the SDK alone:
//!   c = β₁m + (1 − β₁)g;  w ← w − η(sign(c) + λw);  m ← β₂m + (1 − β₂)g.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use trellis_sdk::{bail, Component, Error, Host, Optimizer, ParamGroup, Plugin, Result, State};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LionConfig {
    pub beta1: f64,
    pub beta2: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            beta1: 0.9,
            beta2: 0.99,
        }
    }
}

pub struct Lion {
    config: LionConfig,
    groups: Vec<ParamGroup>,
    momentum: HashMap<String, Tensor>,
}

impl Component for Lion {
    const NAME: &'static str = "lion";
    const DESCRIPTION: &'static str =
        "Lion: the sign of an interpolated momentum, decoupled weight decay";
    type Config = LionConfig;

    fn new(config: LionConfig, _host: Host) -> Result<Self> {
        for (key, beta) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::config(
                    key,
                    format!("{key} must be in [0, 1), got {beta}"),
                ));
            }
        }
        Ok(Lion {
            config,
            groups: Vec::new(),
            momentum: HashMap::new(),
        })
    }
}

impl Optimizer for Lion {
    fn set_param_groups(&mut self, groups: Vec<ParamGroup>) -> Result<()> {
        self.groups = groups;
        Ok(())
    }

    fn set_learning_rates(&mut self, rates: &[f64]) -> Result<()> {
        if rates.len() != self.groups.len() {
            bail!("{} rates for {} groups", rates.len(), self.groups.len());
        }
        for (g, &lr) in self.groups.iter_mut().zip(rates) {
            g.lr = lr;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let LionConfig { beta1, beta2 } = self.config;
        for group in &self.groups {
            for (name, param) in &group.params {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let m = self
                    .momentum
                    .entry(name.clone())
                    .or_insert_with(|| grad.zeros_like());
                let update =
                    (&*m * beta1 + &grad * (1.0 - beta1)).sign() + param * group.weight_decay;
                let _ = param.shallow_clone().f_sub_(&(update * group.lr))?;
                *m = &*m * beta2 + grad * (1.0 - beta2);
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<State> {
        Ok(State {
            tensors: self
                .momentum
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            meta: String::new(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        self.momentum = state
            .tensors
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        Ok(())
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "the Lion optimizer, built outside the Trellis workspace"
)
.optimizer::<Lion>());
