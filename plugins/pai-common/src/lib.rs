//! What the pruning-at-initialisation plugins share (METHODS.md section 0): the prunable set,
//! the exact threshold (prune exactly k = round((1 − d)·N) weights, or Synaptic-Flow's ⌊(1 − d)·N⌋
//! with `count = "floor"`, ties broken by position),
//! masks and per-layer densities, the scoring loss and its gradients, and the BatchNorm mode
//! data-dependent scores are computed in.
//!
//! Gradients are taken with `Tensor::run_backward`, which returns them instead of accumulating
//! into `.grad`: scoring leaves the model's gradients exactly as it found them.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_sdk::{bail, Batch, Error, Model, Param, PruneRequest, PruneResult, Result, Scope};

#[cfg(feature = "testing")]
pub mod testing;

/// The weights pruners score and mask: every Conv2d and Linear weight, the first conv, the 1×1
/// shortcuts and the classifier included; never biases or BatchNorm.
pub fn prunable(model: &Model) -> Result<Vec<Param>> {
    let params = model.prunable_parameters()?;
    if params.is_empty() {
        bail!("the model has no Conv2d or Linear weights to prune");
    }
    Ok(params)
}

/// How many of N weights a density prunes (`[pruner] count`, a host key the host passes on).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Count {
    /// k = round((1 − d)·N): the density reported is the nearest one to the density asked for.
    #[default]
    Round,
    /// k = ⌊(1 − d)·N⌋, Synaptic-Flow's `int((1.0 - sparsity) * numel)` on the same float product:
    /// one weight per threshold fewer at most, which SynFlow's 100 rounds compound.
    Floor,
}

impl Count {
    /// How many of `n` weights density `density` prunes.
    pub fn pruned(self, density: f64, n: i64) -> i64 {
        let k = (1.0 - density) * n as f64;
        let k = match self {
            Count::Round => k.round(),
            Count::Floor => k.floor(),
        };
        (k as i64).clamp(0, n)
    }
}

/// Refuses a request a pruner cannot honour, naming the method.
pub fn check_request(request: &PruneRequest, method: &str, needs_data: bool) -> Result<()> {
    let d = request.density;
    if !(d.is_finite() && (0.0..=1.0).contains(&d)) {
        bail!("{method}: the density to keep must be in [0, 1], got {d}");
    }
    if needs_data && request.batches.is_empty() {
        bail!("{method} scores weights on data, but the request holds no scoring batches");
    }
    Ok(())
}

/// True at the `k` lowest entries of a flat float64 tensor: exactly `k` of them, ties broken by
/// position (the earlier entry goes first), so the density a run reports is the one it asked
/// for. Reference code prunes every score ≤ the k-th value, which over-prunes on ties.
fn lowest_k(flat: &Tensor, k: i64) -> Result<Tensor> {
    let n = flat.numel() as i64;
    if k <= 0 {
        return Ok(flat.f_zeros_like()?.f_to_kind(Kind::Bool)?);
    }
    if k >= n {
        return Ok(flat.f_ones_like()?.f_to_kind(Kind::Bool)?);
    }
    let (threshold, _) = flat.f_kthvalue(k, 0, false)?;
    let mut pruned = flat.f_lt_tensor(&threshold)?;
    let needed = k - pruned.f_sum(Kind::Int64)?.int64_value(&[]);
    // Of the entries equal to the k-th value, the first `needed` by position.
    let ties = flat
        .f_eq_tensor(&threshold)?
        .f_nonzero()?
        .f_flatten(0, -1)?;
    let first_ties = ties.f_narrow(0, 0, needed)?;
    let _ = pruned.f_index_fill_(0, &first_ties, 1)?;
    Ok(pruned)
}

