//! Unit tests: the architecture against the reference's numbers and names, the model contract
//! the host relies on (modes, in-place double, spec), and the configuration errors.

use tch::{Device, Kind, Tensor};
use trellis_sdk::abi::ErrorKind;
use trellis_sdk::testing::FakeHost;
use trellis_sdk::{parse_config, Architecture, Component, LayerKind};

use super::*;

fn config(depth: i64, widen_factor: i64, dropout: f64) -> WideResNetConfig {
    WideResNetConfig {
        depth,
        widen_factor,
        dropout,
    }
}

/// Through the component's constructor, as the host builds it.
fn from_host(toml: &str, host: FakeHost) -> Result<WideResNet> {
    WideResNet::new(parse_config(toml)?, host.host())
}

fn param<'a>(params: &'a [Param], name: &str) -> &'a Tensor {
    let found = params.iter().find(|p| p.name == name);
    &found
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .tensor
}

/// WRN-d-k's parameter count from the architecture: stem, per block two BatchNorms (γ, β) and
/// two 3×3 convolutions plus a 1×1 shortcut where the width changes, final BatchNorm, classifier.
fn reference_count(depth: i64, k: i64, in_channels: i64, classes: i64) -> i64 {
    let n = (depth - 4) / 6;
    let widths = [16, 16 * k, 32 * k, 64 * k];
    let mut total = in_channels * 16 * 9;
    for g in 1..=3 {
        for i in 0..n {
            let (cin, cout) = (if i == 0 { widths[g - 1] } else { widths[g] }, widths[g]);
            total += 2 * cin + cin * cout * 9 + 2 * cout + cout * cout * 9;
            if cin != cout {
                total += cin * cout;
            }
        }
    }
    total + 2 * widths[3] + widths[3] * classes + classes
}

#[test]
fn wrn_16_4_has_the_reference_parameter_count() {
    let net = from_host("", FakeHost::without_model()).unwrap();
    assert_eq!(net.config, WideResNetConfig::default());
    // 2,748,890: what `sum(p.numel() for p in WideResNet(16, 10, 4).parameters())` prints.
    assert_eq!(reference_count(16, 4, 3, 10), 2_748_890);
    assert_eq!(net.num_parameters(), 2_748_890);
    for (depth, k, classes) in [(10, 1, 10), (22, 2, 100), (28, 10, 10)] {
        let net = WideResNet::build(&config(depth, k, 0.0), 3, classes, Device::Cpu).unwrap();
        let want = reference_count(depth, k, 3, classes);
        assert_eq!(net.num_parameters(), want, "WRN-{depth}-{k}");
    }
    // WRN-28-10, the paper's CIFAR headline model: 36.5M parameters.
    let big = WideResNet::build(&config(28, 10, 0.0), 3, 10, Device::Cpu).unwrap();
    assert_eq!(big.num_parameters(), 36_479_194);
}

#[test]
fn names_modules_and_kinds_are_pytorchs() {
    let net = WideResNet::build(&config(10, 2, 0.0), 3, 10, Device::Cpu).unwrap();
    let mut want = vec!["conv1.weight".to_string()];
    let bn = |m: &str| [format!("{m}.weight"), format!("{m}.bias")];
    for g in 1..=3 {
        let b = format!("block{g}.layer.0");
        want.extend(bn(&format!("{b}.bn1")));
        want.push(format!("{b}.conv1.weight"));
        want.extend(bn(&format!("{b}.bn2")));
        want.push(format!("{b}.conv2.weight"));
        // 16 → 32, 32 → 64, 64 → 128: every first block changes width.
        want.push(format!("{b}.convShortcut.weight"));
    }
    want.extend(bn("bn1"));
    want.extend(["fc.weight".to_string(), "fc.bias".to_string()]);
    let params = net.parameters().unwrap();
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, want);
    for p in &params {
        let (module, _) = p.name.rsplit_once('.').unwrap();
        assert_eq!(p.module, module);
        let last = module.rsplit('.').next().unwrap();
        let kind = match last {
            "fc" => LayerKind::Linear,
            l if l.starts_with("bn") => LayerKind::BatchNorm,
            _ => LayerKind::Conv2d,
        };
        assert_eq!(p.kind, kind, "{}", p.name);
        assert!(p.tensor.requires_grad(), "{}", p.name);
    }

    let buffers: Vec<String> = net.buffers().unwrap().into_iter().map(|b| b.0).collect();
    let bn_modules: Vec<&str> = params
        .iter()
        .filter(|p| p.kind == LayerKind::BatchNorm && p.name.ends_with(".weight"))
        .map(|p| p.module.as_str())
        .collect();
    let want: Vec<String> = bn_modules
        .iter()
        .flat_map(|m| [format!("{m}.running_mean"), format!("{m}.running_var")])
        .collect();
    assert_eq!(buffers, want);

    // Width 1: block1's first block keeps 16 channels and stride 1, so it has no shortcut.
    let thin = WideResNet::build(&config(10, 1, 0.0), 3, 10, Device::Cpu).unwrap();
    let thin = thin.parameters().unwrap();
    assert!(!thin
        .iter()
        .any(|p| p.name == "block1.layer.0.convShortcut.weight"));
    assert!(thin
        .iter()
        .any(|p| p.name == "block2.layer.0.convShortcut.weight"));
    // Later blocks of a group keep the shape: no shortcut either.
    let deeper = WideResNet::build(&config(16, 2, 0.0), 3, 10, Device::Cpu).unwrap();
    let deeper = deeper.parameters().unwrap();
    assert!(param(&deeper, "block3.layer.1.conv1.weight").size() == [128, 128, 3, 3]);
    assert!(!deeper
        .iter()
        .any(|p| p.name == "block3.layer.1.convShortcut.weight"));
}

