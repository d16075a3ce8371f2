//! Small networks for quick experiments and for papers that use them: an MLP and LeNet-5.
//! Both keep PyTorch's default initialisation, as the reference code does.

use anyhow::{ensure, Result};
use tch::Tensor;

use super::blocks::{Builder, Conv2d, ConvInit, ConvSpec, Linear};
use super::size::{dim, product, ModelSize};
use super::{scaled, Padding, Pool};

/// Hidden sizes when the config names none.
pub(crate) const DEFAULT_HIDDEN: [i64; 2] = [256, 256];

#[derive(Debug)]
pub(crate) struct Mlp {
    hidden: Vec<Linear>,
}

impl Mlp {
    /// Returns the network body and its feature dimension.
    pub fn new(b: &mut Builder, hidden: &[i64], width: f64, in_dim: i64) -> Result<(Self, i64)> {
        let mut layers = Vec::new();
        let mut dim = in_dim;
        for (i, &h) in hidden.iter().enumerate() {
            let out = scaled(h, width);
            layers.push(b.linear(&format!("fc{i}"), dim, out)?);
            dim = out;
        }
        Ok((Mlp { hidden: layers }, dim))
    }

    /// What [`new`](Self::new) creates, counted without allocating; returns the feature
    /// dimension.
    pub fn count(hidden: &[i64], width: f64, in_dim: i64, size: &mut ModelSize) -> u128 {
        let mut d = dim(in_dim);
        for &h in hidden {
            let out = dim(scaled(h, width));
            size.linear(d, out);
            d = out;
        }
        d
    }

    pub fn features(&self, x: &Tensor) -> Tensor {
        let mut out = x.flatten(1, -1);
        for fc in &self.hidden {
            out = fc.forward(&out).relu();
        }
        out
    }
}

#[derive(Debug)]
pub(crate) struct LeNet5 {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    pool: Pool,
}

impl LeNet5 {
    /// Returns the network body and its feature dimension. LeCun's LeNet-5 has unpadded
    /// convolutions and max-pooling; the linearized-networks paper's variant pads them to keep
    /// the size (`padding = "same"`) and average-pools (`pool = "avg"`).
    pub fn new(
        b: &mut Builder,
        width: f64,
        in_channels: i64,
        image_size: i64,
        pool: Pool,
        padding: Padding,
    ) -> Result<(Self, i64)> {
        // Valid: two 5×5 convs, each followed by a 2×2 pool: 32 → 28 → 14 → 10 → 5.
        // Same: 32 → 32 → 16 → 16 → 8.
        let (shrink, pad) = match padding {
            Padding::Valid => (4, 0),
            Padding::Same => (0, 2),
        };
        let side = ((image_size - shrink) / 2 - shrink) / 2;
        ensure!(
            side >= 1,
            "lenet5 needs images of at least {} pixels a side, got {image_size}",
            if padding == Padding::Valid { 16 } else { 4 }
        );
        let (c1, c2) = (scaled(6, width), scaled(16, width));
        let (h1, h2) = (scaled(120, width), scaled(84, width));
        let conv = |c_in, c_out| ConvSpec {
            c_in,
            c_out,
            kernel: 5,
            stride: 1,
            padding: pad,
            bias: true,
            init: ConvInit::PyTorchDefault,
        };
        let conv1 = b.conv2d("conv1", conv(in_channels, c1))?;
        let conv2 = b.conv2d("conv2", conv(c1, c2))?;
        let fc1 = b.linear("fc1", c2 * side * side, h1)?;
        let fc2 = b.linear("fc2", h1, h2)?;
        Ok((
            LeNet5 {
                conv1,
                conv2,
                fc1,
                fc2,
                pool,
            },
            h2,
        ))
    }

    /// What [`new`](Self::new) creates, counted without allocating; returns the feature
    /// dimension.
    pub fn count(
        width: f64,
        in_channels: i64,
        image_size: i64,
        padding: Padding,
        size: &mut ModelSize,
    ) -> u128 {
        let shrink = match padding {
            Padding::Valid => 4,
            Padding::Same => 0,
        };
        let side = dim(((image_size - shrink) / 2 - shrink) / 2);
        let (c1, c2) = (dim(scaled(6, width)), dim(scaled(16, width)));
        let (h1, h2) = (dim(scaled(120, width)), dim(scaled(84, width)));
        size.conv(dim(in_channels), c1, 5, true);
        size.conv(c1, c2, 5, true);
        size.linear(product(&[c2, side, side]), h1);
        size.linear(h1, h2);
        h2
    }

    fn pool2(&self, x: &Tensor) -> Tensor {
        match self.pool {
            Pool::Max => x.max_pool2d_default(2),
            Pool::Avg => x.avg_pool2d_default(2),
        }
    }

