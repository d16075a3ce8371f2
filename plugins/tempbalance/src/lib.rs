//! `tempbalance`: a learning rate per layer from the heavy-tailed shape of its weight spectrum
//! (TempBalance, Zhou et al. NeurIPS 2023; METHODS.md section 5).
//!
//! 1. **Layers.** Every Conv2d and Linear layer is analysed (registration order). The first
//!    and the last are left out (`remove_first_layer`, `remove_last_layer`), and so is every
//!    layer with fewer than `eigs_thresh` eigenvalues. Each remaining layer is a parameter
//!    group (weight and bias), joined by its BatchNorm: by name (`bn_pairing = "name"`, the
//!    reference's default: `xbnK` pairs with `xconvK`, so a ResNet shortcut's BN is nobody's)
//!    or the BN right after a conv (`"order"`). Everything else stays in the host's `rest`
//!    group at the global rate η_t.
//! 2. **α.** The power-law exponent of each balanced layer's ESD (`trellis-spectral`, `fit`,
//!    `conv_norm`, `xmin_pos`, `filter_zeros`), or its `alphahat` or `spectral_norm` (`metric`,
//!    the paper's ablation).
//! 3. **α → rate.** `assign = "linear"`: η_t·(s1 + (s2 − s1)·(α − α_min)/(α_max − α_min)), so
//!    the most under-trained layer (largest α) learns fastest; `sqrt`, `log2` and `step` are the
//!    reference's other maps. s1 = `lr_min_ratio`, s2 = `lr_max_ratio`.
//! 4. **When.** At initialisation, then after every epoch (`every`, `every_unit`): the ESD is
//!    recomputed and the rate factors cached; in between, every call only scales the cached
//!    factors by the host's η_t (`[schedule]`, cosine in the paper).
//!
//! A layer whose spectrum admits no fit (zero or equal eigenvalues) trains at η_t and does not
//! enter the map, so no rate is ever NaN or infinite.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_sdk::{
    bail, Boundary, Component, Error, GroupSpec, Host, LayerKind, Param, Plugin, Result,
    SchedulePoint, Scheduler, State,
};
use trellis_spectral::{analysed_layers, analyze_with, eigenvalue_count, EsdOptions, Fit};

/// How α becomes a rate factor (METHODS.md section 5; the reference's `tb_*` functions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assign {
    /// s1 + (s2 − s1)·(α − α_min)/(α_max − α_min).
    #[default]
    Linear,
    /// n·√α / Σ√α.
    Sqrt,
    /// n·log2 α / Σ log2 α.
    Log2,
    /// s1 + (s2 − s1)·r/n for the layer of rank r (0 = smallest α) among n.
    Step,
}

/// Which BatchNorm joins a balanced conv's group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BnPairing {
    /// The BN whose path, with every `bn` read as `conv`, is the conv's (`bn1` → `conv1`).
    #[default]
    Name,
    /// The BN registered right after the conv.
    Order,
}

/// The layer statistic the rates are mapped from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    #[default]
    Alpha,
    /// α·log10(λ_max).
    Alphahat,
    /// λ_max.
    SpectralNorm,
}

/// What `every` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    #[default]
    Epoch,
    Step,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// "median" (xmin = the median eigenvalue) or "goodness-of-fit" (WeightWatcher's KS choice).
    pub fit: Fit,
    /// "linear", "sqrt", "log2" or "step".
    pub assign: Assign,
    /// s1: the smallest α's rate as a multiple of the global rate.
    pub lr_min_ratio: f64,
    /// s2: the largest α's rate as a multiple of the global rate.
    pub lr_max_ratio: f64,
    pub remove_first_layer: bool,
    pub remove_last_layer: bool,
    /// Layers with fewer eigenvalues than this are not balanced.
    pub eigs_thresh: usize,
    /// Recompute the ESD every this many `every_unit`s (the paper: every epoch).
    pub every: u64,
    /// "epoch" or "step".
    pub every_unit: Unit,
    /// "name" (the reference's default) or "order".
    pub bn_pairing: BnPairing,
    /// "alpha", "alphahat" or "spectral_norm".
    pub metric: Metric,
    /// Every kernel position's matrix is scaled by √conv_norm before its SVD.
    pub conv_norm: f64,
    /// The median fit's xmin is λ_⌊N / xmin_pos⌋.
    pub xmin_pos: f64,
    /// Fit only eigenvalues above 1e-5.
    pub filter_zeros: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            fit: Fit::Median,
            assign: Assign::Linear,
            lr_min_ratio: 0.5,
            lr_max_ratio: 1.5,
            remove_first_layer: true,
            remove_last_layer: true,
            eigs_thresh: 50,
            every: 1,
            every_unit: Unit::Epoch,
            bn_pairing: BnPairing::Name,
            metric: Metric::Alpha,
            conv_norm: 0.5,
            xmin_pos: 2.0,
            filter_zeros: false,
        }
    }
}