/// Masks keeping the highest scores at `density`, with one threshold over all scores
/// (`Scope::Global`) or one per layer (`Scope::Layer`). Each mask has its parameter's shape,
/// dtype and device, 1 = kept, 0 = pruned.
///
/// `previous` (masks of an earlier round, as in SynFlow) ranks already-pruned weights below
/// every other, so they stay pruned whatever their new score.
pub fn masks_from_scores(
    params: &[Param],
    scores: &[Tensor],
    density: f64,
    scope: Scope,
    count: Count,
    previous: Option<&[Tensor]>,
) -> Result<Vec<(String, Tensor)>> {
    if !(density.is_finite() && (0.0..=1.0).contains(&density)) {
        bail!("the density to keep must be in [0, 1], got {density}");
    }
    if scores.len() != params.len() || previous.is_some_and(|p| p.len() != params.len()) {
        bail!(
            "internal error: {} parameters, {} score tensors and {} previous masks",
            params.len(),
            scores.len(),
            previous.map_or(0, <[Tensor]>::len)
        );
    }
    let device = params
        .first()
        .map_or(tch::Device::Cpu, |p| p.tensor.device());
    let mut ranks = Vec::with_capacity(params.len());
    for (param, score) in params.iter().zip(scores) {
        if score.size() != param.tensor.size() {
            bail!(
                "the scores of `{}` have shape {:?}, the weight {:?}",
                param.name,
                score.size(),
                param.tensor.size()
            );
        }
        ranks.push(
            score
                .f_detach()?
                .f_to_kind(Kind::Double)?
                .f_to_device(device)?
                .f_flatten(0, -1)?,
        );
    }
    let pruned_before = |i: usize| -> Result<Option<Tensor>> {
        previous
            .map(|p| Ok(p[i].f_to_device(device)?.f_flatten(0, -1)?.f_eq(0)?))
            .transpose()
    };
    // One copy of every score, ranked in place: this runs 100 times on 11M weights in SynFlow.
    let pruned: Vec<Tensor> = match scope {
        Scope::Global => {
            let mut flat = Tensor::f_cat(&ranks, 0)?;
            refuse_nan(&flat, params, &ranks)?;
            if previous.is_some() {
                let before: Vec<Tensor> = (0..params.len())
                    .filter_map(|i| pruned_before(i).transpose())
                    .collect::<Result<_>>()?;
                let _ = flat.f_masked_fill_(&Tensor::f_cat(&before, 0)?, f64::NEG_INFINITY)?;
            }
            let k = count.pruned(density, flat.numel() as i64);
            let sizes: Vec<i64> = ranks.iter().map(|r| r.numel() as i64).collect();
            lowest_k(&flat, k)?.f_split_with_sizes(&sizes, 0)?
        }
        Scope::Layer => {
            let mut pruned = Vec::with_capacity(ranks.len());
            for (i, rank) in ranks.iter().enumerate() {
                refuse_nan(rank, &params[i..=i], std::slice::from_ref(rank))?;
                let rank = match pruned_before(i)? {
                    Some(before) => rank.f_masked_fill(&before, f64::NEG_INFINITY)?,
                    None => rank.shallow_clone(),
                };
                pruned.push(lowest_k(&rank, count.pruned(density, rank.numel() as i64))?);
            }
            pruned
        }
    };
    params
        .iter()
        .zip(pruned)
        .map(|(param, pruned)| {
            let mask = pruned
                .f_logical_not()?
                .f_to_kind(param.tensor.kind())?
                .f_view(param.tensor.size().as_slice())?;
            Ok((param.name.clone(), mask))
        })
        .collect()
}

/// A NaN score has no rank; name the first parameter that has one.
fn refuse_nan(flat: &Tensor, params: &[Param], ranks: &[Tensor]) -> Result<()> {
    if flat.f_isnan()?.f_any()?.int64_value(&[]) == 0 {
        return Ok(());
    }
    for (param, rank) in params.iter().zip(ranks) {
        if rank.f_isnan()?.f_any()?.int64_value(&[]) != 0 {
            bail!(
                "the scores of `{}` contain NaN: the score overflowed or the data is broken",
                param.name
            );
        }
    }
    Ok(())
}

/// Scores thresholded once (SNIP, GraSP, Magnitude, Random): masks and the named scores.
pub fn one_shot(
    params: &[Param],
    scores: Vec<Tensor>,
    request: &PruneRequest,
    count: Count,
) -> Result<PruneResult> {
    let masks = masks_from_scores(params, &scores, request.density, request.scope, count, None)?;
    Ok(PruneResult {
        masks,
        scores: named(params, scores),
    })
}

/// Pairs tensors with their parameters' names.
pub fn named(params: &[Param], tensors: Vec<Tensor>) -> Vec<(String, Tensor)> {
    params.iter().map(|p| p.name.clone()).zip(tensors).collect()
}

/// Weights kept of one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDensity {
    pub name: String,
    pub kept: i64,
    pub total: i64,
}

impl LayerDensity {
    pub fn density(&self) -> f64 {
        self.kept as f64 / self.total.max(1) as f64
    }
}

/// The density of every mask, in order.
pub fn densities(masks: &[(String, Tensor)]) -> Vec<LayerDensity> {
    masks
        .iter()
        .map(|(name, mask)| LayerDensity {
            name: name.clone(),
            kept: mask.count_nonzero(None::<i64>).int64_value(&[]),
            total: mask.numel() as i64,
        })
        .collect()
}

/// The fraction of all masked weights that are kept.
pub fn overall_density(layers: &[LayerDensity]) -> f64 {
    let kept: i64 = layers.iter().map(|l| l.kept).sum();
    let total: i64 = layers.iter().map(|l| l.total).sum();
    kept as f64 / total.max(1) as f64
}

