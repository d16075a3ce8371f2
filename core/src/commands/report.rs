//! `trellis report DIR...`: the runs under the directories, grouped by the keys they differ in,
//! as one table of mean ± std over seeds per group — with a baseline, the difference, Welch's
//! t-test and a bootstrap interval — and figures of the curves behind it.
//!
//! A run directory is any directory with a `state.json`; a sweep's directory holds them one
//! level down. Only finished runs are counted (the others are listed). Groups are the values of
//! `--group-by` keys (default: every key of the resolved configs that differs between runs,
//! except the seeds and the thread count); the runs of one group are its seeds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::compare::figures::{self, Band, LayerSeries};
use crate::compare::stats::{bootstrap_diff_interval, summarize, welch_t_test};
use crate::compare::table::TextTable;
use crate::report::EpochRecord;
use crate::run_dir::{read_state, Phase};

/// Keys that tell seeds apart (or change only float sums), never groups.
const NOT_GROUPS: &[&str] = &["train.seed", "train.threads", "data.data_seed", "plugins"];

/// Resamples of the bootstrap interval; its seed is fixed so a report reads the same each time.
const RESAMPLES: usize = 10_000;
const BOOTSTRAP_SEED: u64 = 0x007e_1115;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum At {
    /// The last evaluated epoch.
    Final,
    /// The best evaluated epoch of each run (lowest for losses and ECE, highest otherwise).
    Best,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Markdown,
    Csv,
    Latex,
}

#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub dirs: Vec<PathBuf>,
    pub group_by: Vec<String>,
    pub metrics: Vec<String>,
    pub baseline: Option<String>,
    pub at: At,
    pub format: Format,
    /// Where report.md, table.{md,csv,tex} and figures/ go.
    pub out: Option<PathBuf>,
}

struct Run {
    dir: PathBuf,
    keys: BTreeMap<String, String>,
    records: Vec<EpochRecord>,
}

struct Group {
    label: String,
    runs: Vec<usize>,
}

