//! A network small enough to score by hand, for the pruners' unit tests: 3 inputs → `fc1`
//! (2 units) → optional BatchNorm `bn` → ReLU → `fc2` (2 classes), float64, fixed weights, and
//! one fixed batch of four samples. [`reference_gradients`] is the plain-arithmetic gradient of
//! the same network (without BatchNorm), so tests check tensor code against formulas.

use std::cell::Cell;
use std::rc::Rc;

use tch::{Kind, Tensor};

use trellis_sdk::testing::{set_kind, FakeHost};
use trellis_sdk::{Architecture, Batch, Host, LayerKind, Model, Outputs, Param, Result};

/// The network's weights in plain numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub w1: [[f64; 3]; 2],
    pub b1: [f64; 2],
    pub w2: [[f64; 2]; 2],
    pub b2: [f64; 2],
}

pub const WEIGHTS: Weights = Weights {
    w1: [[0.5, -0.3, 0.8], [-0.6, 0.4, 0.2]],
    b1: [0.1, -0.1],
    w2: [[0.7, -0.4], [-0.2, 0.9]],
    b2: [0.05, -0.05],
};

/// Every pre-activation of `fc1` on this batch is at least 0.1 away from ReLU's kink, so
/// finite differences of the gradient stay on one linear piece.
pub const INPUTS: [[f64; 3]; 4] = [
    [1.0, 0.5, -0.3],
    [0.2, -1.0, 0.7],
    [-0.8, 0.3, 1.2],
    [0.6, 0.9, -0.3],
];
pub const TARGETS: [i64; 4] = [0, 1, 1, 0];

/// BatchNorm's affine weight, bias and running statistics in the BatchNorm variant; the running
/// mean has a negative entry so that SynFlow's absolute value of buffers shows.
pub const BN_WEIGHT: [f64; 2] = [1.2, 0.8];
pub const BN_BIAS: [f64; 2] = [0.1, -0.2];
pub const BN_RUNNING_MEAN: [f64; 2] = [0.1, -0.2];
pub const BN_RUNNING_VAR: [f64; 2] = [1.5, 0.5];
pub const BN_EPS: f64 = 1e-5;

struct TinyNet {
    params: Vec<(String, LayerKind, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    training: Cell<bool>,
}

fn tensor(values: &[f64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(values).view(shape)
}

fn weight(values: &[f64], shape: &[i64]) -> Tensor {
    tensor(values, shape).set_requires_grad(true)
}

impl TinyNet {
    fn get(&self, name: &str) -> Option<&Tensor> {
        let param = self.params.iter().find(|(n, _, _)| n == name).map(|p| &p.2);
        param.or_else(|| self.buffers.iter().find(|(n, _)| n == name).map(|b| &b.1))
    }

    fn features(&self, inputs: &Tensor) -> Tensor {
        let p = |name| self.get(name).expect("tiny net variable");
        let mut a = inputs.linear(p("fc1.weight"), Some(p("fc1.bias")));
        if self.get("bn.weight").is_some() {
            a = a.batch_norm(
                Some(p("bn.weight")),
                Some(p("bn.bias")),
                Some(p("bn.running_mean")),
                Some(p("bn.running_var")),
                self.training.get(),
                0.1,
                BN_EPS,
                false,
            );
        }
        a.relu()
    }
}

/// One tiny network, seen as a model or through a host, as often as a test needs.
#[derive(Clone)]
pub struct Tiny(Rc<TinyNet>);

struct View(Rc<TinyNet>);

impl Tiny {
    /// The network with `weights`, optionally with BatchNorm after `fc1`, in eval mode.
    pub fn new(weights: &Weights, batch_norm: bool) -> Tiny {
        Tiny(Rc::new(TinyNet::new(weights, batch_norm)))
    }

    pub fn model(&self) -> Model {
        Model::new(View(self.0.clone()))
    }

    /// A host whose model is this network: 2 classes, inputs of 3 values (told as `[3, 1, 1]`;
    /// the network takes them flat, `[B, 3]`), the whole fixed batch as its training data, no
    /// run directory.
    pub fn host(&self) -> Host {
        self.host_with_seed(0)
    }

    /// [`Tiny::host`] with the run seed `seed` (the host's default is 0).
    pub fn host_with_seed(&self, seed: u64) -> Host {
        FakeHost::new(View(self.0.clone()))
            .classes(2)
            .input_shape([3, 1, 1])
            .batches(vec![batch(0, 4)])
            .seed(seed)
            .host()
    }
}

impl Architecture for View {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let features = self.0.features(inputs);
        Ok(Outputs {
            logits: self.head(&features)?,
            features,
        })
    }

    fn head(&self, features: &Tensor) -> Result<Tensor> {
        let p = |name| self.0.get(name).expect("tiny net variable");
        Ok(features.linear(p("fc2.weight"), Some(p("fc2.bias"))))
    }

    fn parameters(&self) -> Result<Vec<Param>> {
        Ok(self
            .0
            .params
            .iter()
            .map(|(name, kind, t)| Param {
                name: name.clone(),
                module: name.rsplit_once('.').map_or("", |m| m.0).to_string(),
                kind: *kind,
                tensor: t.shallow_clone(),
            })
            .collect())
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .0
            .buffers
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect())
    }