#[test]
fn shapes_follow_the_host_and_head_is_the_classifier() {
    tch::manual_seed(0);
    let host = FakeHost::without_model()
        .input_shape([1, 16, 16])
        .classes(7);
    let net = from_host("depth = 10\nwiden_factor = 2", host).unwrap();
    assert_eq!(net.feature_dim().unwrap(), 128);
    let params = net.parameters().unwrap();
    assert_eq!(param(&params, "conv1.weight").size(), [16, 1, 3, 3]);
    assert_eq!(
        param(&params, "block2.layer.0.conv1.weight").size(),
        [64, 32, 3, 3]
    );
    assert_eq!(
        param(&params, "block3.layer.0.convShortcut.weight").size(),
        [128, 64, 1, 1]
    );
    assert_eq!(param(&params, "fc.weight").size(), [7, 128]);
    let x = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    for train in [true, false] {
        net.set_training(train).unwrap();
        assert_eq!(net.is_training().unwrap(), train);
        let out = net.forward(&x).unwrap();
        assert_eq!(out.logits.size(), [2, 7]);
        assert_eq!(out.features.size(), [2, 128]);
        assert!(net.head(&out.features).unwrap().equal(&out.logits));
    }

    // The default WRN-16-4 on CIFAR-shaped inputs.
    let net = from_host("", FakeHost::without_model()).unwrap();
    let out = net.forward(&Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)));
    let out = out.unwrap();
    assert_eq!(
        (out.logits.size(), out.features.size()),
        (vec![2, 10], vec![2, 256])
    );
    // Gradients reach every parameter, shortcuts included.
    out.logits.sum(Kind::Float).backward();
    for p in net.parameters().unwrap() {
        assert!(p.tensor.grad().defined(), "{} has no gradient", p.name);
    }
}

#[test]
fn depth_must_be_six_n_plus_four() {
    for depth in [12, 15, 4, 0, -2] {
        let toml = format!("depth = {depth}");
        let err = from_host(&toml, FakeHost::without_model()).err().unwrap();
        assert_eq!(err.kind, ErrorKind::Config, "{depth}: {err}");
        assert_eq!(err.key.as_deref(), Some("depth"));
        assert!(err.message.contains("6n + 4") && err.message.contains(&depth.to_string()));
    }
    for (toml, key) in [
        ("widen_factor = 0", "widen_factor"),
        ("dropout = 1.0", "dropout"),
        ("dropout = -0.1", "dropout"),
        ("width = 2", "width"),
        ("depth = 16.0", "depth"),
    ] {
        let err = from_host(toml, FakeHost::without_model()).err().unwrap();
        assert_eq!(err.key.as_deref(), Some(key), "{toml}: {err}");
    }
}

