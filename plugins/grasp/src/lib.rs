//! `grasp`: GraSP, gradient signal preservation (Wang et al. 2020; alecwangcq/GraSP, SF
//! `GraSP.score`), METHODS.md section 2. Temperature T = 200 on the logits, eps = 1e-10.
//!
//! 1. Pass 1: g = Σ_batches ∂CE(f(x)/T, y)/∂w, without a graph; g is a constant from then on.
//! 2. Pass 2: for each batch, h = ∂CE(f(x)/T, y)/∂w with the graph kept (`create_graph`),
//!    z = Σ_w g · h, and ∂z/∂w accumulates H·g (double backward through conv, BN and linear).
//! 3. score = w ⊙ Hg, divided by |Σ w ⊙ Hg| + eps as both reference codes do (a positive
//!    factor: the ranking is unchanged). **The lowest scores are pruned**: the paper removes the
//!    largest −w ⊙ Hg, the same set; SF had the opposite sign until commit e329c2e, which prunes
//!    the wrong weights and still trains.
//! 4. BatchNorm in eval mode by default (SF); `bn_mode = "train"` scores on batch statistics as
//!    the original code did, without moving the running statistics.
//! 5. `reinit_classifier = true` scores as the original code did by default: the classifier's
//!    weight is replaced by Xavier-normal draws (std √(2 / (fan_in + fan_out)), bias kept) for
//!    the scoring only, so its w ⊙ Hg is taken at those weights; the model keeps its own.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_pai_common::{self as pai, BnMode, Count};
use trellis_sdk::{
    Component, Error, Host, LayerKind, Model, Param, Plugin, PruneRequest, PruneResult, Pruner,
    Result,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GraspConfig {
    /// `eval` (running statistics, SF) or `train` (batch statistics, the original code).
    pub bn_mode: BnMode,
    /// The logits are divided by this before the cross-entropy.
    pub temperature: f64,
    /// Added to |Σ score| before normalising, so an exactly balanced sum does not divide by 0.
    pub eps: f64,
    /// `round` (k = round((1 − d)·N), the default) or `floor` (Synaptic-Flow's ⌊(1 − d)·N⌋).
    pub count: Count,
    /// Score with the classifier's weight re-drawn Xavier-normal from the run's seed, as the
    /// original GraSP code does in its scoring copy (SF does not); the model keeps its weights.
    pub reinit_classifier: bool,
}

impl Default for GraspConfig {
    fn default() -> Self {
        GraspConfig {
            bn_mode: BnMode::Eval,
            temperature: 200.0,
            eps: 1e-10,
            count: Count::Round,
            reinit_classifier: false,
        }
    }
}

pub struct Grasp {
    config: GraspConfig,
    host: Host,
}

impl Component for Grasp {
    const NAME: &'static str = "grasp";
    const DESCRIPTION: &'static str =
        "GraSP: prune the lowest w ⊙ Hg, preserving gradient flow (Wang et al. 2020)";
    type Config = GraspConfig;

    fn new(config: GraspConfig, host: Host) -> Result<Self> {
        if !(config.temperature.is_finite() && config.temperature > 0.0) {
            return Err(Error::config(
                "temperature",
                format!("temperature must be > 0, got {}", config.temperature),
            ));
        }
        if !(config.eps.is_finite() && config.eps >= 0.0) {
            return Err(Error::config(
                "eps",
                format!("eps must be >= 0, got {}", config.eps),
            ));
        }
        if config.reinit_classifier {
            let model = host.model()?;
            classifier(&model, &pai::prunable(&model)?)?;
        }
        Ok(Grasp { config, host })
    }
}

/// w ⊙ Hg / (|Σ w ⊙ Hg| + eps) for every prunable weight.
pub fn grasp_scores(
    model: &Model,
    request: &PruneRequest,
    config: &GraspConfig,
) -> Result<Vec<Tensor>> {
    let params = pai::prunable(model)?;
    let temperature = config.temperature;
    pai::with_bn_mode(model, config.bn_mode, || {
        let mut g = Vec::new();
        for batch in &request.batches {
            let loss = pai::scoring_loss(model, batch, temperature)?;
            pai::accumulate(&mut g, pai::gradients(&loss, &params, false)?)?;
        }
        let mut hg = Vec::new();
        for batch in &request.batches {
            let loss = pai::scoring_loss(model, batch, temperature)?;
            let h = pai::gradients(&loss, &params, true)?;
            let mut z = Tensor::f_zeros([], (loss.kind(), loss.device()))?;
            for (g, h) in g.iter().zip(&h) {
                z = z.f_add(&g.f_mul(h)?.f_sum(loss.kind())?)?;
            }
            let batch_hg = if z.requires_grad() {
                pai::gradients(&z, &params, false)?
            } else {
                // No gradient depends on the weights (a network without curvature): H = 0.
                params
                    .iter()
                    .map(|p| p.tensor.f_zeros_like())
                    .collect::<Result<_, _>>()?
            };
            pai::accumulate(&mut hg, batch_hg)?;
        }
        let raw: Vec<Tensor> = hg
            .iter()
            .zip(&params)
            .map(|(hg, p)| hg.f_mul(&p.tensor.f_detach()?))
            .collect::<Result<_, _>>()?;
        let mut total = 0.0;
        for s in &raw {
            total += s.f_sum(Kind::Double)?.double_value(&[]);
        }
        let norm = total.abs() + config.eps;
        raw.iter().map(|s| Ok(s.f_div_scalar(norm)?)).collect()
    })
}

/// The classifier: the last Linear weight that takes the pooled features, `[classes,
/// feature_dim]`. The SDK names no head parameter, and a model registers its head last.
pub fn classifier(model: &Model, params: &[Param]) -> Result<usize> {
    let features = model.feature_dim()?;
    params
        .iter()
        .rposition(|p| {
            let size = p.tensor.size();
            p.kind == LayerKind::Linear && size.len() == 2 && size[1] == features
        })
        .ok_or_else(|| {
            Error::config(
                "reinit_classifier",
                format!(
                    "reinit_classifier: the model has no Linear weight taking its {features} \
                     pooled features, so there is no classifier to re-initialise"
                ),
            )
        })
}

/// Xavier-normal values for a Linear weight `[fan_out, fan_in]` (PyTorch's `xavier_normal_`,
/// gain 1), drawn from `seed`, in the weight's dtype and on its device.
pub fn xavier_normal(weight: &Tensor, seed: u64) -> Result<Tensor> {
    // Keeps these draws apart from every other use of the run seed.
    const XAVIER_STREAM: u64 = 0x5841_5649; // "XAVI"
    let size = weight.size();
    let (fan_out, fan_in) = (size[0], size[1]);
    let std = (2.0 / (fan_in + fan_out) as f64).sqrt();
    let noise = pai::standard_normal(seed ^ XAVIER_STREAM.rotate_left(32), weight.numel());
    Ok(Tensor::from_slice(&noise)
        .f_mul_scalar(std)?
        .f_view(size.as_slice())?
        .f_to_kind(weight.kind())?
        .f_to_device(weight.device())?)
}

/// Runs `score` with the classifier's weight replaced by [`xavier_normal`] draws and puts the
/// model's own weight back afterwards, bit for bit, whether scoring succeeded or not.
fn with_reinitialised_classifier<R>(
    model: &Model,
    seed: u64,
    score: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let params = pai::prunable(model)?;
    let weight = &params[classifier(model, &params)?].tensor;
    let saved = weight.f_detach_copy()?;
    let drawn = xavier_normal(weight, seed)?;
    tch::no_grad(|| weight.shallow_clone().f_copy_(&drawn))?;
    let result = score();
    tch::no_grad(|| weight.shallow_clone().f_copy_(&saved))
        .map_err(|e| Error::from(e).context("cannot restore the classifier's weight"))?;
    result
}

impl Pruner for Grasp {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult> {
        pai::check_request(&request, "grasp", true)?;
        let model = self.host.model()?;
        let params = pai::prunable(&model)?;
        let scores = if self.config.reinit_classifier {
            with_reinitialised_classifier(&model, self.host.seed(), || {
                grasp_scores(&model, &request, &self.config)
            })?
        } else {
            grasp_scores(&model, &request, &self.config)?
        };
        // Lowest scores pruned: the shared threshold keeps the highest.
        pai::one_shot(&params, scores, &request, self.config.count)
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "GraSP pruning at initialisation"
)
.pruner::<Grasp>());

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_pai_common::testing::{self as tiny, assert_close, request, values};

    /// Σ over the two test batches of the reference gradient at `w`.
    fn total_gradient(w: &tiny::Weights, t: f64) -> Vec<f64> {
        let (a, b) = (
            tiny::reference_gradients(w, 0, 2, t),
            tiny::reference_gradients(w, 2, 4, t),
        );
        a.iter().zip(&b).map(|(a, b)| a + b).collect()
    }

    /// H·g as the directional derivative of the gradient along g, by central differences of
    /// the written-out gradient: independent of autograd's double backward.
    fn reference_hg(t: f64) -> Vec<f64> {
        let w = tiny::prunable_values(&tiny::WEIGHTS);
        let g = total_gradient(&tiny::WEIGHTS, t);
        let step = 1e-4 / g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let moved = |sign: f64| {
            let values: Vec<f64> = w.iter().zip(&g).map(|(w, g)| w + sign * step * g).collect();
            total_gradient(&tiny::with_prunable_values(&tiny::WEIGHTS, &values), t)
        };
        let (plus, minus) = (moved(1.0), moved(-1.0));
        plus.iter()
            .zip(&minus)
            .map(|(p, m)| (p - m) / (2.0 * step))
            .collect()
    }

    #[test]
    fn scores_are_normalised_w_times_hg_and_the_lowest_are_pruned() {
        let net = tiny::tiny();
        let mut grasp = Grasp::new(GraspConfig::default(), net.host()).unwrap();
        let batches = vec![tiny::batch(0, 2), tiny::batch(2, 4)];
        let result = grasp.prune(request(0.5, batches)).unwrap();

        let w = tiny::prunable_values(&tiny::WEIGHTS);
        let raw: Vec<f64> = reference_hg(200.0)
            .iter()
            .zip(&w)
            .map(|(hg, w)| hg * w)
            .collect();
        let norm = raw.iter().sum::<f64>().abs() + 1e-10;
        let want: Vec<f64> = raw.iter().map(|s| s / norm).collect();
        let got: Vec<f64> = result.scores.iter().flat_map(|(_, s)| values(s)).collect();
        assert_close(&got, &want, 1e-6);

        // Both signs occur, so "lowest" and "lowest magnitude" or "highest" are different sets.
        assert!(want.iter().any(|s| *s > 0.01) && want.iter().any(|s| *s < -0.01));
        let pruned = tiny::pruned_positions(&result.masks);
        assert_eq!(pruned, tiny::lowest_positions(&want, 5));
        let negated: Vec<f64> = want.iter().map(|s| -s).collect();
        assert_ne!(pruned, tiny::lowest_positions(&negated, 5));
        let magnitudes: Vec<f64> = want.iter().map(|s| s.abs()).collect();
        assert_ne!(pruned, tiny::lowest_positions(&magnitudes, 5));
    }

    #[test]
    fn temperature_enters_the_scores() {
        let net = tiny::tiny();
        let config = GraspConfig {
            temperature: 1.0,
            ..GraspConfig::default()
        };
        let batches = vec![tiny::batch(0, 2), tiny::batch(2, 4)];
        let scores = grasp_scores(&net.model(), &request(0.5, batches), &config).unwrap();
        let w = tiny::prunable_values(&tiny::WEIGHTS);
        let raw: Vec<f64> = reference_hg(1.0)
            .iter()
            .zip(&w)
            .map(|(h, w)| h * w)
            .collect();
        let norm = raw.iter().sum::<f64>().abs() + 1e-10;
        let want: Vec<f64> = raw.iter().map(|s| s / norm).collect();
        let got: Vec<f64> = scores.iter().flat_map(values).collect();
        assert_close(&got, &want, 1e-6);
    }

    #[test]
    fn scoring_leaves_the_model_as_it_was() {
        let net = tiny::Tiny::new(&tiny::WEIGHTS, true);
        let mut grasp = Grasp::new(
            GraspConfig {
                bn_mode: BnMode::Train,
                ..GraspConfig::default()
            },
            net.host(),
        )
        .unwrap();
        grasp.prune(request(0.5, vec![tiny::batch(0, 4)])).unwrap();
        let model = net.model();
        let params = model.parameters().unwrap();
        assert_close(
            &values(&params[0].tensor),
            tiny::WEIGHTS.w1.as_flattened(),
            0.0,
        );
        assert!(params.iter().all(|p| !p.tensor.grad().defined()));
        let buffers = model.buffers().unwrap();
        assert_close(&values(&buffers[0].1), &tiny::BN_RUNNING_MEAN, 0.0);
        assert_close(&values(&buffers[1].1), &tiny::BN_RUNNING_VAR, 0.0);
        assert!(!model.is_training().unwrap());
    }

    /// Every parameter and buffer, copied.
    fn snapshot(model: &Model) -> Vec<(String, Tensor)> {
        let params = model.parameters().unwrap().into_iter();
        params
            .map(|p| (p.name, p.tensor))
            .chain(model.buffers().unwrap())
            .map(|(n, t)| (n, t.detach_copy()))
            .collect()
    }

    #[test]
    fn reinit_classifier_scores_at_xavier_weights_and_leaves_the_model_unchanged() {
        let batches = || vec![tiny::batch(0, 2), tiny::batch(2, 4)];
        let prune = |net: &tiny::Tiny, seed: u64, reinit_classifier: bool| {
            let config = GraspConfig {
                reinit_classifier,
                ..GraspConfig::default()
            };
            Grasp::new(config, net.host_with_seed(seed))
                .unwrap()
                .prune(request(0.5, batches()))
                .unwrap()
        };
        let scores = |r: &PruneResult| -> Vec<f64> {
            r.scores.iter().flat_map(|(_, s)| values(s)).collect()
        };
        let net = tiny::Tiny::new(&tiny::WEIGHTS, true);
        let model = net.model();
        let before = snapshot(&model);
        let reinit = prune(&net, 7, true);
        for ((name, was), (_, is)) in before.iter().zip(snapshot(&model)) {
            assert!(was.equal(&is), "{name} changed");
        }
        assert!(model
            .parameters()
            .unwrap()
            .iter()
            .all(|p| !p.tensor.grad().defined()));

        // The same scores as GraSP on a copy whose classifier holds the drawn weights: Hg and
        // w ⊙ Hg are both taken at them.
        let params = pai::prunable(&model).unwrap();
        assert_eq!(classifier(&model, &params).unwrap(), 1);
        let drawn = values(&xavier_normal(&params[1].tensor, 7).unwrap());
        let mut copy_weights = tiny::WEIGHTS;
        copy_weights.w2 = [[drawn[0], drawn[1]], [drawn[2], drawn[3]]];
        let copy = tiny::Tiny::new(&copy_weights, true);
        let want = grasp_scores(
            &copy.model(),
            &request(0.5, batches()),
            &GraspConfig::default(),
        )
        .unwrap();
        let want: Vec<f64> = want.iter().flat_map(values).collect();
        assert_close(&scores(&reinit), &want, 1e-12);

        let plain = prune(&net, 7, false);
        assert!(
            scores(&plain)
                .iter()
                .zip(scores(&reinit))
                .any(|(a, b)| (a - b).abs() > 1e-3),
            "reinit_classifier changed no score"
        );
        // The draw is the run seed's: the same seed scores the same, another differently.
        let again = prune(&tiny::Tiny::new(&tiny::WEIGHTS, true), 7, true);
        assert_eq!(scores(&again), scores(&reinit));
        assert_eq!(
            tiny::pruned_positions(&again.masks),
            tiny::pruned_positions(&reinit.masks)
        );
        assert_ne!(scores(&prune(&net, 8, true)), scores(&reinit));
    }

    #[test]
    fn xavier_normal_has_the_glorot_spread() {
        let weight = Tensor::zeros([300, 200], (Kind::Float, tch::Device::Cpu));
        let drawn = xavier_normal(&weight, 3).unwrap();
        assert_eq!((drawn.size(), drawn.kind()), (weight.size(), Kind::Float));
        let v = values(&drawn);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        let want = (2.0f64 / 500.0).sqrt();
        assert!(
            mean.abs() < 0.002 && (std / want - 1.0).abs() < 0.01,
            "{mean} {std}"
        );
        assert!(drawn.equal(&xavier_normal(&weight, 3).unwrap()));
        assert!(!drawn.equal(&xavier_normal(&weight, 4).unwrap()));
    }

    #[test]
    fn bad_temperature_is_refused_by_key() {
        let net = tiny::tiny();
        let config = trellis_sdk::parse_config::<GraspConfig>("temperature = 0.0").unwrap();
        let e = Grasp::new(config, net.host()).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("temperature"));
    }
}