impl Config {
    fn validate(&self) -> Result<()> {
        for (key, ratio) in [
            ("lr_min_ratio", self.lr_min_ratio),
            ("lr_max_ratio", self.lr_max_ratio),
        ] {
            if !(ratio.is_finite() && ratio >= 0.0) {
                return Err(Error::config(
                    key,
                    format!("{key} must be a number >= 0, got {ratio}"),
                ));
            }
        }
        if self.lr_min_ratio > self.lr_max_ratio {
            return Err(Error::config(
                "lr_min_ratio",
                format!(
                    "lr_min_ratio ({}) exceeds lr_max_ratio ({}); the paper uses 0.5 and 1.5",
                    self.lr_min_ratio, self.lr_max_ratio
                ),
            ));
        }
        if !(self.conv_norm.is_finite() && self.conv_norm > 0.0) {
            return Err(Error::config(
                "conv_norm",
                format!(
                    "conv_norm must be > 0, got {} (the reference uses 0.5)",
                    self.conv_norm
                ),
            ));
        }
        if !(self.xmin_pos.is_finite() && self.xmin_pos > 1.0) {
            return Err(Error::config(
                "xmin_pos",
                format!(
                    "xmin_pos must be > 1 (xmin = λ_⌊N / xmin_pos⌋; 2 is the median), got {}",
                    self.xmin_pos
                ),
            ));
        }
        if self.every == 0 {
            return Err(Error::config(
                "every",
                "every must be >= 1 (e.g. every = 1 with every_unit = \"epoch\")",
            ));
        }
        Ok(())
    }
}

/// Positions (in the list of analysed layers) of the layers that get their own rate.
pub fn balanced_positions(eigenvalue_counts: &[usize], config: &Config) -> Vec<usize> {
    let last = eigenvalue_counts.len().saturating_sub(1);
    (0..eigenvalue_counts.len())
        .filter(|&i| !(config.remove_first_layer && i == 0))
        .filter(|&i| !(config.remove_last_layer && i == last))
        .filter(|&i| eigenvalue_counts[i] >= config.eigs_thresh)
        .collect()
}

/// Each layer's rate as a multiple of the global rate. Layers without a usable α (`None`, or
/// not a power law's α > 1) get 1 and stay out of the map's min, max and sums; a map that
/// would divide by zero (all α equal) gives every layer 1.
pub fn rate_factors(alphas: &[Option<f64>], assign: Assign, s1: f64, s2: f64) -> Vec<f64> {
    let measured: Vec<(usize, f64)> = alphas
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.filter(|a| a.is_finite() && *a > 1.0).map(|a| (i, a)))
        .collect();
    let mut factors = vec![1.0; alphas.len()];
    let n = measured.len() as f64;
    match assign {
        Assign::Linear => {
            let lo = measured.iter().map(|m| m.1).fold(f64::INFINITY, f64::min);
            let hi = measured
                .iter()
                .map(|m| m.1)
                .fold(f64::NEG_INFINITY, f64::max);
            let span = hi - lo;
            if span > 0.0 && span.is_finite() {
                for &(i, a) in &measured {
                    factors[i] = s1 + (s2 - s1) * (a - lo) / span;
                }
            }
        }
        Assign::Sqrt | Assign::Log2 => {
            let score = |a: f64| {
                if assign == Assign::Sqrt {
                    a.sqrt()
                } else {
                    a.log2()
                }
            };
            let total: f64 = measured.iter().map(|m| score(m.1)).sum();
            if total > 0.0 && total.is_finite() {
                for &(i, a) in &measured {
                    factors[i] = n * score(a) / total;
                }
            }
        }
        Assign::Step => {
            let mut by_alpha = measured;
            // Stable: equal α keep layer order, as a reproducible stand-in for argsort.
            by_alpha.sort_by(|x, y| x.1.total_cmp(&y.1));
            for (rank, &(i, _)) in by_alpha.iter().enumerate() {
                factors[i] = s1 + (s2 - s1) * rank as f64 / n;
            }
        }
    }
    factors
}

