//! One test over every component (Composer's `test_algorithm_resumption`): for each component the
//! plugins of `examples/plugins.toml` provide, a short run stopped after its first epoch and
//! resumed ends exactly where the uninterrupted run ends — weights bit for bit, every logged
//! number equal. A new plugin is covered by adding it to that manifest; a component whose
//! `state`/`load_state` misses something fails here. The same components then train on
//! Fashion-MNIST (1×28×28, real images) where `dataset-fashion-mnist` is installed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::Tensor;
use trellis::plugin_host::Registry;
use trellis_sdk::Role;
use trellis_tests::*;

/// `trellis` limited to oneDNN's AVX2 kernels, the ones CI machines without AVX-512 run: libtorch
/// 2.11's AVX2 weight gradient of a strided 1×1 convolution over few channels corrupts the heap
/// (see `models::blocks`), which every run here crashed on there and nowhere else.
fn trellis(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(trellis_bin())
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env("DNNL_MAX_CPU_ISA", "AVX2")
        .output()
        .expect("trellis runs")
}

/// The workspace plugins `examples/plugins.toml` lists, by package name.
fn listed_packages() -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join("examples/plugins.toml")).unwrap();
    let manifest: toml::Table = text.parse().unwrap();
    manifest["plugin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// A manifest of the listed plugins as this test profile built them, in a directory that lives
/// as long as the test process.
fn manifest() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let packages = listed_packages();
        let names: Vec<&str> = packages.iter().map(String::as_str).collect();
        write_manifest(dir.path(), &names);
        dir
    })
    .path()
}

/// Every (role, component) the listed plugins provide.
fn components(role: Role) -> Vec<String> {
    let registry = Registry::load(&manifest().join("plugins.toml")).unwrap();
    registry
        .components()
        .into_iter()
        .filter(|(_, c)| c.role == role)
        .map(|(_, c)| c.name.clone())
        .collect()
}

/// The `[data]` table of a run: the embedded synthetic data (3×32×32) or Fashion-MNIST (1×28×28),
/// 16 training images per class of its 60k and the whole 10k test split.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Data {
    Synthetic,
    FashionMnist,
}

impl Data {
    fn table(self) -> &'static str {
        match self {
            Data::Synthetic => "[data]\ntrain_size = 160\ntest_size = 80\n",
            Data::FashionMnist => {
                "[data]\nsource = \"fashion_mnist\"\nsubset = { per_class = 16 }\n"
            }
        }
    }
}

const TRAIN: &str = r#"
[train]
epochs = 2
batch_size = 40
seed = 11
device = "cpu"
threads = 1
"#;

const MODEL: &str = "[model]\narch = \"resnet18\"\nwidth = 0.0625\n";
const OPTIMIZER: &str =
    "[optimizer]\nuse = \"sgd\"\nlr = 0.05\nmomentum = 0.9\nweight_decay = 5e-4\n";
const METRICS: &str = "[[metrics]]\nuse = \"accuracy\"\n\n[[metrics]]\nuse = \"loss\"\n";

/// The teacher the distillation components compare with: a run of the base config on the same
/// data, once.
fn teacher(data: Data) -> &'static Path {
    static TEACHERS: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    TEACHERS[data as usize].get_or_init(|| {
        let dir = manifest().join(format!("teacher-{data:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "plugins = \"{}\"\n{}{TRAIN}{MODEL}{OPTIMIZER}",
            manifest().join("plugins.toml").display(),
            data.table()
        );
        std::fs::write(dir.join("run.toml"), config).unwrap();
        assert_ok(&trellis(
            &dir,
            &["run", "run.toml", "--out", "out", "--quiet"],
        ));
        dir.join("out/model.safetensors")
    })
}

/// Keys a component needs beyond `use`, in its table.
fn keys(role: Role, name: &str, data: Data) -> String {
    let teacher = || {
        format!(
            "teacher = {{ arch = \"resnet18\", width = 0.0625 }}\nteacher_checkpoint = \"{}\"\n",
            crate::teacher(data).display()
        )
    };
    match (role, name) {
        (Role::Optimizer, "sgd") => "lr = 0.05\nmomentum = 0.9\n".into(),
        (Role::Optimizer, _) => "lr = 0.001\n".into(),
        // Pruned mid-epoch, so the masks must come back from the checkpoint.
        (Role::Pruner, _) => "sparsity = 0.5\nat_step = 2\n".into(),
        (Role::Distiller, "kd") | (Role::Metric, "agreement") => teacher(),
        (Role::Metric, "adversarial_transfer") => format!("{}max_images = 16\n", teacher()),
        // The teacher doubles as the independent student: resumption is checked, not the value.
        (Role::Metric, "localization") => format!(
            "{}independent = {{ arch = \"resnet18\", width = 0.0625 }}\n\
             independent_checkpoint = \"{}\"\nmax_images = 16\n",
            teacher(),
            crate::teacher(data).display()
        ),
        (Role::Metric, "ntk_alignment") => "samples = 32\n".into(),
        (Role::Model, "linearized") => "base = { arch = \"resnet18\", width = 0.0625 }\n".into(),
        (Role::Callback, "ema") => "decay = 0.9\n".into(),
        _ => String::new(),
    }
}

