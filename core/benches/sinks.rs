//! What `[log] sinks` cost a run per epoch: `cargo bench -p trellis --bench sinks [-- --epochs N]`.
//!
//! Every run appends each epoch's record to `metrics.jsonl` and syncs it; the sinks add
//! `metrics.csv` and TensorBoard event files (scalars and one histogram per per-layer column,
//! synced too). The records written are shaped like a TempBalance run's on ResNet18 with
//! `htsr` and pruning densities: 21 layers in each table, one learning rate per layer. Each
//! configuration writes the same records into a fresh directory on the same disk, in turn, and
//! the medians are printed beside the `metrics.jsonl` append they ride on.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use trellis::config::{LogConfig, Sink};
use trellis::report::{EpochRecord, MetricsLog};
use trellis::sinks::Sinks;

const LAYERS: usize = 21;

fn record(epoch: usize) -> EpochRecord {
    let value = |i: usize, j: usize| 1.0 + ((epoch * 31 + i * 7 + j) % 97) as f64 / 97.0;
    let layer = |i: usize| format!("layer{}.{}.conv{}", i / 4 + 1, (i / 2) % 2, i % 2 + 1);
    let table = |columns: &[&str]| -> BTreeMap<String, BTreeMap<String, f64>> {
        (0..LAYERS)
            .map(|i| {
                let row = columns
                    .iter()
                    .enumerate()
                    .map(|(j, c)| (c.to_string(), value(i, j)))
                    .collect();
                (layer(i), row)
            })
            .collect()
    };
    let mut tables = BTreeMap::new();
    tables.insert(
        "htsr".to_string(),
        table(&["alpha", "alphahat", "spectral_norm", "xmin", "stable_rank"]),
    );
    tables.insert("density".to_string(), table(&["density"]));
    EpochRecord {
        epoch,
        step: epoch as u64 * 390,
        train_loss: 2.3 / epoch as f64,
        test: ["top1", "top5", "loss", "ece", "htsr_alpha_mean"]
            .iter()
            .enumerate()
            .map(|(j, k)| (k.to_string(), value(99, j)))
            .collect(),
        tables,
        lr: (0..LAYERS).map(|i| (layer(i), 0.1 * value(i, 9))).collect(),
        data_waits: 0,
        train_seconds: 20.0,
        epoch_seconds: 25.0,
        elapsed_seconds: 25.0 * epoch as f64,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Milliseconds per epoch of writing `epochs` records with these sinks, the jsonl log included.
fn per_epoch_ms(sinks: &[Sink], epochs: usize, scratch: &std::path::Path) -> Result<Vec<f64>> {
    let dir = tempfile::tempdir_in(scratch)?;
    let mut log = MetricsLog::create(dir.path())?;
    let config = LogConfig {
        sinks: sinks.to_vec(),
    };
    let mut out = Sinks::open(dir.path(), &config, &[])?;
    let mut times = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        let record = record(epoch);
        let start = Instant::now();
        log.append(&record)?;
        out.write(&record)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

fn main() -> Result<()> {
    let mut epochs = 200;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--epochs" => {
                epochs = args
                    .next()
                    .context("--epochs needs a number")?
                    .parse()
                    .context("--epochs needs a number")?
            }
            "--bench" => {}
            other => bail!("unknown argument `{other}`; usage: sinks [--epochs N]"),
        }
    }
    // The target directory is on the disk run directories usually live on; /tmp may be tmpfs.
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let cases: [(&str, Vec<Sink>); 4] = [
        ("metrics.jsonl only", vec![]),
        ("+ csv", vec![Sink::Csv]),
        ("+ tensorboard", vec![Sink::Tensorboard]),
        ("+ csv + tensorboard", vec![Sink::Csv, Sink::Tensorboard]),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    // Alternating rounds, so that a slow patch of the disk falls on every case alike.
    for _round in 0..5 {
        for (i, (_, sinks)) in cases.iter().enumerate() {
            results[i].extend(per_epoch_ms(sinks, epochs / 5, scratch)?);
        }
    }
    let reference = median(results[0].clone());
    println!(
        "{} epochs per case, records of {LAYERS} layers (htsr 5 columns, density, {LAYERS} learning rates)",
        epochs / 5 * 5
    );
    println!(
        "{:<22} {:>14} {:>16} {:>12}",
        "writes per epoch", "median ms", "added ms/epoch", "/ jsonl"
    );
    for ((name, _), times) in cases.iter().zip(results) {
        let ms = median(times);
        println!(
            "{name:<22} {ms:>14.3} {:>16.3} {:>12.2}",
            ms - reference,
            ms / reference
        );
    }
    Ok(())
}
