//! `snip`: SNIP, connection sensitivity at initialisation (Lee et al. 2019; SF `SNIP.score`),
//! METHODS.md section 1.
//!
//! 1. BatchNorm in eval mode (running statistics; mean 0, variance 1 at initialisation), or
//!    `bn_mode = "train"` for the original's batch statistics, running statistics untouched.
//! 2. For each scoring batch, L = mean cross-entropy(f(x), y); g += ∂L/∂w (summed over batches).
//! 3. score = |g ⊙ w|. SF divides by the global sum, which does not change the ranking; the raw
//!    score is what `trellis prune --scores` saves.
//! 4. One global threshold (or one per layer with `scope = "layer"`), one shot.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use trellis_pai_common::{self as pai, BnMode, Count};
use trellis_sdk::{Component, Host, Model, Plugin, PruneRequest, PruneResult, Pruner, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SnipConfig {
    /// `eval` (running statistics, SF) or `train` (batch statistics, the original code).
    pub bn_mode: BnMode,
    /// `round` (k = round((1 − d)·N), the default) or `floor` (Synaptic-Flow's ⌊(1 − d)·N⌋).
    pub count: Count,
}

pub struct Snip {
    config: SnipConfig,
    host: Host,
}

impl Component for Snip {
    const NAME: &'static str = "snip";
    const DESCRIPTION: &'static str =
        "SNIP: prune the weights of lowest connection sensitivity |g ⊙ w| (Lee et al. 2019)";
    type Config = SnipConfig;

    fn new(config: SnipConfig, host: Host) -> Result<Self> {
        Ok(Snip { config, host })
    }
}

/// |g ⊙ w| with g the cross-entropy gradient summed over the scoring batches.
pub fn snip_scores(model: &Model, request: &PruneRequest, bn_mode: BnMode) -> Result<Vec<Tensor>> {
    let params = pai::prunable(model)?;
    pai::with_bn_mode(model, bn_mode, || {
        let mut g = Vec::new();
        for batch in &request.batches {
            let loss = pai::scoring_loss(model, batch, 1.0)?;
            pai::accumulate(&mut g, pai::gradients(&loss, &params, false)?)?;
        }
        g.iter()
            .zip(&params)
            .map(|(g, p)| Ok(g.f_mul(&p.tensor.f_detach()?)?.f_abs()?))
            .collect()
    })
}

impl Pruner for Snip {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult> {
        pai::check_request(&request, "snip", true)?;
        let model = self.host.model()?;
        let params = pai::prunable(&model)?;
        let scores = snip_scores(&model, &request, self.config.bn_mode)?;
        pai::one_shot(&params, scores, &request, self.config.count)
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "SNIP pruning at initialisation"
)
.pruner::<Snip>());

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_pai_common::testing::{self as tiny, assert_close, request, values};

    fn snip(net: &tiny::Tiny, bn_mode: BnMode) -> Snip {
        Snip::new(
            SnipConfig {
                bn_mode,
                ..Default::default()
            },
            net.host(),
        )
        .unwrap()
    }

    #[test]
    fn scores_are_abs_of_gradient_summed_over_batches_times_weight() {
        let net = tiny::tiny();
        // Two batches: the gradients are summed before the absolute value, so a score differs
        // from the sum of per-batch scores wherever the two gradients disagree in sign.
        let batches = vec![tiny::batch(0, 2), tiny::batch(2, 4)];
        let result = snip(&net, BnMode::Eval)
            .prune(request(0.5, batches))
            .unwrap();
        let w = tiny::prunable_values(&tiny::WEIGHTS);
        let g0 = tiny::reference_gradients(&tiny::WEIGHTS, 0, 2, 1.0);
        let g1 = tiny::reference_gradients(&tiny::WEIGHTS, 2, 4, 1.0);
        let want: Vec<f64> = (0..w.len())
            .map(|i| ((g0[i] + g1[i]) * w[i]).abs())
            .collect();
        let got: Vec<f64> = result.scores.iter().flat_map(|(_, s)| values(s)).collect();
        assert_eq!(result.scores[0].0, "fc1.weight");
        assert_eq!(result.scores[1].0, "fc2.weight");
        assert_close(&got, &want, 1e-6);
        let summed_abs: Vec<f64> = (0..w.len())
            .map(|i| (g0[i] * w[i]).abs() + (g1[i] * w[i]).abs())
            .collect();
        assert!(
            got.iter()
                .zip(&summed_abs)
                .any(|(a, b)| (a - b).abs() > 1e-3),
            "the test batches must tell |Σg ⊙ w| from Σ|g ⊙ w|"
        );

        // Ten weights at density 0.5: the five lowest scores go.
        assert_eq!(
            tiny::pruned_positions(&result.masks),
            tiny::lowest_positions(&want, 5)
        );
        // Biases are never pruned.
        assert_eq!(result.masks.len(), 2);
    }

    #[test]
    fn scoring_leaves_weights_gradients_and_mode_alone() {
        let net = tiny::tiny();
        snip(&net, BnMode::Eval)
            .prune(request(0.3, vec![tiny::batch(0, 4)]))
            .unwrap();
        let model = net.model();
        let params = model.parameters().unwrap();
        assert_close(
            &values(&params[0].tensor),
            tiny::WEIGHTS.w1.as_flattened(),
            0.0,
        );
        assert!(params.iter().all(|p| !p.tensor.grad().defined()));
        assert!(!model.is_training().unwrap());
    }

    #[test]
    fn train_mode_scores_on_batch_statistics_without_moving_running_ones() {
        let batches = || vec![tiny::batch(0, 4)];
        let eval_model = tiny::Tiny::new(&tiny::WEIGHTS, true).model();
        let eval = snip_scores(&eval_model, &request(0.5, batches()), BnMode::Eval).unwrap();
        let train_model = tiny::Tiny::new(&tiny::WEIGHTS, true).model();
        let train = snip_scores(&train_model, &request(0.5, batches()), BnMode::Train).unwrap();
        let (eval, train) = (values(&eval[0]), values(&train[0]));
        assert!(
            eval.iter().zip(&train).any(|(a, b)| (a - b).abs() > 1e-4),
            "batch statistics must change the scores: {eval:?} vs {train:?}"
        );
        let buffers = train_model.buffers().unwrap();
        assert_close(&values(&buffers[0].1), &tiny::BN_RUNNING_MEAN, 0.0);
        assert_close(&values(&buffers[1].1), &tiny::BN_RUNNING_VAR, 0.0);
        assert!(!train_model.is_training().unwrap());
    }

    #[test]
    fn unknown_bn_mode_is_refused() {
        let e = trellis_sdk::parse_config::<SnipConfig>("bn_mode = \"batch\"").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("bn_mode"));
    }
}
