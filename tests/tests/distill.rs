//! Distillers end to end: a teacher trained by one `trellis run` feeds `kd` and the
//! what-gets-distilled metrics of another; `fc_augment` trains its branch without changing the
//! exported model.

use std::path::Path;

use tch::Tensor;
use trellis_tests::*;

const PLUGINS: [&str; 5] = [
    "trellis-optim",
    "trellis-metrics",
    "trellis-kd",
    "trellis-fc-augment",
    "trellis-distill-metrics",
];

/// A small ResNet run on the synthetic data; `plugins` is the manifest relative to the config.
fn config(plugins: &str, arch: &str, epochs: usize, extra: &str) -> String {
    format!(
        r#"plugins = "{plugins}"

[model]
arch = "{arch}"
width = 0.125

[data]
train_size = 300
test_size = 100

[train]
epochs = {epochs}
batch_size = 50
seed = 1
device = "cpu"

[optimizer]
use = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4

[[metrics]]
use = "accuracy"
{extra}"#
    )
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(path).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Writes `text` as `<dir>/<sub>/run.toml` and runs it from `dir` into `<dir>/<sub>/out`.
fn run_in(dir: &Path, sub: &str, text: &str, extra_args: &[&str]) -> std::process::Output {
    std::fs::create_dir_all(dir.join(sub)).unwrap();
    std::fs::write(dir.join(sub).join("run.toml"), text).unwrap();
    let config = format!("{sub}/run.toml");
    let out = format!("{sub}/out");
    let mut args = vec!["run", &config, "--out", &out, "--quiet"];
    args.extend_from_slice(extra_args);
    trellis(dir, &args)
}

const TEACHER: &str = r#"teacher = { arch = "resnet34", width = 0.125 }
teacher_checkpoint = "../teacher/out/model.safetensors""#;

#[test]
fn kd_learns_from_a_teacher_run_and_the_metrics_compare_them() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &PLUGINS);
    let kd_table = format!("\n[[distillers]]\nuse = \"kd\"\n{TEACHER}\n");
    let student = config("../plugins.toml", "resnet18", 1, &kd_table);
    let err = assert_error(&run_in(dir.path(), "early", &student, &[]));
    assert!(
        err.contains("no weights of the teacher at") && err.contains("train it first"),
        "{err}"
    );

    assert_ok(&run_in(
        dir.path(),
        "teacher",
        &config("../plugins.toml", "resnet34", 1, ""),
        &[],
    ));

    // The wrong architecture for the checkpoint: the error names the key and the extra blocks.
    let wrong = TEACHER.replace("resnet34", "resnet18");
    let err = assert_error(&run_in(
        dir.path(),
        "mismatch",
        &config(
            "../plugins.toml",
            "resnet18",
            1,
            &format!("\n[[distillers]]\nuse = \"kd\"\n{wrong}\n"),
        ),
        &[],
    ));
    assert!(err.contains("teacher_checkpoint"), "{err}");
    assert!(err.contains("unexpected in the file"), "{err}");
    assert!(err.contains("layer1.2."), "{err}");

    // The checkpoint path is relative to the KD config (one directory down), not to the cwd.
    let kd = config(
        "../plugins.toml",
        "resnet18",
        1,
        &format!(
            r#"
[[distillers]]
use = "kd"
{TEACHER}

[[metrics]]
use = "agreement"
{TEACHER}

[[metrics]]
use = "adversarial_transfer"
max_images = 50
{TEACHER}

[[metrics]]
use = "jitter_invariance"
{TEACHER}
"#
        ),
    );
    assert_ok(&run_in(dir.path(), "kd", &kd, &[]));
    let records = metrics(&dir.path().join("kd/out"));
    let test = &records[0]["test"];
    for key in [
        "top1",
        "teacher_agreement",
        "teacher_fooled",
        "jitter_invariance",
        "teacher_jitter_invariance",
    ] {
        let value = test[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {test}"));
        assert!((0.0..=100.0).contains(&value), "{key} = {value}");
    }
    assert!(records[0]["train_loss"].as_f64().unwrap().is_finite());

    // The student's files hold the student alone.
    let student = tensors(&dir.path().join("kd/out/model.safetensors"));
    let plain = tensors(&dir.path().join("teacher/out/model.safetensors"));
    assert!(student.len() < plain.len(), "the student is a ResNet18");
    assert!(student.iter().all(|(n, _)| !n.starts_with("layer1.2.")));
    let state = tensors(&dir.path().join("kd/out/checkpoint/state.safetensors"));
    assert!(
        state.iter().all(|(n, _)| n.starts_with("optimizer/")),
        "only the optimizer's state belongs in the checkpoint: {:?}",
        state.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
}

#[test]
fn fc_augment_trains_its_branch_but_exports_the_plain_model() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &PLUGINS);
    assert_ok(&run_in(
        dir.path(),
        "plain",
        &config("../plugins.toml", "resnet18", 1, ""),
        &[],
    ));
    let fc = config(
        "../plugins.toml",
        "resnet18",
        2,
        "\n[[distillers]]\nuse = \"fc_augment\"\n",
    );
    assert_ok(&run_in(dir.path(), "fc", &fc, &[]));

    let plain = tensors(&dir.path().join("plain/out/model.safetensors"));
    let augmented = tensors(&dir.path().join("fc/out/model.safetensors"));
    let shapes = |t: &[(String, Tensor)]| -> Vec<(String, Vec<i64>)> {
        t.iter().map(|(n, t)| (n.clone(), t.size())).collect()
    };
    assert_eq!(shapes(&plain), shapes(&augmented));
    let count = |t: &[(String, Tensor)]| t.iter().map(|(_, t)| t.numel()).sum::<usize>();
    assert_eq!(count(&plain), count(&augmented));

    // The branch is trained by the run's optimizer and kept in the checkpoint for resuming.
    let records = metrics(&dir.path().join("fc/out"));
    assert!(
        records[1]["lr"]["distiller.0"].is_number(),
        "{}",
        records[1]
    );
    let state = tensors(&dir.path().join("fc/out/checkpoint/state.safetensors"));
    let input = state
        .iter()
        .find(|(n, _)| n == "params.distiller.0/refiner.input.weight")
        .unwrap_or_else(|| panic!("no refiner in {:?}", shapes(&state)));
    // Width 0.125: the pooled features of ResNet18 are 512 · 0.125 = 64 wide.
    assert_eq!(input.1.size(), [64, 64]);

    // Stopped and resumed, the run continues exactly, branch included.
    assert_ok(&run_in(
        dir.path(),
        "fc-resumed",
        &fc,
        &["--stop-after", "1"],
    ));
    assert_ok(&run_in(dir.path(), "fc-resumed", &fc, &["--resume"]));
    let resumed = tensors(&dir.path().join("fc-resumed/out/model.safetensors"));
    for ((name, a), (_, b)) in augmented.iter().zip(&resumed) {
        assert!(a.equal(b), "{name} differs after resuming");
    }
    let resumed_records = metrics(&dir.path().join("fc-resumed/out"));
    assert_eq!(records[1]["test"], resumed_records[1]["test"]);
}
