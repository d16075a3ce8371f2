//! Plugins written outside the workspace, against trellis-sdk only, swap in through the released
//! binary: core is not rebuilt. `examples/third_party_plugin/lion` adds an optimizer,
//! `examples/third_party_plugin/wide_resnet` a model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use tch::Tensor;
use trellis_tests::*;

/// Runs `cargo <command>` on the out-of-tree crate in `examples/third_party_plugin/<crate_dir>`
/// on its own, from its directory.
fn cargo_out_of_tree(command: &str, crate_dir: &str) {
    let project = workspace_root()
        .join("examples/third_party_plugin")
        .join(crate_dir);
    // The workspace's target directory and dev profile, so tch is not compiled a second time.
    let out = Command::new(env!("CARGO"))
        .args([command, "--quiet", "--manifest-path"])
        .arg(project.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(workspace_root().join("target"))
        .env("CARGO_PROFILE_DEV_OPT_LEVEL", "1")
        .current_dir(&project)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo {command} fails for the out-of-tree plugin {crate_dir} on its own:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

/// Builds an out-of-tree crate and returns the path of its `lib<lib>.so`.
fn build_out_of_tree(crate_dir: &str, lib: &str) -> PathBuf {
    cargo_out_of_tree("build", crate_dir);
    workspace_root().join(format!("target/debug/lib{lib}.so"))
}

/// The binary's modification time, to check at the end that nothing rebuilt it.
fn built_at(binary: &Path) -> SystemTime {
    std::fs::metadata(binary).unwrap().modified().unwrap()
}

/// A manifest with `own` (name, path) and workspace plugins.
fn manifest(dir: &Path, own: (&str, &Path), workspace: &[&str]) {
    let entry = |name: &str, path: &Path| {
        format!(
            "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n\n",
            path.display()
        )
    };
    let mut text = entry(own.0, own.1);
    for p in workspace {
        text.push_str(&entry(p, &plugin(p)));
    }
    std::fs::write(dir.join("plugins.toml"), text).unwrap();
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn count_nonzero(t: &Tensor) -> i64 {
    t.count_nonzero(None::<i64>).int64_value(&[])
}

fn train_losses(run: &Path) -> Vec<f64> {
    let records = metrics(run);
    let losses = records.iter().map(|r| r["train_loss"].as_f64().unwrap());
    losses.collect()
}

#[test]
fn out_of_tree_plugin_builds_alone_and_runs_through_the_existing_binary() {
    let binary = trellis_bin();
    let built = built_at(&binary);
    let lion = build_out_of_tree("lion", "lion_optimizer");

    let dir = tempfile::tempdir().unwrap();
    manifest(dir.path(), ("lion-optimizer", &lion), &["trellis-metrics"]);
    let config = small_config("")
        .replace(
            "use = \"sgd\"\nlr = 0.05\nmomentum = 0.9",
            "use = \"lion\"\nlr = 1e-3\nbeta2 = 0.99",
        )
        .replace("[[metrics]]\nuse = \"loss\"\n", "");
    std::fs::write(dir.path().join("run.toml"), config).unwrap();

    let out = trellis(dir.path(), &["run", "run.toml", "--out", "out", "--quiet"]);
    assert_ok(&out);
    let losses = train_losses(&dir.path().join("out"));
    assert_eq!(losses.len(), 2);
    assert!(losses[1] < losses[0], "{losses:?}");
    let plugins = std::fs::read_to_string(dir.path().join("out/plugins.json")).unwrap();
    assert!(plugins.contains("optimizer lion"), "{plugins}");

    let listed = trellis(dir.path(), &["plugins"]);
    assert_ok(&listed);
    assert!(stdout(&listed).contains("lion") && stdout(&listed).contains("lion-optimizer"));

    assert_eq!(built, built_at(&binary), "the trellis binary was rebuilt");
}

#[test]
fn out_of_tree_model_passes_its_own_unit_tests() {
    // Not a workspace member, so `cargo test --workspace` would not run them otherwise.
    cargo_out_of_tree("test", "wide_resnet");
}

/// small_config with a WRN-10-1 (one block per group, 78k parameters) and half its data: the
/// test runs `trellis` four times.
fn wide_resnet_config(extra: &str) -> String {
    small_config(extra)
        .replace(
            "[model]\narch = \"resnet18\"\nwidth = 0.125",
            "[model]\nuse = \"wide_resnet\"\ndepth = 10\nwiden_factor = 1",
        )
        .replace("train_size = 1000", "train_size = 500")
        .replace("test_size = 500", "test_size = 200")
}

/// A run directory of `config` trained with `args`, in `dir/<out>`.
fn run(dir: &Path, config: &str, out: &str, args: &[&str]) -> PathBuf {
    let file = format!("{out}.toml");
    std::fs::write(dir.join(&file), config).unwrap();
    let mut all = vec!["run", &file, "--out", out, "--quiet"];
    all.extend_from_slice(args);
    assert_ok(&trellis(dir, &all));
    dir.join(out)
}

#[test]
fn out_of_tree_model_trains_prunes_resumes_and_reloads_through_the_existing_binary() {
    let binary = trellis_bin();
    let built = built_at(&binary);
    let wrn = build_out_of_tree("wide_resnet", "wide_resnet");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    manifest(
        d,
        ("wide-resnet", &wrn),
        &[
            "trellis-optim",
            "trellis-metrics",
            "trellis-snip",
            "trellis-htsr",
        ],
    );
    let listed = trellis(d, &["plugins"]);
    assert_ok(&listed);
    assert!(
        stdout(&listed).contains("models:") && stdout(&listed).contains("wide_resnet"),
        "{}",
        stdout(&listed)
    );

    // It trains.
    let plain = wide_resnet_config("");
    let full = run(d, &plain, "full", &[]);
    let losses = train_losses(&full);
    assert_eq!(losses.len(), 2);
    assert!(losses[1] < losses[0], "{losses:?}");
    let plugins = std::fs::read_to_string(full.join("plugins.json")).unwrap();
    assert!(plugins.contains("model wide_resnet"), "{plugins}");
    let model = read(&full.join("model.safetensors"));
    assert_eq!(model["block3.layer.0.conv2.weight"].size(), [64, 64, 3, 3]);
    assert_eq!(model["fc.weight"].size(), [10, 64]);
    assert!(model.contains_key("block2.layer.0.bn1.running_var"));
    let saved = std::fs::read_to_string(full.join("config.toml")).unwrap();
    assert!(
        saved.contains("use = \"wide_resnet\"") && saved.contains("depth = 10"),
        "{saved}"
    );

    // Stopped after one epoch and resumed, it ends where the uninterrupted run did, bit for bit:
    // weights and BatchNorm statistics.
    let resumed = run(d, &plain, "resumed", &["--stop-after", "1"]);
    assert_eq!(metrics(&resumed).len(), 1);
    run(d, &plain, "resumed", &["--resume"]);
    assert_eq!(train_losses(&resumed), losses);
    let after_resume = read(&resumed.join("model.safetensors"));
    assert_eq!(
        after_resume.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>()
    );
    for (name, t) in &model {
        assert!(after_resume[name].equal(t), "{name} differs after a resume");
    }

    // SNIP prunes it and htsr analyses it, per layer, by the plugin's module names; the pruned
    // weights stay exactly zero.
    let pruned = wide_resnet_config(
        "\n[pruner]\nuse = \"snip\"\nsparsity = 0.5\nsamples_per_class = 2\n\n[[metrics]]\nuse = \"htsr\"\nplots = false\n",
    );
    let pruned = run(d, &pruned, "pruned", &[]);
    let records = metrics(&pruned);
    assert_eq!(records.len(), 2);
    let density = records[0]["tables"]["density"].as_object().unwrap();
    // 9 convolutions (stem, 2 per block, 2 shortcuts) and the classifier.
    assert_eq!(density.len(), 10, "{density:?}");
    assert!(density.contains_key("block2.layer.0.convShortcut.weight"));
    let htsr = records[1]["tables"]["htsr"].as_object().unwrap();
    for layer in [
        "conv1",
        "block1.layer.0.conv1",
        "block3.layer.0.conv2",
        "fc",
    ] {
        assert!(htsr.contains_key(layer), "no htsr row {layer}: {htsr:?}");
    }
    assert!(htsr["block3.layer.0.conv2"]["alpha"].as_f64().is_some());

    let weights = read(&pruned.join("model.safetensors"));
    let state = read(&pruned.join("checkpoint/state.safetensors"));
    let (mut zeros, mut total) = (0, 0);
    for name in density.keys() {
        let mask = &state[&format!("masks/{name}")];
        let w = &weights[name];
        assert_eq!(mask.size(), w.size(), "{name}");
        let at_pruned = w.masked_select(&mask.eq(0));
        assert_eq!(
            count_nonzero(&at_pruned),
            0,
            "{name}: pruned weights moved off zero"
        );
        assert!(count_nonzero(&w.masked_select(&mask.eq(1))) > 0, "{name}");
        zeros += w.numel() as i64 - count_nonzero(w);
        total += w.numel() as i64;
    }
    let share = zeros as f64 / total as f64;
    assert!(
        (share - 0.5).abs() < 1e-3,
        "{zeros} of {total} weights are zero"
    );

    // The saved weights load into the plugin's own definition of the model, which the run
    // directory's config.toml describes: `trellis esd` finds the α htsr measured on them.
    let config = pruned.join("config.toml");
    let weights = pruned.join("model.safetensors");
    let esd = trellis(
        d,
        &[
            "esd",
            "--config",
            config.to_str().unwrap(),
            weights.to_str().unwrap(),
        ],
    );
    assert_ok(&esd);
    let text = stdout(&esd);
    for layer in [
        "conv1",
        "block2.layer.0.convShortcut",
        "block3.layer.0.conv2",
        "fc",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{layer} ")))
            .unwrap_or_else(|| panic!("no {layer} row in:\n{text}"));
        if let Some(alpha) = htsr[layer]["alpha"].as_f64() {
            let alpha = format!("{alpha:.4}");
            assert!(line.contains(&alpha), "{line} lacks htsr's α {alpha}");
        }
    }

    assert_eq!(built, built_at(&binary), "the trellis binary was rebuilt");
}
