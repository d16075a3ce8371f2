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

/// Where the `k` lowest of some keys ([`order_key`]s) end: every key below `threshold`, and of
/// the keys equal to it the first `ties` by position. Exactly `k` entries, so the density a run
/// reports is the one it asked for; reference code prunes every score ≤ the k-th value, which
/// over-prunes on ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    threshold: u64,
    ties: usize,
}

impl Cut {
    /// The cut at the `k` lowest of `keys`, found exactly by a radix select: a histogram of the
    /// top 16 bits, then a selection among the keys of the one bucket that holds the k-th. Two
    /// linear passes and no copy of the keys: SynFlow cuts a full-width ResNet18's 11.2 M
    /// scores 100 times, and libtorch's `kthvalue` moves an index along with every value.
    fn at(keys: &[u64], k: usize) -> Cut {
        if k == 0 {
            return Cut {
                threshold: 0,
                ties: 0,
            };
        }
        if k >= keys.len() {
            return Cut {
                threshold: u64::MAX,
                ties: keys.len(),
            };
        }
        const SHIFT: u32 = 48;
        let mut counts = vec![0usize; 1 << (64 - SHIFT)];
        for &key in keys {
            counts[(key >> SHIFT) as usize] += 1;
        }
        let mut below = 0;
        let mut bucket = 0;
        for (b, &count) in counts.iter().enumerate() {
            if below + count >= k {
                bucket = b as u64;
                break;
            }
            below += count;
        }
        let mut candidates: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|&key| key >> SHIFT == bucket)
            .collect();
        let (lower, &mut threshold, _) = candidates.select_nth_unstable(k - below - 1);
        let below = below + lower.iter().filter(|&&key| key < threshold).count();
        Cut {
            threshold,
            ties: k - below,
        }
    }

    /// Walks keys in position order (across calls, for a cut over several tensors): whether
    /// each is among the `k` lowest.
    fn pruned(&self) -> impl FnMut(u64) -> bool {
        let (threshold, mut ties) = (self.threshold, self.ties);
        move |key| {
            let tie = key == threshold && ties > 0;
            ties -= usize::from(tie);
            key < threshold || tie
        }
    }
}

/// An integer whose order is the order of the floats: sign bit flipped for positives, every bit
/// for negatives. −0 ranks as 0, as the comparison of floats has it.
fn order_key(value: f64) -> u64 {
    let value = if value == 0.0 { 0.0 } else { value };
    let bits = value.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    }
}