    /// The second convolution's activations `[B, 16, H, W]`, before its pooling (what Grad-CAM
    /// looks at).
    pub fn feature_map(&self, x: &Tensor) -> Tensor {
        let out = self.pool2(&self.conv1.forward(x).relu());
        self.conv2.forward(&out).relu()
    }

    /// The fully connected layers on a [`feature_map`](Self::feature_map).
    pub fn pool(&self, map: &Tensor) -> Tensor {
        let out = self.fc1.forward(&self.pool2(map).flatten(1, -1)).relu();
        self.fc2.forward(&out).relu()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Arch, ModelConfig, Network};
    use tch::{Device, Kind, Tensor};
    use trellis_sdk::LayerKind;

    fn names(net: &Network) -> Vec<(String, Vec<i64>)> {
        net.parameters()
            .into_iter()
            .map(|(n, _, t)| (n, t.size()))
            .collect()
    }

    fn named(list: &[(&str, &[i64])]) -> Vec<(String, Vec<i64>)> {
        list.iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    }

    #[test]
    fn mlp_default_hidden_layers() {
        let net = Network::build(&ModelConfig::new(Arch::Mlp), 10, 3, 32, Device::Cpu).unwrap();
        assert_eq!(
            names(&net),
            named(&[
                ("fc0.weight", &[256, 3072]),
                ("fc0.bias", &[256]),
                ("fc1.weight", &[256, 256]),
                ("fc1.bias", &[256]),
                ("head.weight", &[10, 256]),
                ("head.bias", &[10]),
            ])
        );
        assert_eq!(
            net.num_parameters(),
            3072 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
        );
        assert_eq!(net.feature_dim(), 256);
        assert!(net.buffers().is_empty());
        assert!(net.layers().iter().all(|l| l.kind == LayerKind::Linear));
    }

    #[test]
    fn mlp_custom_hidden_and_features_are_last_activation() {
        tch::manual_seed(3);
        let cfg = ModelConfig {
            hidden: Some(vec![40, 30, 20]),
            ..ModelConfig::new(Arch::Mlp)
        };
        let net = Network::build(&cfg, 5, 1, 8, Device::Cpu).unwrap();
        let paths: Vec<&str> = net.layers().iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, ["fc0", "fc1", "fc2", "head"]);
        assert_eq!(net.feature_dim(), 20);
        let x = Tensor::randn([4, 1, 8, 8], (Kind::Float, Device::Cpu));
        let (logits, features) = net.forward(&x, true).unwrap();
        assert_eq!(logits.size(), [4, 5]);
        // Post-ReLU activations.
        assert_eq!(features.lt(0.0).any().int64_value(&[]), 0);
    }

    #[test]
    fn lenet5_parameter_count_and_names() {
        let net = Network::build(&ModelConfig::new(Arch::Lenet5), 10, 3, 32, Device::Cpu).unwrap();
        assert_eq!(
            names(&net),
            named(&[
                ("conv1.weight", &[6, 3, 5, 5]),
                ("conv1.bias", &[6]),
                ("conv2.weight", &[16, 6, 5, 5]),
                ("conv2.bias", &[16]),
                ("fc1.weight", &[120, 400]),
                ("fc1.bias", &[120]),
                ("fc2.weight", &[84, 120]),
                ("fc2.bias", &[84]),
                ("fc3.weight", &[10, 84]),
                ("fc3.bias", &[10]),
            ])
        );
        assert_eq!(net.num_parameters(), 62_006);
        assert_eq!(net.feature_dim(), 84);
        // PyTorch's default conv init: uniform in ±1/sqrt(fan_in) = ±1/sqrt(3·5·5).
        let w = &net.parameters()[0].2;
        let max = w.abs().max().double_value(&[]);
        let bound = 1.0 / 75.0_f64.sqrt();
        assert!(
            max <= bound && max > 0.8 * bound,
            "max |w| {max}, bound {bound}"
        );
    }

    #[test]
    fn lenet5_grayscale_28px() {
        // MNIST-sized input: 28 → 24 → 12 → 8 → 4.
        let net = Network::build(&ModelConfig::new(Arch::Lenet5), 10, 1, 28, Device::Cpu).unwrap();
        let shapes = names(&net);
        assert_eq!(shapes[0].1, [6, 1, 5, 5]);
        assert_eq!(shapes[4].1, [120, 16 * 4 * 4]);
        let x = Tensor::randn([2, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward(&x, false).unwrap().0.size(), [2, 10]);
        assert!(Network::build(&ModelConfig::new(Arch::Lenet5), 10, 1, 12, Device::Cpu).is_err());
    }
}