/// Tables a component needs beside its own: the component it reads in the same run.
fn companions(role: Role, name: &str) -> &'static str {
    match (role, name) {
        (Role::Metric, "refiner_accuracy") => "\n[[distillers]]\nuse = \"fc_augment\"\n",
        _ => "",
    }
}

/// The run config that exercises one component on top of the base run.
fn config(manifest: &Path, role: Role, name: &str, data: Data) -> String {
    let table = format!("use = \"{name}\"\n{}", keys(role, name, data));
    let (model, optimizer, extra) = match role {
        Role::Model => (
            format!("[model]\n{table}"),
            OPTIMIZER.to_string(),
            String::new(),
        ),
        Role::Optimizer => (
            MODEL.to_string(),
            format!("[optimizer]\n{table}"),
            String::new(),
        ),
        Role::Scheduler => (
            MODEL.into(),
            OPTIMIZER.into(),
            format!("[scheduler]\n{table}"),
        ),
        Role::Pruner => (MODEL.into(), OPTIMIZER.into(), format!("[pruner]\n{table}")),
        Role::Distiller => (
            MODEL.into(),
            OPTIMIZER.into(),
            format!("[[distillers]]\n{table}"),
        ),
        Role::Metric => (
            MODEL.into(),
            OPTIMIZER.into(),
            format!("[[metrics]]\n{table}"),
        ),
        Role::Callback => (
            MODEL.into(),
            OPTIMIZER.into(),
            format!("[[callbacks]]\n{table}"),
        ),
    };
    let config = format!(
        "plugins = \"{}\"\n{}{TRAIN}{model}\n{optimizer}\n{METRICS}\n{extra}{}",
        manifest.display(),
        data.table(),
        companions(role, name)
    );
    if matches!((role, name), (Role::Metric, "ntk_alignment")) {
        single_logit(config)
    } else {
        config
    }
}

/// The config as a two-class run with one logit and binary cross-entropy, which the NTK–label
/// alignment needs. Each key goes under the header the config already has: TOML takes no second
/// `[data]` or `[train]`.
fn single_logit(config: String) -> String {
    [
        ("[data]\n", "cifar2 = true\n"),
        ("[model]\n", "outputs = 1\n"),
        ("[train]\n", "loss = \"bce\"\n"),
    ]
    .into_iter()
    .fold(config, |config, (header, key)| {
        assert!(config.contains(header), "no {header:?} in {config}");
        config.replacen(header, &format!("{header}{key}"), 1)
    })
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(path).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Runs the component's config straight through and stopped-then-resumed; describes the first
/// difference, if any.
fn resume_difference(manifest: &Path, role: Role, name: &str) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let config = config(manifest, role, name, Data::Synthetic);
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["run", "run.toml", "--quiet"];
        all.extend_from_slice(args);
        let out = trellis(dir.path(), &all);
        assert!(
            out.status.success(),
            "{role} {name}: trellis {all:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
    };
    run(&["--out", "straight"]);
    run(&["--out", "resumed", "--stop-after", "1"]);
    let stopped = dir.path().join("resumed");
    assert!(
        !stopped.join("model.safetensors").exists() && metrics(&stopped).len() == 1,
        "{role} {name}: a run stopped after one epoch exports nothing and logs one epoch"
    );
    run(&["--out", "resumed", "--resume"]);

    let (a, b) = (dir.path().join("straight"), dir.path().join("resumed"));
    let (ta, tb) = (
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors")),
    );
    for ((na, wa), (_, wb)) in ta.iter().zip(&tb) {
        if !wa.equal(wb) {
            return Some(format!("{na} differs after resuming"));
        }
    }
    for (ra, rb) in metrics(&a).iter().zip(&metrics(&b)) {
        for key in ["step", "train_loss", "test", "tables", "lr"] {
            if ra[key] != rb[key] {
                return Some(format!(
                    "epoch {}: `{key}` differs after resuming: {} vs {}",
                    ra["epoch"], ra[key], rb[key]
                ));
            }
        }
    }
    None
}

