//! TempBalance and the htsr diagnostics end to end (METHODS.md section 5): a two-epoch run
//! whose per-layer rates follow the linear α map composed with cosine annealing, the per-layer
//! table and plots, a resumed run that continues identically, and `trellis esd` on the result.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use trellis_tests::{assert_ok, metrics, setup, small_config, stdout, trellis, write_manifest};

const PLUGINS: [&str; 4] = [
    "trellis-optim",
    "trellis-metrics",
    "trellis-tempbalance",
    "trellis-htsr",
];

/// small_config's optimizer.lr.
const LR0: f64 = 0.05;

/// small_config with half its data: these tests run `trellis` four times.
fn config(scheduler_options: &str) -> String {
    small_config(&format!(
        "\n[scheduler]\nuse = \"tempbalance\"\n{scheduler_options}\n\n[[metrics]]\nuse = \"htsr\"\n"
    ))
    .replace("train_size = 1000", "train_size = 500")
    .replace("test_size = 500", "test_size = 200")
}

fn run_dir_with(config: &str, args: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, _) = setup(config);
    write_manifest(dir.path(), &PLUGINS);
    let mut all = vec!["run", "run.toml", "--out", "out", "--quiet"];
    all.extend_from_slice(args);
    assert_ok(&trellis(dir.path(), &all));
    let run = dir.path().join("out");
    (dir, run)
}

fn numbers(value: &Value) -> BTreeMap<String, f64> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect()
}

/// η·(0.5 + (α − α_min)/(α_max − α_min)) for every layer.
fn linear_map(alphas: &BTreeMap<String, f64>, eta: f64) -> BTreeMap<String, f64> {
    let lo = alphas.values().cloned().fold(f64::INFINITY, f64::min);
    let hi = alphas.values().cloned().fold(f64::NEG_INFINITY, f64::max);
    alphas
        .iter()
        .map(|(layer, a)| (layer.clone(), eta * (0.5 + (a - lo) / (hi - lo))))
        .collect()
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[test]
fn per_layer_rates_follow_alpha_each_epoch_and_esd_reads_the_saved_model() {
    let (dir, run) = run_dir_with(&config(""), &[]);
    let records = metrics(&run);
    assert_eq!(records.len(), 2);
    // Cosine per epoch over T = 2: η_0 = lr0, η_1 = lr0·½(1 + cos(π/2)).
    let eta = [LR0, LR0 * 0.5 * (1.0 + (std::f64::consts::PI / 2.0).cos())];
    let rates: Vec<BTreeMap<String, f64>> = records.iter().map(|r| numbers(&r["lr"])).collect();

    // Width 0.125: every 3×3 block conv has ≥ 8·9 = 72 eigenvalues; conv1 (first), linear
    // (last) and the 1×1 shortcut convs (≤ 32 eigenvalues) stay in `rest`.
    let mut expected: Vec<String> = (1..=4)
        .flat_map(|s| {
            (0..2).flat_map(move |b| (1..=2).map(move |c| format!("layer{s}.{b}.conv{c}")))
        })
        .collect();
    expected.push("rest".into());
    expected.sort();
    for epoch_rates in &rates {
        assert_eq!(epoch_rates.keys().cloned().collect::<Vec<_>>(), expected);
    }
    for (epoch, epoch_rates) in rates.iter().enumerate() {
        assert!(
            (epoch_rates["rest"] - eta[epoch]).abs() < 1e-15,
            "{epoch_rates:?}"
        );
    }

    // Epoch 1 trained with the rates from the ESD at initialisation: exactly 0.5·η and 1.5·η
    // at the ends.
    let layers: Vec<&String> = rates[0].keys().filter(|k| *k != "rest").collect();
    let first: Vec<f64> = layers.iter().map(|l| rates[0][*l]).collect();
    let lo = first.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = first.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    assert!(
        (lo - 0.5 * LR0).abs() < 1e-15 && (hi - 1.5 * LR0).abs() < 1e-15,
        "{first:?}"
    );

    // Epoch 2 trained with the rates from the ESD after epoch 1, which htsr measured on the
    // same weights at the end of epoch 1.
    let table = &records[0]["tables"]["htsr"];
    let alphas: BTreeMap<String, f64> = layers
        .iter()
        .map(|l| ((*l).clone(), table[l.as_str()]["alpha"].as_f64().unwrap()))
        .collect();
    let want = linear_map(&alphas, eta[1]);
    for (layer, w) in &want {
        let got = rates[1][layer];
        assert!((got - w).abs() < 1e-9 * w, "{layer}: lr {got}, formula {w}");
    }
    let rescaled_only = layers
        .iter()
        .all(|l| (rates[1][*l] / eta[1] - rates[0][*l] / eta[0]).abs() < 1e-9);
    assert!(!rescaled_only, "the ESD was not recomputed after epoch 1");

    // The table reports what each layer trained with: its group's rate, or rest's.
    let last = &records[1]["tables"]["htsr"];
    for layer in &layers {
        assert_eq!(last[layer.as_str()]["lr"].as_f64(), Some(rates[1][*layer]));
    }
    assert_eq!(last["conv1"]["lr"].as_f64(), Some(eta[1]));
    assert_eq!(last["linear"]["eigenvalues"].as_f64(), Some(10.0));
    let deepest = &last["layer4.1.conv2"];
    let value = |column: &str| deepest[column].as_f64().unwrap();
    let alphahat = value("alpha") * value("spectral_norm").log10();
    assert!((value("alphahat") - alphahat).abs() < 1e-12, "{deepest}");
    assert!(is_png(&run.join("htsr_alpha.png")));
    assert!(is_png(&run.join("htsr_lr.png")));

    // `trellis esd` on the saved model gives the α htsr measured after the last epoch.
    let out = trellis(
        dir.path(),
        &[
            "esd",
            "out/model.safetensors",
            "--arch",
            "resnet18",
            "--width",
            "0.125",
        ],
    );
    assert_ok(&out);
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("layer3.1.conv1 "))
        .unwrap_or_else(|| panic!("no layer3.1.conv1 row in:\n{text}"));
    let alpha = last["layer3.1.conv1"]["alpha"].as_f64().unwrap();
    assert!(
        line.contains(&format!("{alpha:.4}")),
        "{line} lacks α {alpha:.4}"
    );
    let rows = text
        .lines()
        .filter(|l| l.starts_with("layer") && l.contains('.'));
    assert_eq!(rows.count(), 19, "16 block convs and 3 shortcuts:\n{text}");
}

#[test]
fn a_resumed_run_keeps_the_rate_factors_its_checkpoint_saved() {
    // With the ESD due only every 2 epochs, epoch 2 trains with the factors computed at
    // initialisation: a resumed run must take them from the checkpoint, not recompute them
    // from the weights after epoch 1.
    let (dir, run) = run_dir_with(&config("every = 2"), &["--stop-after", "1"]);
    assert_ok(&trellis(
        dir.path(),
        &["run", "run.toml", "--out", "out", "--quiet", "--resume"],
    ));
    let records = metrics(&run);
    assert_eq!(records.len(), 2);
    let (first, second) = (numbers(&records[0]["lr"]), numbers(&records[1]["lr"]));
    let eta1 = LR0 * 0.5 * (1.0 + (std::f64::consts::PI / 2.0).cos());
    for (group, lr) in &first {
        let kept = lr / LR0 * eta1;
        assert!(
            (second[group] - kept).abs() < 1e-15,
            "{group}: {} vs {kept}",
            second[group]
        );
    }
    // A resumed run draws its plots too (its history is read back from metrics.jsonl).
    assert!(is_png(&run.join("htsr_alpha.png")));
}
