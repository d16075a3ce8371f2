//! `ema`: an exponential moving average of the weights, evaluated in place of the weights
//! themselves (Polyak & Juditsky 1992 averaging in its exponential form; as timm's
//! `ModelEmaV2`, which averages every entry of the state dict).
//!
//! After every optimizer step (event `AFTER_STEP`, so after the pruning masks too), for every
//! parameter and floating-point buffer w of the model (BatchNorm running statistics included):
//!
//!   shadow ← decay·shadow + (1 − decay)·w          (computed as `shadow.lerp_(w, 1 − decay)`)
//!
//! The shadow starts as a copy of the weights *after the first optimizer step*, not at
//! construction: pruning at initialisation and the checkpoint a resumed run loads both change the
//! weights after the callbacks are built, and a shadow taken before would average them in.
//! Seeding from the first step instead of from the initial weights makes no difference after the
//! first few hundred steps (decay^k), and timm's and the paper's analyses do not depend on the
//! starting point. Non-float buffers (counters) are not averaged; they stay the model's own.
//!
//! Evaluation (event `EVAL`) sees the averaged weights: `eval_start` keeps the live weights
//! aside and copies the shadow into the model in place (under no_grad, so every handle to the
//! model's tensors sees it), `eval_end` copies the live weights back exactly; so the run's
//! metrics are the EMA model's. Before the first step there is no shadow and evaluation sees the
//! live weights. The shadow follows the model's dtype (`set_double`) and device.
//!
//! With `export = true`, the epoch end of the last epoch (`EPOCH_END` with epoch = epochs) writes
//! the shadow as `model_ema.safetensors` into the run directory, under the names and in the
//! layout of the host's `model.safetensors` (non-float buffers taken from the model), so it
//! loads wherever `model.safetensors` does, e.g. as a distillation teacher. `model.safetensors`
//! itself stays the live weights.
//!
//! Pruning during training (a pruner with `at_step` > 0) is not seen by the average: the pruned
//! weights' shadow decays towards zero as decay^k instead of being zero, because callbacks are
//! not told about masks. Prune at initialisation, or expect an evaluated model that is not
//! exactly sparse for a while.
//!
//! Configuration (`[[callbacks]] use = "ema"`):
//! - `decay` (0.999): the weight of the old average, in [0, 1]. The average spans about
//!   1 / (1 − decay) steps; timm's ImageNet recipes use 0.9998 with far more steps per epoch.
//! - `export` (false): write `model_ema.safetensors` at the end of training.
//!
//! State: the shadow tensors by name, and the number of updates (0 before the first step).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};
use trellis_sdk::{
    bail, Callback, Component, EpochInfo, Error, Events, Host, Model, Plugin, Result, State,
    StepInfo,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    /// Weight of the old average in each update.
    pub decay: f64,
    /// Write the average as `model_ema.safetensors` after the last epoch.
    pub export: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.999,
            export: false,
        }
    }
}

/// The file `export = true` writes into the run directory.
pub const EXPORT_FILE: &str = "model_ema.safetensors";

pub struct Ema {
    model: Model,
    decay: f64,
    export: bool,
    run_dir: Option<PathBuf>,
    /// Only one process of a data-parallel run writes the export.
    writes: bool,
    /// The model's parameters and float buffers, by name, sharing the model's storage.
    tracked: Vec<(String, Tensor)>,
    /// One per tracked tensor; empty before the first step.
    shadow: Vec<Tensor>,
    /// The live weights while evaluation sees the shadow; empty otherwise.
    aside: Vec<Tensor>,
    updates: u64,
}

/// Parameters then floating-point buffers: what the average covers.
fn tracked_tensors(model: &Model) -> Result<Vec<(String, Tensor)>> {
    let mut tracked: Vec<(String, Tensor)> = model
        .parameters()?
        .into_iter()
        .map(|p| (p.name, p.tensor))
        .collect();
    tracked.extend(
        model
            .buffers()?
            .into_iter()
            .filter(|(_, t)| t.is_floating_point()),
    );
    Ok(tracked)
}

impl Ema {
    /// The average of the tensor named `name`, if there is one yet.
    #[cfg(test)]
    pub(crate) fn shadow_of(&self, name: &str) -> Option<&Tensor> {
        let i = self.tracked.iter().position(|(n, _)| n == name)?;
        self.shadow.get(i)
    }

