//! VGG16 with BatchNorm in its CIFAR form: torchvision's `features` stack with a single linear
//! classifier, as in kuangliu/pytorch-cifar.

use anyhow::{ensure, Result};
use tch::Tensor;

use super::blocks::{
    conv_bn, convolution_layout, BatchNorm2d, Builder, Conv2d, ConvInit, ConvSpec,
};
use super::scaled;
use super::size::{dim, product, ModelSize};

/// Channel counts, with `None` for a 2×2 max-pool.
const VGG16: [Option<i64>; 18] = [
    Some(64),
    Some(64),
    None,
    Some(128),
    Some(128),
    None,
    Some(256),
    Some(256),
    Some(256),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
];

#[derive(Debug)]
enum Stage {
    ConvBnRelu(Conv2d, BatchNorm2d),
    MaxPool,
}

#[derive(Debug)]
pub(crate) struct Vgg {
    features: Vec<Stage>,
}

impl Vgg {
    /// Returns the network body and its feature dimension.
    pub fn new(
        b: &mut Builder,
        width: f64,
        in_channels: i64,
        image_size: i64,
    ) -> Result<(Self, i64)> {
        let pools = VGG16.iter().filter(|v| v.is_none()).count() as u32;
        let side = image_size / 2_i64.pow(pools);
        ensure!(
            side >= 1,
            "vgg16_bn halves the image {pools} times and needs at least {}×{} pixels, got {image_size}",
            2_i64.pow(pools),
            2_i64.pow(pools)
        );
        let mut features = Vec::new();
        let mut c_in = in_channels;
        // Indices follow PyTorch's nn.Sequential, where the ReLU and pool modules take an index
        // too, so the names match torchvision checkpoints.
        let mut index = 0;
        for entry in VGG16 {
            match entry {
                Some(c) => {
                    let c_out = scaled(c, width);
                    let spec = ConvSpec {
                        c_in,
                        c_out,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                        bias: true,
                        init: ConvInit::KaimingFanOut,
                    };
                    let conv = b.conv2d(&format!("features.{index}"), spec)?;
                    let bn = b.batch_norm2d(&format!("features.{}", index + 1), c_out)?;
                    features.push(Stage::ConvBnRelu(conv, bn));
                    c_in = c_out;
                    index += 3;
                }
                None => {
                    features.push(Stage::MaxPool);
                    index += 1;
                }
            }
        }
        Ok((Vgg { features }, c_in * side * side))
    }

    /// What [`new`](Self::new) creates, counted without allocating; returns the feature
    /// dimension (0 for an image too small, which `new` refuses).
    pub fn count(width: f64, in_channels: i64, image_size: i64, size: &mut ModelSize) -> u128 {
        let pools = VGG16.iter().filter(|v| v.is_none()).count() as u32;
        let side = dim(image_size / 2_i64.pow(pools));
        let mut c_in = dim(in_channels);
        for c in VGG16.into_iter().flatten() {
            let c_out = dim(scaled(c, width));
            size.conv(c_in, c_out, 3, true);
            size.batch_norm(c_out);
            c_in = c_out;
        }
        product(&[c_in, side, side])
    }

    /// The last convolution's activations `[B, C, H, W]`, before the final pooling (what
    /// Grad-CAM looks at).
    pub fn feature_map(&self, x: &Tensor, train: bool) -> Tensor {
        let mut out = convolution_layout(x);
        let last_conv = self.last_conv();
        for stage in &self.features[..=last_conv] {
            out = self.apply(stage, &out, train);
        }
        out
    }

    /// The stages after [`feature_map`](Self::feature_map), flattened into the head's input.
    pub fn pool(&self, map: &Tensor, train: bool) -> Tensor {
        let last_conv = self.last_conv();
        let mut out = map.shallow_clone();
        for stage in &self.features[last_conv + 1..] {
            out = self.apply(stage, &out, train);
        }
        out.flatten(1, -1)
    }

    fn last_conv(&self) -> usize {
        let conv = |s: &Stage| matches!(s, Stage::ConvBnRelu(..));
        self.features.iter().rposition(conv).unwrap_or(0)
    }

    fn apply(&self, stage: &Stage, x: &Tensor, train: bool) -> Tensor {
        match stage {
            Stage::ConvBnRelu(conv, bn) => conv_bn(conv, bn, x, train).relu(),
            Stage::MaxPool => x.max_pool2d_default(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Arch, ModelConfig, Network};
    use tch::Device;
    use trellis_sdk::LayerKind;

    #[test]
    fn vgg16_bn_parameter_count_and_names() {
        let net = Network::build(&ModelConfig::new(Arch::Vgg16Bn), 10, 3, 32, Device::Cpu).unwrap();
        // The CIFAR VGG16-BN of kuangliu/pytorch-cifar: 14.73M parameters.
        assert_eq!(net.num_parameters(), 14_728_266);
        assert_eq!(net.feature_dim(), 512);
        let layers: Vec<(&str, LayerKind)> = net
            .layers()
            .iter()
            .map(|l| (l.path.as_str(), l.kind))
            .collect();
        assert_eq!(layers.len(), 13 * 2 + 1);
        assert_eq!(layers[0], ("features.0", LayerKind::Conv2d));
        assert_eq!(layers[1], ("features.1", LayerKind::BatchNorm));
        assert_eq!(layers[2], ("features.3", LayerKind::Conv2d));
        // The first pool sits at index 6, so the third conv is at 7.
        assert_eq!(layers[4], ("features.7", LayerKind::Conv2d));
        assert_eq!(layers[24], ("features.40", LayerKind::Conv2d));
        assert_eq!(layers[25], ("features.41", LayerKind::BatchNorm));
        assert_eq!(layers[26], ("classifier", LayerKind::Linear));
        let state = net.state_dict();
        let shape = |name: &str| state.iter().find(|(n, _)| n == name).unwrap().1.size();
        assert_eq!(shape("features.0.weight"), [64, 3, 3, 3]);
        assert_eq!(shape("features.0.bias"), [64]);
        assert_eq!(shape("features.41.running_var"), [512]);
        assert_eq!(shape("classifier.weight"), [10, 512]);
        let bias = state.iter().find(|(n, _)| n == "features.40.bias").unwrap();
        assert_eq!(bias.1.abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn vgg16_bn_refuses_too_small_images() {
        let cfg = ModelConfig {
            width: 0.125,
            ..ModelConfig::new(Arch::Vgg16Bn)
        };
        let err = Network::build(&cfg, 10, 3, 16, Device::Cpu).unwrap_err();
        assert!(format!("{err:#}").contains("32×32"), "{err:#}");
        let net = Network::build(&cfg, 10, 3, 64, Device::Cpu).unwrap();
        assert_eq!(net.feature_dim(), 64 * 2 * 2);
    }
}
