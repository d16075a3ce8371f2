//! Creates the model's tensors with the reference initialisation and records them, in PyTorch's
//! registration order, as the host sees them: every parameter with its module path and layer
//! kind, every buffer by its full name.

use tch::{Device, Kind, Tensor};
use trellis_sdk::{LayerKind, Param, Result};

use crate::layers::{BatchNorm2d, Conv2d, Linear};

pub(crate) struct Registry {
    device: Device,
    params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
}

impl Registry {
    pub fn new(device: Device) -> Registry {
        Registry {
            device,
            params: Vec::new(),
            buffers: Vec::new(),
        }
    }

    fn options(&self) -> (Kind, Device) {
        (Kind::Float, self.device)
    }

    /// Records `tensor` as the trainable `module.name`; returns the model's handle to it.
    fn param(&mut self, module: &str, name: &str, kind: LayerKind, tensor: Tensor) -> Tensor {
        let tensor = tensor.set_requires_grad(true);
        self.params.push(Param {
            name: format!("{module}.{name}"),
            module: module.to_string(),
            kind,
            tensor: tensor.shallow_clone(),
        });
        tensor
    }

    fn buffer(&mut self, module: &str, name: &str, tensor: Tensor) -> Tensor {
        self.buffers
            .push((format!("{module}.{name}"), tensor.shallow_clone()));
        tensor
    }

    /// `nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)` with
    /// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / (cout·kernel²)).
    pub fn conv2d(
        &mut self,
        module: &str,
        cin: i64,
        cout: i64,
        kernel: i64,
        stride: i64,
    ) -> Result<Conv2d> {
        let std = (2.0 / (cout * kernel * kernel) as f64).sqrt();
        let weight = Tensor::f_randn([cout, cin, kernel, kernel], self.options())? * std;
        let weight = self.param(module, "weight", LayerKind::Conv2d, weight);
        Ok(Conv2d {
            weight,
            stride,
            padding: kernel / 2,
        })
    }

    /// `nn.BatchNorm2d(channels)`: weight 1, bias 0, running mean 0 and variance 1.
    pub fn batch_norm2d(&mut self, module: &str, channels: i64) -> Result<BatchNorm2d> {
        let opts = self.options();
        let weight = Tensor::f_ones([channels], opts)?;
        let bias = Tensor::f_zeros([channels], opts)?;
        let weight = self.param(module, "weight", LayerKind::BatchNorm, weight);
        let bias = self.param(module, "bias", LayerKind::BatchNorm, bias);
        // PyTorch's `num_batches_tracked` is left out: with a fixed momentum nothing reads it.
        let running_mean = self.buffer(module, "running_mean", Tensor::f_zeros([channels], opts)?);
        let running_var = self.buffer(module, "running_var", Tensor::f_ones([channels], opts)?);
        Ok(BatchNorm2d {
            weight,
            bias,
            running_mean,
            running_var,
        })
    }

    /// `nn.Linear(inputs, outputs)` with its default weight, U(±1/√inputs), and the bias zeroed
    /// as the reference does.
    pub fn linear(&mut self, module: &str, inputs: i64, outputs: i64) -> Result<Linear> {
        let bound = 1.0 / (inputs as f64).sqrt();
        let mut weight = Tensor::f_empty([outputs, inputs], self.options())?;
        let weight = weight.f_uniform_(-bound, bound)?;
        let bias = Tensor::f_zeros([outputs], self.options())?;
        let weight = self.param(module, "weight", LayerKind::Linear, weight);
        let bias = self.param(module, "bias", LayerKind::Linear, bias);
        Ok(Linear { weight, bias })
    }

    /// Parameters and buffers, each in the order it was created.
    pub fn finish(self) -> (Vec<Param>, Vec<(String, Tensor)>) {
        (self.params, self.buffers)
    }
}