/// A module of the model as its parameters reveal it.
struct Module {
    path: String,
    kind: LayerKind,
    params: Vec<String>,
    shape: Vec<i64>,
}

/// Modules in registration order, from the parameter list.
fn modules(params: &[Param]) -> Vec<Module> {
    let mut modules: Vec<Module> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for p in params {
        let i = *index.entry(p.module.clone()).or_insert_with(|| {
            modules.push(Module {
                path: p.module.clone(),
                kind: p.kind,
                params: Vec::new(),
                shape: Vec::new(),
            });
            modules.len() - 1
        });
        if p.name.strip_prefix(p.module.as_str()) == Some(".weight") {
            modules[i].shape = p.tensor.size();
        }
        modules[i].params.push(p.name.clone());
    }
    modules
}

/// The balanced layers and their parameter groups: one per layer, named after it, with the
/// BatchNorm that comes right after a conv in registration order.
pub fn plan_groups(params: &[Param], config: &Config) -> Vec<GroupSpec> {
    let modules = modules(params);
    let analysed: Vec<usize> = (0..modules.len())
        .filter(|&i| matches!(modules[i].kind, LayerKind::Conv2d | LayerKind::Linear))
        .filter(|&i| eigenvalue_count(&modules[i].shape).is_some())
        .collect();
    let counts: Vec<usize> = analysed
        .iter()
        .map(|&i| eigenvalue_count(&modules[i].shape).unwrap_or(0))
        .collect();
    balanced_positions(&counts, config)
        .into_iter()
        .map(|position| {
            let i = analysed[position];
            let mut params = modules[i].params.clone();
            if let Some(bn) = paired_batch_norm(&modules, i, config.bn_pairing) {
                params.extend(bn.params.iter().cloned());
            }
            GroupSpec {
                name: modules[i].path.clone(),
                params,
            }
        })
        .collect()
}

/// The BatchNorm that trains at the rate of layer `i`, if any.
fn paired_batch_norm(modules: &[Module], i: usize, pairing: BnPairing) -> Option<&Module> {
    let layer = &modules[i];
    match pairing {
        BnPairing::Name => modules
            .iter()
            .find(|m| m.kind == LayerKind::BatchNorm && m.path.replace("bn", "conv") == layer.path),
        BnPairing::Order => modules
            .get(i + 1)
            .filter(|next| layer.kind == LayerKind::Conv2d && next.kind == LayerKind::BatchNorm),
    }
}

pub struct TempBalance {
    config: Config,
    host: Host,
    /// The balanced layers' module paths, in group order.
    layers: Vec<String>,
    alphas: Vec<Option<f64>>,
    /// Cached rate / η_t per group, from the last ESD.
    factors: Vec<f64>,
    /// The optimizer step at which the ESD was last computed.
    computed_at_step: Option<u64>,
}

impl Component for TempBalance {
    const NAME: &'static str = "tempbalance";
    const DESCRIPTION: &'static str =
        "per-layer learning rates from each layer's heavy-tailed ESD exponent alpha (TempBalance)";
    type Config = Config;

    fn new(config: Config, host: Host) -> Result<Self> {
        config.validate()?;
        Ok(TempBalance {
            config,
            host,
            layers: Vec::new(),
            alphas: Vec::new(),
            factors: Vec::new(),
            computed_at_step: None,
        })
    }
}

impl TempBalance {
    fn due(&self, point: &SchedulePoint) -> bool {
        match self.config.every_unit {
            Unit::Epoch => {
                point.boundary == Boundary::EpochStart
                    && point.epoch.is_multiple_of(self.config.every)
            }
            Unit::Step => point.step.is_multiple_of(self.config.every),
        }
    }

    /// Computes α of every balanced layer from the model's current weights, and the factors.
    fn recompute(&mut self) -> Result<()> {
        let weights: HashMap<String, Tensor> =
            analysed_layers(&self.host.model()?)?.into_iter().collect();
        let mut alphas = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let Some(weight) = weights.get(layer) else {
                bail!("tempbalance: the model no longer has the layer `{layer}` it balances");
            };
            let options = EsdOptions {
                fit: self.config.fit,
                conv_norm: self.config.conv_norm,
                xmin_pos: self.config.xmin_pos,
                filter_zeros: self.config.filter_zeros,
            };
            let spectrum = analyze_with(weight, &options)
                .map_err(|e| Error::msg(format!("the ESD of `{layer}`: {e}")))?;
            let value = match self.config.metric {
                Metric::Alpha => spectrum.alpha(),
                Metric::Alphahat => spectrum.alphahat(),
                Metric::SpectralNorm => Some(spectrum.spectral_norm).filter(|v| *v > 0.0),
            };
            if value.is_none() {
                tracing::warn!(
                    "{layer}: its spectrum admits no {:?}; it trains at the global rate",
                    self.config.metric
                );
            }
            alphas.push(value);
        }
        self.factors = rate_factors(
            &alphas,
            self.config.assign,
            self.config.lr_min_ratio,
            self.config.lr_max_ratio,
        );
        self.alphas = alphas;
        Ok(())
    }
}

