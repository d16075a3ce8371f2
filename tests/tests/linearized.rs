//! Linearized networks end to end (METHODS.md section 8): the example pair f / f_lin on the
//! embedded data, shrunk; what f_lin keeps fixed (BatchNorm statistics, θ0, the NTK); a network
//! that is already linear in its parameters trains the same either way.

use std::path::Path;

use tch::Tensor;
use trellis_tests::*;

const PLUGINS: [&str; 4] = [
    "trellis-optim",
    "trellis-metrics",
    "trellis-linearized",
    "trellis-ntk-alignment",
];

/// Runs `config` (a path relative to `dir`) into `dir/out` with `overrides`.
fn run(dir: &Path, config: &Path, out: &str, overrides: &[String]) {
    let mut args = vec![
        "run".to_string(),
        config.display().to_string(),
        "--out".into(),
        dir.join(out).display().to_string(),
        "--quiet".into(),
    ];
    for o in overrides {
        args.extend(["--set".to_string(), o.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_ok(&trellis(dir, &args));
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap()
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

fn alignments(run_dir: &Path) -> Vec<f64> {
    metrics(run_dir)
        .iter()
        .map(|epoch| {
            epoch["test"]["ntk_alignment"]
                .as_f64()
                .expect("ntk_alignment")
        })
        .collect()
}

#[test]
fn the_example_pair_runs_and_f_lin_keeps_its_kernel_its_statistics_and_theta0() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &PLUGINS);
    let examples = workspace_root().join("examples/linearized");
    let shrink: Vec<String> = [
        format!("plugins={}", manifest.display()),
        "data.train_size=384".into(),
        "data.test_size=64".into(),
        "train.epochs=2".into(),
        "train.threads=1".into(),
        "metrics.2.samples=48".into(),
    ]
    .into();
    run(dir.path(), &examples.join("synthetic_f.toml"), "f", &shrink);
    run(
        dir.path(),
        &examples.join("synthetic_f_lin.toml"),
        "f_lin",
        &shrink,
    );

    // The alignment of f moves as f trains; f_lin's gradient is J(θ0) wherever θ is.
    let f = alignments(&dir.path().join("f"));
    let f_lin = alignments(&dir.path().join("f_lin"));
    assert_eq!((f.len(), f_lin.len()), (2, 2));
    assert!((f[1] - f[0]).abs() > 1e-3 * f[0].abs(), "f: {f:?}");
    assert!(
        (f_lin[1] - f_lin[0]).abs() <= 1e-6 * f_lin[0].abs(),
        "f_lin: {f_lin:?}"
    );

    // BatchNorm never updated: the statistics of a fresh network; θ0 saved beside θ.
    let lin = tensors(&dir.path().join("f_lin/model.safetensors"));
    for (name, t) in &lin {
        if name.ends_with("running_mean") {
            assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}");
        }
        if name.ends_with("running_var") {
            assert_eq!((t - 1.0).abs().max().double_value(&[]), 0.0, "{name}");
        }
    }
    let theta = get(&lin, "conv1.weight");
    let theta0 = get(&lin, "theta0.conv1.weight");
    assert!(!theta.equal(theta0), "θ trained away from θ0");

    // Linearising a trained f: θ0 and the statistics are f's, and stay so.
    let f_weights = dir.path().join("f/model.safetensors");
    let text = std::fs::read_to_string(examples.join("synthetic_f_lin.toml")).unwrap();
    let around_f = text.replace(
        "at = \"init\"",
        &format!("checkpoint = \"{}\"", f_weights.display()),
    );
    assert_ne!(around_f, text);
    std::fs::write(dir.path().join("around_f.toml"), around_f).unwrap();
    let one_epoch: Vec<String> = shrink
        .iter()
        .map(|o| o.replace("train.epochs=2", "train.epochs=1"))
        .collect();
    run(
        dir.path(),
        Path::new("around_f.toml"),
        "around_f",
        &one_epoch,
    );
    let trained = tensors(&f_weights);
    let lin = tensors(&dir.path().join("around_f/model.safetensors"));
    for (name, t) in &trained {
        let saved = if name.contains("running_") || name.ends_with("num_batches_tracked") {
            get(&lin, name)
        } else {
            get(&lin, &format!("theta0.{name}"))
        };
        assert!(saved.equal(t), "{name}: f_lin's θ0 is f's");
    }
}

#[test]
fn a_network_linear_in_its_parameters_trains_the_same_as_f_and_as_f_lin() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &PLUGINS);
    let body = |model: &str| {
        format!(
            "plugins = \"plugins.toml\"\n{model}\n[data]\ntrain_size = 300\ntest_size = 100\n\
             cifar2 = true\naugment = false\n\n[train]\nepochs = 2\nbatch_size = 50\nseed = 5\n\
             threads = 1\nloss = \"bce\"\n\n[optimizer]\nuse = \"sgd\"\nlr = 0.05\n\
             momentum = 0.9\n\n[[metrics]]\nuse = \"loss\"\n\n[[metrics]]\nuse = \"accuracy\"\n"
        )
    };
    // Logistic regression: an MLP with no hidden layer is w·x + b.
    let f = "[model]\narch = \"mlp\"\nhidden = []\noutputs = 1\n";
    let f_lin = "[model]\nuse = \"linearized\"\n\
                 base = { arch = \"mlp\", hidden = [], outputs = 1 }\n";
    for (name, model) in [("f", f), ("f_lin", f_lin)] {
        std::fs::write(dir.path().join(format!("{name}.toml")), body(model)).unwrap();
        run(dir.path(), Path::new(&format!("{name}.toml")), name, &[]);
    }
    let (a, b) = (
        metrics(&dir.path().join("f")),
        metrics(&dir.path().join("f_lin")),
    );
    assert_eq!(a.len(), 2);
    for (ea, eb) in a.iter().zip(&b) {
        for (x, y) in [
            (&ea["train_loss"], &eb["train_loss"]),
            (&ea["test"]["loss"], &eb["test"]["loss"]),
        ] {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            // Equal up to float32 rounding: f_lin computes w0·x + b0 + (w − w0)·x + (b − b0).
            assert!((x - y).abs() < 1e-4 * x.abs(), "{x} vs {y}");
        }
        assert_eq!(ea["test"]["top1"], eb["test"]["top1"]);
    }
}
