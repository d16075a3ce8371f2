//! The parameterised building blocks and the registry that records them in construction order.
//!
//! The blocks own their variables directly instead of using `tch::nn`'s modules: tch registers a
//! conv's bias before its weight and initialises BatchNorm weights uniformly in [0, 1), both of
//! which differ from PyTorch, whose order and initialisation the reproduced papers assume.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;

use anyhow::{ensure, Result};
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::{self, Init, VarStore};
use tch::{Kind, Tensor};
use trellis_sdk::LayerKind;

use super::Layer;
use crate::distributed::Dist;

/// PyTorch's `nn.BatchNorm2d` defaults; tch's `BatchNormConfig` has the same values.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

thread_local! {
    /// The kind convolutions and linear layers compute in on this thread, when not their own.
    /// Per thread, like libtorch's autocast state.
    static AUTOCAST: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// Runs `f` with convolutions and linear layers computing in `kind` (`None`: in their weights'
/// kind), as `torch.autocast` does for these layers: inputs, weights and biases are cast, the
/// casts are differentiable, so gradients reach the f32 weights as f32.
pub fn autocast<T>(kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Kind>);
    impl Drop for Restore {
        fn drop(&mut self) {
            AUTOCAST.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(AUTOCAST.with(|a| a.replace(kind)));
    f()
}

thread_local! {
    /// While a training forward pass of a data-parallel run with `[distributed] sync_bn` runs:
    /// the ranks whose batches batch norm normalises over together, and the first error a layer
    /// met doing so.
    static SYNC_BN: RefCell<Option<(Rc<Dist>, Option<anyhow::Error>)>> = const { RefCell::new(None) };
}

/// Runs `f` (a training forward pass) with batch norm normalising over every rank's batch, as
/// PyTorch's SyncBatchNorm does; fails with the first error a layer met (a lost rank). The
/// backward pass of such a forward is a collective too.
pub fn sync_batch_norm<T>(dist: &Rc<Dist>, f: impl FnOnce() -> T) -> Result<T> {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            SYNC_BN.with(|s| s.borrow_mut().take());
        }
    }
    SYNC_BN.with(|s| *s.borrow_mut() = Some((dist.clone(), None)));
    let restore = Restore;
    let out = f();
    let error = SYNC_BN.with(|s| s.borrow_mut().as_mut().and_then(|(_, e)| e.take()));
    drop(restore);
    match error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The kind [`autocast`] set on this thread, if any.
pub fn autocast_kind() -> Option<Kind> {
    AUTOCAST.with(Cell::get)
}

/// `x` in the memory layout convolutional bodies run in: NHWC ("channels last") on the CPU,
/// where oneDNN's kernels for it are faster (a ResNet18 training step at width 16 by ~20 % on a
/// 2-core Xeon), and on GPUs under autocast, where reduced-precision cuDNN kernels want it.
/// Convolutions keep their input's layout, so one copy here sets it for the whole body. Only
/// strides change: values, shapes and the parameters' own layout stay as they are. (tch 0.24 has
/// no `contiguous(memory_format)`; permute, copy, permute back is what it does.)
pub fn convolution_layout(x: &Tensor) -> Tensor {
    let nhwc = x.device() == tch::Device::Cpu || autocast_kind().is_some();
    if nhwc && x.dim() == 4 {
        x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        x.shallow_clone()
    }
}

/// One variable of the network as the registry knows it.
#[derive(Debug)]
pub(crate) struct Var {
    pub name: String,
    pub layer: usize,
    pub tensor: Tensor,
    pub trainable: bool,
}

/// How a convolution's weight is initialised.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ConvInit {
    /// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, bias 0: what ResNet and VGG use.
    KaimingFanOut,
    /// `nn.Conv2d.reset_parameters`: weight and bias uniform in ±1/sqrt(fan_in).
    PyTorchDefault,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec {
    pub c_in: i64,
    pub c_out: i64,
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
    pub bias: bool,
    pub init: ConvInit,
}

#[derive(Debug)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, &self.weight, self.bias.as_ref())
    }

    /// The convolution with `weight` and `bias` in place of the layer's own.
    fn forward_with(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (x, stride) = strided_pointwise_as_subsampling(x, weight, self.stride, self.padding);
        let conv = |x: &Tensor, weight: &Tensor, bias: Option<&Tensor>| {
            x.conv2d(
                weight,
                bias,
                [stride, stride],
                [self.padding, self.padding],
                [1, 1],
                1,
            )
        };
        match autocast_kind() {
            None => conv(&x, weight, bias),
            Some(kind) => conv(
                &x.to_kind(kind),
                &weight.to_kind(kind),
                bias.map(|b| b.to_kind(kind)).as_ref(),
            ),
        }
    }
}