pub fn report(opts: &ReportOptions) -> Result<()> {
    let (runs, skipped) = find_runs(&opts.dirs)?;
    if runs.is_empty() {
        bail!(
            "no finished run under {}{}\n  help: a run directory has a state.json; pass run \
             directories or a sweep's directory",
            opts.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if skipped.is_empty() {
                String::new()
            } else {
                format!(" ({} unfinished)", skipped.len())
            }
        );
    }
    for (dir, state) in &skipped {
        eprintln!("left out {} ({state})", dir.display());
    }
    let group_by = if opts.group_by.is_empty() {
        varying_keys(&runs)
    } else {
        for key in &opts.group_by {
            if !runs.iter().any(|r| r.keys.contains_key(key)) {
                bail!(
                    "--group-by {key}: no run's config has this key\n  help: keys are written as in \
                     --set, e.g. pruner.use or optimizer.lr; see a run's config.toml"
                );
            }
        }
        opts.group_by.clone()
    };
    let groups = group(&runs, &group_by);
    let metrics = if opts.metrics.is_empty() {
        let mut names: Vec<String> = runs
            .iter()
            .flat_map(|r| final_test(&r.records).keys().cloned().collect::<Vec<_>>())
            .collect();
        names.sort();
        names.dedup();
        names
    } else {
        opts.metrics.clone()
    };
    for m in &metrics {
        if !runs.iter().any(|r| final_test(&r.records).contains_key(m)) {
            bail!(
                "--metric {m}: no run has it\n  help: the runs have {}",
                runs.first()
                    .map(|r| final_test(&r.records)
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
        }
    }
    let values = |g: &Group, metric: &str| -> Vec<f64> {
        g.runs
            .iter()
            .filter_map(|&i| value_at(&runs[i].records, metric, opts.at))
            .collect()
    };
    let baseline = match &opts.baseline {
        None => None,
        Some(b) => {
            let Some((key, value)) = b.split_once('=') else {
                bail!("--baseline expects key=value, e.g. --baseline scheduler.use=none");
            };
            let wanted = format!("{}={}", key.trim(), value.trim());
            let found = groups
                .iter()
                .position(|g| g.label.split(", ").any(|part| part == wanted));
            match found {
                Some(i) => Some(i),
                None => bail!(
                    "--baseline {b}: no group has it\n  help: the groups are: {}",
                    groups
                        .iter()
                        .map(|g| g.label.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }
        }
    };

    let mut table = TextTable::default();
    table.columns.push(if group_by.is_empty() {
        "runs".into()
    } else {
        group_by.join(", ")
    });
    table.numeric.push(false);
    table.columns.push("n".into());
    table.numeric.push(true);
    for m in &metrics {
        table.columns.push(m.clone());
        table.numeric.push(true);
        if baseline.is_some() {
            for extra in ["Δ", "p (Welch)", "95 % CI of Δ"] {
                table.columns.push(format!("{extra} {m}"));
                table.numeric.push(true);
            }
        }
    }
    for (gi, g) in groups.iter().enumerate() {
        let mut row = vec![g.label.clone(), g.runs.len().to_string()];
        for m in &metrics {
            let v = values(g, m);
            let s = summarize(&v);
            row.push(if s.n == 0 {
                "—".into()
            } else {
                format!("{:.4} ± {:.4}", s.mean, s.std)
            });
            if let Some(b) = baseline {
                if gi == b {
                    row.extend(["baseline".into(), String::new(), String::new()]);
                    continue;
                }
                row.extend(comparison(&v, &values(&groups[b], m)));
            }
        }
        table.rows.push(row);
    }
    let at = match opts.at {
        At::Final => "final epoch",
        At::Best => "best epoch",
    };
    let note = format!(
        "mean ± std (n − 1) over the runs of each group, at the {at}{}",
        if baseline.is_some() {
            "; Δ against the baseline, Welch's two-sided t-test, 95 % percentile bootstrap \
             interval of Δ (10,000 resamples); ~ marks a Δ within noise (p ≥ 0.05 or an interval \
             holding 0)"
        } else {
            ""
        }
    );
    let shown = match opts.format {
        Format::Markdown => table.markdown(),
        Format::Csv => table.csv(),
        Format::Latex => table.latex(),
    };
    println!("{shown}");
    if opts.format == Format::Markdown {
        println!("\n{note}.");
    }
    if let Some(out) = &opts.out {
        write_report(out, opts, &runs, &groups, &metrics, &table, &note)?;
    }
    Ok(())
}

fn write_report(
    out: &Path,
    opts: &ReportOptions,
    runs: &[Run],
    groups: &[Group],
    metrics: &[String],
    table: &TextTable,
    note: &str,
) -> Result<()> {
    let figures_dir = out.join("figures");
    std::fs::create_dir_all(&figures_dir)
        .with_context(|| format!("cannot create {}", figures_dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write("table.md", &table.markdown())?;
    write("table.csv", &table.csv())?;
    write("table.tex", &table.latex())?;
    let mut md = String::from("# Report\n\n");
    let _ = writeln!(
        md,
        "`{}`\n\n{}\n\n{note}.\n",
        command_line(opts),
        table.markdown()
    );
    for m in metrics {
        let bands: Vec<Band> = groups.iter().filter_map(|g| curve(runs, g, m)).collect();
        if bands.is_empty() {
            continue;
        }
        let name = format!("curve_{}.png", file_name(m));
        figures::learning_curves(&figures_dir.join(&name), m, "epoch", m, &bands)?;
        let _ = writeln!(md, "## {m} over epochs\n\n![{m}](figures/{name})\n");
    }
    // Per-layer density of pruned runs (their first epoch's `density` table).
    let density: Vec<(String, BTreeMap<String, f64>)> = groups
        .iter()
        .filter_map(|g| {
            let layers = mean_table(runs, g, "density", "density", false)?;
            Some((g.label.clone(), layers))
        })
        .collect();
    if !density.is_empty() {
        let layers = layer_order(runs, "density");
        let series: Vec<LayerSeries> = density
            .iter()
            .map(|(label, values)| LayerSeries {
                label: label.clone(),
                values: layers
                    .iter()
                    .map(|l| values.get(l).copied().unwrap_or(f64::NAN))
                    .collect(),
            })
            .collect();
        figures::per_layer(
            &figures_dir.join("density.png"),
            "density per layer after pruning",
            "density",
            &layers,
            &series,
            true,
        )?;
        md.push_str("## Density per layer\n\n![density](figures/density.png)\n\n");
    }
    // Per-layer α over epochs of each group's first run (the htsr metric's table).
    for (gi, g) in groups.iter().enumerate() {
        let Some(&first) = g.runs.first() else {
            continue;
        };
        let layers = layer_order(runs, "htsr");
        if layers.is_empty() {
            break;
        }
        let records = &runs[first].records;
        let epochs: Vec<f64> = records
            .iter()
            .filter(|r| r.tables.contains_key("htsr"))
            .map(|r| r.epoch as f64)
            .collect();
        let values: Vec<Vec<f64>> = layers
            .iter()
            .map(|l| {
                records
                    .iter()
                    .filter_map(|r| r.tables.get("htsr"))
                    .map(|t| {
                        t.get(l)
                            .and_then(|row| row.get("alpha"))
                            .copied()
                            .unwrap_or(f64::NAN)
                    })
                    .collect()
            })
            .collect();
        let name = format!("alpha_{gi}.png");
        figures::layers_over_epochs(
            &figures_dir.join(&name),
            &format!("α per layer, {}", g.label),
            "α",
            &epochs,
            &layers,
            &values,
        )?;
        let _ = writeln!(
            md,
            "## α per layer: {}\n\n![alpha](figures/{name})\n",
            g.label
        );
    }
    md.push_str("## Runs\n\n");
    for (g, run) in groups
        .iter()
        .flat_map(|g| g.runs.iter().map(move |&i| (g, i)))
    {
        let _ = writeln!(md, "- {}: `{}`", g.label, runs[run].dir.display());
    }
    write("report.md", &md)?;
    eprintln!("report: {}", out.join("report.md").display());
    Ok(())
}

/// The command as typed, for the report's header.
fn command_line(opts: &ReportOptions) -> String {
    let mut args = vec!["trellis".to_string(), "report".into()];
    args.extend(opts.dirs.iter().map(|d| d.display().to_string()));
    if !opts.group_by.is_empty() {
        args.push(format!("--group-by {}", opts.group_by.join(",")));
    }
    for m in &opts.metrics {
        args.push(format!("--metric {m}"));
    }
    if let Some(b) = &opts.baseline {
        args.push(format!("--baseline {b}"));
    }
    if opts.at == At::Best {
        args.push("--at best".into());
    }
    args.join(" ")
}

fn file_name(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Finished runs under `dirs` (the directories themselves, or one level down), and the others.
/// A run directory that is not counted, and why.
type Skipped = (PathBuf, String);

fn find_runs(dirs: &[PathBuf]) -> Result<(Vec<Run>, Vec<Skipped>)> {
    let mut candidates = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            bail!("{} is not a directory", d.display());
        }
        if d.join("state.json").exists() {
            candidates.push(d.clone());
            continue;
        }
        let mut children: Vec<PathBuf> = std::fs::read_dir(d)
            .with_context(|| format!("cannot read {}", d.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("state.json").exists())
            .collect();
        children.sort();
        candidates.extend(children);
    }
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for dir in candidates {
        let state = read_state(&dir)?.expect("has a state.json");
        if state.state != Phase::Finished {
            skipped.push((dir, state.describe()));
            continue;
        }
        let config_path = dir.join("config.toml");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let value: toml::Value = toml::from_str(&text)
            .with_context(|| format!("{} does not parse", config_path.display()))?;
        let mut keys = BTreeMap::new();
        flatten("", &value, &mut keys);
        let records = read_records(&dir.join("metrics.jsonl"))?;
        runs.push(Run { dir, keys, records });
    }
    Ok((runs, skipped))
}

fn read_records(path: &Path) -> Result<Vec<EpochRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))
        })
        .collect()
}

/// `optimizer.lr` → `0.1`; lists of tables by position (`metrics.0.use`).
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                flatten(&join(k), v, out);
            }
        }
        toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                flatten(&join(&i.to_string()), v, out);
            }
        }
        toml::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        v => {
            out.insert(prefix.to_string(), v.to_string());
        }
    }
}

