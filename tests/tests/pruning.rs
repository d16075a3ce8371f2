//! Pruning at initialisation end to end: the pruner plugins through the released binary, masks
//! kept exactly through training, momentum, weight decay and a resume, the `at_step` point,
//! `trellis prune`'s files, and the config errors.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};
use trellis_tests::*;

const PRUNERS: [&str; 5] = [
    "trellis-optim",
    "trellis-metrics",
    "trellis-snip",
    "trellis-grasp",
    "trellis-pai-baselines",
];

/// A temp dir with every pruner in the manifest and `run.toml` = `config`.
fn setup_pruning(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &PRUNERS);
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    dir
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn count(t: &Tensor) -> i64 {
    t.count_nonzero(None::<i64>).int64_value(&[])
}

/// k = round((1 − d)·N) pruned: the kept count a density must give exactly.
fn expected_kept(density: f64, total: i64) -> i64 {
    total - ((1.0 - density) * total as f64).round() as i64
}

fn kept_and_total(masks: &BTreeMap<String, Tensor>) -> (i64, i64) {
    masks
        .values()
        .fold((0, 0), |(k, n), m| (k + count(m), n + m.numel() as i64))
}

#[test]
fn pruned_weights_stay_exactly_zero_through_momentum_weight_decay_and_resume() {
    // 20 steps per epoch; pruning after 5 steps, when SGD's momentum buffers already hold
    // values for the weights about to be pruned: only re-masking after each step keeps them 0.
    let config = small_config(
        "\n[pruner]\nuse = \"snip\"\nsparsity = 0.9\nat_step = 5\nsamples_per_class = 5\n",
    );
    let dir = setup_pruning(&config);
    let d = dir.path();
    let o = trellis(d, &["prune", "run.toml", "--out", "masks.safetensors"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("per-layer density"), "{}", stdout(&o));
    assert_ok(&trellis(
        d,
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
    let o = trellis(
        d,
        &["run", "run.toml", "--out", "out", "--quiet", "--resume"],
    );
    assert_ok(&o);
    assert!(stdout(&o).contains("per-layer density"), "{}", stdout(&o));

    let masks = read(&d.join("masks.safetensors"));
    assert_eq!(masks.len(), 21, "ResNet18 has 21 conv and linear weights");
    let (kept, total) = kept_and_total(&masks);
    assert_eq!(kept, expected_kept(0.1, total));

    // The run's masks (in its checkpoint) are the ones `trellis prune` computed.
    let state = read(&d.join("out/checkpoint/state.safetensors"));
    for (name, mask) in &masks {
        let saved = &state[&format!("masks/{name}")];
        assert!(saved.equal(&mask.to_kind(saved.kind())), "{name}");
    }

    let model = read(&d.join("out/model.safetensors"));
    for (name, mask) in &masks {
        let weight = &model[name];
        let pruned_nonzero = count(&weight.masked_select(&mask.eq(0)));
        assert_eq!(pruned_nonzero, 0, "{name}: pruned weights moved off zero");
        // The kept ones trained (and are not all zero).
        assert!(count(&weight.masked_select(&mask.eq(1))) > 0, "{name}");
    }

    let records = metrics(&d.join("out"));
    assert_eq!(records.len(), 2);
    let global = &records[0]["tables"]["pruning"]["global"];
    assert_eq!(global["step"], 5.0);
    assert_eq!(global["kept"].as_f64().unwrap() as i64, kept);
    assert_eq!(global["total"].as_f64().unwrap() as i64, total);
    assert!((global["target"].as_f64().unwrap() - 0.1).abs() < 1e-12);
    let layers = records[0]["tables"]["density"].as_object().unwrap();
    assert_eq!(layers.len(), 21);
    let conv1 = &layers["conv1.weight"];
    assert_eq!(
        conv1["kept"].as_f64().unwrap() as i64,
        count(&masks["conv1.weight"])
    );
    assert!(records[1]["tables"].get("pruning").is_none());
}

#[test]
fn at_step_prunes_after_exactly_n_training_iterations() {
    // 250 images in batches of 50: one epoch is exactly 5 steps.
    let base = small_config("")
        .replace("train_size = 1000", "train_size = 250")
        .replace("kind = \"cosine\"", "kind = \"constant\"");
    let dir = setup_pruning(&format!(
        "{base}\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\nat_step = 5\n"
    ));
    let d = dir.path();
    for at in ["5", "4"] {
        let set = format!("pruner.at_step={at}");
        let out = format!("masks{at}.safetensors");
        let weights = format!("weights{at}.safetensors");
        let o = trellis(
            d,
            &[
                "prune",
                "run.toml",
                "--out",
                &out,
                "--weights",
                &weights,
                "--set",
                &set,
            ],
        );
        assert_ok(&o);
    }
    // The same run without a pruner, stopped after its first epoch: 5 steps.
    std::fs::write(d.join("plain.toml"), &base).unwrap();
    assert_ok(&trellis(
        d,
        &[
            "run",
            "plain.toml",
            "--out",
            "plain",
            "--quiet",
            "--stop-after",
            "1",
        ],
    ));
    let after_five = read(&d.join("plain/checkpoint/model.safetensors"));
    let at_five = read(&d.join("weights5.safetensors"));
    let at_four = read(&d.join("weights4.safetensors"));
    assert_eq!(after_five.len(), at_five.len());
    for (name, t) in &after_five {
        assert!(
            t.equal(&at_five[name]),
            "{name} differs from the weights after 5 steps"
        );
    }
    assert!(
        after_five.iter().any(|(n, t)| !t.equal(&at_four[n])),
        "pruning at step 4 must see different weights than after 5 steps"
    );
    // Magnitude pruned those exact weights: the 50 % smallest |w| of the step-5 weights.
    let masks = read(&d.join("masks5.safetensors"));
    let w = &at_five["conv1.weight"];
    let kept_min = w.abs().masked_select(&masks["conv1.weight"].eq(1)).min();
    let pruned_max = w.abs().masked_select(&masks["conv1.weight"].eq(0)).max();
    assert!(kept_min.double_value(&[]) >= pruned_max.double_value(&[]));
}

#[test]
fn every_method_prunes_a_resnet_to_the_exact_density_and_saves_what_it_saw() {
    let config = small_config(
        "\n[pruner]\nuse = \"snip\"\ndensity = 0.05\nsamples_per_class = 2\nbatches = 2\n",
    );
    let dir = setup_pruning(&config);
    let d = dir.path();
    for (i, (method, extras)) in [
        ("snip", &["pruner.bn_mode=\"train\""][..]),
        ("grasp", &["pruner.bn_mode=\"eval\""]),
        ("grasp", &["pruner.reinit_classifier=true"]),
        ("synflow", &["pruner.rounds=3"]),
        ("synflow", &["pruner.rounds=3", "pruner.dtype=\"float32\""]),
        ("magnitude", &["train.seed=3"]),
        ("random", &["pruner.seed=11"]),
    ]
    .into_iter()
    .enumerate()
    {
        let set_use = format!("pruner.use=\"{method}\"");
        let out = format!("{method}{i}.safetensors");
        let scores = format!("{method}{i}-scores.safetensors");
        let mut args = vec![
            "prune",
            "run.toml",
            "--out",
            &out,
            "--scores",
            &scores,
            "--batch",
            "batch.safetensors",
            "--set",
            &set_use,
        ];
        for extra in extras {
            args.extend(["--set", extra]);
        }
        let o = trellis(d, &args);
        assert_ok(&o);
        let masks = read(&d.join(&out));
        let (kept, total) = kept_and_total(&masks);
        assert_eq!(kept, expected_kept(0.05, total), "{method} {extras:?}");
        let scores = read(&d.join(&scores));
        assert_eq!(scores.len(), masks.len(), "{method}");
        let float32 = extras.iter().any(|e| e.contains("float32"));
        for (name, s) in &scores {
            assert_eq!(s.size(), masks[name].size(), "{method} {name}");
            let finite = s.isfinite().all().int64_value(&[]) != 0;
            assert!(finite, "{method}: scores of {name} are not finite");
            if method == "synflow" {
                let kind = if float32 { Kind::Float } else { Kind::Double };
                assert_eq!(s.kind(), kind, "{method} {extras:?} {name}");
            }
        }
    }
    // Re-initialising GraSP's classifier changes what it scores.
    let grasp = read(&d.join("grasp1-scores.safetensors"));
    let reinit = read(&d.join("grasp2-scores.safetensors"));
    assert!(!grasp["linear.weight"].equal(&reinit["linear.weight"]));
    // The scoring batch: 2 per class, 10 classes, split in two class-balanced halves.
    let batch = read(&d.join("batch.safetensors"));
    assert_eq!(batch["inputs"].size(), [20, 3, 32, 32]);
    assert_eq!(
        Vec::<i64>::try_from(&batch["batch_sizes"]).unwrap(),
        [10, 10]
    );
    let targets = Vec::<i64>::try_from(&batch["targets"]).unwrap();
    let mut first: Vec<i64> = targets[..10].to_vec();
    first.sort_unstable();
    assert_eq!(first, (0..10).collect::<Vec<_>>());
}

#[test]
fn scoring_draws_random_or_augmented_samples_with_the_run_seed() {
    let config = small_config(
        "\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\nsamples_per_class = 3\nbatches = 2\n",
    );
    let dir = setup_pruning(&config);
    let d = dir.path();
    let batch = |name: &str, sets: &[&str]| {
        let file = format!("{name}.safetensors");
        let mut args = vec![
            "prune",
            "run.toml",
            "--out",
            "m.safetensors",
            "--batch",
            &file,
        ];
        for set in sets {
            args.extend(["--set", set]);
        }
        assert_ok(&trellis(d, &args));
        read(&d.join(&file))
    };
    let labels = |b: &BTreeMap<String, Tensor>| Vec::<i64>::try_from(&b["targets"]).unwrap();
    let per_class = |b: &BTreeMap<String, Tensor>| {
        let mut counts = [0; 10];
        for l in labels(b) {
            counts[l as usize] += 1;
        }
        counts
    };

    let balanced = batch("balanced", &[]);
    assert_eq!(per_class(&balanced), [3; 10]);
    assert_eq!(
        Vec::<i64>::try_from(&balanced["batch_sizes"]).unwrap(),
        [15, 15]
    );
    // 3 × 10 images drawn whatever their class: the seed's draw is not balanced, and the same
    // seed draws it again.
    let random = batch("random", &["pruner.scoring=\"random\""]);
    assert_eq!(random["inputs"].size(), [30, 3, 32, 32]);
    assert_ne!(per_class(&random), [3; 10]);
    let again = batch("random_again", &["pruner.scoring=\"random\""]);
    assert!(random["inputs"].equal(&again["inputs"]));
    assert_eq!(labels(&random), labels(&again));
    let other_seed = batch(
        "random_seed4",
        &["pruner.scoring=\"random\"", "train.seed=4"],
    );
    assert_ne!(labels(&random), labels(&other_seed));
    // The run's crop and flip change the pixels of the same images, not their labels.
    for (name, sets) in [
        ("balanced_augmented", &["pruner.scoring_augment=true"][..]),
        (
            "random_augmented",
            &["pruner.scoring_augment=true", "pruner.scoring=\"random\""],
        ),
    ] {
        let augmented = batch(name, sets);
        let plain = if name.starts_with("random") {
            &random
        } else {
            &balanced
        };
        assert_eq!(labels(&augmented), labels(plain), "{name}");
        assert_eq!(augmented["inputs"].size(), plain["inputs"].size(), "{name}");
        assert!(!augmented["inputs"].equal(&plain["inputs"]), "{name}");
    }
}

#[test]
fn synflow_scores_a_full_width_resnet18_without_overflow_and_reaches_the_target() {
    let config = small_config("\n[pruner]\nuse = \"synflow\"\nsparsity = 0.98\nrounds = 4\n")
        .replace("width = 0.125", "width = 1.0")
        .replace("train_size = 1000", "train_size = 100");
    let dir = setup_pruning(&config);
    let d = dir.path();
    let o = trellis(
        d,
        &[
            "prune",
            "run.toml",
            "--out",
            "m.safetensors",
            "--scores",
            "s.safetensors",
        ],
    );
    assert_ok(&o);
    let masks = read(&d.join("m.safetensors"));
    let (kept, total) = kept_and_total(&masks);
    assert_eq!(total, 11_164_352, "full-width ResNet18's prunable weights");
    assert_eq!(kept, expected_kept(0.02, total));
    for (name, s) in read(&d.join("s.safetensors")) {
        assert_eq!(s.kind(), Kind::Double, "{name}");
        assert!(
            s.isfinite().all().int64_value(&[]) != 0,
            "{name} overflowed"
        );
    }
    // R = Σ f(1) of the unpruned network, as the plugin logs it: METHODS.md expects about 1e28.
    let log = stderr(&o);
    let first_flow: f64 = log
        .split("R = Σ f(1) = ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no synflow R in the log:\n{log}"));
    assert!(
        (1e25..1e31).contains(&first_flow),
        "R = {first_flow:e} in round 1"
    );
}

#[test]
fn a_saved_mask_file_starts_a_run_and_a_collapsed_layer_is_reported() {
    let config = small_config("\n[pruner]\nuse = \"magnitude\"\ncompression = 1\n")
        .replace("epochs = 2", "epochs = 1");
    let dir = setup_pruning(&config);
    let d = dir.path();
    assert_ok(&trellis(
        d,
        &["prune", "run.toml", "--out", "saved.safetensors"],
    ));
    // The same masks with one layer emptied by hand.
    let mut masks = read(&d.join("saved.safetensors"));
    let collapsed = "layer4.1.conv2.weight";
    masks.insert(collapsed.into(), masks[collapsed].zeros_like());
    let named: Vec<(String, Tensor)> = masks
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&named, d.join("edited.safetensors")).unwrap();

    let from_file = small_config("\n[pruner]\nmasks = \"edited.safetensors\"\n")
        .replace("epochs = 2", "epochs = 1");
    std::fs::write(d.join("from_file.toml"), from_file).unwrap();
    let o = trellis(d, &["run", "from_file.toml", "--out", "out", "--quiet"]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains(&format!("layer collapse: {collapsed}")),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).contains("collapsed"), "{}", stdout(&o));
    let model = read(&d.join("out/model.safetensors"));
    for (name, mask) in &masks {
        assert_eq!(count(&model[name].masked_select(&mask.eq(0))), 0, "{name}");
    }
    let first = &metrics(&d.join("out"))[0]["tables"];
    let (kept, _) = kept_and_total(&masks);
    assert_eq!(
        first["pruning"]["global"]["kept"].as_f64().unwrap() as i64,
        kept
    );
    assert_eq!(first["density"][collapsed]["density"], 0.0);
}