fn check_role(role: Role) {
    let names = components(role);
    let manifest = manifest().join("plugins.toml");
    let failures: Vec<String> = names
        .iter()
        .filter_map(|name| {
            resume_difference(&manifest, role, name).map(|d| format!("{role} `{name}`: {d}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn optimizers_resume_exactly() {
    check_role(Role::Optimizer);
}

#[test]
fn schedulers_resume_exactly() {
    check_role(Role::Scheduler);
}

#[test]
fn pruners_resume_exactly() {
    check_role(Role::Pruner);
}

#[test]
fn distillers_resume_exactly() {
    check_role(Role::Distiller);
}

#[test]
fn metrics_resume_exactly() {
    check_role(Role::Metric);
}

#[test]
fn callbacks_resume_exactly() {
    check_role(Role::Callback);
}

#[test]
fn models_resume_exactly() {
    check_role(Role::Model);
}

/// The harness is only worth something if it fails: a callback that forgets its state on
/// resume must be caught.
#[test]
fn a_component_that_forgets_its_state_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &[
            "trellis-optim",
            "trellis-metrics",
            "trellis-fixture-misbehaving",
        ],
    );
    let difference = resume_difference(&manifest, Role::Callback, "forgetful");
    assert!(
        difference
            .as_deref()
            .is_some_and(|d| d.contains("differs after resuming")),
        "{difference:?}"
    );
}

/// Whether the Debian package's four files are where `source = "fashion_mnist"` looks; when they
/// are not, the Fashion-MNIST tests say so and pass, as CI without the package would.
fn fashion_mnist_present() -> bool {
    let dir = Path::new(trellis::data::FASHION_MNIST_DIR);
    let present = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    .iter()
    .all(|f| dir.join(f).exists());
    if !present {
        eprintln!(
            "skipped: Fashion-MNIST is not in {} (apt-get install dataset-fashion-mnist)",
            dir.display()
        );
    }
    present
}

/// Every component of the role trains two epochs on Fashion-MNIST unchanged: the run succeeds,
/// logs finite losses, and its input convolution reads one channel.
fn check_role_on_fashion_mnist(role: Role) {
    if !fashion_mnist_present() {
        return;
    }
    let manifest = manifest().join("plugins.toml");
    let failures: Vec<String> = components(role)
        .iter()
        .filter_map(|name| {
            let dir = tempfile::tempdir().unwrap();
            let config = config(&manifest, role, name, Data::FashionMnist);
            std::fs::write(dir.path().join("run.toml"), config).unwrap();
            let out = trellis(dir.path(), &["run", "run.toml", "--out", "out", "--quiet"]);
            if !out.status.success() {
                return Some(format!(
                    "{role} `{name}` failed ({}):\n{}",
                    out.status,
                    stderr(&out)
                ));
            }
            let run = dir.path().join("out");
            let losses: Vec<f64> = metrics(&run)
                .iter()
                .map(|r| r["train_loss"].as_f64().unwrap_or(f64::NAN))
                .collect();
            if losses.len() != 2 || !losses.iter().all(|l| l.is_finite()) {
                return Some(format!("{role} `{name}`: train losses {losses:?}"));
            }
            let convolutions: Vec<Vec<i64>> = tensors(&run.join("model.safetensors"))
                .into_iter()
                .filter(|(_, t)| t.dim() == 4)
                .map(|(_, t)| t.size())
                .collect();
            if convolutions.iter().any(|size| size[1] == 1) {
                None
            } else {
                Some(format!(
                    "{role} `{name}`: no convolution reads one channel: {convolutions:?}"
                ))
            }
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn optimizers_train_on_fashion_mnist() {
    check_role_on_fashion_mnist(Role::Optimizer);
}

#[test]
fn schedulers_train_on_fashion_mnist() {
    check_role_on_fashion_mnist(Role::Scheduler);
}

#[test]
fn pruners_train_on_fashion_mnist() {
    check_role_on_fashion_mnist(Role::Pruner);
}

#[test]
fn distillers_train_on_fashion_mnist() {
    check_role_on_fashion_mnist(Role::Distiller);
}

#[test]
fn metrics_train_on_fashion_mnist() {
    check_role_on_fashion_mnist(Role::Metric);
}

#[test]
fn callbacks_train_on_fashion_mnist() {
    check_role_on_fashion_mnist(Role::Callback);
}

#[test]
fn models_train_on_fashion_mnist() {
    check_role_on_fashion_mnist(Role::Model);
}