/// The keys whose values differ between runs, less the seeds.
fn varying_keys(runs: &[Run]) -> Vec<String> {
    let mut all: Vec<&String> = runs.iter().flat_map(|r| r.keys.keys()).collect();
    all.sort();
    all.dedup();
    all.into_iter()
        .filter(|k| !NOT_GROUPS.contains(&k.as_str()) && !k.ends_with("path"))
        .filter(|k| {
            let first = runs[0].keys.get(*k);
            runs.iter().any(|r| r.keys.get(*k) != first)
        })
        .cloned()
        .collect()
}

/// Groups in the order their first run appears (a sweep's order).
fn group(runs: &[Run], keys: &[String]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let label = if keys.is_empty() {
            "all runs".to_string()
        } else {
            keys.iter()
                .map(|k| format!("{k}={}", run.keys.get(k).map_or("(none)", String::as_str)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match groups.iter_mut().find(|g| g.label == label) {
            Some(g) => g.runs.push(i),
            None => groups.push(Group {
                label,
                runs: vec![i],
            }),
        }
    }
    groups
}

/// The Δ, Welch p-value and bootstrap-interval cells of a group's values against the baseline's.
fn comparison(values: &[f64], base: &[f64]) -> [String; 3] {
    if values.is_empty() || base.is_empty() {
        // A metric only one side has (fc_augment's refiner_top1): nothing to compare.
        return ["—".into(), "—".into(), "—".into()];
    }
    let diff = summarize(values).mean - summarize(base).mean;
    let welch = welch_t_test(values, base);
    let interval = bootstrap_diff_interval(values, base, RESAMPLES, 0.95, BOOTSTRAP_SEED);
    let noise = interval.is_some_and(|(lo, hi)| lo <= 0.0 && hi >= 0.0)
        || welch.is_some_and(|w| w.p >= 0.05);
    [
        format!("{diff:+.4}{}", if noise { " ~" } else { "" }),
        welch.map_or("—".into(), |w| format!("{:.3}", w.p)),
        interval.map_or("—".into(), |(lo, hi)| format!("[{lo:+.4}, {hi:+.4}]")),
    ]
}

fn final_test(records: &[EpochRecord]) -> BTreeMap<String, f64> {
    records
        .iter()
        .rev()
        .find(|r| !r.test.is_empty())
        .map(|r| r.test.clone())
        .unwrap_or_default()
}

fn lower_is_better(metric: &str) -> bool {
    metric.contains("loss") || metric.contains("ece")
}

fn value_at(records: &[EpochRecord], metric: &str, at: At) -> Option<f64> {
    match at {
        At::Final => final_test(records).get(metric).copied(),
        At::Best => {
            let values = records.iter().filter_map(|r| r.test.get(metric).copied());
            if lower_is_better(metric) {
                values.reduce(f64::min)
            } else {
                values.reduce(f64::max)
            }
        }
    }
}

/// A group's mean ± std of `metric` at each evaluated epoch its runs share.
fn curve(runs: &[Run], g: &Group, metric: &str) -> Option<Band> {
    let mut by_epoch: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for &i in &g.runs {
        for r in &runs[i].records {
            if let Some(v) = r.test.get(metric) {
                by_epoch.entry(r.epoch).or_default().push(*v);
            }
        }
    }
    if by_epoch.is_empty() {
        return None;
    }
    let (mut x, mut mean, mut std) = (Vec::new(), Vec::new(), Vec::new());
    for (epoch, values) in by_epoch {
        let s = summarize(&values);
        x.push(epoch as f64);
        mean.push(s.mean);
        std.push(s.std);
    }
    Some(Band {
        label: g.label.clone(),
        x,
        mean,
        std,
    })
}

/// A group's mean over runs of one column of a per-row table, at its first (`last` = false) or
/// last record holding it.
fn mean_table(
    runs: &[Run],
    g: &Group,
    table: &str,
    column: &str,
    last: bool,
) -> Option<BTreeMap<String, f64>> {
    let mut sums: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for &i in &g.runs {
        let records = &runs[i].records;
        let mut holding = records.iter().filter_map(|r| r.tables.get(table));
        let t = if last {
            holding.next_back()
        } else {
            holding.next()
        };
        for (row, columns) in t.into_iter().flatten() {
            if let Some(v) = columns.get(column) {
                sums.entry(row.clone()).or_default().push(*v);
            }
        }
    }
    (!sums.is_empty()).then(|| {
        sums.into_iter()
            .map(|(k, v)| (k, summarize(&v).mean))
            .collect()
    })
}

/// The rows of a table in the network's order as far as names tell it (records keep them
/// alphabetically): by the numbers in the names, `layer1.0` before `layer1.1` before `layer10`.
fn layer_order(runs: &[Run], table: &str) -> Vec<String> {
    let mut layers: Vec<String> = runs
        .iter()
        .flat_map(|r| r.records.iter().filter_map(|rec| rec.tables.get(table)))
        .flat_map(|t| t.keys().cloned())
        .collect();
    layers.sort_by_key(|l| natural_key(l));
    layers.dedup();
    layers
}

fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut number = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            number.push(c);
        } else {
            if !number.is_empty() {
                out.push((std::mem::take(&mut text), number.parse().unwrap_or(0)));
                number.clear();
            }
            text.push(c);
        }
    }
    out.push((text, number.parse().unwrap_or(0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(keys: &[(&str, &str)], top1: &[f64]) -> Run {
        Run {
            dir: PathBuf::new(),
            keys: keys
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            records: top1
                .iter()
                .enumerate()
                .map(|(i, v)| EpochRecord {
                    epoch: i + 1,
                    test: [("top1".to_string(), *v)].into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn groups_are_the_varying_keys_less_the_seeds() {
        let runs = vec![
            run(&[("pruner.use", "snip"), ("train.seed", "0")], &[0.5]),
            run(&[("pruner.use", "snip"), ("train.seed", "1")], &[0.6]),
            run(&[("pruner.use", "grasp"), ("train.seed", "0")], &[0.7]),
        ];
        assert_eq!(varying_keys(&runs), ["pruner.use"]);
        let groups = group(&runs, &varying_keys(&runs));
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].label, "pruner.use=snip");
        assert_eq!(groups[0].runs, [0, 1]);
    }

    #[test]
    fn a_metric_the_baseline_lacks_is_not_compared() {
        assert_eq!(comparison(&[78.6, 78.7], &[]), ["—", "—", "—"]);
        assert_eq!(comparison(&[], &[83.4]), ["—", "—", "—"]);
        let [diff, p, _] = comparison(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        assert_eq!((diff.as_str(), p.as_str()), ("+0.0000 ~", "1.000"));
    }

    #[test]
    fn final_and_best_values() {
        let r = run(&[], &[0.5, 0.9, 0.7]);
        assert_eq!(value_at(&r.records, "top1", At::Final), Some(0.7));
        assert_eq!(value_at(&r.records, "top1", At::Best), Some(0.9));
        assert!(lower_is_better("loss"));
    }

    #[test]
    fn layers_are_in_network_order() {
        let mut v = vec![
            "layer10.conv",
            "layer2.0.conv1",
            "conv1",
            "layer2.10.conv1",
            "layer2.2.conv1",
        ];
        v.sort_by_key(|l| natural_key(l));
        assert_eq!(
            v,
            [
                "conv1",
                "layer2.0.conv1",
                "layer2.2.conv1",
                "layer2.10.conv1",
                "layer10.conv"
            ]
        );
    }
}
