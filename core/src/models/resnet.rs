//! CIFAR ResNets in the layout of kuangliu/pytorch-cifar, so checkpoints and per-layer results
//! line up with the many papers that train on it.

use anyhow::Result;
use tch::Tensor;

use super::blocks::{
    conv_bn, convolution_layout, BatchNorm2d, Builder, Conv2d, ConvInit, ConvSpec,
};
use super::scaled;
use super::size::{dim, ModelSize};

fn conv(c_in: i64, c_out: i64, kernel: i64, stride: i64) -> ConvSpec {
    ConvSpec {
        c_in,
        c_out,
        kernel,
        stride,
        // Keeps 3×3 convs size-preserving (and halving at stride 2); the 1×1 shortcut needs none.
        padding: kernel / 2,
        bias: false,
        init: ConvInit::KaimingFanOut,
    }
}

#[derive(Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    shortcut: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(b: &mut Builder, path: &str, c_in: i64, c_out: i64, stride: i64) -> Result<Self> {
        let conv1 = b.conv2d(&format!("{path}.conv1"), conv(c_in, c_out, 3, stride))?;
        let bn1 = b.batch_norm2d(&format!("{path}.bn1"), c_out)?;
        let conv2 = b.conv2d(&format!("{path}.conv2"), conv(c_out, c_out, 3, 1))?;
        let bn2 = b.batch_norm2d(&format!("{path}.bn2"), c_out)?;
        let shortcut = if stride != 1 || c_in != c_out {
            let c = b.conv2d(&format!("{path}.shortcut.0"), conv(c_in, c_out, 1, stride))?;
            let n = b.batch_norm2d(&format!("{path}.shortcut.1"), c_out)?;
            Some((c, n))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1,
            bn1,
            conv2,
            bn2,
            shortcut,
        })
    }

    /// `zero_init_residual`: the block starts as its shortcut, the residual branch scaled by 0.
    fn zero_residual(&self) {
        self.bn2.zero_scale();
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let out = conv_bn(&self.conv1, &self.bn1, x, train).relu();
        let out = conv_bn(&self.conv2, &self.bn2, &out, train);
        let short = match &self.shortcut {
            Some((c, n)) => conv_bn(c, n, x, train),
            None => x.shallow_clone(),
        };
        (out + short).relu()
    }
}

#[derive(Debug)]
pub(crate) struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    blocks: Vec<BasicBlock>,
}

impl ResNet {
    /// Returns the network body and its feature dimension. `zero_init_residual` starts the
    /// second BatchNorm of every block at scale 0 (Goyal et al.; the linearized-networks recipe).
    pub fn new(
        b: &mut Builder,
        depths: [usize; 4],
        width: f64,
        in_channels: i64,
        zero_init_residual: bool,
    ) -> Result<(Self, i64)> {
        let stem = scaled(64, width);
        let conv1 = b.conv2d("conv1", conv(in_channels, stem, 3, 1))?;
        let bn1 = b.batch_norm2d("bn1", stem)?;
        let mut blocks = Vec::new();
        let mut c_in = stem;
        for (stage, (&depth, base)) in depths.iter().zip([64, 128, 256, 512]).enumerate() {
            let c_out = scaled(base, width);
            for i in 0..depth {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let path = format!("layer{}.{i}", stage + 1);
                blocks.push(BasicBlock::new(b, &path, c_in, c_out, stride)?);
                c_in = c_out;
            }
        }
        if zero_init_residual {
            blocks.iter().for_each(BasicBlock::zero_residual);
        }
        Ok((ResNet { conv1, bn1, blocks }, c_in))
    }

    /// What [`new`](Self::new) creates, counted without allocating; returns the feature
    /// dimension too.
    pub fn count(depths: [usize; 4], width: f64, in_channels: i64, size: &mut ModelSize) -> u128 {
        let stem = dim(scaled(64, width));
        size.conv(dim(in_channels), stem, 3, false);
        size.batch_norm(stem);
        let mut c_in = stem;
        for (stage, (&depth, base)) in depths.iter().zip([64, 128, 256, 512]).enumerate() {
            let c_out = dim(scaled(base, width));
            for i in 0..depth {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                size.conv(c_in, c_out, 3, false);
                size.batch_norm(c_out);
                size.conv(c_out, c_out, 3, false);
                size.batch_norm(c_out);
                if stride != 1 || c_in != c_out {
                    size.conv(c_in, c_out, 1, false);
                    size.batch_norm(c_out);
                }
                c_in = c_out;
            }
        }
        c_in
    }

