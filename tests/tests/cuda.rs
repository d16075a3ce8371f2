//! `device = "cuda"` end to end (data resident on the GPU, augmented there, the model there) and
//! `[train] autocast = "bf16"`. The CUDA tests pass without doing anything where libtorch sees no
//! CUDA device, as in CI; autocast is also checked on the CPU, which runs bf16 too.

use trellis_tests::{assert_ok, metrics, setup, small_config, trellis, workspace_root};

fn cuda_available() -> bool {
    let available = tch::Cuda::is_available();
    if !available {
        eprintln!("skipped: libtorch sees no CUDA device");
    }
    available
}

/// Trains `small_config` with `overrides`; the run must succeed and its loss go down.
fn run(overrides: &[&str]) -> Vec<f64> {
    let (dir, _) = setup(&small_config(""));
    // Half of small_config's data: enough to see the loss go down, and twice as fast.
    let mut args = vec!["run", "run.toml", "--out", "out", "--quiet"];
    args.extend([
        "--set",
        "data.train_size=500",
        "--set",
        "data.test_size=250",
    ]);
    for o in overrides {
        args.extend(["--set", o]);
    }
    let out = trellis(dir.path(), &args);
    assert_ok(&out);
    let records = metrics(&dir.path().join("out"));
    let losses: Vec<f64> = records
        .iter()
        .map(|r| r["train_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 2);
    assert!(
        losses[1] < losses[0],
        "{overrides:?}: no learning: {losses:?}"
    );
    assert!(records[1]["test"]["loss"].as_f64().unwrap().is_finite());
    losses
}

/// bf16 autocast follows the f32 run from the same start, up to bf16 rounding.
fn assert_close_to_f32(f32_losses: &[f64], bf16_losses: &[f64]) {
    for (a, b) in f32_losses.iter().zip(bf16_losses) {
        assert!(
            (a - b).abs() < 0.05 * a,
            "f32 losses {f32_losses:?}, bf16 losses {bf16_losses:?}"
        );
    }
}

#[test]
fn cuda_run_trains_on_the_gpu_with_and_without_bf16_autocast() {
    if !cuda_available() {
        return;
    }
    let full = run(&["train.device=\"cuda\""]);
    let bf16 = run(&["train.device=\"cuda\"", "train.autocast=\"bf16\""]);
    assert_close_to_f32(&full, &bf16);
}

#[test]
fn bf16_autocast_follows_the_f32_run_on_the_cpu() {
    let full = run(&[]);
    let bf16 = run(&["train.autocast=\"bf16\""]);
    assert_ne!(full, bf16, "autocast changed nothing");
    assert_close_to_f32(&full, &bf16);
}

#[test]
fn trellis_has_libtorch_cuda_loaded_when_libtorch_is_a_cuda_build() {
    // A linker defaulting to --as-needed drops libtorch_cuda from the binary, and then libtorch
    // sees no GPU on a machine that has one. This is checkable without a GPU.
    let has_cuda_build = workspace_root()
        .join(".libtorch/lib/libtorch_cuda.so")
        .exists();
    let dir = tempfile::tempdir().unwrap();
    let out = trellis(dir.path(), &["info"]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("libtorch 2.11"), "{text}");
    if has_cuda_build {
        assert!(text.contains("libtorch_cuda loaded"), "{text}");
    } else {
        assert!(text.contains("CPU-only"), "{text}");
    }
}