#[test]
fn bad_pruning_targets_are_refused_at_their_line() {
    let dir = setup_pruning("");
    let d = dir.path();
    // (the [pruner] body, a phrase of the error, the line the error must point at)
    let cases = [
        ("sparsity = 1.2", "out of range", "sparsity"),
        ("sparsity = 0.9\ndensity = 0.1", "only one of", "density"),
        // ResNet18 at width 0.125: layer2.0.shortcut.0 has 8·16 = 128 weights, and density
        // 0.003 keeps round(0.384) = 0 of them.
        (
            "density = 0.003\nscope = \"layer\"",
            "layer2.0.shortcut.0.weight",
            "density",
        ),
        ("sparsity = 0.9\nat_step = 40", "never prune", "at_step"),
        ("sparsity = 0.9\nbn_mode = \"batch\"", "bn_mode", "bn_mode"),
        (
            "sparsity = 0.9\nscoring = \"uniform\"",
            "`balanced`",
            "scoring",
        ),
    ];
    // Keys that only refuse in company: the scoring images can take no augmentation the run
    // does not have, and SynFlow's precision is one of two.
    let no_augment =
        small_config("\n[pruner]\nuse = \"snip\"\nsparsity = 0.9\nscoring_augment = true\n")
            .replace("test_size = 500", "test_size = 500\naugment = false");
    let synflow = |key: &str| {
        small_config(&format!(
            "\n[pruner]\nuse = \"synflow\"\nsparsity = 0.9\n{key}\n"
        ))
    };
    let snip_cases = cases.into_iter().map(|(body, needle, key)| {
        let config = small_config(&format!("\n[pruner]\nuse = \"snip\"\n{body}\n"));
        (config, needle, key)
    });
    let in_company = [
        (no_augment, "[data] augment = false", "scoring_augment"),
        (synflow("dtype = \"float16\""), "`float32`", "dtype"),
        (synflow("float64 = true"), "`dtype`", "float64"),
    ];
    for (config, needle, key) in snip_cases.chain(in_company) {
        let line = 1 + config
            .lines()
            .position(|l| l.starts_with(&format!("{key} =")))
            .unwrap();
        std::fs::write(d.join("bad.toml"), &config).unwrap();
        let e = assert_error(&trellis(d, &["run", "bad.toml", "--out", "bad", "--quiet"]));
        assert!(e.contains(needle), "{key}: {e}");
        assert!(e.contains(&format!("bad.toml:{line}:")), "{key}: {e}");
    }
    let config = small_config("\n[pruner]\nuse = \"snap\"\nsparsity = 0.9\n");
    std::fs::write(d.join("bad.toml"), &config).unwrap();
    let e = assert_error(&trellis(d, &["run", "bad.toml", "--out", "bad", "--quiet"]));
    assert!(e.contains("snap") && e.contains("snip"), "{e}");
}