    fn set_training(&self, train: bool) -> Result<()> {
        self.0.training.set(train);
        Ok(())
    }

    fn is_training(&self) -> Result<bool> {
        Ok(self.0.training.get())
    }

    fn set_double(&self, double: bool) -> Result<()> {
        let kind = if double { Kind::Double } else { Kind::Float };
        let all = self.0.params.iter().map(|p| &p.2);
        set_kind(all.chain(self.0.buffers.iter().map(|b| &b.1)), kind);
        Ok(())
    }

    /// `fc1`'s two units, after the optional BatchNorm and the ReLU.
    fn feature_dim(&self) -> Result<i64> {
        Ok(2)
    }

    fn spec(&self) -> Result<String> {
        Ok("use = \"tiny\"\n".into())
    }
}

impl TinyNet {
    fn new(weights: &Weights, batch_norm: bool) -> TinyNet {
        let w = weights;
        let mut params = vec![
            (
                "fc1.weight".to_string(),
                LayerKind::Linear,
                weight(w.w1.as_flattened(), &[2, 3]),
            ),
            ("fc1.bias".into(), LayerKind::Linear, weight(&w.b1, &[2])),
        ];
        let mut buffers = Vec::new();
        if batch_norm {
            params.push((
                "bn.weight".into(),
                LayerKind::BatchNorm,
                weight(&BN_WEIGHT, &[2]),
            ));
            params.push((
                "bn.bias".into(),
                LayerKind::BatchNorm,
                weight(&BN_BIAS, &[2]),
            ));
            buffers.push((
                "bn.running_mean".to_string(),
                tensor(&BN_RUNNING_MEAN, &[2]),
            ));
            buffers.push(("bn.running_var".to_string(), tensor(&BN_RUNNING_VAR, &[2])));
        }
        params.push((
            "fc2.weight".into(),
            LayerKind::Linear,
            weight(w.w2.as_flattened(), &[2, 2]),
        ));
        params.push(("fc2.bias".into(), LayerKind::Linear, weight(&w.b2, &[2])));
        TinyNet {
            params,
            buffers,
            training: Cell::new(false),
        }
    }
}

/// The tiny network with [`WEIGHTS`] and no BatchNorm.
pub fn tiny() -> Tiny {
    Tiny::new(&WEIGHTS, false)
}

/// The four samples `[first, end)` of the fixed batch.
pub fn batch(first: usize, end: usize) -> Batch {
    let rows = &INPUTS[first..end];
    Batch {
        inputs: tensor(rows.as_flattened(), &[rows.len() as i64, 3]),
        targets: Tensor::from_slice(&TARGETS[first..end]),
    }
}

