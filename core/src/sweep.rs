//! A sweep: many runs of one config that differ in a few keys, under one directory.
//!
//! A sweep file names the run config (or several, as one more axis) and a grid:
//!
//! ```toml
//! config = "base.toml"              # or ["tempbalance.toml", "baseline.toml"]
//! [grid]
//! "pruner.use" = ["snip", "grasp"]  # each axis is a key and its values
//! "train.seed" = [0, 1, 2]
//! optimizer = [{ use = "sgd", lr = 0.1 }, { use = "adamw", lr = 1e-3 }]  # several keys at once
//! ```
//!
//! The runs are the product of the axes: the configs outermost, then the axes in the order
//! written, the last varying fastest (as `itertools.product`), so adding a seed never renames
//! the runs before it in the same position of the other axes. `runs.tsv` in the sweep's
//! directory indexes them: one line per run, its position the Slurm array index.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml_edit::{DocumentMut, Item, Value};

/// One axis of the grid: a key (or a table of keys) and the override sets of its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub key: String,
    /// Per value: the `key=value` overrides it stands for, and a short label for directory names.
    pub values: Vec<(Vec<String>, String)>,
}

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRun {
    /// `007-snip-0.98-1`: its position and values, also its directory's name.
    pub id: String,
    pub config: PathBuf,
    /// The grid's overrides, `key=value` as for `--set`.
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    pub configs: Vec<PathBuf>,
    pub axes: Vec<Axis>,
}

impl Sweep {
    /// Reads a sweep file, or takes a run config as a sweep of itself; `grid` adds the axes given
    /// on the command line (`key=v1,v2,...`) after the file's.
    pub fn load(path: &Path, grid: &[String]) -> Result<Sweep> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file = crate::source::SourceFile::from_text(path, text.as_str());
        let doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
            file.error_at(
                e.span().unwrap_or(0..0),
                &crate::source::plain_words(e.message().trim()),
                None,
            )
        })?;
        let dir = file.dir();
        let mut sweep = match doc.get("config") {
            // A run config: the sweep is its grid from the command line.
            None => Sweep {
                configs: vec![path.to_path_buf()],
                axes: Vec::new(),
            },
            Some(item) => {
                let at = |key: &str| {
                    file.value_span(&[crate::source::Seg::Key(key)])
                        .or_else(|| file.key_span(&[crate::source::Seg::Key(key)]))
                        .unwrap_or(0..0)
                };
                for (key, _) in doc.iter() {
                    if key != "config" && key != "grid" {
                        return Err(file.error_at(
                            at(key),
                            &format!("unknown key `{key}` in a sweep file"),
                            Some("a sweep file has `config` and a [grid] table; run keys belong in the config it names"),
                        ));
                    }
                }
                let configs: Option<Vec<PathBuf>> = match item.as_value() {
                    Some(Value::String(s)) => Some(vec![dir.join(s.value())]),
                    Some(Value::Array(list)) if !list.is_empty() => list
                        .iter()
                        .map(|v| v.as_str().map(|s| dir.join(s)))
                        .collect(),
                    _ => None,
                };
                let Some(configs) = configs else {
                    return Err(file.error_at(
                        at("config"),
                        "`config` takes the run config's path, or a list of paths, in quotes",
                        Some("e.g. config = \"base.toml\", relative to the sweep file"),
                    ));
                };
                let mut axes = Vec::new();
                match doc.get("grid") {
                    None => {}
                    Some(Item::Table(t)) => {
                        collect_axes(t, "", &mut axes).map_err(|(key, message)| {
                            let segs: Vec<crate::source::Seg<'_>> = std::iter::once("grid")
                                .chain(key.split('.'))
                                .map(crate::source::Seg::Key)
                                .collect();
                            file.error_at(
                                file.key_span(&segs).unwrap_or_else(|| at("grid")),
                                &message,
                                Some("each key of [grid] takes a list of the values to try"),
                            )
                        })?
                    }
                    Some(_) => {
                        return Err(file.error_at(
                            at("grid"),
                            "`grid` is a table of keys and their values",
                            Some("write [grid] and below it e.g. \"train.seed\" = [0, 1, 2]"),
                        ))
                    }
                }
                Sweep { configs, axes }
            }
        };
        for g in grid {
            sweep.axes.push(parse_grid_arg(g)?);
        }
        let mut keys: Vec<&str> = sweep.axes.iter().map(|a| a.key.as_str()).collect();
        keys.sort_unstable();
        if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
            bail!(
                "the grid has the key `{}` twice\n  help: give each key once, with all its values",
                w[0]
            );
        }
        Ok(sweep)
    }

    /// The runs, in their stable order.
    pub fn runs(&self) -> Vec<SweepRun> {
        let mut combos: Vec<(Vec<String>, Vec<String>)> = vec![(Vec::new(), Vec::new())];
        for axis in &self.axes {
            combos = combos
                .into_iter()
                .flat_map(|(overrides, labels)| {
                    axis.values.iter().map(move |(o, label)| {
                        let mut overrides = overrides.clone();
                        overrides.extend(o.iter().cloned());
                        let mut labels = labels.clone();
                        labels.push(label.clone());
                        (overrides, labels)
                    })
                })
                .collect();
        }
        let total = self.configs.len() * combos.len();
        let digits = total.saturating_sub(1).to_string().len().max(3);
        let mut runs = Vec::with_capacity(total);
        for config in &self.configs {
            for (overrides, labels) in &combos {
                let mut parts = vec![format!("{:0digits$}", runs.len())];
                if self.configs.len() > 1 {
                    parts.push(
                        config
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    );
                }
                parts.extend(labels.iter().cloned());
                runs.push(SweepRun {
                    id: sanitize(&parts.join("-")),
                    config: config.clone(),
                    overrides: overrides.clone(),
                });
            }
        }
        runs
    }
}