#[test]
fn example_pruning_sweeps_expand_to_every_method_and_sparsity_and_load() {
    let dir = workspace_root().join("examples/pruning");
    let methods = ["snip", "grasp", "synflow", "magnitude", "random"];
    for (file, sparsities, seeds) in [
        ("sweep.toml", &[0.90, 0.98][..], 3),
        ("sweep_synthetic.toml", &[0.98][..], 2),
    ] {
        let sweep = trellis::sweep::Sweep::load(&dir.join(file), &[]).unwrap();
        let runs = sweep.runs();
        assert_eq!(
            runs.len(),
            methods.len() * sparsities.len() * seeds,
            "{file}"
        );
        let mut seen = std::collections::BTreeSet::new();
        for run in &runs {
            let cfg = trellis::config::LoadedConfig::load(&run.config, &run.overrides)
                .unwrap_or_else(|e| panic!("{file} {}: {e:#}", run.id));
            let pruner = cfg.config.pruner.as_ref().expect("a [pruner] table");
            let method = pruner.component.clone().unwrap();
            let sparsity = 1.0 - pruner.density().unwrap();
            assert!(
                sparsities.iter().any(|s| (s - sparsity).abs() < 1e-12),
                "{file} {}",
                run.id
            );
            seen.insert((
                method,
                (sparsity * 100.0).round() as u32,
                cfg.config.train.seed,
            ));
        }
        assert_eq!(
            seen.len(),
            runs.len(),
            "{file}: every run is a different combination"
        );
        assert!(
            methods.iter().all(|m| seen.iter().any(|(s, _, _)| s == m)),
            "{file}"
        );
    }
    // The synthetic variant inherits everything but data, width, epochs and device.
    let synthetic = trellis::config::LoadedConfig::load(&dir.join("base_synthetic.toml"), &[])
        .unwrap()
        .config;
    let base = trellis::config::LoadedConfig::load(&dir.join("base.toml"), &[])
        .unwrap()
        .config;
    assert_eq!(synthetic.pruner, base.pruner);
    assert_eq!(synthetic.optimizer, base.optimizer);
    assert_eq!(synthetic.train.batch_size, base.train.batch_size);
    let trellis::models::ModelSpec::Builtin(model) = &synthetic.model else {
        panic!("a built-in model")
    };
    assert_eq!((model.width, synthetic.train.epochs), (0.25, 5));
}