/// The values of `t` (any float kind) in order, as f64, a chunk at a time: no full-size copy.
fn for_each_value(t: &Tensor, mut f: impl FnMut(f64)) -> Result<()> {
    const CHUNK: i64 = 1 << 16;
    let flat = t
        .f_detach()?
        .f_to_device(tch::Device::Cpu)?
        .f_contiguous()?
        .f_flatten(0, -1)?;
    let n = flat.numel() as i64;
    let mut start = 0;
    let single = flat.kind() == Kind::Float;
    let mut f32s = vec![0f32; if single { CHUNK as usize } else { 0 }];
    let mut f64s = vec![0f64; if single { 0 } else { CHUNK as usize }];
    while start < n {
        let len = CHUNK.min(n - start);
        let chunk = flat.f_narrow(0, start, len)?;
        if single {
            chunk.f_copy_data(&mut f32s, len as usize)?;
            f32s[..len as usize].iter().for_each(|&v| f(f64::from(v)));
        } else {
            chunk
                .f_to_kind(Kind::Double)?
                .f_copy_data(&mut f64s, len as usize)?;
            f64s[..len as usize].iter().for_each(|&v| f(v));
        }
        start += len;
    }
    Ok(())
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
    // Every score's rank key in one vector, ranked on the host: one pass over 11.2 M scores,
    // where SynFlow's 100 rounds would otherwise pay for a chain of libtorch passes each time.
    let total: usize = params.iter().map(|p| p.tensor.numel()).sum();
    let mut keys = Vec::with_capacity(total);
    let mut sizes = Vec::with_capacity(params.len());
    for (i, (param, score)) in params.iter().zip(scores).enumerate() {
        if score.size() != param.tensor.size() {
            bail!(
                "the scores of `{}` have shape {:?}, the weight {:?}",
                param.name,
                score.size(),
                param.tensor.size()
            );
        }
        let start = keys.len();
        let mut nan = false;
        for_each_value(score, |v| {
            nan |= v.is_nan();
            keys.push(order_key(v));
        })?;
        // A NaN score has no rank.
        if nan {
            bail!(
                "the scores of `{}` contain NaN: the score overflowed or the data is broken",
                param.name
            );
        }
        // Weights an earlier round pruned rank below every other, so they stay pruned.
        if let Some(previous) = previous {
            let lowest = order_key(f64::NEG_INFINITY);
            let mut key = keys[start..].iter_mut();
            for_each_value(&previous[i], |m| {
                if let Some(key) = key.next() {
                    if m == 0.0 {
                        *key = lowest;
                    }
                }
            })?;
        }
        sizes.push(keys.len() - start);
    }
    let cuts: Vec<Cut> = match scope {
        Scope::Global => vec![Cut::at(
            &keys,
            count.pruned(density, keys.len() as i64) as usize,
        )],
        Scope::Layer => {
            let mut start = 0;
            sizes
                .iter()
                .map(|&size| {
                    let layer = &keys[start..start + size];
                    start += size;
                    Cut::at(layer, count.pruned(density, size as i64) as usize)
                })
                .collect()
        }
    };
    // The global cut is walked across the layers in order (its ties run on from one layer into
    // the next); a layer's own cut starts afresh at each layer.
    let mut global = match scope {
        Scope::Global => Some(cuts[0].pruned()),
        Scope::Layer => None,
    };
    let mut start = 0;
    params
        .iter()
        .zip(sizes)
        .enumerate()
        .map(|(i, (param, size))| {
            let layer = &keys[start..start + size];
            start += size;
            let mut own;
            let pruned: &mut dyn FnMut(u64) -> bool = match &mut global {
                Some(global) => global,
                None => {
                    own = cuts[i].pruned();
                    &mut own
                }
            };
            let kept: Vec<f32> = layer
                .iter()
                .map(|&key| f32::from(u8::from(!pruned(key))))
                .collect();
            let mask = Tensor::f_from_slice(&kept)?
                .f_view(param.tensor.size().as_slice())?
                .f_to_kind(param.tensor.kind())?
                .f_to_device(param.tensor.device())?;
            Ok((param.name.clone(), mask))
        })
        .collect()
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

    /// Against the definition: stable-sort (value, position), the first k, on values with many
    /// ties, negative and positive zeros, infinities and every k.
    #[test]
    fn exact_selection_takes_the_k_lowest_with_ties_by_position() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as i64
        };
        for n in [2usize, 3, 17, 100, 1000] {
            let values: Vec<f64> = (0..n)
                .map(|_| match next() % 7 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f64::NEG_INFINITY,
                    3 => f64::INFINITY,
                    _ => (next() % 9 - 4) as f64 * 0.25,
                })
                .collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| values[a].partial_cmp(&values[b]).unwrap().then(a.cmp(&b)));
            let keys: Vec<u64> = values.iter().map(|&v| order_key(v)).collect();
            let lowest_k_of = |k: usize| -> Vec<bool> {
                let mut pruned = Cut::at(&keys, k).pruned();
                keys.iter().map(|&key| pruned(key)).collect()
            };
            assert_eq!(lowest_k_of(0), vec![false; n]);
            assert_eq!(lowest_k_of(n), vec![true; n]);
            for k in 1..n {
                let mut expected = vec![false; n];
                for &i in &order[..k] {
                    expected[i] = true;
                }
                assert_eq!(lowest_k_of(k), expected, "n = {n}, k = {k}");
            }
        }
    }

    /// Spread over many exponents (many histogram buckets), against a full sort.
    #[test]
    fn exact_selection_over_many_buckets() {
        let mut state = 99u64;
        let values: Vec<f64> = (0..100_000)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
                let sign = if i % 3 == 0 { -1.0 } else { 1.0 };
                sign * (unit * 40.0 - 20.0).exp2()
            })
            .collect();
        let keys: Vec<u64> = values.iter().map(|&v| order_key(v)).collect();
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        for k in [1, 12_345, 50_000, 99_999] {
            let cut = Cut::at(&keys, k);
            assert_eq!(cut.threshold, order_key(sorted[k - 1]), "k = {k}");
            let mut is_pruned = cut.pruned();
            let pruned: Vec<bool> = keys.iter().map(|&key| is_pruned(key)).collect();
            assert_eq!(pruned.iter().filter(|&&p| p).count(), k);
            let largest_pruned = values
                .iter()
                .zip(&pruned)
                .filter(|(_, &p)| p)
                .map(|(&v, _)| v)
                .fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(largest_pruned, sorted[k - 1]);
        }
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