impl Scheduler for TempBalance {
    fn param_groups(&mut self) -> Result<Vec<GroupSpec>> {
        let groups = plan_groups(&self.host.model()?.parameters()?, &self.config);
        if groups.is_empty() {
            tracing::warn!(
                "tempbalance balances no layer: none is left after removing the first and last \
                 and those with fewer than {} eigenvalues (eigs_thresh); every layer trains at \
                 the global rate",
                self.config.eigs_thresh
            );
        }
        self.layers = groups.iter().map(|g| g.name.clone()).collect();
        Ok(groups)
    }

    fn learning_rates(&mut self, point: SchedulePoint) -> Result<Option<Vec<f64>>> {
        let stale = self.factors.len() != self.layers.len();
        if stale || (self.due(&point) && self.computed_at_step != Some(point.step)) {
            self.recompute()?;
            self.computed_at_step = Some(point.step);
        }
        Ok(Some(
            self.factors.iter().map(|f| f * point.base_lr).collect(),
        ))
    }

    fn state(&self) -> Result<State> {
        let alphas: Vec<f64> = self.alphas.iter().map(|a| a.unwrap_or(f64::NAN)).collect();
        Ok(State {
            tensors: vec![
                ("factors".into(), Tensor::from_slice(&self.factors)),
                ("alphas".into(), Tensor::from_slice(&alphas)),
            ],
            meta: self
                .computed_at_step
                .map(|s| s.to_string())
                .unwrap_or_default(),
        })
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        let mut factors = None;
        let mut alphas = None;
        for (name, tensor) in state.tensors {
            let values = Vec::<f64>::try_from(&tensor.to_kind(Kind::Double))?;
            match name.as_str() {
                "factors" => factors = Some(values),
                "alphas" => alphas = Some(values),
                other => bail!("unexpected tensor `{other}` in tempbalance state"),
            }
        }
        let (Some(factors), Some(alphas)) = (factors, alphas) else {
            // Nothing saved: the ESD is computed afresh at the next call.
            return Ok(());
        };
        if factors.len() != self.layers.len() || alphas.len() != self.layers.len() {
            bail!(
                "the checkpoint's tempbalance state has {} layers but this run balances {}\n  \
                 help: resume with the model and [scheduler] settings the run started with",
                factors.len(),
                self.layers.len()
            );
        }
        self.factors = factors;
        self.alphas = alphas
            .into_iter()
            .map(|a| Some(a).filter(|a| a.is_finite()))
            .collect();
        self.computed_at_step = state.meta.trim().parse().ok();
        Ok(())
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "TempBalance: per-layer learning rates from heavy-tailed spectral analysis"
)
.scheduler::<TempBalance>());

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;
    use trellis_sdk::testing::FakeHost;
    use trellis_sdk::{Architecture, Outputs};
    use trellis_spectral::analyze;

    /// (module, kind, parameter shapes) in registration order.
    type Layout = Vec<(&'static str, LayerKind, Vec<(&'static str, Vec<i64>)>)>;

    /// stem (first) → its BN; three balanced convs, each followed by a BN; a conv with 18
    /// eigenvalues (< 50); a 1×1 conv and its BN; the classifier (last).
    fn layout() -> Layout {
        let conv = |o: i64, i: i64, k: i64| vec![("weight", vec![o, i, k, k])];
        let bn = |c: i64| vec![("weight", vec![c]), ("bias", vec![c])];
        vec![
            ("stem", LayerKind::Conv2d, conv(8, 3, 3)),
            ("stem_bn", LayerKind::BatchNorm, bn(8)),
            ("a.conv", LayerKind::Conv2d, conv(8, 8, 3)),
            ("a.bn", LayerKind::BatchNorm, bn(8)),
            ("b.conv", LayerKind::Conv2d, conv(12, 8, 3)),
            ("b.bn", LayerKind::BatchNorm, bn(12)),
            ("c.conv", LayerKind::Conv2d, conv(12, 12, 3)),
            ("c.bn", LayerKind::BatchNorm, bn(12)),
            ("thin", LayerKind::Conv2d, conv(2, 12, 3)),
            ("thin_bn", LayerKind::BatchNorm, bn(2)),
            ("wide", LayerKind::Conv2d, conv(64, 2, 1)),
            (
                "fc",
                LayerKind::Linear,
                vec![("weight", vec![10, 64]), ("bias", vec![10])],
            ),
        ]
    }

    struct FakeModel {
        params: Vec<(String, String, LayerKind, Tensor)>,
    }

    impl Architecture for FakeModel {
        fn forward(&self, _inputs: &Tensor) -> Result<Outputs> {
            bail!("not needed")
        }
        fn head(&self, _features: &Tensor) -> Result<Tensor> {
            bail!("not needed")
        }
        fn parameters(&self) -> Result<Vec<Param>> {
            Ok(self
                .params
                .iter()
                .map(|(name, module, kind, t)| Param {
                    name: name.clone(),
                    module: module.clone(),
                    kind: *kind,
                    tensor: t.shallow_clone(),
                })
                .collect())
        }
        fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
            Ok(Vec::new())
        }
        fn set_training(&self, _train: bool) -> Result<()> {
            Ok(())
        }
        fn is_training(&self) -> Result<bool> {
            Ok(false)
        }
        fn set_double(&self, _double: bool) -> Result<()> {
            Ok(())
        }
        /// The input width of `fc`.
        fn feature_dim(&self) -> Result<i64> {
            Ok(64)
        }
        fn spec(&self) -> Result<String> {
            Ok("use = \"fake\"\n".into())
        }
    }

    /// Random weights whose spectra differ from layer to layer; the tensors are shared with
    /// the returned host, so the test can change them in place.
    fn host(seed: i64) -> (Host, Vec<(String, Tensor)>) {
        host_of(layout(), seed)
    }

    fn host_of(layout: Layout, seed: i64) -> (Host, Vec<(String, Tensor)>) {
        tch::manual_seed(seed);
        let mut params = Vec::new();
        for (module, kind, shapes) in layout {
            for (name, shape) in shapes {
                let t = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
                params.push((format!("{module}.{name}"), module.to_string(), kind, t));
            }
        }
        let weights = params
            .iter()
            .map(|(n, _, _, t)| (n.clone(), t.shallow_clone()))
            .collect();
        (
            FakeHost::new(FakeModel { params }).classes(10).host(),
            weights,
        )
    }

    fn scheduler(config: Config, seed: i64) -> (TempBalance, Vec<(String, Tensor)>) {
        let (host, weights) = host(seed);
        (TempBalance::new(config, host).unwrap(), weights)
    }

    fn point(boundary: Boundary, epoch: u64, step: u64, base_lr: f64) -> SchedulePoint {
        SchedulePoint {
            boundary,
            epoch,
            epochs: 10,
            step,
            steps_per_epoch: 5,
            base_lr,
        }
    }

    /// Changes every weight so that any recomputed α differs from the last.
    fn perturb(weights: &[(String, Tensor)]) {
        tch::no_grad(|| {
            for (_, w) in weights {
                let noise = w.randn_like() * 0.7;
                let _ = w.shallow_clone().g_add_(&noise).square_();
            }
        });
    }

    #[test]
    fn groups_are_balanced_layers_with_the_batch_norm_after_each_conv() {
        let (mut tb, _) = scheduler(Config::default(), 1);
        let groups = tb.param_groups().unwrap();
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        // stem: first; thin: 2·9 = 18 eigenvalues; wide: 2 (1×1, in = 2); fc: last.
        assert_eq!(names, ["a.conv", "b.conv", "c.conv"]);
        assert_eq!(
            groups[0].params,
            ["a.conv.weight", "a.bn.weight", "a.bn.bias"]
        );
        assert_eq!(groups[2].params[1..], ["c.bn.weight", "c.bn.bias"]);
        // Every option changes the set as documented.
        let keep_ends = Config {
            remove_first_layer: false,
            remove_last_layer: false,
            eigs_thresh: 0,
            ..Config::default()
        };
        let (mut tb, _) = scheduler(keep_ends, 1);
        let names: Vec<String> = tb
            .param_groups()
            .unwrap()
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(
            names,
            ["stem", "a.conv", "b.conv", "c.conv", "thin", "wide", "fc"]
        );
        let fc = plan_groups(
            &tb.host.model().unwrap().parameters().unwrap(),
            &Config {
                remove_last_layer: false,
                eigs_thresh: 10,
                ..Config::default()
            },
        );
        let fc = fc.last().unwrap();
        // A Linear keeps its bias and is never joined by a BatchNorm.
        assert_eq!((fc.name.as_str(), fc.params.len()), ("fc", 2));
    }

    /// A ResNet stage's first block as the CIFAR ResNet names it.
    fn resnet_block() -> Layout {
        let conv = |o: i64, i: i64, k: i64| vec![("weight", vec![o, i, k, k])];
        let bn = |c: i64| vec![("weight", vec![c]), ("bias", vec![c])];
        vec![
            ("conv1", LayerKind::Conv2d, conv(8, 3, 3)),
            ("bn1", LayerKind::BatchNorm, bn(8)),
            ("layer2.0.conv1", LayerKind::Conv2d, conv(16, 8, 3)),
            ("layer2.0.bn1", LayerKind::BatchNorm, bn(16)),
            ("layer2.0.conv2", LayerKind::Conv2d, conv(16, 16, 3)),
            ("layer2.0.bn2", LayerKind::BatchNorm, bn(16)),
            ("layer2.0.shortcut.0", LayerKind::Conv2d, conv(16, 8, 1)),
            ("layer2.0.shortcut.1", LayerKind::BatchNorm, bn(16)),
            (
                "linear",
                LayerKind::Linear,
                vec![("weight", vec![10, 16]), ("bias", vec![10])],
            ),
        ]
    }

    #[test]
    fn batch_norms_pair_by_name_and_leave_the_shortcut_bn_in_rest() {
        let (host, _) = host_of(resnet_block(), 4);
        let params = host.model().unwrap().parameters().unwrap();
        let config = |bn_pairing| Config {
            bn_pairing,
            eigs_thresh: 0,
            ..Config::default()
        };
        let groups = |pairing| -> Vec<(String, Vec<String>)> {
            plan_groups(&params, &config(pairing))
                .into_iter()
                .map(|g| (g.name, g.params))
                .collect()
        };
        let by_name = groups(BnPairing::Name);
        assert_eq!(
            by_name[0],
            (
                "layer2.0.conv1".to_string(),
                vec![
                    "layer2.0.conv1.weight".to_string(),
                    "layer2.0.bn1.weight".into(),
                    "layer2.0.bn1.bias".into()
                ]
            )
        );
        assert_eq!(
            by_name[1].1[1..],
            ["layer2.0.bn2.weight", "layer2.0.bn2.bias"]
        );
        assert_eq!(by_name[2].0, "layer2.0.shortcut.0");
        assert_eq!(by_name[2].1, ["layer2.0.shortcut.0.weight"]);
        let grouped: Vec<&String> = by_name.iter().flat_map(|(_, p)| p).collect();
        assert!(
            !grouped.iter().any(|p| p.starts_with("layer2.0.shortcut.1")),
            "the shortcut BN stays in rest: {by_name:?}"
        );
        // By order the shortcut's BN follows its conv and joins it.
        let by_order = groups(BnPairing::Order);
        assert_eq!(
            by_order[2].1,
            [
                "layer2.0.shortcut.0.weight",
                "layer2.0.shortcut.1.weight",
                "layer2.0.shortcut.1.bias"
            ]
        );
        assert_eq!(by_order[..2], by_name[..2]);
    }

    #[test]
    fn the_metric_option_maps_alphahat_or_the_spectral_norm_instead_of_alpha() {
        let rates = |metric| {
            let (mut tb, weights) = scheduler(
                Config {
                    metric,
                    ..Config::default()
                },
                2,
            );
            tb.param_groups().unwrap();
            let rates = tb
                .learning_rates(point(Boundary::EpochStart, 0, 0, 1.0))
                .unwrap()
                .unwrap();
            (rates, weights)
        };
        let (by_norm, weights) = rates(Metric::SpectralNorm);
        let norms: Vec<f64> = ["a.conv", "b.conv", "c.conv"]
            .iter()
            .map(|layer| {
                let w = &weights
                    .iter()
                    .find(|(n, _)| *n == format!("{layer}.weight"))
                    .unwrap()
                    .1;
                analyze(w, Fit::Median).unwrap().spectral_norm
            })
            .collect();
        let (lo, hi) = (
            norms.iter().copied().fold(f64::INFINITY, f64::min),
            norms.iter().copied().fold(0.0, f64::max),
        );
        for (rate, norm) in by_norm.iter().zip(&norms) {
            let expected = 0.5 + (norm - lo) / (hi - lo);
            assert!((rate - expected).abs() < 1e-9, "{rate} vs {expected}");
        }
        assert_ne!(by_norm, rates(Metric::Alpha).0);
        assert_ne!(rates(Metric::Alphahat).0, rates(Metric::Alpha).0);
    }

    #[test]
    fn linear_map_gives_s1_eta_to_the_smallest_alpha_and_s2_eta_to_the_largest() {
        let (mut tb, weights) = scheduler(Config::default(), 2);
        tb.param_groups().unwrap();
        let eta = 0.1;
        let rates = tb
            .learning_rates(point(Boundary::EpochStart, 0, 0, eta))
            .unwrap()
            .unwrap();
        let alphas: Vec<f64> = ["a.conv", "b.conv", "c.conv"]
            .iter()
            .map(|layer| {
                let w = &weights
                    .iter()
                    .find(|(n, _)| *n == format!("{layer}.weight"))
                    .unwrap()
                    .1;
                analyze(w, Fit::Median).unwrap().alpha().unwrap()
            })
            .collect();
        let lo = alphas.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = alphas.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert!(hi > lo, "the fixture needs distinct α: {alphas:?}");
        for (rate, alpha) in rates.iter().zip(&alphas) {
            if *alpha == lo {
                assert_eq!(*rate, 0.5 * eta);
            } else if *alpha == hi {
                assert_eq!(*rate, 1.5 * eta);
            } else {
                let want = eta * (0.5 + (alpha - lo) / (hi - lo));
                assert!((rate - want).abs() < 1e-15, "{rate} vs {want}");
                assert!(*rate > 0.5 * eta && *rate < 1.5 * eta);
            }
        }
        // Later calls only rescale the cached factors by the host's global rate.
        let later = tb
            .learning_rates(point(Boundary::Step, 0, 3, eta / 4.0))
            .unwrap()
            .unwrap();
        for (a, b) in later.iter().zip(&rates) {
            assert!((a - b / 4.0).abs() < 1e-15);
        }
    }

    #[test]
    fn every_map_on_hand_made_alphas() {
        let alphas = [Some(2.0), Some(4.0), None, Some(3.0)];
        let f = rate_factors(&alphas, Assign::Linear, 0.5, 1.5);
        assert_eq!(f, [0.5, 1.5, 1.0, 1.0]);
        let f = rate_factors(&alphas, Assign::Sqrt, 0.5, 1.5);
        let total = 2f64.sqrt() + 2.0 + 3f64.sqrt();
        let want = [
            3.0 * 2f64.sqrt() / total,
            6.0 / total,
            1.0,
            3.0 * 3f64.sqrt() / total,
        ];
        f.iter()
            .zip(want)
            .for_each(|(g, w)| assert!((g - w).abs() < 1e-12));
        let f = rate_factors(&alphas, Assign::Log2, 0.5, 1.5);
        let total = 1.0 + 2.0 + 3f64.log2();
        let want = [3.0 / total, 6.0 / total, 1.0, 3.0 * 3f64.log2() / total];
        f.iter()
            .zip(want)
            .for_each(|(g, w)| assert!((g - w).abs() < 1e-12));
        let f = rate_factors(&alphas, Assign::Step, 0.5, 1.5);
        let want = [0.5, 0.5 + 2.0 / 3.0, 1.0, 0.5 + 1.0 / 3.0];
        f.iter()
            .zip(want)
            .for_each(|(g, w)| assert!((g - w).abs() < 1e-12));
    }

    #[test]
    fn equal_or_missing_alphas_never_give_nan_or_infinite_rates() {
        let cases: [&[Option<f64>]; 5] = [
            &[Some(3.0), Some(3.0), Some(3.0)],
            &[None, None],
            &[Some(f64::INFINITY), Some(f64::NAN), Some(2.0)],
            &[Some(1.0), Some(1.0)],
            &[],
        ];
        for alphas in cases {
            for assign in [Assign::Linear, Assign::Sqrt, Assign::Log2, Assign::Step] {
                let f = rate_factors(alphas, assign, 0.5, 1.5);
                assert_eq!(f.len(), alphas.len());
                assert!(
                    f.iter().all(|x| x.is_finite() && *x > 0.0),
                    "{assign:?} {alphas:?} → {f:?}"
                );
            }
            // Equal α: every layer at the global rate for the maps that normalise.
            if alphas.len() == 3 && alphas[0] == Some(3.0) {
                for assign in [Assign::Linear, Assign::Sqrt, Assign::Log2] {
                    let f = rate_factors(alphas, assign, 0.5, 1.5);
                    assert!(f.iter().all(|x| (x - 1.0).abs() < 1e-12), "{assign:?}");
                }
            }
        }
        // Layers too thin for the threshold are simply not groups.
        let (mut tb, _) = scheduler(
            Config {
                eigs_thresh: 10_000,
                ..Config::default()
            },
            3,
        );
        assert!(tb.param_groups().unwrap().is_empty());
        let rates = tb
            .learning_rates(point(Boundary::EpochStart, 0, 0, 0.1))
            .unwrap();
        assert_eq!(rates, Some(vec![]));
    }

    fn rates_at(tb: &mut TempBalance, p: SchedulePoint) -> Vec<f64> {
        tb.learning_rates(p).unwrap().unwrap()
    }

    #[test]
    fn esd_is_recomputed_only_when_due() {
        // Per epoch (default): at epoch starts only, not at steps in between.
        let (mut tb, weights) = scheduler(Config::default(), 4);
        tb.param_groups().unwrap();
        let first = rates_at(&mut tb, point(Boundary::EpochStart, 0, 0, 1.0));
        perturb(&weights);
        assert_eq!(rates_at(&mut tb, point(Boundary::Step, 0, 1, 1.0)), first);
        let second = rates_at(&mut tb, point(Boundary::EpochStart, 1, 5, 1.0));
        assert_ne!(second, first);

        // Every 2 steps: steps 0, 2, 4.
        let config = Config {
            every: 2,
            every_unit: Unit::Step,
            ..Config::default()
        };
        let (mut tb, weights) = scheduler(config, 5);
        tb.param_groups().unwrap();
        let mut previous = rates_at(&mut tb, point(Boundary::EpochStart, 0, 0, 1.0));
        for step in 1..5 {
            perturb(&weights);
            let rates = rates_at(&mut tb, point(Boundary::Step, 0, step, 1.0));
            assert_eq!(rates != previous, step % 2 == 0, "step {step}");
            previous = rates;
        }
    }

    #[test]
    fn state_round_trip_keeps_the_factors_until_the_next_recompute() {
        let config = Config {
            every: 2,
            ..Config::default()
        };
        let (mut tb, weights) = scheduler(config.clone(), 6);
        tb.param_groups().unwrap();
        let rates = rates_at(&mut tb, point(Boundary::EpochStart, 0, 0, 0.1));
        let state = tb.state().unwrap();

        // A resumed run (new weights: the checkpoint's) at epoch 1, which is not due.
        perturb(&weights);
        let mut resumed = TempBalance::new(config, tb.host).unwrap();
        resumed.param_groups().unwrap();
        resumed.load_state(state).unwrap();
        assert_eq!(resumed.alphas, tb.alphas);
        assert_eq!(resumed.computed_at_step, Some(0));
        let kept = rates_at(&mut resumed, point(Boundary::EpochStart, 1, 5, 0.1));
        assert_eq!(kept, rates);
        let due = rates_at(&mut resumed, point(Boundary::EpochStart, 2, 10, 0.1));
        assert_ne!(due, rates);

        let (mut other, _) = scheduler(
            Config {
                remove_last_layer: false,
                eigs_thresh: 0,
                ..Config::default()
            },
            6,
        );
        other.param_groups().unwrap();
        let err = other.load_state(resumed.state().unwrap()).unwrap_err();
        assert!(err.message.contains("balances"), "{}", err.message);
    }

    #[test]
    fn bad_options_are_refused_naming_the_key() {
        let (host, _) = host(0);
        let err = TempBalance::new(
            Config {
                lr_min_ratio: 2.0,
                ..Config::default()
            },
            host,
        )
        .err()
        .unwrap();
        assert!(err.message.contains("lr_max_ratio"), "{}", err.message);
        let parsed: Config = trellis_sdk::parse_config(
            "fit = \"goodness-of-fit\"\nassign = \"log2\"\nevery_unit = \"step\"",
        )
        .unwrap();
        assert_eq!(
            (parsed.fit, parsed.assign, parsed.every_unit),
            (Fit::GoodnessOfFit, Assign::Log2, Unit::Step)
        );
        assert!(trellis_sdk::parse_config::<Config>("fit = \"mean\"").is_err());
        assert!(trellis_sdk::parse_config::<Config>("lr_ratio = 1").is_err());
    }
}
