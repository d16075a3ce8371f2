//! The core issue's end-to-end behaviour: the `trellis` binary with real plugin dylibs.

use std::path::Path;

use tch::Tensor;
use trellis_tests::*;

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(path).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn synthetic_run_learns_and_writes_its_run_directory() {
    let config = small_config("\n[[metrics]]\nuse = \"ece\"\n")
        .replace("train_size = 1000", "train_size = 2000");
    let (dir, _) = setup(&config);
    let out = trellis(dir.path(), &["run", "run.toml", "--out", "out", "--quiet"]);
    assert_ok(&out);
    let run = dir.path().join("out");
    let records = metrics(&run);
    assert_eq!(records.len(), 2);
    let top1 = records[1]["test"]["top1"].as_f64().unwrap();
    // Ten classes: chance is 10 %. With 500 test images its standard error is 1.3 points, so
    // 20 % is ~7 standard errors above chance; seeds give 22-34 % at this size and length.
    assert!(
        top1 > 20.0,
        "test accuracy {top1} is not clearly above chance"
    );
    assert!(
        records[1]["train_loss"].as_f64().unwrap() < records[0]["train_loss"].as_f64().unwrap()
    );
    assert!(records[0]["lr"]["all"].as_f64().unwrap() > records[1]["lr"]["all"].as_f64().unwrap());
    for r in &records {
        // The steps alone, so less than the epoch with its evaluation and checkpoint.
        let (train, epoch) = (r["train_seconds"].as_f64(), r["epoch_seconds"].as_f64());
        assert!(
            matches!((train, epoch), (Some(t), Some(e)) if 0.0 < t && t < e),
            "{r}"
        );
    }
    for key in ["ece", "loss", "top5"] {
        assert!(
            records[1]["test"][key].is_number(),
            "{key} missing: {}",
            records[1]
        );
    }

    // The exported model uses the reference parameter names.
    let names: Vec<String> = tensors(&run.join("model.safetensors"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for expected in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.bn2.bias",
        "linear.weight",
        "linear.bias",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }

    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        config.contains("batch_size = 50") && config.contains("eval_batch_size"),
        "{config}"
    );
    let plugins: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plugins.json")).unwrap()).unwrap();
    let optim = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "trellis-optim")
        .unwrap();
    assert_eq!(optim["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(optim["components"][0], "optimizer sgd");
    assert!(
        stdout(&out).contains("top1"),
        "no summary table:\n{}",
        stdout(&out)
    );
}

#[test]
fn corrupt_checkpoint_is_refused_and_left_alone() {
    let (dir, _) = setup(&tiny("").replace("epochs = 1", "epochs = 2"));
    assert_ok(&trellis(
        dir.path(),
        &[
            "run",
            "run.toml",
            "--out",
            "out",
            "--quiet",
            "--stop-after",
            "1",
        ],
    ));
    let state = dir.path().join("out/checkpoint/model.safetensors");
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() - 100]).unwrap();
    let err = assert_error(&trellis(
        dir.path(),
        &["run", "run.toml", "--out", "out", "--quiet", "--resume"],
    ));
    assert!(
        err.contains("corrupt") && err.contains("model.safetensors"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap().len(),
        bytes.len() - 100,
        "the checkpoint was touched"
    );
}

#[test]
fn config_errors_name_file_line_and_fix() {
    let (dir, _) = setup(&tiny("").replace("batch_size = 50", "batch_size = 50\nbatchsize = 3"));
    let err = assert_error(&trellis(dir.path(), &["run", "run.toml"]));
    assert!(err.contains("unknown field `batchsize`"), "{err}");
    assert!(err.contains("run.toml:14:1"), "{err}");

    // A key the plugin refuses is reported at its line in the run config.
    let (dir, _) = setup(&tiny("momentm = 0.9\n"));
    let err = assert_error(&trellis(dir.path(), &["run", "run.toml"]));
    assert!(
        err.contains("optimizer `sgd` (plugin trellis-optim) refused its configuration"),
        "{err}"
    );
    assert!(
        err.contains("momentm") && err.contains("run.toml:19:1"),
        "{err}"
    );

    // So is a value the plugin refuses.
    let (dir, _) = setup(&tiny("momentum = -1.0\n"));
    let err = assert_error(&trellis(dir.path(), &["run", "run.toml"]));
    assert!(
        err.contains("momentum must be >= 0") && err.contains("run.toml:19"),
        "{err}"
    );

    let (dir, _) = setup(&tiny("").replace("lr = 0.05", "lr = 0.05 0.1"));
    let err = assert_error(&trellis(dir.path(), &["run", "run.toml"]));
    assert!(err.contains("run.toml:18"), "{err}");
}