/// The prunable weights `fc1.weight` then `fc2.weight`, row-major, as the pruners order them.
pub fn prunable_values(w: &Weights) -> Vec<f64> {
    w.w1.as_flattened()
        .iter()
        .chain(w.w2.as_flattened())
        .copied()
        .collect()
}

/// `w` with its prunable weights replaced by `values` (in [`prunable_values`] order).
pub fn with_prunable_values(w: &Weights, values: &[f64]) -> Weights {
    let mut out = *w;
    for (i, v) in values.iter().enumerate() {
        if i < 6 {
            out.w1[i / 3][i % 3] = *v;
        } else {
            out.w2[(i - 6) / 2][(i - 6) % 2] = *v;
        }
    }
    out
}

/// ∂/∂w of the mean cross-entropy of `logits / temperature` on samples `[first, end)`, for the
/// network without BatchNorm, in [`prunable_values`] order, by the chain rule written out:
/// δz = (softmax(z/T) − onehot(y)) / (B·T); ∂fc2 = δz hᵀ; δa = (fc2ᵀ δz) ⊙ 1[a > 0]; ∂fc1 = δa xᵀ.
pub fn reference_gradients(w: &Weights, first: usize, end: usize, temperature: f64) -> Vec<f64> {
    let mut g1 = [[0.0; 3]; 2];
    let mut g2 = [[0.0; 2]; 2];
    let n = (end - first) as f64;
    for (x, &y) in INPUTS[first..end].iter().zip(&TARGETS[first..end]) {
        let a: Vec<f64> = (0..2)
            .map(|j| (0..3).map(|k| w.w1[j][k] * x[k]).sum::<f64>() + w.b1[j])
            .collect();
        let h: Vec<f64> = a.iter().map(|v| v.max(0.0)).collect();
        let z: Vec<f64> = (0..2)
            .map(|i| ((0..2).map(|j| w.w2[i][j] * h[j]).sum::<f64>() + w.b2[i]) / temperature)
            .collect();
        let m = z[0].max(z[1]);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let dz: Vec<f64> = (0..2)
            .map(|i| (e[i] / sum - if i as i64 == y { 1.0 } else { 0.0 }) / (n * temperature))
            .collect();
        for i in 0..2 {
            for j in 0..2 {
                g2[i][j] += dz[i] * h[j];
            }
        }
        for j in 0..2 {
            let da = if a[j] > 0.0 {
                (0..2).map(|i| dz[i] * w.w2[i][j]).sum::<f64>()
            } else {
                0.0
            };
            for k in 0..3 {
                g1[j][k] += da * x[k];
            }
        }
    }
    g1.as_flattened()
        .iter()
        .chain(g2.as_flattened())
        .copied()
        .collect()
}

/// A tensor's values as float64, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).flatten(0, -1)).expect("values")
}

/// Asserts two vectors agree to `tolerance` element-wise.
pub fn assert_close(got: &[f64], want: &[f64], tolerance: f64) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tolerance,
            "got {got:?}\nwant {want:?}\n(tolerance {tolerance})"
        );
    }
}

/// The positions of the `k` lowest values, ties by position: the pruned set, worked out with a
/// plain sort rather than the library's threshold.
pub fn lowest_positions(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut pruned = order[..k].to_vec();
    pruned.sort_unstable();
    pruned
}

/// The positions where a concatenation of masks is 0.
pub fn pruned_positions(masks: &[(String, Tensor)]) -> Vec<usize> {
    let all: Vec<f64> = masks.iter().flat_map(|(_, m)| values(m)).collect();
    (0..all.len()).filter(|&i| all[i] == 0.0).collect()
}

/// A global-scope pruning request for `density` on `batches`.
pub fn request(density: f64, batches: Vec<Batch>) -> trellis_sdk::PruneRequest {
    trellis_sdk::PruneRequest {
        density,
        scope: trellis_sdk::Scope::Global,
        batches,
    }
}