/// `bn(conv(x))`. In evaluation, batch norm is a fixed affine map per channel, so it is folded
/// into the convolution: weight·s and bias (b − μ)·s + β, with s = γ/√(σ² + ε) from the running
/// statistics. The same function (to float rounding) and the same gradients, one pass over the
/// activations fewer: a width-16 ResNet18 evaluates ~15 % faster on the CPU. The fold is a few
/// operations on weight-sized tensors, redone every call, so nothing goes stale when the weights
/// change.
pub(crate) fn conv_bn(conv: &Conv2d, bn: &BatchNorm2d, x: &Tensor, train: bool) -> Tensor {
    if train {
        return bn.forward_t(&conv.forward(x), true);
    }
    let scale = &bn.weight * (&bn.running_var + BN_EPS).rsqrt();
    let weight = &conv.weight * scale.view([-1, 1, 1, 1]);
    let shift = match &conv.bias {
        Some(b) => (b - &bn.running_mean) * &scale + &bn.bias,
        None => &bn.bias - &bn.running_mean * &scale,
    };
    conv.forward_with(x, &weight, Some(&shift))
}

/// A 1×1 convolution with stride s and no padding reads every s-th pixel, so on the CPU one over
/// fewer than 8 input channels runs as that subsampling followed by a stride-1 convolution: the
/// same outputs and gradients. The reason is a libtorch 2.11 bug: oneDNN's AVX2 kernel for the
/// weight gradient of a strided 1×1 convolution over fewer than 8 input channels writes past its
/// buffer (heap corruption, then a crash: `F.conv2d(x, w, None, 2)` with x channels-last
/// 40×4×32×32 and `DNNL_MAX_CPU_ISA=AVX2` aborts PyTorch itself), which a ResNet's shortcut at
/// width 0.0625 hits on every CPU without AVX-512. Only then: elsewhere the detour costs a copy of
/// the subsampled input forward and a zero-filled full-size gradient backward (2 % of a
/// width-16 ResNet18 training step).
fn strided_pointwise_as_subsampling(
    x: &Tensor,
    weight: &Tensor,
    stride: i64,
    padding: i64,
) -> (Tensor, i64) {
    let size = weight.size();
    let narrow_pointwise = size[1] < 8 && size[2..] == [1, 1];
    if narrow_pointwise && stride > 1 && padding == 0 && x.device() == tch::Device::Cpu {
        let every = |x: Tensor, dim| x.slice(dim, 0, None, stride);
        (every(every(x.shallow_clone(), 2), 3), 1)
    } else {
        (x.shallow_clone(), stride)
    }
}

#[derive(Debug)]
pub(crate) struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm2d {
    /// Sets the scale γ to 0 (the layer then outputs its shift, 0 at initialisation).
    pub fn zero_scale(&self) {
        tch::no_grad(|| {
            let _ = self.weight.shallow_clone().zero_();
        });
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            if let Some(out) = self.forward_synced(x) {
                return out;
            }
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }
}