/// `key=v1,v2,...` from `--grid`; each value is read as TOML, else taken as a string.
fn parse_grid_arg(arg: &str) -> Result<Axis> {
    let Some((key, values)) = arg.split_once('=') else {
        bail!("--grid expects key=value1,value2,..., got `{arg}`");
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|k| k.trim().is_empty()) || values.trim().is_empty() {
        bail!("--grid expects key=value1,value2,..., got `{arg}`");
    }
    let values = values
        .split(',')
        .map(|v| {
            let v = v.trim();
            let value: Value = v.parse().unwrap_or_else(|_| Value::from(v));
            (vec![format!("{key}={}", value_text(&value))], label(&value))
        })
        .collect();
    Ok(Axis {
        key: key.to_string(),
        values,
    })
}

/// The axes of a `[grid]` table: a key whose value is a list is an axis; a table of such keys
/// (`pruner.use = [...]` written without quotes) holds axes further down.
fn collect_axes(
    table: &dyn toml_edit::TableLike,
    prefix: &str,
    axes: &mut Vec<Axis>,
) -> std::result::Result<(), (String, String)> {
    for (key, item) in table.iter() {
        let path = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        if let Some(sub) = item.as_table_like() {
            collect_axes(sub, &path, axes)?;
            continue;
        }
        let list: Vec<Value> = match item {
            Item::Value(Value::Array(a)) => a.iter().cloned().collect(),
            Item::ArrayOfTables(a) => a
                .iter()
                .map(|t| t.clone().into_inline_table().into())
                .collect(),
            _ => {
                return Err((
                    path.clone(),
                    format!("`{path}` in [grid] is one value; an axis is a list of values"),
                ))
            }
        };
        if list.is_empty() {
            return Err((path.clone(), format!("`{path}` in [grid] has no values")));
        }
        let values = list
            .iter()
            .map(|value| match value {
                Value::InlineTable(t) => {
                    let mut overrides = Vec::new();
                    flatten(&path, t, &mut overrides);
                    let name = t.get("use").map(label).unwrap_or_else(|| {
                        t.iter()
                            .map(|(_, v)| label(v))
                            .collect::<Vec<_>>()
                            .join("_")
                    });
                    (overrides, name)
                }
                v => (vec![format!("{path}={}", value_text(v))], label(v)),
            })
            .collect();
        axes.push(Axis { key: path, values });
    }
    Ok(())
}