/// splitmix64: a small, well-mixed generator, enough for noise scores and initial weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so the logarithm below is finite.
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// `n` standard normal draws (Box–Muller) from `seed`, in plain Rust rather than from
/// libtorch's global generator: the draws depend on the seed alone, not on how much of that
/// generator the run used before, and pruning leaves it untouched for training. Callers mix a
/// stream id of their own into `seed` so that two uses of the run seed never share draws.
pub fn standard_normal(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = SplitMix64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let radius = (-2.0 * rng.unit().ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * rng.unit();
        out.push(radius * angle.cos());
        out.push(radius * angle.sin());
    }
    out.truncate(n);
    out
}

/// Mean cross-entropy of the logits divided by `temperature` (1 for SNIP, 200 for GraSP), in
/// the model's current train/eval mode.
pub fn scoring_loss(model: &Model, batch: &Batch, temperature: f64) -> Result<Tensor> {
    let logits = model.forward(&batch.inputs)?.logits;
    let logits = if temperature == 1.0 {
        logits
    } else {
        logits.f_div_scalar(temperature)?
    };
    Ok(logits.f_log_softmax(-1, None::<Kind>)?.f_nll_loss(
        &batch.targets,
        None::<Tensor>,
        tch::Reduction::Mean,
        -100,
    )?)
}

/// ∂loss/∂w for every parameter, without touching their `.grad`. With `create_graph` the
/// gradients are themselves differentiable (for Hessian-vector products) and the loss's graph
/// is kept. A parameter the loss does not depend on gets zeros.
pub fn gradients(loss: &Tensor, params: &[Param], create_graph: bool) -> Result<Vec<Tensor>> {
    let inputs: Vec<&Tensor> = params.iter().map(|p| &p.tensor).collect();
    let grads = Tensor::f_run_backward(&[loss], &inputs, create_graph, create_graph)?;
    grads
        .into_iter()
        .zip(params)
        .map(|(g, p)| {
            if g.defined() {
                Ok(g)
            } else {
                Ok(p.tensor.f_zeros_like()?)
            }
        })
        .collect()
}

/// Adds `more` to `total` element-wise (an empty `total` takes `more`).
pub fn accumulate(total: &mut Vec<Tensor>, more: Vec<Tensor>) -> Result<()> {
    if total.is_empty() {
        *total = more;
        return Ok(());
    }
    for (t, m) in total.iter_mut().zip(more) {
        *t = t.f_add(&m)?;
    }
    Ok(())
}

/// How BatchNorm normalises while a pruner scores.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BnMode {
    /// Running statistics (mean 0, variance 1 at initialisation), as SF scores.
    #[default]
    Eval,
    /// Batch statistics, as the original SNIP and GraSP code scored.
    Train,
}

