//! The pruning-at-initialisation baselines of SF (ganguli-lab/Synaptic-Flow), METHODS.md
//! sections 3 and 4: `synflow` (data-free, iterative), `magnitude` (|w|) and `random`
//! (standard normal noise). Each is thresholded like the data-dependent pruners: exactly
//! round((1 − d)·N) weights, globally or per layer.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_pai_common::{self as pai, BnMode, Count};
use trellis_sdk::{
    bail, Component, Error, Host, Model, Param, Plugin, PruneRequest, PruneResult, Pruner, Result,
    Scope,
};

// ---------------------------------------------------------------------------------------------

/// The precision SynFlow scores in.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// The model is converted to float64 while it is scored and back afterwards: the product of
    /// every layer's |w| grows with depth and width, and float64 leaves room to spare.
    #[default]
    Float64,
    /// The model's own float32, as Synaptic-Flow scores (R ≈ 1.4e27 on a full-width ResNet18 is
    /// still finite). A model that is float64 already stays float64.
    Float32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SynFlowConfig {
    /// Scoring rounds; round k of n keeps density d^(k/n).
    pub rounds: usize,
    /// `float64` (the default: R reaches about 1e28 on a Kaiming-initialised ResNet18) or
    /// `float32` (Synaptic-Flow's precision).
    pub dtype: Dtype,
    /// `round` (k = round((1 − d)·N), the default) or `floor` (Synaptic-Flow's ⌊(1 − d)·N⌋).
    pub count: Count,
}

impl Default for SynFlowConfig {
    fn default() -> Self {
        SynFlowConfig {
            rounds: 100,
            dtype: Dtype::Float64,
            count: Count::Round,
        }
    }
}

/// SynFlow (Tanaka et al. 2020; SF `SynFlow.score`), data-free:
/// 1. eval mode; every parameter and BatchNorm buffer replaced by its absolute value;
/// 2. input ones of shape [1, C, H, W], R = Σ f(1), backprop R;
/// 3. score = |∂R/∂w ⊙ w|; signs restored at the end;
/// 4. `rounds` rounds, round k keeping density d^(k/rounds) with a fresh threshold; pruned
///    weights stay pruned (they are zero in later rounds, so their score is 0), in float64
///    (`dtype = "float64"`) or, as Synaptic-Flow, in float32 (`dtype = "float32"`).
pub struct SynFlow {
    config: SynFlowConfig,
    host: Host,
}

impl Component for SynFlow {
    const NAME: &'static str = "synflow";
    const DESCRIPTION: &'static str =
        "SynFlow: iterative synaptic-flow pruning without data (Tanaka et al. 2020)";
    type Config = SynFlowConfig;

    fn new(config: SynFlowConfig, host: Host) -> Result<Self> {
        if config.rounds == 0 {
            return Err(Error::config(
                "rounds",
                "rounds must be at least 1 (SF uses 100)",
            ));
        }
        Ok(SynFlow { config, host })
    }
}

/// The model with every parameter and buffer made non-negative; `restore` puts the signs
/// back, exactly (|x|·sign(x) = x in floating point, zeros included).
struct Linearised {
    tensors: Vec<Tensor>,
    signs: Vec<Tensor>,
}

impl Linearised {
    fn new(model: &Model) -> Result<Linearised> {
        let tensors: Vec<Tensor> = model
            .parameters()?
            .into_iter()
            .map(|p| p.tensor)
            .chain(model.buffers()?.into_iter().map(|(_, b)| b))
            .collect();
        let signs = tch::no_grad(|| -> Result<Vec<Tensor>> {
            let mut signs = Vec::with_capacity(tensors.len());
            for t in &tensors {
                signs.push(t.f_sign()?);
                let _ = t.shallow_clone().f_abs_()?;
            }
            Ok(signs)
        })?;
        Ok(Linearised { tensors, signs })
    }

    fn restore(self) -> Result<()> {
        tch::no_grad(|| {
            for (t, sign) in self.tensors.iter().zip(&self.signs) {
                let _ = t.shallow_clone().f_mul_(sign)?;
            }
            Ok(())
        })
    }
}