fn flatten(prefix: &str, table: &toml_edit::InlineTable, out: &mut Vec<String>) {
    for (k, v) in table.iter() {
        let path = format!("{prefix}.{k}");
        match v {
            Value::InlineTable(t) => flatten(&path, t, out),
            v => out.push(format!("{path}={}", value_text(v))),
        }
    }
}

/// A value as `--set` reads it back: TOML without the file's spacing or comments.
fn value_text(value: &Value) -> String {
    let mut value = value.clone();
    value.decor_mut().clear();
    value.to_string().trim().to_string()
}

/// A value in a directory name: strings without quotes, other values as written.
fn label(value: &Value) -> String {
    match value {
        Value::String(s) => s.value().clone(),
        v => value_text(v),
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `runs.tsv`'s header.
pub const TSV_HEADER: &str = "id\tconfig\toverrides\trun_dir\tthreads\tstate";

/// One line of `runs.tsv`.
#[derive(Debug, Clone, PartialEq)]
pub struct TsvLine {
    pub id: String,
    pub config: String,
    pub overrides: String,
    pub run_dir: String,
    /// The CPU threads the run was started with; a resumed run keeps them (they change its sums).
    pub threads: usize,
    pub state: String,
}

impl TsvLine {
    pub fn new(run: &SweepRun, dir: &Path, threads: usize, state: &str) -> TsvLine {
        TsvLine {
            id: run.id.clone(),
            config: run.config.display().to_string(),
            overrides: run.overrides.join(" "),
            run_dir: dir.join(&run.id).display().to_string(),
            threads,
            state: state.to_string(),
        }
    }

    /// Whether this line describes the same run as `other` (state and threads aside).
    pub fn same_run(&self, other: &TsvLine) -> bool {
        (&self.id, &self.config, &self.overrides) == (&other.id, &other.config, &other.overrides)
    }
}

pub fn write_tsv(path: &Path, lines: &[TsvLine]) -> Result<()> {
    let mut text = format!("{TSV_HEADER}\n");
    for l in lines {
        let _ = writeln!(
            text,
            "{}\t{}\t{}\t{}\t{}\t{}",
            l.id, l.config, l.overrides, l.run_dir, l.threads, l.state
        );
    }
    let tmp = path.with_extension("tsv.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn read_tsv(path: &Path) -> Result<Option<Vec<TsvLine>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        let threads = f.get(4).and_then(|t| t.parse().ok());
        let (true, Some(threads)) = (f.len() == 6, threads) else {
            bail!(
                "{}:{}: not a line of runs.tsv ({TSV_HEADER})\n  help: trellis sweep writes it; \
                 restore it, or sweep into another --out",
                path.display(),
                i + 1
            );
        };
        lines.push(TsvLine {
            id: f[0].into(),
            config: f[1].into(),
            overrides: f[2].into(),
            run_dir: f[3].into(),
            threads,
            state: f[5].into(),
        });
    }
    Ok(Some(lines))
}

/// Quotes an argument for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// An `sbatch --array` script whose task N runs line N of `runs.tsv` through `trellis run`,
/// resuming its own checkpoint when requeued (and doing nothing when the run is finished). With
/// `nproc` > 1 each task is `nproc` Slurm tasks that srun starts as the ranks of one
/// data-parallel run.
pub fn slurm_script(
    name: &str,
    trellis: &Path,
    dir: &Path,
    runs: &[SweepRun],
    nproc: usize,
) -> String {
    let mut s = String::new();
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let _ = writeln!(s, "#!/bin/bash");
    let _ = writeln!(
        s,
        "# Written by `trellis sweep --emit slurm`: array task N runs line N of runs.tsv (counting\n\
         # from 0 below its header). Submit with `sbatch {}`; add #SBATCH lines for your cluster\n\
         # (partition, time, --gres=gpu:1, --cpus-per-task). A requeued or re-submitted task resumes\n\
         # its run from its last checkpoint; a finished run is left as it is.",
        dir.join("sweep.sbatch").display()
    );
    let _ = writeln!(s, "#SBATCH --job-name={}", sanitize(name));
    let _ = writeln!(s, "#SBATCH --array=0-{}", runs.len().saturating_sub(1));
    let _ = writeln!(s, "#SBATCH --output={}/logs/%a.log", dir.display());
    let _ = writeln!(s, "#SBATCH --open-mode=append");
    let _ = writeln!(s, "#SBATCH --requeue");
    if nproc > 1 {
        let _ = writeln!(s, "#SBATCH --ntasks={nproc}");
    }
    let _ = writeln!(s, "set -euo pipefail");
    let _ = writeln!(s, "trellis=${{TRELLIS:-{}}}", q(trellis));
    let _ = writeln!(
        s,
        "task=${{SLURM_ARRAY_TASK_ID:?this script runs as a Slurm array task}}"
    );
    let _ = writeln!(s, "case \"$task\" in");
    for (i, run) in runs.iter().enumerate() {
        let mut args = vec![q(&run.config)];
        for o in &run.overrides {
            args.push("--set".into());
            args.push(shell_quote(o));
        }
        let _ = writeln!(
            s,
            "  {i}) out={}; args=({}) ;;",
            q(&dir.join(&run.id)),
            args.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "  *) echo \"runs.tsv has no run $task (0-{})\" >&2; exit 2 ;;",
        runs.len().saturating_sub(1)
    );
    let _ = writeln!(s, "esac");
    // srun starts the ranks of a multi-rank run; they find each other through Slurm's
    // variables (crate::distributed::World).
    let _ = writeln!(s, "launch={}", if nproc > 1 { "srun" } else { "" });
    let _ = writeln!(
        s,
        "# The CPUs Slurm gave the task; 0 leaves them to libtorch. The same on every requeue, as a\n\
         # resumed run needs (the thread count changes float sums).\n\
         args+=(--set \"train.threads=${{SLURM_CPUS_PER_TASK:-0}}\" --out \"$out\" --quiet)\n\
         if [ -f \"$out/state.json\" ]; then\n  \
           if grep -q '\"state\": *\"finished\"' \"$out/state.json\"; then\n    \
             echo \"$out is finished\"; exit 0\n  \
           fi\n  \
           exec $launch \"$trellis\" run \"${{args[@]}}\" --resume\n\
         fi\n\
         exec $launch \"$trellis\" run \"${{args[@]}}\""
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(text: &str, grid: &[&str]) -> Result<Sweep> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.toml");
        std::fs::write(&path, text).unwrap();
        let grid: Vec<String> = grid.iter().map(|s| s.to_string()).collect();
        Sweep::load(&path, &grid)
    }

    #[test]
    fn the_grid_expands_to_the_product_in_a_stable_order() {
        let s = sweep(
            "config = \"base.toml\"\n[grid]\n\"pruner.use\" = [\"snip\", \"grasp\"]\n\
             pruner.sparsity = [0.9, 0.98]\n",
            &["train.seed=0,1,2"],
        )
        .unwrap();
        let runs = s.runs();
        assert_eq!(runs.len(), 12);
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids[0], "000-snip-0.9-0");
        assert_eq!(ids[1], "001-snip-0.9-1");
        assert_eq!(ids[3], "003-snip-0.98-0");
        assert_eq!(ids[11], "011-grasp-0.98-2");
        assert_eq!(
            runs[5].overrides,
            [
                "pruner.use=\"snip\"",
                "pruner.sparsity=0.98",
                "train.seed=2"
            ]
        );
        // The same file expands the same way every time.
        assert_eq!(s.runs(), runs);
        // Every override reads back through --set.
        let mut doc = DocumentMut::new();
        for o in &runs[11].overrides {
            crate::config::apply_override(&mut doc, o).unwrap();
        }
        assert_eq!(doc["pruner"]["use"].as_str(), Some("grasp"));
        assert_eq!(doc["pruner"]["sparsity"].as_float(), Some(0.98));
    }

    #[test]
    fn configs_are_the_outer_axis_and_tables_set_several_keys() {
        let s = sweep(
            "config = [\"tb.toml\", \"base.toml\"]\n[grid]\n\
             optimizer = [{ use = \"sgd\", lr = 0.1 }, { use = \"adamw\", lr = 1e-3 }]\n",
            &[],
        )
        .unwrap();
        let runs = s.runs();
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "000-tb-sgd",
                "001-tb-adamw",
                "002-base-sgd",
                "003-base-adamw"
            ]
        );
        assert_eq!(
            runs[1].overrides,
            ["optimizer.use=\"adamw\"", "optimizer.lr=1e-3"]
        );
        assert!(runs[2].config.ends_with("base.toml"));
    }

    #[test]
    fn a_run_config_is_a_sweep_of_itself() {
        let s = sweep("[train]\nepochs = 2\n", &["train.seed=1,2"]).unwrap();
        assert_eq!(s.runs().len(), 2);
        assert!(s.runs()[0].config.ends_with("sweep.toml"));
        assert_eq!(sweep("[train]\n", &[]).unwrap().runs().len(), 1);
    }

    #[test]
    fn bad_grids_are_refused_at_their_line() {
        let e = format!(
            "{:#}",
            sweep("config = \"a.toml\"\n[grid]\nseed = 3\n", &[]).unwrap_err()
        );
        assert!(
            e.contains("sweep.toml:3:1") && e.contains("is one value"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            sweep("config = \"a.toml\"\nepochs = 3\n", &[]).unwrap_err()
        );
        assert!(
            e.contains("unknown key `epochs`") && e.contains(":2:"),
            "{e}"
        );
        let e = format!("{:#}", sweep("config = 3\n", &[]).unwrap_err());
        assert!(e.contains("`config` takes") && e.contains(":1:10"), "{e}");
        let e = format!(
            "{:#}",
            sweep("config = \"a.toml\"\n[grid]\n\"x\" = []\n", &[]).unwrap_err()
        );
        assert!(e.contains("has no values"), "{e}");
        let e = format!(
            "{:#}",
            sweep("config = \"a.toml\"\n[grid]\nx = [1]\n", &["x=2"]).unwrap_err()
        );
        assert!(e.contains("`x` twice"), "{e}");
        let e = format!("{:#}", sweep("[train]\n", &["train.seed"]).unwrap_err());
        assert!(e.contains("--grid expects"), "{e}");
    }

    #[test]
    fn runs_tsv_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let run = SweepRun {
            id: "000-a".into(),
            config: "c.toml".into(),
            overrides: vec!["a.b=1".into(), "c=\"x\"".into()],
        };
        let lines = vec![TsvLine::new(&run, dir.path(), 2, "pending")];
        let path = dir.path().join("runs.tsv");
        write_tsv(&path, &lines).unwrap();
        assert_eq!(read_tsv(&path).unwrap().unwrap(), lines);
        std::fs::write(&path, format!("{TSV_HEADER}\nbroken\n")).unwrap();
        let e = format!("{:#}", read_tsv(&path).unwrap_err());
        assert!(e.contains("runs.tsv:2"), "{e}");
    }
}