#[test]
fn set_overrides_any_key() {
    let (dir, _) = setup(&tiny(""));
    let out = trellis(
        dir.path(),
        &[
            "run",
            "run.toml",
            "--out",
            "o",
            "--quiet",
            "--set",
            "train.epochs=2",
            "--set",
            "optimizer.momentum=0.5",
        ],
    );
    assert_ok(&out);
    assert_eq!(metrics(&dir.path().join("o")).len(), 2);
    let config = std::fs::read_to_string(dir.path().join("o/config.toml")).unwrap();
    assert!(config.contains("momentum = 0.5"), "{config}");
}

#[test]
fn unknown_component_lists_the_available_ones() {
    let (dir, _) = setup(&tiny("").replace("use = \"sgd\"", "use = \"sgdd\""));
    let err = assert_error(&trellis(dir.path(), &["run", "run.toml"]));
    assert!(err.contains("no optimizer named `sgdd`"), "{err}");
    assert!(
        err.contains("sgd (plugin trellis-optim)") && err.contains("adamw (plugin trellis-optim)"),
        "{err}"
    );
    assert!(err.contains("run.toml:17"), "{err}");
}

fn manifest_error(manifest: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plugins.toml"), manifest).unwrap();
    std::fs::write(dir.path().join("run.toml"), tiny("")).unwrap();
    assert_error(&trellis(dir.path(), &["run", "run.toml"]))
}

fn entry(name: &str, path: &Path) -> String {
    format!(
        "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n",
        path.display()
    )
}

#[test]
fn each_load_error_is_reported_clearly() {
    let optim = plugin("trellis-optim");

    let err = manifest_error(&entry("trellis-optim", Path::new("missing/libnothing.so")));
    assert!(
        err.contains("does not exist") && err.contains("plugins.toml:3"),
        "{err}"
    );

    let text_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text_file.path(), "not a library").unwrap();
    let err = manifest_error(&entry("x", text_file.path()));
    assert!(
        err.contains("cannot load plugin") && err.contains("not a shared library"),
        "{err}"
    );

    // A real shared library that is not a plugin.
    let err = manifest_error(&entry("m", &plugin("trellis-fixture-old-abi")));
    assert!(
        err.contains("ABI version 1")
            && err.contains("uses ABI version 2")
            && err.contains("rebuild the plugin"),
        "{err}"
    );
    let foreign = [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists())
    .expect("a system library to stand in for a foreign .so");
    let err = manifest_error(&entry("z", foreign));
    assert!(err.contains("is not a Trellis plugin"), "{err}");

    let err = manifest_error(&entry(
        "trellis-fixture-mismatch",
        &plugin("trellis-fixture-mismatch"),
    ));
    assert!(
        err.contains("libtorch 1.13.1+cpu") && err.contains("rebuild it"),
        "{err}"
    );

    let pinned = format!(
        "{}sha256 = \"{}\"\n",
        entry("trellis-optim", &optim),
        "0".repeat(64)
    );
    let err = manifest_error(&pinned);
    assert!(
        err.contains("does not match its sha256 pin") && err.contains("plugins.toml:4"),
        "{err}"
    );

    let twice = format!(
        "{}\n{}",
        entry("trellis-optim", &optim),
        entry("trellis-optim", &optim)
    );
    let err = manifest_error(&twice);
    assert!(err.contains("optimizer `sgd` is provided twice"), "{err}");

    let err = manifest_error(&entry("optimizers", &optim));
    assert!(err.contains("declares itself `trellis-optim`"), "{err}");

    let err = manifest_error("[[plugin]]\nname = \"a\"\npaht = \"x.so\"\n");
    assert!(
        err.contains("unknown field `paht`") && err.contains("plugins.toml:3"),
        "{err}"
    );
}

#[test]
fn cuda_and_tch_claims_are_checked_too() {
    for (claim, expected) in [("tch", "tch 0.1.0"), ("cuda", "libtorch")] {
        let dir = tempfile::tempdir().unwrap();
        write_manifest(dir.path(), &["trellis-fixture-mismatch"]);
        let out = std::process::Command::new(trellis_bin())
            .args(["plugins", "--manifest", "plugins.toml"])
            .current_dir(dir.path())
            .env("TRELLIS_FIXTURE_CLAIM", claim)
            .output()
            .unwrap();
        let err = assert_error(&out);
        assert!(
            err.contains(expected) && err.contains("rebuild it"),
            "{claim}: {err}"
        );
    }
}