/// The rounds on a linearised model: masks and the last round's scores.
fn synflow_rounds(
    model: &Model,
    params: &[Param],
    input_shape: &[i64],
    density: f64,
    scope: Scope,
    count: Count,
    rounds: usize,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let kind = params[0].tensor.kind();
    let device = params[0].tensor.device();
    // The weights as linearised, to mask from in every round and to put back at the end.
    let weights: Vec<Tensor> = params
        .iter()
        .map(|p| p.tensor.f_detach_copy())
        .collect::<Result<_, _>>()?;
    let mut shape = vec![1];
    shape.extend_from_slice(input_shape);
    let ones = Tensor::f_ones(shape.as_slice(), (kind, device))?;
    let mut masks: Vec<Tensor> = weights
        .iter()
        .map(Tensor::f_ones_like)
        .collect::<Result<_, _>>()?;
    let mut scores = Vec::new();
    let mut first_flow = None;
    let outcome = (|| -> Result<()> {
        for round in 1..=rounds {
            tch::no_grad(|| -> Result<()> {
                for ((p, w), m) in params.iter().zip(&weights).zip(&masks) {
                    p.tensor.shallow_clone().f_copy_(&w.f_mul(m)?)?;
                }
                Ok(())
            })?;
            let r = model.forward(&ones)?.logits.f_sum(kind)?;
            let flow = r.double_value(&[]);
            if !flow.is_finite() {
                bail!(
                    "synflow: R = Σ f(1) is {flow} in round {round}: the network overflows {kind:?}; \
                     score with dtype = \"float64\""
                );
            }
            let grads = pai::gradients(&r, params, false)?;
            scores = grads
                .iter()
                .zip(params)
                .map(|(g, p)| g.f_mul(&p.tensor.f_detach()?)?.f_abs())
                .collect::<Result<_, _>>()?;
            let density = density.powf(round as f64 / rounds as f64);
            masks = pai::masks_from_scores(params, &scores, density, scope, count, Some(&masks))?
                .into_iter()
                .map(|(_, m)| m)
                .collect();
            tracing::debug!("synflow round {round}/{rounds}: R = {flow:e}, density {density:.6}");
            let first = *first_flow.get_or_insert(flow);
            if round == rounds {
                tracing::info!(
                    "synflow: R = Σ f(1) = {first:e} in round 1, {flow:e} in round {rounds} ({kind:?})"
                );
            }
        }
        Ok(())
    })();
    tch::no_grad(|| -> Result<()> {
        for (p, w) in params.iter().zip(&weights) {
            p.tensor.shallow_clone().f_copy_(w)?;
        }
        Ok(())
    })?;
    outcome?;
    Ok((masks, scores))
}