/// Runs `score` with BatchNorm in `mode` and leaves the model as it found it: its train/eval
/// mode, and in train mode the running statistics the forward passes update, which are saved
/// before and written back after, so that scoring never moves them.
pub fn with_bn_mode<R>(
    model: &Model,
    mode: BnMode,
    score: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let was_training = model.is_training()?;
    let saved: Vec<(Tensor, Tensor)> = match mode {
        BnMode::Eval => Vec::new(),
        BnMode::Train => model
            .buffers()?
            .into_iter()
            .map(|(_, b)| {
                let copy = b.f_detach_copy()?;
                Ok((b, copy))
            })
            .collect::<Result<_>>()?,
    };
    model.set_training(mode == BnMode::Train)?;
    let result = score();
    model.set_training(was_training)?;
    let restored: Result<()> = tch::no_grad(|| {
        for (buffer, copy) in &saved {
            buffer.shallow_clone().f_copy_(copy)?;
        }
        Ok(())
    });
    let value = result?;
    restored.map_err(|e: Error| e.context("cannot restore the BatchNorm running statistics"))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;
    use trellis_sdk::LayerKind;

    fn param(name: &str, values: &[f32], shape: &[i64]) -> Param {
        Param {
            name: name.into(),
            module: name.trim_end_matches(".weight").into(),
            kind: LayerKind::Linear,
            tensor: Tensor::from_slice(values).view(shape),
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
    }

    #[test]
    fn global_threshold_prunes_exactly_k_with_ties_broken_by_position() {
        let params = [
            param("a.weight", &[0.0; 4], &[2, 2]),
            param("b.weight", &[0.0; 3], &[3, 1]),
        ];
        // Five scores tie at 1.0; d = 0.5 of 7 prunes round(3.5) = 4: the 0.5, then the first
        // three of the tied ones in position order (a's two, then b's first).
        let scores = [
            Tensor::from_slice(&[1.0f32, 0.5, 3.0, 1.0]).view([2, 2]),
            Tensor::from_slice(&[1.0f32, 1.0, 1.0]).view([3, 1]),
        ];
        let masks =
            masks_from_scores(&params, &scores, 0.5, Scope::Global, Count::Round, None).unwrap();
        assert_eq!(flat(&masks[0].1), [0.0, 0.0, 1.0, 0.0]);
        assert_eq!(flat(&masks[1].1), [0.0, 1.0, 1.0]);
        assert_eq!(masks[1].1.size(), [3, 1]);
        assert_eq!(masks[0].1.kind(), Kind::Float);
        // SF's "≤ the k-th value" would prune six; we keep exactly round(0.5 · 7) = 3.
        let d = densities(&masks);
        assert_eq!(d.iter().map(|l| l.kept).sum::<i64>(), 3);
    }

    #[test]
    fn layer_scope_thresholds_every_layer_alone() {
        let params = [
            param("a.weight", &[0.0; 4], &[4]),
            param("b.weight", &[0.0; 4], &[4]),
        ];
        // Globally all of a would go; per layer each keeps its two best.
        let scores = [
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]),
            Tensor::from_slice(&[10.0f32, 40.0, 30.0, 20.0]),
        ];
        let masks =
            masks_from_scores(&params, &scores, 0.5, Scope::Layer, Count::Round, None).unwrap();
        assert_eq!(flat(&masks[0].1), [0.0, 0.0, 1.0, 1.0]);
        assert_eq!(flat(&masks[1].1), [0.0, 1.0, 1.0, 0.0]);
        let global =
            masks_from_scores(&params, &scores, 0.5, Scope::Global, Count::Round, None).unwrap();
        assert_eq!(flat(&global[0].1), [0.0; 4]);
        assert_eq!(flat(&global[1].1), [1.0; 4]);
    }

    #[test]
    fn previously_pruned_weights_stay_pruned() {
        let params = [param("a.weight", &[0.0; 4], &[4])];
        let scores = [Tensor::from_slice(&[9.0f32, 1.0, 2.0, 3.0])];
        let previous = [Tensor::from_slice(&[0.0f32, 1.0, 1.0, 1.0])];
        let masks = masks_from_scores(
            &params,
            &scores,
            0.5,
            Scope::Global,
            Count::Round,
            Some(&previous),
        )
        .unwrap();
        assert_eq!(flat(&masks[0].1), [0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn densities_and_counts_follow_the_convention() {
        let round = |d, n| Count::Round.pruned(d, n);
        assert_eq!(round(0.1, 1000), 900);
        assert_eq!(round(0.02, 11_164_352), 10_941_065);
        assert_eq!(round(1.0, 7), 0);
        assert_eq!(round(0.0, 7), 7);
        let params = [param("a.weight", &[0.0; 10], &[10])];
        let scores = [Tensor::arange(10, (Kind::Float, Device::Cpu))];
        for (d, kept) in [(0.0, 0), (0.25, 2), (0.3, 3), (1.0, 10)] {
            let masks =
                masks_from_scores(&params, &scores, d, Scope::Global, Count::Round, None).unwrap();
            assert_eq!(densities(&masks)[0].kept, kept, "density {d}");
        }
    }

    #[test]
    fn floor_count_prunes_synaptic_flows_number() {
        let floor = |d, n| Count::Floor.pruned(d, n);
        assert_eq!(floor(0.25, 10), 7);
        assert_eq!(floor(0.02, 11_164_352), 10_941_064);
        // SF's int((1.0 - 0.9) * 10) is int(0.9999999999999998) = 0, and so is this.
        assert_eq!(floor(0.9, 10), 0);
        assert_eq!(floor(0.0, 7), 7);
        let params = [param("a.weight", &[0.0; 10], &[10])];
        let scores = [Tensor::arange(10, (Kind::Float, Device::Cpu))];
        for (count, kept) in [(Count::Round, 2), (Count::Floor, 3)] {
            for scope in [Scope::Global, Scope::Layer] {
                let masks = masks_from_scores(&params, &scores, 0.25, scope, count, None).unwrap();
                assert_eq!(flat(&masks[0].1)[..7], [0.0; 7][..], "{count:?} {scope:?}");
                assert_eq!(densities(&masks)[0].kept, kept, "{count:?} {scope:?}");
            }
        }
    }

    #[test]
    fn nan_scores_and_bad_shapes_are_refused() {
        let params = [param("a.weight", &[0.0; 2], &[2])];
        let e = masks_from_scores(
            &params,
            &[Tensor::from_slice(&[f32::NAN, 1.0])],
            0.5,
            Scope::Global,
            Count::Round,
            None,
        )
        .unwrap_err();
        assert!(
            e.message.contains("NaN") && e.message.contains("a.weight"),
            "{e}"
        );
        let e = masks_from_scores(
            &params,
            &[Tensor::from_slice(&[1.0f32, 2.0, 3.0])],
            0.5,
            Scope::Global,
            Count::Round,
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("shape"), "{e}");
    }
}