#[test]
fn panicking_plugins_are_contained_and_named() {
    let setup_with = |config: &str| {
        let dir = tempfile::tempdir().unwrap();
        write_manifest(
            dir.path(),
            &[
                "trellis-optim",
                "trellis-metrics",
                "trellis-fixture-misbehaving",
            ],
        );
        std::fs::write(dir.path().join("run.toml"), config).unwrap();
        dir
    };

    let dir = setup_with(&tiny("").replace("use = \"sgd\"", "use = \"panic_on_step\""));
    let err = assert_error(&trellis(
        dir.path(),
        &["run", "run.toml", "--out", "o", "--quiet"],
    ));
    assert!(
        err.contains(
            "optimizer `panic_on_step` (plugin trellis-fixture-misbehaving) panicked: boom in step"
        ),
        "{err}"
    );
    assert!(
        err.contains("src/lib.rs:"),
        "the panic location is missing: {err}"
    );

    let dir = setup_with(&tiny("[[metrics]]\nuse = \"panic_in_new\"\n"));
    let err = assert_error(&trellis(
        dir.path(),
        &["run", "run.toml", "--out", "o", "--quiet"],
    ));
    assert!(
        err.contains(
            "metric `panic_in_new` (plugin trellis-fixture-misbehaving) panicked: boom in new"
        ),
        "{err}"
    );

    // Panics in the small questions the host asks are reported too, never answered by a default.
    for (table, name) in [
        ("metrics", "panic_in_wants_batches"),
        ("distillers", "panic_in_replaces_task_loss"),
        ("callbacks", "panic_in_events"),
    ] {
        let dir = setup_with(&tiny(&format!("[[{table}]]\nuse = \"{name}\"\n")));
        let err = assert_error(&trellis(
            dir.path(),
            &["run", "run.toml", "--out", "o", "--quiet"],
        ));
        let boom = name.trim_start_matches("panic_in_");
        assert!(
            err.contains(&format!(
                "`{name}` (plugin trellis-fixture-misbehaving) panicked: boom in {boom}"
            )),
            "{err}"
        );
    }

    // tch's own panicking methods (a shape mismatch in libtorch) are contained as well, and the
    // plugin's tracing events reach the host's log under the plugin's name.
    let dir = setup_with(&tiny("[[metrics]]\nuse = \"shape_mismatch\"\n"));
    let err = assert_error(&trellis(
        dir.path(),
        &["run", "run.toml", "--out", "o", "--quiet"],
    ));
    assert!(
        err.contains("metric `shape_mismatch` (plugin trellis-fixture-misbehaving) panicked"),
        "{err}"
    );
    assert!(
        err.contains("size mismatch") || err.contains("shapes cannot be multiplied"),
        "{err}"
    );
    assert!(
        err.lines().any(|l| l.contains(
            "INFO trellis-fixture-misbehaving: shape_mismatch is about to fail answer=42"
        )),
        "the plugin's tracing event did not reach the host's log with the plugin as target:\n{err}"
    );
    // The epoch's training completed and was logged before the failure: nothing was lost.
    assert!(dir.path().join("o/config.toml").exists());
}

#[test]
fn nan_loss_stops_the_run_with_a_clear_error() {
    let (dir, _) = setup(&tiny("").replace("lr = 0.05", "lr = 1e30"));
    let err = assert_error(&trellis(
        dir.path(),
        &["run", "run.toml", "--out", "o", "--quiet"],
    ));
    assert!(
        err.contains("training loss became") && err.contains("lower optimizer.lr"),
        "{err}"
    );
}

#[test]
fn truncated_dataset_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &["trellis-optim"]);
    let data = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("data_batch_1.bin"), vec![0u8; 3073 * 3 + 17]).unwrap();
    let config = tiny("").replace(
        "train_size = 200\ntest_size = 100",
        "source = \"cifar10\"\npath = \"cifar-10-batches-bin\"",
    );
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    let err = assert_error(&trellis(dir.path(), &["run", "run.toml"]));
    assert!(err.contains("data_batch_1.bin"), "{err}");
}

