//! The three layer kinds WideResNet is made of, as the tensors they hold and their forward pass.
//! They share storage with the parameters and buffers the model hands the host.

use tch::Tensor;
use trellis_sdk::Result;

/// PyTorch's `nn.BatchNorm2d` defaults.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// A convolution without bias; square kernel, same stride and padding in both directions.
pub(crate) struct Conv2d {
    pub weight: Tensor,
    pub stride: i64,
    pub padding: i64,
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (s, p) = (self.stride, self.padding);
        Ok(x.f_conv2d(&self.weight, None::<&Tensor>, [s, s], [p, p], [1, 1], 1)?)
    }
}

/// Batch normalisation over the channels of `[B, C, H, W]`: batch statistics (updating the
/// running ones with momentum 0.1) in training, the running ones in evaluation.
pub(crate) struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

impl BatchNorm2d {
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(x.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )?)
    }
}

pub(crate) struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, Some(&self.bias))?)
    }
}