    /// The last stage's activations `[B, C, H, W]`, before pooling (what Grad-CAM looks at).
    pub fn feature_map(&self, x: &Tensor, train: bool) -> Tensor {
        let x = convolution_layout(x);
        let mut out = conv_bn(&self.conv1, &self.bn1, &x, train).relu();
        for block in &self.blocks {
            out = block.forward_t(&out, train);
        }
        out
    }

    /// Pools a [`feature_map`](Self::feature_map) into the features the head takes.
    pub fn pool(map: &Tensor) -> Tensor {
        // Equals kuangliu's avg_pool2d(out, 4) at 32×32 and still works at other input sizes.
        map.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Arch, ModelConfig, Network};
    use tch::{Device, Kind, Tensor};
    use trellis_sdk::LayerKind;

    fn resnet(arch: Arch, width: f64) -> Network {
        let cfg = ModelConfig {
            width,
            ..ModelConfig::new(arch)
        };
        Network::build(&cfg, 10, 3, 32, Device::Cpu).unwrap()
    }

    fn param_shape(net: &Network, name: &str) -> Vec<i64> {
        let found = net.state_dict().into_iter().find(|(n, _)| n == name);
        found
            .unwrap_or_else(|| panic!("no variable {name}"))
            .1
            .size()
    }

    #[test]
    fn resnet18_parameter_count_and_names() {
        let net = resnet(Arch::Resnet18, 1.0);
        assert_eq!(net.num_parameters(), 11_173_962);
        assert_eq!(net.feature_dim(), 512);
        let params: Vec<String> = net.parameters().into_iter().map(|(n, _, _)| n).collect();
        let buffers: Vec<String> = net.buffers().into_iter().map(|(n, _)| n).collect();
        for name in [
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "layer1.0.conv1.weight",
            "layer1.1.bn2.bias",
            "layer2.0.shortcut.0.weight",
            "layer3.0.shortcut.1.weight",
            "layer4.0.shortcut.1.bias",
            "layer4.1.conv2.weight",
            "linear.weight",
            "linear.bias",
        ] {
            assert!(params.iter().any(|n| n == name), "missing parameter {name}");
        }
        for name in [
            "bn1.running_mean",
            "bn1.running_var",
            "layer2.1.bn1.running_var",
            "layer4.0.shortcut.1.running_mean",
        ] {
            assert!(buffers.iter().any(|n| n == name), "missing buffer {name}");
        }
        // Identity shortcuts have no parameters, and the stem conv has no bias.
        assert!(!params.iter().any(|n| n.starts_with("layer1.0.shortcut")));
        assert!(!params
            .iter()
            .any(|n| n == "conv1.bias" || n == "layer1.0.conv1.bias"));
        assert_eq!(
            param_shape(&net, "layer2.0.shortcut.0.weight"),
            [128, 64, 1, 1]
        );
        assert_eq!(param_shape(&net, "linear.weight"), [10, 512]);
        // 20 BatchNorms (17 in blocks and stem, 3 in shortcuts), two buffers each.
        assert_eq!(buffers.len(), 40);
    }

    #[test]
    fn resnet34_parameter_count() {
        let net = resnet(Arch::Resnet34, 1.0);
        assert_eq!(net.num_parameters(), 21_282_122);
        let params: Vec<String> = net.parameters().into_iter().map(|(n, _, _)| n).collect();
        assert!(params.iter().any(|n| n == "layer3.5.conv2.weight"));
        assert!(!params.iter().any(|n| n.starts_with("layer3.6")));
    }