#[test]
fn plugins_command_lists_and_inspects() {
    let (dir, _) = setup(&tiny(""));
    let out = trellis(dir.path(), &["plugins"]);
    assert_ok(&out);
    let text = stdout(&out);
    for expected in [
        "optimizers:",
        "sgd",
        "adamw",
        "metrics:",
        "accuracy",
        "ece",
        "momentum = 0.9",
        "bins = 15",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    let lib = plugin("trellis-metrics");
    let out = trellis(dir.path(), &["plugins", "inspect", lib.to_str().unwrap()]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("plugin   trellis-metrics")
            && text.contains("ABI 2")
            && text.contains("libtorch 2.11.0"),
        "{text}"
    );
    assert!(
        text.contains("metric `ece`: expected calibration error"),
        "{text}"
    );
}

/// A plugin's model is used exactly like a built-in one: trained, pruned, checkpointed and
/// resumed, exported under the names it declares, analysed by `trellis esd`, and usable as a KD
/// teacher. The fixture wraps a model the host builds from a nested spec.
#[test]
fn a_plugin_model_works_everywhere_a_builtin_one_does() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(
        dir.path(),
        &[
            "trellis-optim",
            "trellis-metrics",
            "trellis-pai-baselines",
            "trellis-kd",
            "trellis-fc-augment",
            "trellis-tempbalance",
            "trellis-fixture-models",
        ],
    );
    let model =
        "[model]\nuse = \"wrapper\"\nbase = { arch = \"mlp\", hidden = [16] }\nscale = 2.0\n";
    let config = tiny(
        "[[metrics]]\nuse = \"accuracy\"\n\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\nat_step = 2\n\n\
         [scheduler]\nuse = \"tempbalance\"\n\n[[distillers]]\nuse = \"fc_augment\"\n",
    )
        .replace("[model]\narch = \"mlp\"\nhidden = [32]\n", model)
        .replace("epochs = 1", "epochs = 2");
    std::fs::write(dir.path().join("run.toml"), &config).unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["run", "run.toml", "--quiet"];
        all.extend_from_slice(args);
        trellis(dir.path(), &all)
    };
    assert_ok(&run(&["--out", "straight"]));
    assert_ok(&run(&["--out", "resumed", "--stop-after", "1"]));
    assert_ok(&run(&["--out", "resumed", "--resume"]));

    let straight = tensors(&dir.path().join("straight/model.safetensors"));
    let resumed = tensors(&dir.path().join("resumed/model.safetensors"));
    let names: Vec<&str> = straight.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["fc0.bias", "fc0.weight", "head.bias", "head.weight"]
    );
    for ((name, a), (_, b)) in straight.iter().zip(&resumed) {
        assert!(a.equal(b), "{name} differs after resuming");
    }
    let weights = &straight[1].1;
    let zeros = weights.eq(0.0).sum(tch::Kind::Int64).int64_value(&[]);
    assert!(
        zeros > 0,
        "the pruned weights of the plugin model are not zero"
    );
    let records = metrics(&dir.path().join("straight"));
    assert!(records[1]["test"]["top1"].as_f64().is_some(), "{records:?}");

    // The exported weights load into the plugin's own definition, built from the run's config.
    let out = trellis(
        dir.path(),
        &[
            "esd",
            "straight/model.safetensors",
            "--config",
            "straight/config.toml",
        ],
    );
    assert_ok(&out);
    assert!(
        stdout(&out).contains("fc0") && stdout(&out).contains("head"),
        "{}",
        stdout(&out)
    );

    // `trellis prune` sets the plugin model up as `trellis run` does.
    let out = trellis(
        dir.path(),
        &["prune", "run.toml", "--out", "masks.safetensors"],
    );
    assert_ok(&out);
    let masks = tensors(&dir.path().join("masks.safetensors"));
    let names: Vec<&str> = masks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["fc0.weight", "head.weight"]);

    // As a KD student and teacher: both tables are a plugin model's.
    let kd = tiny(
        "[[distillers]]\nuse = \"kd\"\nteacher = { use = \"wrapper\", base = { arch = \"mlp\", hidden = [16] }, scale = 2.0 }\nteacher_checkpoint = \"straight/model.safetensors\"\n",
    );
    let kd = kd.replace("[model]\narch = \"mlp\"\nhidden = [32]\n", model);
    std::fs::write(dir.path().join("kd.toml"), kd).unwrap();
    assert_ok(&trellis(
        dir.path(),
        &["run", "kd.toml", "--out", "kd", "--quiet"],
    ));

    // Autocast is the built-in layers' and is refused for a plugin's model.
    let out = trellis(
        dir.path(),
        &[
            "run",
            "run.toml",
            "--out",
            "bf16",
            "--quiet",
            "--set",
            "train.autocast=\"bf16\"",
        ],
    );
    let err = assert_error(&out);
    assert!(
        err.contains("train.autocast applies to the built-in"),
        "{err}"
    );

    // The plugin refuses a key at its line in the run config.
    std::fs::write(
        dir.path().join("bad.toml"),
        config.replace("scale = 2.0", "scael = 2.0"),
    )
    .unwrap();
    let err = assert_error(&trellis(
        dir.path(),
        &["run", "bad.toml", "--out", "bad", "--quiet"],
    ));
    assert!(
        err.contains("model `wrapper` (plugin trellis-fixture-models) refused its configuration")
            && err.contains("bad.toml:6:1"),
        "{err}"
    );
}