    fn update(&mut self) -> Result<()> {
        tch::no_grad(|| {
            if self.shadow.is_empty() {
                self.shadow = self
                    .tracked
                    .iter()
                    .map(|(_, w)| w.detach().copy())
                    .collect();
                return Ok(());
            }
            for ((_, w), s) in self.tracked.iter().zip(&mut self.shadow) {
                if s.kind() != w.kind() || s.device() != w.device() {
                    *s = s.to_device(w.device()).to_kind(w.kind());
                }
                let _ = s.f_lerp_(w, 1.0 - self.decay)?;
            }
            Ok(())
        })
        .map_err(|e: tch::TchError| Error::msg(e).context("ema update"))?;
        self.updates += 1;
        Ok(())
    }

    fn export(&self) -> Result<()> {
        let Some(dir) = &self.run_dir else {
            return Ok(());
        };
        if self.shadow.is_empty() {
            tracing::warn!("ema: no optimizer step was taken, {EXPORT_FILE} not written");
            return Ok(());
        }
        let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu).contiguous();
        let averaged: HashMap<&str, &Tensor> = self
            .tracked
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(&self.shadow)
            .collect();
        // The layout of model.safetensors: parameters, then every buffer.
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let params = self
            .model
            .parameters()?
            .into_iter()
            .map(|p| (p.name, p.tensor));
        for (name, live) in params.chain(self.model.buffers()?) {
            let t = averaged.get(name.as_str()).copied().unwrap_or(&live);
            tensors.push((name.clone(), cpu(t)));
        }
        let path = dir.join(EXPORT_FILE);
        // Beside the target and renamed, so a crash mid-write leaves no truncated file.
        let tmp = dir.join(format!("{EXPORT_FILE}.tmp"));
        Tensor::write_safetensors(&tensors, &tmp)
            .map_err(|e| Error::msg(e).context(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::msg(e).context(format!("moving {}", tmp.display())))?;
        tracing::info!("ema: wrote {}", path.display());
        Ok(())
    }
}

impl Component for Ema {
    const NAME: &'static str = "ema";
    const DESCRIPTION: &'static str =
        "exponential moving average of the weights, used for evaluation (optionally exported)";
    type Config = EmaConfig;

    fn new(config: EmaConfig, host: Host) -> Result<Self> {
        if !(0.0..=1.0).contains(&config.decay) {
            return Err(Error::config(
                "decay",
                format!("decay must be in [0, 1], got {}", config.decay),
            ));
        }
        let model = host.model()?;
        let tracked = tracked_tensors(&model)?;
        Ok(Ema {
            model,
            decay: config.decay,
            export: config.export,
            run_dir: host.run_dir(),
            writes: host.rank_and_world_size().0 == 0,
            tracked,
            shadow: Vec::new(),
            aside: Vec::new(),
            updates: 0,
        })
    }
}

impl Callback for Ema {
    fn events(&self) -> Events {
        let mut events = Events::AFTER_STEP | Events::EVAL;
        if self.export {
            events = events | Events::EPOCH_END;
        }
        events
    }

    fn after_step(&mut self, _at: StepInfo) -> Result<()> {
        self.update()
    }

    fn epoch_end(&mut self, info: EpochInfo) -> Result<()> {
        if self.export && self.writes && info.epoch == info.epochs {
            self.export()?;
        }
        Ok(())
    }

    fn eval_start(&mut self, _info: EpochInfo) -> Result<()> {
        if self.shadow.is_empty() || !self.aside.is_empty() {
            return Ok(());
        }
        tch::no_grad(|| -> Result<()> {
            let mut aside = Vec::with_capacity(self.tracked.len());
            for ((_, w), s) in self.tracked.iter().zip(&self.shadow) {
                aside.push(w.detach().copy());
                w.shallow_clone().f_copy_(s)?;
            }
            self.aside = aside;
            Ok(())
        })
    }

    fn eval_end(&mut self, _info: EpochInfo) -> Result<()> {
        let aside = std::mem::take(&mut self.aside);
        tch::no_grad(|| -> Result<()> {
            for ((_, w), live) in self.tracked.iter().zip(&aside) {
                w.shallow_clone().f_copy_(live)?;
            }
            Ok(())
        })
    }