    #[test]
    fn layer_order_follows_construction() {
        let net = resnet(Arch::Resnet18, 0.125);
        let layers = net.layers();
        let head: Vec<(&str, LayerKind)> = layers
            .iter()
            .take(5)
            .map(|l| (l.path.as_str(), l.kind))
            .collect();
        assert_eq!(
            head,
            [
                ("conv1", LayerKind::Conv2d),
                ("bn1", LayerKind::BatchNorm),
                ("layer1.0.conv1", LayerKind::Conv2d),
                ("layer1.0.bn1", LayerKind::BatchNorm),
                ("layer1.0.conv2", LayerKind::Conv2d),
            ]
        );
        let last = layers.last().unwrap();
        assert_eq!(
            (last.path.as_str(), last.kind),
            ("linear", LayerKind::Linear)
        );
        let pos = |p: &str| layers.iter().position(|l| l.path == p).unwrap();
        assert!(pos("layer2.0.bn2") < pos("layer2.0.shortcut.0"));
        assert!(pos("layer2.0.shortcut.1") < pos("layer2.1.conv1"));
        // 1 stem + 8 blocks × 2 + 3 shortcuts convs, as many BNs, and the classifier.
        assert_eq!(layers.len(), 20 + 20 + 1);

        // Parameters come in PyTorch's named_parameters() order and point at their own layer.
        let params = net.parameters();
        let names: Vec<&str> = params.iter().take(4).map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "layer1.0.conv1.weight"
            ]
        );
        for (name, layer, _) in &params {
            assert_eq!(name.rsplit_once('.').unwrap().0, layers[*layer].path);
        }
        let state: Vec<String> = net
            .state_dict()
            .into_iter()
            .take(5)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            state,
            [
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var"
            ]
        );
    }

    #[test]
    fn init_statistics() {
        tch::manual_seed(7);
        let net = resnet(Arch::Resnet18, 1.0);
        let state = net.state_dict();
        let get = |name: &str| {
            state
                .iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .shallow_clone()
        };

        let w = get("layer4.0.conv1.weight");
        assert_eq!(w.size(), [512, 256, 3, 3]);
        let expected = (2.0 / (512.0 * 9.0_f64)).sqrt();
        let std = w.std(true).double_value(&[]);
        assert!(
            (std / expected - 1.0).abs() < 0.05,
            "std {std} vs {expected}"
        );
        let mean = w.mean(Kind::Float).double_value(&[]);
        assert!(mean.abs() < 0.05 * expected, "mean {mean}");

        for (name, t) in &state {
            if name.ends_with("bn1.weight") || name.ends_with("shortcut.1.weight") {
                assert!(
                    t.eq(1.0).all().int64_value(&[]) == 1,
                    "{name} is not all ones"
                );
            }
            if name.ends_with("bn2.bias") || name.ends_with("running_mean") {
                assert!(
                    t.eq(0.0).all().int64_value(&[]) == 1,
                    "{name} is not all zeros"
                );
            }
            if name.ends_with("running_var") {
                assert!(
                    t.eq(1.0).all().int64_value(&[]) == 1,
                    "{name} is not all ones"
                );
            }
        }

        // PyTorch's default Linear init: uniform in ±1/sqrt(fan_in), for the bias too.
        let bound = 1.0 / 512.0_f64.sqrt();
        for name in ["linear.weight", "linear.bias"] {
            let t = get(name);
            let max = t.abs().max().double_value(&[]);
            assert!(
                max <= bound && max > 0.5 * bound,
                "{name}: max |x| {max}, bound {bound}"
            );
        }
    }

    #[test]
    fn width_multiplier_scales_channels() {
        let net = resnet(Arch::Resnet18, 0.25);
        assert_eq!(param_shape(&net, "conv1.weight"), [16, 3, 3, 3]);
        assert_eq!(param_shape(&net, "layer1.1.conv2.weight"), [16, 16, 3, 3]);
        assert_eq!(param_shape(&net, "layer2.0.conv1.weight"), [32, 16, 3, 3]);
        assert_eq!(
            param_shape(&net, "layer3.0.shortcut.0.weight"),
            [64, 32, 1, 1]
        );
        assert_eq!(param_shape(&net, "layer4.1.bn2.running_var"), [128]);
        assert_eq!(param_shape(&net, "linear.weight"), [10, 128]);
        assert_eq!(net.feature_dim(), 128);
    }

    #[test]
    fn other_input_sizes_pool_to_one_vector() {
        let net = resnet(Arch::Resnet18, 0.125);
        // A batch-size-1 eval forward at 64×64 still pools to one feature vector.
        let x = Tensor::randn([1, 3, 64, 64], (Kind::Float, Device::Cpu));
        let (logits, features) = net.forward(&x, false).unwrap();
        assert_eq!(logits.size(), [1, 10]);
        assert_eq!(features.size(), [1, 64]);
    }
}
