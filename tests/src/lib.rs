//! Support for the end-to-end tests: build the binary and plugins once, write manifests and
//! configs into temporary directories, run `trellis` and read what it wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// target/debug: the test binary lives in target/debug/deps.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Builds workspace packages (the `trellis` binary, plugin dylibs) once per test process, with
/// the profile the tests run under.
pub fn build(package: &str) {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|p| p == package) {
        return;
    }
    let mut command = Command::new(env!("CARGO"));
    command
        .args(["build", "--quiet", "-p", package])
        .current_dir(workspace_root());
    if target_dir().ends_with("release") {
        command.arg("--release");
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "cargo build -p {package} failed");
    built.push(package.to_string());
}

pub fn trellis_bin() -> PathBuf {
    build("trellis");
    target_dir().join("trellis")
}

/// The path of a workspace plugin's dylib, e.g. `plugin("trellis-optim")`.
pub fn plugin(package: &str) -> PathBuf {
    build(package);
    target_dir().join(format!("lib{}.so", package.replace('-', "_")))
}

/// A manifest listing the given workspace plugins, written into `dir`.
pub fn write_manifest(dir: &Path, packages: &[&str]) -> PathBuf {
    let mut text = String::new();
    for p in packages {
        text.push_str(&format!(
            "[[plugin]]\nname = \"{p}\"\npath = \"{}\"\n\n",
            plugin(p).display()
        ));
    }
    let path = dir.join("plugins.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `trellis` with `args` in `dir`.
pub fn trellis(dir: &Path, args: &[&str]) -> Output {
    Command::new(trellis_bin())
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .output()
        .expect("trellis runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts success, printing both streams otherwise.
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "trellis failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Asserts a clean failure (an error, not a crash) and returns stderr.
pub fn assert_error(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean error exit, got {}:\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stderr(o)
}

/// The records of a run's metrics.jsonl.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A small, fast run config on the synthetic data with the optim and metrics plugins.
pub fn small_config(extra: &str) -> String {
    format!(
        r#"plugins = "plugins.toml"

[model]
arch = "resnet18"
width = 0.125

[data]
train_size = 1000
test_size = 500

[train]
epochs = 2
batch_size = 50
seed = 3
device = "cpu"

[optimizer]
use = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4

[schedule]
kind = "cosine"

[[metrics]]
use = "accuracy"

[[metrics]]
use = "loss"
{extra}"#
    )
}

/// A temp dir with a manifest of the standard plugins and `run.toml` = `config`.
pub fn setup(config: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &["trellis-optim", "trellis-metrics"]);
    let path = dir.path().join("run.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

/// Every file under `dir` (recursively) with its bytes: compare two snapshots to assert that a
/// refused command left a run directory exactly as it was.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                files.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    files
}

/// Runs `trellis` with `args` in `dir` and asserts a clean, non-crashing refusal (exit 1) whose
/// message contains `phrase` and that left `untouched` byte for byte as it was; returns stderr.
pub fn assert_refused(dir: &Path, args: &[&str], phrase: &str, untouched: &Path) -> String {
    let before = snapshot(untouched);
    let err = assert_error(&trellis(dir, args));
    assert!(
        err.contains(phrase),
        "`trellis {}`: expected {phrase:?} in:\n{err}",
        args.join(" ")
    );
    assert!(
        snapshot(untouched) == before,
        "`trellis {}` changed {}",
        args.join(" "),
        untouched.display()
    );
    err
}

/// A tiny, fast config for tests about errors and plumbing rather than learning.
pub fn tiny(extra: &str) -> String {
    format!(
        r#"plugins = "plugins.toml"

[model]
arch = "mlp"
hidden = [32]

[data]
train_size = 200
test_size = 100

[train]
epochs = 1
batch_size = 50
device = "cpu"

[optimizer]
use = "sgd"
lr = 0.05
{extra}"#
    )
}