impl Pruner for SynFlow {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult> {
        pai::check_request(&request, "synflow", false)?;
        let Some(batch) = request.batches.first() else {
            bail!("synflow takes the input shape from the scoring batch, and the request has none");
        };
        let input_shape = batch.inputs.size()[1..].to_vec();
        let model = self.host.model()?;
        let original_kind = pai::prunable(&model)?[0].tensor.kind();
        let to_double = self.config.dtype == Dtype::Float64 && original_kind != Kind::Double;
        let (masks, scores) = pai::with_bn_mode(&model, BnMode::Eval, || {
            if to_double {
                model.set_double(true)?;
            }
            let scored = (|| {
                let params = pai::prunable(&model)?;
                let linearised = Linearised::new(&model)?;
                let scored = synflow_rounds(
                    &model,
                    &params,
                    &input_shape,
                    request.density,
                    request.scope,
                    self.config.count,
                    self.config.rounds,
                );
                linearised.restore()?;
                scored
            })();
            if to_double {
                model.set_double(false)?;
            }
            scored
        })?;
        let params = pai::prunable(&model)?;
        let masks = masks
            .into_iter()
            .zip(&params)
            .map(|(m, p)| Ok((p.name.clone(), m.f_to_kind(p.tensor.kind())?)))
            .collect::<Result<_>>()?;
        Ok(PruneResult {
            masks,
            scores: pai::named(&params, scores),
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// Magnitude (SF): score = |w|, one global threshold.
pub struct Magnitude {
    count: Count,
    host: Host,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MagnitudeConfig {
    /// `round` (k = round((1 − d)·N), the default) or `floor` (Synaptic-Flow's ⌊(1 − d)·N⌋).
    pub count: Count,
}

impl Component for Magnitude {
    const NAME: &'static str = "magnitude";
    const DESCRIPTION: &'static str = "prune the weights of smallest magnitude |w|";
    type Config = MagnitudeConfig;

    fn new(config: MagnitudeConfig, host: Host) -> Result<Self> {
        Ok(Magnitude {
            count: config.count,
            host,
        })
    }
}

impl Pruner for Magnitude {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult> {
        pai::check_request(&request, "magnitude", false)?;
        let params = pai::prunable(&self.host.model()?)?;
        let scores = params
            .iter()
            .map(|p| p.tensor.f_detach()?.f_abs())
            .collect::<Result<_, _>>()?;
        pai::one_shot(&params, scores, &request, self.count)
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RandomConfig {
    /// Seed of the noise; the run's seed when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `round` (k = round((1 − d)·N), the default) or `floor` (Synaptic-Flow's ⌊(1 − d)·N⌋).
    pub count: Count,
}

/// Random (SF): score = standard normal noise, one global threshold. The noise comes from its
/// own generator seeded by `seed`, so the masks depend on the seed alone, not on how much of
/// libtorch's global generator the run has used before pruning.
pub struct Random {
    seed: u64,
    count: Count,
    host: Host,
}

impl Component for Random {
    const NAME: &'static str = "random";
    const DESCRIPTION: &'static str = "prune weights at random (standard normal scores)";
    type Config = RandomConfig;

    fn new(config: RandomConfig, host: Host) -> Result<Self> {
        Ok(Random {
            seed: config.seed.unwrap_or_else(|| host.seed()),
            count: config.count,
            host,
        })
    }
}

/// `n` standard normal draws from `seed`.
pub fn normal_noise(seed: u64, n: usize) -> Vec<f64> {
    // Keeps this stream apart from any other use of the run seed.
    const RANDOM_STREAM: u64 = 0x5241_4E44; // "RAND"
    pai::standard_normal(seed ^ RANDOM_STREAM.rotate_left(32), n)
}

impl Pruner for Random {
    fn prune(&mut self, request: PruneRequest) -> Result<PruneResult> {
        pai::check_request(&request, "random", false)?;
        let params = pai::prunable(&self.host.model()?)?;
        let total: usize = params.iter().map(|p| p.tensor.numel()).sum();
        let noise = normal_noise(self.seed, total);
        let mut offset = 0;
        let mut scores = Vec::with_capacity(params.len());
        for p in &params {
            let n = p.tensor.numel();
            let values = Tensor::from_slice(&noise[offset..offset + n]);
            scores.push(
                values
                    .f_view(p.tensor.size().as_slice())?
                    .f_to_device(p.tensor.device())?,
            );
            offset += n;
        }
        pai::one_shot(&params, scores, &request, self.count)
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "pruning-at-initialisation baselines: SynFlow, Magnitude, Random"
)
.pruner::<SynFlow>()
.pruner::<Magnitude>()
.pruner::<Random>());

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_pai_common::testing::{self as tiny, assert_close, values, Weights};

    fn request(density: f64) -> PruneRequest {
        PruneRequest {
            density,
            scope: Scope::Global,
            batches: vec![tiny::batch(0, 4)],
        }
    }

    fn scores_of(result: &PruneResult) -> Vec<f64> {
        result.scores.iter().flat_map(|(_, s)| values(s)).collect()
    }

    /// SynFlow's scores on the tiny net by hand, with `keep` (1/0 per prunable weight) applied.
    /// With |θ| and input 1 every unit is active: a_j = Σ_k |W1_jk|·keep + |b1_j|, and with
    /// BatchNorm y_j = |γ_j|(a_j − |μ_j|)/√(|σ²_j| + ε) + |β_j|; R = Σ_i (Σ_j |W2_ij| y_j + |b2_i|).
    /// ∂R/∂W2_ij = y_j; ∂R/∂W1_jk = (Σ_i |W2_ij|) · s_j with s_j = |γ_j|/√(|σ²_j| + ε) (1 without
    /// BatchNorm); score = |∂R/∂w| · |w| on kept weights, 0 on pruned ones.
    fn reference_synflow(w: &Weights, keep: &[f64], batch_norm: bool) -> Vec<f64> {
        let abs_w1 = |j: usize, k: usize| w.w1[j][k].abs() * keep[j * 3 + k];
        let abs_w2 = |i: usize, j: usize| w.w2[i][j].abs() * keep[6 + i * 2 + j];
        let scale = |j: usize| {
            if batch_norm {
                tiny::BN_WEIGHT[j].abs() / (tiny::BN_RUNNING_VAR[j].abs() + tiny::BN_EPS).sqrt()
            } else {
                1.0
            }
        };
        let y = |j: usize| {
            let a = (0..3).map(|k| abs_w1(j, k)).sum::<f64>() + w.b1[j].abs();
            if batch_norm {
                scale(j) * (a - tiny::BN_RUNNING_MEAN[j].abs()) + tiny::BN_BIAS[j].abs()
            } else {
                a
            }
        };
        let mut scores = Vec::new();
        for j in 0..2 {
            let upstream = (0..2).map(|i| abs_w2(i, j)).sum::<f64>() * scale(j);
            for k in 0..3 {
                scores.push(upstream * abs_w1(j, k));
            }
        }
        for i in 0..2 {
            for j in 0..2 {
                scores.push(y(j) * abs_w2(i, j));
            }
        }
        scores
    }

    /// The weights the network actually holds (float32-rounded when it is float32).
    fn held_weights(net: &tiny::Tiny) -> Weights {
        let params = net.model().prunable_parameters().unwrap();
        let all: Vec<f64> = params.iter().flat_map(|p| values(&p.tensor)).collect();
        tiny::with_prunable_values(&tiny::WEIGHTS, &all)
    }

    #[test]
    fn synflow_one_round_matches_the_flow_by_hand() {
        let net = tiny::tiny();
        let mut synflow = SynFlow::new(
            SynFlowConfig {
                rounds: 1,
                dtype: Dtype::Float64,
                count: Count::Round,
            },
            net.host(),
        )
        .unwrap();
        let result = synflow.prune(request(0.5)).unwrap();
        let want = reference_synflow(&tiny::WEIGHTS, &[1.0; 10], false);
        assert_close(&scores_of(&result), &want, 1e-6);
        assert_eq!(
            tiny::pruned_positions(&result.masks),
            tiny::lowest_positions(&want, 5)
        );
    }

    #[test]
    fn synflow_takes_absolute_values_of_batch_norm_buffers() {
        let net = tiny::Tiny::new(&tiny::WEIGHTS, true);
        let mut synflow = SynFlow::new(
            SynFlowConfig {
                rounds: 1,
                dtype: Dtype::Float64,
                count: Count::Round,
            },
            net.host(),
        )
        .unwrap();
        let result = synflow.prune(request(0.5)).unwrap();
        let want = reference_synflow(&tiny::WEIGHTS, &[1.0; 10], true);
        assert_close(&scores_of(&result), &want, 1e-6);
    }

    #[test]
    fn synflow_rounds_rescore_with_pruned_weights_removed_and_restore_the_model() {
        let net = tiny::Tiny::new(&tiny::WEIGHTS, true);
        net.model().set_double(false).unwrap();
        let held = held_weights(&net);
        let before: Vec<Vec<f64>> = net
            .model()
            .parameters()
            .unwrap()
            .iter()
            .map(|p| values(&p.tensor))
            .chain(
                net.model()
                    .buffers()
                    .unwrap()
                    .iter()
                    .map(|(_, b)| values(b)),
            )
            .collect();
        let mut synflow = SynFlow::new(
            SynFlowConfig {
                rounds: 3,
                dtype: Dtype::Float64,
                count: Count::Round,
            },
            net.host(),
        )
        .unwrap();
        let density = 0.2;
        let result = synflow.prune(request(density)).unwrap();

        // The same rounds by hand: round k keeps round(d^(k/3) · 10) weights; pruned ones are
        // ranked first so they stay pruned.
        let mut keep = vec![1.0; 10];
        let mut want = Vec::new();
        for round in 1..=3 {
            want = reference_synflow(&held, &keep, true);
            let ranked: Vec<f64> = want
                .iter()
                .zip(&keep)
                .map(|(s, k)| if *k == 0.0 { f64::NEG_INFINITY } else { *s })
                .collect();
            let d = density.powf(round as f64 / 3.0);
            let k = Count::Round.pruned(d, 10) as usize;
            for i in tiny::lowest_positions(&ranked, k) {
                keep[i] = 0.0;
            }
        }
        assert_close(&scores_of(&result), &want, 1e-6);
        let pruned_by_hand: Vec<usize> = (0..10).filter(|&i| keep[i] == 0.0).collect();
        assert_eq!(tiny::pruned_positions(&result.masks), pruned_by_hand);
        assert_eq!(pruned_by_hand.len(), 8);

        // Back to float32, every parameter and buffer bit for bit as before, signs included.
        let model = net.model();
        assert!(model
            .parameters()
            .unwrap()
            .iter()
            .all(|p| p.tensor.kind() == Kind::Float));
        assert!(result.masks.iter().all(|(_, m)| m.kind() == Kind::Float));
        let after: Vec<Vec<f64>> = model
            .parameters()
            .unwrap()
            .iter()
            .map(|p| values(&p.tensor))
            .chain(model.buffers().unwrap().iter().map(|(_, b)| values(b)))
            .collect();
        assert_eq!(before, after);
        assert!(!model.is_training().unwrap());
    }

    #[test]
    fn zero_rounds_are_refused() {
        let net = tiny::tiny();
        let config = trellis_sdk::parse_config::<SynFlowConfig>("rounds = 0").unwrap();
        let e = SynFlow::new(config, net.host()).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("rounds"));
    }

    #[test]
    fn synflow_in_float32_prunes_as_in_float64_where_both_are_finite() {
        let prune = |dtype| {
            let net = tiny::Tiny::new(&tiny::WEIGHTS, true);
            net.model().set_double(false).unwrap();
            let config = SynFlowConfig {
                rounds: 3,
                dtype,
                count: Count::Round,
            };
            let result = SynFlow::new(config, net.host())
                .unwrap()
                .prune(request(0.3))
                .unwrap();
            let kinds: Vec<Kind> = net
                .model()
                .parameters()
                .unwrap()
                .iter()
                .map(|p| p.tensor.kind())
                .collect();
            (result, kinds)
        };
        let (double, kinds64) = prune(Dtype::Float64);
        let (single, kinds32) = prune(Dtype::Float32);
        // The scores show the precision each was computed in; the model is float32 after both.
        assert!(double.scores.iter().all(|(_, s)| s.kind() == Kind::Double));
        assert!(single.scores.iter().all(|(_, s)| s.kind() == Kind::Float));
        assert!(kinds64.iter().chain(&kinds32).all(|k| *k == Kind::Float));
        assert_close(&scores_of(&single), &scores_of(&double), 1e-5);
        assert_eq!(
            tiny::pruned_positions(&single.masks),
            tiny::pruned_positions(&double.masks)
        );
        assert_eq!(tiny::pruned_positions(&single.masks).len(), 7);
    }

    #[test]
    fn synflow_dtype_takes_float64_or_float32_and_nothing_else() {
        let parse = trellis_sdk::parse_config::<SynFlowConfig>;
        assert_eq!(parse("").unwrap().dtype, Dtype::Float64);
        assert_eq!(parse("dtype = \"float32\"").unwrap().dtype, Dtype::Float32);
        let e = parse("dtype = \"float16\"").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("dtype"));
        assert!(
            e.message.contains("`float64`") && e.message.contains("`float32`"),
            "{e}"
        );
        // A misspelled key, and the boolean this key replaced, are refused by name.
        for (text, key) in [
            ("dtpye = \"float32\"", "dtpye"),
            ("float64 = true", "float64"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.message.contains("`dtype`"), "{e}");
        }
    }

    #[test]
    fn magnitude_prunes_the_smallest_absolute_weights() {
        let net = tiny::tiny();
        let result = Magnitude::new(MagnitudeConfig::default(), net.host())
            .unwrap()
            .prune(request(0.3))
            .unwrap();
        let want: Vec<f64> = tiny::prunable_values(&tiny::WEIGHTS)
            .iter()
            .map(|w| w.abs())
            .collect();
        assert_close(&scores_of(&result), &want, 1e-12);
        // |w| = 0.5 0.3 0.8 0.6 0.4 0.2 | 0.7 0.4 0.2 0.9: seven go, the first 0.4 and the 0.2
        // tied with it go before the later ones.
        assert_eq!(
            tiny::pruned_positions(&result.masks),
            vec![0, 1, 3, 4, 5, 7, 8]
        );
    }

    #[test]
    fn random_scores_are_seeded_standard_normal_noise() {
        let noise = normal_noise(7, 200_000);
        let mean = noise.iter().sum::<f64>() / noise.len() as f64;
        let var = noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / noise.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "mean {mean}, var {var}"
        );
        assert_eq!(normal_noise(7, 10), noise[..10]);
        assert_ne!(normal_noise(8, 10), noise[..10]);

        let net = tiny::tiny();
        let prune = |seed: Option<u64>| {
            Random::new(
                RandomConfig {
                    seed,
                    ..Default::default()
                },
                net.host(),
            )
            .unwrap()
            .prune(request(0.4))
            .unwrap()
        };
        let result = prune(Some(7));
        assert_close(&scores_of(&result), &noise[..10], 1e-12);
        let pruned = tiny::pruned_positions(&result.masks);
        assert_eq!(pruned, tiny::lowest_positions(&noise[..10], 6));
        // Without a seed, the run's (the tiny host's is 0).
        assert_close(&scores_of(&prune(None)), &normal_noise(0, 10), 1e-12);
    }
}