    fn state(&self) -> Result<State> {
        Ok(State {
            tensors: self
                .tracked
                .iter()
                .zip(&self.shadow)
                .map(|((n, _), s)| (n.clone(), s.shallow_clone()))
                .collect(),
            meta: self.updates.to_string(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        self.updates = match state.meta.trim() {
            "" => 0,
            meta => meta
                .parse()
                .map_err(|_| Error::msg(format!("ema state `{meta}` is not an update count")))?,
        };
        if state.tensors.is_empty() {
            self.shadow.clear();
            return Ok(());
        }
        // By name: checkpoints come back sorted by name, on the CPU.
        let mut saved: HashMap<String, Tensor> = state.tensors.into_iter().collect();
        let mut shadow = Vec::with_capacity(self.tracked.len());
        for (name, w) in &self.tracked {
            let Some(s) = saved.remove(name) else {
                bail!("the ema state has no average for `{name}`");
            };
            if s.size() != w.size() {
                bail!(
                    "the ema average of `{name}` has shape {:?}, the model's {:?}",
                    s.size(),
                    w.size()
                );
            }
            // A copy: the state may be another live instance's.
            shadow.push(s.detach().to_device(w.device()).to_kind(w.kind()).copy());
        }
        if let Some(name) = saved.keys().next() {
            bail!("the ema state has an average for `{name}`, which the model does not have");
        }
        self.shadow = shadow;
        Ok(())
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "exponential moving average of the weights"
)
.callback::<Ema>());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;
    use trellis_sdk::abi::ErrorKind;
    use trellis_sdk::parse_config;
    use trellis_sdk::testing::{FakeHost, Progress, TinyNet};

    fn net() -> TinyNet {
        tch::manual_seed(0);
        TinyNet::new(3, 5)
    }

    fn ema(config: &str) -> (Ema, Progress) {
        let (host, progress) = FakeHost::new(net()).shared();
        (
            Ema::new(parse_config(config).unwrap(), host).unwrap(),
            progress,
        )
    }

    fn ema_on(progress: &Progress, config: &str) -> Ema {
        Ema::new(parse_config(config).unwrap(), progress.host()).unwrap()
    }

    /// Sets every parameter and buffer of the model to `value + offset(tensor index)`.
    fn set_weights(model: &Model, value: f64) {
        let tensors = tracked_tensors(model).unwrap();
        tch::no_grad(|| {
            for (i, (_, t)) in tensors.iter().enumerate() {
                let _ = t.shallow_clone().fill_(value + i as f64);
            }
        });
    }

    fn step(e: &mut Ema) {
        e.after_step(StepInfo::default()).unwrap();
    }

    fn info(epoch: u64) -> EpochInfo {
        EpochInfo {
            epoch,
            epochs: 3,
            step: 0,
        }
    }

    #[test]
    fn shadow_follows_the_closed_form() {
        let (mut e, progress) = ema("decay = 0.9\n");
        let model = progress.host().model().unwrap();
        // Changed after construction: the shadow must start from the first step's weights.
        set_weights(&model, 2.0);
        step(&mut e);
        assert_eq!(e.updates, 1);
        set_weights(&model, -1.0);
        let k = 5;
        for _ in 0..k {
            step(&mut e);
        }
        // shadow_k = w + decay^k (w0 − w), w0 − w = 3 for every tensor.
        let names: Vec<String> = e.tracked.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names.len(), 7, "5 parameters and 2 running statistics");
        for (i, name) in names.iter().enumerate() {
            let w = -1.0 + i as f64;
            let expected = w + 0.9f64.powi(k) * 3.0;
            let s = e.shadow_of(name).unwrap();
            let max_err = (s.to_kind(Kind::Double) - expected)
                .abs()
                .max()
                .double_value(&[]);
            assert!(max_err < 1e-5, "{name}: off by {max_err}");
        }
        // One more step at a new value: decay·s + (1 − decay)·w by hand.
        let before = e.shadow_of("linear.bias").unwrap().copy();
        set_weights(&model, 10.0);
        step(&mut e);
        let w = 10.0 + 4.0; // linear.bias is the fifth tensor
        let expected = before * 0.9 + w * 0.1;
        assert!(e
            .shadow_of("linear.bias")
            .unwrap()
            .allclose(&expected, 1e-6, 1e-6, false));
    }

    #[test]
    fn evaluation_sees_the_average_and_gets_the_live_weights_back() {
        let (mut e, progress) = ema("decay = 0.5\n");
        let model = progress.host().model().unwrap();
        // Nothing to swap before the first step.
        e.eval_start(info(0)).unwrap();
        assert!(e.aside.is_empty());
        e.eval_end(info(0)).unwrap();
        set_weights(&model, 1.0);
        step(&mut e);
        set_weights(&model, 3.0);
        step(&mut e);
        let live: Vec<Tensor> = e.tracked.iter().map(|(_, t)| t.copy()).collect();
        e.eval_start(info(1)).unwrap();
        // Every handle to the model sees the average: 0.5·(1 + i) + 0.5·(3 + i) = 2 + i.
        for (i, (name, t)) in tracked_tensors(&model).unwrap().into_iter().enumerate() {
            assert!(t.equal(e.shadow_of(&name).unwrap()), "{name}");
            assert!(t.equal(&t.full_like(2.0 + i as f64)), "{name}");
        }
        let x = Tensor::ones([1, 3, 4, 4], (Kind::Float, Device::Cpu));
        let evaluated = model.forward(&x).unwrap().logits;
        e.eval_end(info(1)).unwrap();
        for ((name, t), l) in tracked_tensors(&model).unwrap().iter().zip(&live) {
            assert!(t.equal(l), "{name} restored exactly");
            assert!(t.requires_grad() == (name.contains("weight") || name.contains("bias")));
        }
        assert!(!model.forward(&x).unwrap().logits.equal(&evaluated));
        // A second eval_end does not clobber the live weights.
        e.eval_end(info(1)).unwrap();
        assert!(tracked_tensors(&model).unwrap()[0].1.equal(&live[0]));
    }

    #[test]
    fn resumed_state_averages_the_next_step_identically() {
        let (mut a, progress) = ema("");
        let model = progress.host().model().unwrap();
        set_weights(&model, 0.5);
        step(&mut a);
        set_weights(&model, 1.5);
        step(&mut a);
        let mut state = a.state().unwrap();
        assert_eq!(state.meta, "2");
        // As a checkpoint hands it back: sorted by name, on the CPU, not aliasing a's tensors.
        state.tensors.sort_by(|x, y| x.0.cmp(&y.0));
        state.tensors = state
            .tensors
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let mut b = ema_on(&progress, "");
        b.load_state(state).unwrap();
        assert_eq!(b.updates, 2);
        set_weights(&model, -4.0);
        step(&mut a);
        step(&mut b);
        for (name, _) in &a.tracked {
            assert!(
                a.shadow_of(name).unwrap().equal(b.shadow_of(name).unwrap()),
                "{name}"
            );
        }
        // A fresh instance would restart the average at the current weights instead.
        let mut fresh = ema_on(&progress, "");
        step(&mut fresh);
        assert!(!fresh
            .shadow_of("linear.bias")
            .unwrap()
            .equal(a.shadow_of("linear.bias").unwrap()));
        // An empty state is "no step yet".
        fresh.load_state(State::default()).unwrap();
        assert!(fresh.shadow_of("linear.bias").is_none());
        let mut wrong = a.state().unwrap();
        wrong.tensors.pop();
        assert!(fresh.load_state(wrong).is_err());
    }

    #[test]
    fn exports_the_average_after_the_last_epoch() {
        let dir = std::env::temp_dir().join(format!("trellis-ema-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (host, progress) = FakeHost::new(net()).run_dir(&dir).shared();
        let mut e = Ema::new(parse_config("export = true\ndecay = 0.5\n").unwrap(), host).unwrap();
        assert!(e.events().contains(Events::EPOCH_END));
        let model = progress.host().model().unwrap();
        set_weights(&model, 1.0);
        step(&mut e);
        set_weights(&model, 2.0);
        step(&mut e);
        let path = dir.join(EXPORT_FILE);
        e.epoch_end(info(2)).unwrap();
        assert!(!path.exists(), "only after the last epoch");
        e.epoch_end(info(3)).unwrap();
        let saved: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        let mut names: Vec<&String> = saved.keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var",
                "bn1.weight",
                "conv1.weight",
                "linear.bias",
                "linear.weight"
            ]
        );
        for (i, (name, _)) in e.tracked.iter().enumerate() {
            // 0.5·(1 + i) + 0.5·(2 + i), while the model holds 2 + i.
            assert!(saved[name].equal(e.shadow_of(name).unwrap()), "{name}");
            assert!(
                saved[name].equal(&saved[name].full_like(1.5 + i as f64)),
                "{name}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        // Without export the event is not even asked for.
        assert!(!ema("").0.events().contains(Events::EPOCH_END));
    }

    #[test]
    fn follows_the_model_to_double() {
        let (mut e, progress) = ema("decay = 0.5\n");
        let model = progress.host().model().unwrap();
        set_weights(&model, 1.0);
        step(&mut e);
        model.set_double(true).unwrap();
        set_weights(&model, 3.0);
        step(&mut e);
        let s = e.shadow_of("conv1.weight").unwrap();
        assert_eq!(s.kind(), Kind::Double);
        assert!(s.equal(&s.full_like(2.0)));
    }

    #[test]
    fn bad_decay_is_refused_naming_the_key() {
        for text in ["decay = 1.5\n", "decay = -0.1\n"] {
            let host = FakeHost::new(net()).host();
            let err = match Ema::new(parse_config(text).unwrap(), host) {
                Ok(_) => panic!("{text} was accepted"),
                Err(e) => e,
            };
            assert_eq!(
                (err.kind, err.key.as_deref()),
                (ErrorKind::Config, Some("decay"))
            );
        }
    }
}
