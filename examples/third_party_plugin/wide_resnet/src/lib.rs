//! WideResNet for CIFAR (Zagoruyko & Komodakis 2016, "Wide Residual Networks", BMVC), as a
//! Trellis model plugin written against the SDK alone: `[model] use = "wide_resnet"`.
//!
//! WRN-d-k follows the common PyTorch implementation (xternalz/WideResNet-pytorch) in layout,
//! initialisation and parameter names, so its `model.safetensors` lines up with that code's
//! `state_dict()` (less `num_batches_tracked`):
//!
//! ```text
//! conv1 3×3, 16 channels
//! block1, block2, block3: n = (d − 4) / 6 pre-activation basic blocks each, 16k, 32k and 64k
//!                         channels, the first block of each with stride 1, 2, 2
//! bn1 → ReLU → global average pool → fc
//! ```
//!
//! Convolutions are Kaiming-normal (fan out, ReLU gain) without bias, BatchNorm weights 1 and
//! biases 0, the classifier's bias 0. Weights come from libtorch's generator, which the host
//! seeds from `[train] seed` before it builds the model, as it does for its own architectures.

mod block;
mod layers;
mod registry;

use std::cell::Cell;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use trellis_sdk::testing::set_kind;
use trellis_sdk::{Architecture, Component, Error, Host, Outputs, Param, Plugin, Result};

use block::BasicBlock;
use layers::{BatchNorm2d, Conv2d, Linear};
use registry::Registry;

/// The `[model]` keys besides `use`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WideResNetConfig {
    /// d = 6n + 4: each of the three groups has n blocks of two 3×3 convolutions.
    pub depth: i64,
    /// k: the groups are 16k, 32k and 64k channels wide.
    pub widen_factor: i64,
    /// Dropout probability between the two convolutions of every block (the paper uses 0.3).
    pub dropout: f64,
}

impl Default for WideResNetConfig {
    /// WRN-16-4 without dropout.
    fn default() -> Self {
        WideResNetConfig {
            depth: 16,
            widen_factor: 4,
            dropout: 0.0,
        }
    }
}

impl WideResNetConfig {
    /// Blocks per group: (depth − 4) / 6.
    pub fn blocks_per_group(&self) -> i64 {
        (self.depth - 4) / 6
    }

    pub fn validate(&self) -> Result<()> {
        let depth = self.depth;
        if depth < 10 || (depth - 4) % 6 != 0 {
            return Err(Error::config(
                "depth",
                format!(
                    "depth must be 6n + 4 with n ≥ 1 blocks per group (10, 16, 22, 28, 40, …), got {depth}"
                ),
            ));
        }
        if self.widen_factor < 1 {
            return Err(Error::config(
                "widen_factor",
                format!(
                    "widen_factor must be a positive integer, got {}",
                    self.widen_factor
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "dropout",
                format!("dropout must be in [0, 1), got {}", self.dropout),
            ));
        }
        Ok(())
    }
}

pub struct WideResNet {
    config: WideResNetConfig,
    conv1: Conv2d,
    /// block1.layer.0, …, block3.layer.{n−1}, in order.
    blocks: Vec<BasicBlock>,
    bn1: BatchNorm2d,
    fc: Linear,
    params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
    training: Cell<bool>,
}

impl WideResNet {
    /// WRN-`depth`-`widen_factor` for `[B, in_channels, H, W]` images and `classes` classes.
    pub fn build(
        config: &WideResNetConfig,
        in_channels: i64,
        classes: i64,
        device: Device,
    ) -> Result<WideResNet> {
        config.validate()?;
        if in_channels < 1 || classes < 1 {
            return Err(Error::msg(format!(
                "wide_resnet needs at least one input channel and one class, got {in_channels} and {classes}"
            )));
        }
        let k = config.widen_factor;
        let widths = [16, 16 * k, 32 * k, 64 * k];
        let mut r = Registry::new(device);
        let conv1 = r.conv2d("conv1", in_channels, widths[0], 3, 1)?;
        let mut blocks = Vec::new();
        for (group, stride) in [(1, 1), (2, 2), (3, 2)] {
            for i in 0..config.blocks_per_group() {
                let (cin, stride) = if i == 0 {
                    (widths[group - 1], stride)
                } else {
                    (widths[group], 1)
                };
                let module = format!("block{group}.layer.{i}");
                blocks.push(BasicBlock::new(
                    &mut r,
                    &module,
                    cin,
                    widths[group],
                    stride,
                    config.dropout,
                )?);
            }
        }
        let bn1 = r.batch_norm2d("bn1", widths[3])?;
        let fc = r.linear("fc", widths[3], classes)?;
        let (params, buffers) = r.finish();
        Ok(WideResNet {
            config: config.clone(),
            conv1,
            blocks,
            bn1,
            fc,
            params,
            buffers,
            // Like a freshly built `nn.Module`; the host sets the mode before every pass.
            training: Cell::new(true),
        })
    }

    /// The number of trainable elements.
    pub fn num_parameters(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }
}

impl Component for WideResNet {
    const NAME: &'static str = "wide_resnet";
    const DESCRIPTION: &'static str =
        "WideResNet-d-k for CIFAR (Zagoruyko & Komodakis 2016): depth, widen_factor, dropout";
    type Config = WideResNetConfig;

    fn new(config: WideResNetConfig, host: Host) -> Result<Self> {
        let [channels, _, _] = host.input_shape();
        WideResNet::build(&config, channels, host.num_classes(), host.device())
    }
}

impl Architecture for WideResNet {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let train = self.training.get();
        let mut x = self.conv1.forward(inputs)?;
        for block in &self.blocks {
            x = block.forward(&x, train)?;
        }
        let x = self.bn1.forward(&x, train)?.f_relu()?;
        // The reference's `avg_pool2d(out, 8)` is this global pool on 32 × 32 inputs.
        let features = x.f_mean_dim(&[2i64, 3][..], false, x.kind())?;
        Ok(Outputs {
            logits: self.head(&features)?,
            features,
        })
    }

    fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.fc.forward(features)
    }

    fn parameters(&self) -> Result<Vec<Param>> {
        Ok(self
            .params
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                module: p.module.clone(),
                kind: p.kind,
                tensor: p.tensor.shallow_clone(),
            })
            .collect())
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .buffers
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect())
    }

    fn set_training(&self, train: bool) -> Result<()> {
        self.training.set(train);
        Ok(())
    }

    fn is_training(&self) -> Result<bool> {
        Ok(self.training.get())
    }

    fn set_double(&self, double: bool) -> Result<()> {
        // In place: the layers hold the very tensors (same TensorImpl) listed here.
        let tensors = self.params.iter().map(|p| &p.tensor);
        let kind = if double { Kind::Double } else { Kind::Float };
        set_kind(tensors.chain(self.buffers.iter().map(|b| &b.1)), kind);
        Ok(())
    }

    fn feature_dim(&self) -> Result<i64> {
        Ok(64 * self.config.widen_factor)
    }

    fn spec(&self) -> Result<String> {
        let c = &self.config;
        // `{:?}` keeps a decimal point (0.0, not 0): TOML reads it back as a float.
        Ok(format!(
            "use = \"{}\"\ndepth = {}\nwiden_factor = {}\ndropout = {:?}\n",
            Self::NAME,
            c.depth,
            c.widen_factor,
            c.dropout
        ))
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "WideResNet for CIFAR, built outside the Trellis workspace"
)
.model::<WideResNet>());

#[cfg(test)]
mod tests;