impl BatchNorm2d {
    /// The output over every rank's batch inside [`sync_batch_norm`]; `None` outside it, or
    /// after a layer failed (the pass then goes on with local statistics and fails at its end).
    fn forward_synced(&self, x: &Tensor) -> Option<Tensor> {
        let dist = SYNC_BN.with(|s| match &*s.borrow() {
            Some((dist, None)) => Some(dist.clone()),
            _ => None,
        })?;
        let result = dist.sync_batch_norm(
            x,
            &self.weight,
            &self.bias,
            &mut self.running_mean.shallow_clone(),
            &mut self.running_var.shallow_clone(),
            BN_MOMENTUM,
            BN_EPS,
        );
        match result {
            Ok(out) => Some(out),
            Err(e) => {
                SYNC_BN.with(|s| {
                    if let Some((_, error)) = &mut *s.borrow_mut() {
                        *error = Some(e);
                    }
                });
                None
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match autocast_kind() {
            None => x.linear(&self.weight, Some(&self.bias)),
            Some(kind) => x
                .to_kind(kind)
                .linear(&self.weight.to_kind(kind), Some(&self.bias.to_kind(kind))),
        }
    }

    /// The kind of the layer's own weights.
    pub fn kind(&self) -> Kind {
        self.weight.kind()
    }
}

/// `kaiming_uniform_(a=sqrt(5))` reduces to this bound, and PyTorch's bias init uses it too.
fn pytorch_default_uniform(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Creates variables under dotted PyTorch-style paths and remembers their order, because the
/// `VarStore` keeps them in a `HashMap` and per-layer methods need a stable layer order.
pub(crate) struct Builder<'a> {
    vs: &'a VarStore,
    layers: Vec<Layer>,
    vars: Vec<Var>,
    names: HashSet<String>,
}

impl<'a> Builder<'a> {
    pub fn new(vs: &'a VarStore) -> Self {
        Builder {
            vs,
            layers: Vec::new(),
            vars: Vec::new(),
            names: HashSet::new(),
        }
    }

    pub fn finish(self) -> (Vec<Layer>, Vec<Var>) {
        (self.layers, self.vars)
    }

    fn add_layer(&mut self, path: &str, kind: LayerKind) -> Result<(usize, nn::Path<'a>)> {
        ensure!(
            !self.layers.iter().any(|l| l.path == path),
            "internal error: layer {path} registered twice"
        );
        let mut p = self.vs.root();
        for part in path.split('.') {
            p = p.sub(part);
        }
        self.layers.push(Layer {
            path: path.to_string(),
            kind,
        });
        Ok((self.layers.len() - 1, p))
    }

    fn register(
        &mut self,
        layer: usize,
        p: &nn::Path,
        name: &str,
        tensor: &Tensor,
        trainable: bool,
    ) -> Result<()> {
        let full = p.path(name);
        // The VarStore silently renames a clashing variable, which would break checkpoints.
        ensure!(
            self.names.insert(full.clone()),
            "internal error: variable {full} registered twice"
        );
        self.vars.push(Var {
            name: full,
            layer,
            tensor: tensor.shallow_clone(),
            trainable,
        });
        Ok(())
    }

    fn var(
        &mut self,
        layer: usize,
        p: &nn::Path,
        name: &str,
        dims: &[i64],
        init: Init,
    ) -> Result<Tensor> {
        let t = p.f_var(name, dims, init)?;
        self.register(layer, p, name, &t, true)?;
        Ok(t)
    }

    fn buffer(
        &mut self,
        layer: usize,
        p: &nn::Path,
        name: &str,
        dims: &[i64],
        one: bool,
    ) -> Result<Tensor> {
        let t = if one {
            p.f_ones_no_train(name, dims)?
        } else {
            p.f_zeros_no_train(name, dims)?
        };
        self.register(layer, p, name, &t, false)?;
        Ok(t)
    }

    pub fn conv2d(&mut self, path: &str, s: ConvSpec) -> Result<Conv2d> {
        let (layer, p) = self.add_layer(path, LayerKind::Conv2d)?;
        let fan_in = s.c_in * s.kernel * s.kernel;
        let (w_init, b_init) = match s.init {
            ConvInit::KaimingFanOut => (
                Init::Kaiming {
                    dist: NormalOrUniform::Normal,
                    fan: FanInOut::FanOut,
                    non_linearity: NonLinearity::ReLU,
                },
                Init::Const(0.0),
            ),
            ConvInit::PyTorchDefault => (
                pytorch_default_uniform(fan_in),
                pytorch_default_uniform(fan_in),
            ),
        };
        let weight = self.var(
            layer,
            &p,
            "weight",
            &[s.c_out, s.c_in, s.kernel, s.kernel],
            w_init,
        )?;
        let bias = if s.bias {
            Some(self.var(layer, &p, "bias", &[s.c_out], b_init)?)
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            stride: s.stride,
            padding: s.padding,
        })
    }

    pub fn batch_norm2d(&mut self, path: &str, channels: i64) -> Result<BatchNorm2d> {
        let (layer, p) = self.add_layer(path, LayerKind::BatchNorm)?;
        let weight = self.var(layer, &p, "weight", &[channels], Init::Const(1.0))?;
        let bias = self.var(layer, &p, "bias", &[channels], Init::Const(0.0))?;
        let running_mean = self.buffer(layer, &p, "running_mean", &[channels], false)?;
        let running_var = self.buffer(layer, &p, "running_var", &[channels], true)?;
        Ok(BatchNorm2d {
            weight,
            bias,
            running_mean,
            running_var,
        })
    }

    pub fn linear(&mut self, path: &str, in_dim: i64, out_dim: i64) -> Result<Linear> {
        let (layer, p) = self.add_layer(path, LayerKind::Linear)?;
        let init = pytorch_default_uniform(in_dim);
        let weight = self.var(layer, &p, "weight", &[out_dim, in_dim], init)?;
        let bias = self.var(layer, &p, "bias", &[out_dim], init)?;
        Ok(Linear { weight, bias })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Evaluation folds batch norm into the convolution: the outputs and every gradient must be
    /// those of the two layers run one after the other, with and without a convolution bias,
    /// strided and not.
    #[test]
    fn conv_bn_in_evaluation_is_batch_norm_after_the_convolution() {
        tch::manual_seed(7);
        let f = (Kind::Float, Device::Cpu);
        for (bias, stride) in [(false, 1), (true, 2)] {
            let conv = Conv2d {
                weight: Tensor::randn([6, 3, 3, 3], f).set_requires_grad(true),
                bias: bias.then(|| Tensor::randn([6], f).set_requires_grad(true)),
                stride,
                padding: 1,
            };
            let bn = BatchNorm2d {
                weight: (Tensor::rand([6], f) + 0.5).set_requires_grad(true),
                bias: Tensor::randn([6], f).set_requires_grad(true),
                running_mean: Tensor::randn([6], f),
                running_var: Tensor::rand([6], f) + 0.1,
            };
            let x = convolution_layout(&Tensor::randn([4, 3, 8, 8], f)).set_requires_grad(true);
            let leaves = || {
                let mut all = vec![&x, &conv.weight, &bn.weight, &bn.bias];
                all.extend(conv.bias.as_ref());
                all
            };
            let grads = |out: &Tensor| {
                // A weighting that is not symmetric, so that every gradient is tested.
                let w = Tensor::arange(out.numel() as i64, f).view_as(out).sin();
                Tensor::run_backward(&[(out * w).sum(Kind::Float)], &leaves(), false, false)
            };
            let folded = conv_bn(&conv, &bn, &x, false);
            let separate = bn.forward_t(&conv.forward(&x), false);
            assert_eq!(folded.size(), separate.size());
            assert!(max_difference(&folded, &separate) < 1e-5, "bias {bias}");
            for (a, b) in grads(&folded).iter().zip(&grads(&separate)) {
                assert!(max_difference(a, b) < 1e-4, "bias {bias}: gradient differs");
            }
        }
    }
}
