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

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_pai_common::{self as pai, BnMode, Count};
use trellis_sdk::{
    Component, Error, Host, Model, Plugin, PruneRequest, PruneResult, Pruner, Result,
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
}

impl Default for GraspConfig {
    fn default() -> Self {
        GraspConfig {
            bn_mode: BnMode::Eval,
            temperature: 200.0,
            eps: 1e-10,
            count: Count::Round,
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

impl Pruner for Grasp {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult> {
        pai::check_request(&request, "grasp", true)?;
        let model = self.host.model()?;
        let params = pai::prunable(&model)?;
        let scores = grasp_scores(&model, &request, &self.config)?;
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

    #[test]
    fn bad_temperature_is_refused_by_key() {
        let net = tiny::tiny();
        let config = trellis_sdk::parse_config::<GraspConfig>("temperature = 0.0").unwrap();
        let e = Grasp::new(config, net.host()).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("temperature"));
    }
}