#[test]
fn initialisation_follows_the_reference() {
    tch::manual_seed(1);
    let net = WideResNet::build(&config(16, 4, 0.0), 3, 10, Device::Cpu).unwrap();
    let params = net.parameters().unwrap();
    for p in &params {
        let t = &p.tensor;
        match (p.kind, p.name.rsplit('.').next().unwrap()) {
            (LayerKind::BatchNorm, "weight") => assert!(t.eq(1.0).all().int64_value(&[]) == 1),
            (LayerKind::BatchNorm, "bias") | (LayerKind::Linear, "bias") => {
                assert_eq!(
                    t.count_nonzero(None::<i64>).int64_value(&[]),
                    0,
                    "{}",
                    p.name
                )
            }
            (LayerKind::Linear, _) => {
                let bound = 1.0 / 256f64.sqrt();
                assert!(t.abs().max().double_value(&[]) <= bound);
            }
            _ => {}
        }
    }
    // Kaiming normal, fan out: std √(2 / (256·9)) for block3's 256 → 256 convolutions.
    let w = param(&params, "block3.layer.1.conv2.weight");
    let std = w.std(true).double_value(&[]);
    let want = (2.0f64 / (256.0 * 9.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.01, "std {std}, want {want}");
    assert!(w.mean(Kind::Float).double_value(&[]).abs() < 0.01 * want);
    let shortcut = param(&params, "block2.layer.0.convShortcut.weight");
    let std = shortcut.std(true).double_value(&[]);
    assert!(
        (std / (2.0f64 / 128.0).sqrt() - 1.0).abs() < 0.05,
        "std {std}"
    );
    let stats: Vec<(String, Tensor)> = net.buffers().unwrap();
    for (name, t) in &stats {
        let want = if name.ends_with("running_var") {
            1.0
        } else {
            0.0
        };
        assert!(t.eq(want).all().int64_value(&[]) == 1, "{name}");
    }
}

#[test]
fn the_training_flag_drives_batch_norm_and_dropout() {
    tch::manual_seed(2);
    let x = Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu));
    let net = WideResNet::build(&config(10, 1, 0.0), 3, 10, Device::Cpu).unwrap();
    let mean = net.buffers().unwrap()[0].1.shallow_clone();
    net.set_training(false).unwrap();
    let eval1 = net.forward(&x).unwrap().logits;
    assert_eq!(
        mean.abs().sum(Kind::Float).double_value(&[]),
        0.0,
        "eval updated stats"
    );
    net.set_training(true).unwrap();
    let train1 = net.forward(&x).unwrap().logits;
    let train2 = net.forward(&x).unwrap().logits;
    assert!(
        train1.equal(&train2),
        "without dropout training is deterministic"
    );
    assert!(
        mean.abs().sum(Kind::Float).double_value(&[]) > 0.0,
        "training left stats"
    );
    // block1.layer.0.bn1 normalises the stem's output: momentum 0.1 from zero, twice.
    let stem = tch::no_grad(|| net.conv1.forward(&x).unwrap());
    let batch_mean = stem.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
    let after_two = &batch_mean * 0.1 + &batch_mean * 0.1 * 0.9;
    assert!(mean.allclose(&after_two, 1e-4, 1e-6, false));
    net.set_training(false).unwrap();
    let eval2 = net.forward(&x).unwrap().logits;
    assert!(
        !eval2.allclose(&eval1, 1e-4, 1e-5, false),
        "eval ignored running stats"
    );
    assert!(net.forward(&x).unwrap().logits.equal(&eval2));

    let dropped = WideResNet::build(&config(10, 1, 0.5), 3, 10, Device::Cpu).unwrap();
    let a = dropped.forward(&x).unwrap().logits;
    let b = dropped.forward(&x).unwrap().logits;
    assert!(!a.equal(&b), "dropout is active in training");
    dropped.set_training(false).unwrap();
    let a = dropped.forward(&x).unwrap().logits;
    assert!(
        dropped.forward(&x).unwrap().logits.equal(&a),
        "and off in evaluation"
    );
}

#[test]
fn set_double_converts_in_place() {
    let net = WideResNet::build(&config(10, 1, 0.0), 3, 10, Device::Cpu).unwrap();
    let weight = net.parameters().unwrap()[0].tensor.shallow_clone();
    let stats = net.buffers().unwrap()[0].1.shallow_clone();
    net.set_double(true).unwrap();
    assert_eq!((weight.kind(), stats.kind()), (Kind::Double, Kind::Double));
    assert!(weight.requires_grad());
    let x = Tensor::randn([2, 3, 8, 8], (Kind::Double, Device::Cpu));
    let out = net.forward(&x).unwrap();
    assert_eq!(
        out.logits.kind(),
        Kind::Double,
        "the layers use the converted tensors"
    );
    net.set_double(false).unwrap();
    assert_eq!(weight.kind(), Kind::Float);
    let out = net.forward(&x.to_kind(Kind::Float)).unwrap();
    assert_eq!(out.logits.kind(), Kind::Float);
}

#[test]
fn spec_rebuilds_the_same_model() {
    let toml = "depth = 22\nwiden_factor = 3\ndropout = 0.3";
    let net = from_host(toml, FakeHost::without_model()).unwrap();
    let spec = net.spec().unwrap();
    let body = spec.strip_prefix("use = \"wide_resnet\"\n").unwrap();
    let again: WideResNetConfig = parse_config(body).unwrap();
    assert_eq!(again, config(22, 3, 0.3));
    let default = from_host("", FakeHost::without_model()).unwrap();
    let body = default.spec().unwrap();
    assert!(body.contains("dropout = 0.0"), "{body}");
    let again: WideResNetConfig =
        parse_config(body.lines().skip(1).collect::<Vec<_>>().join("\n").as_str()).unwrap();
    assert_eq!(again, WideResNetConfig::default());
}
