//! The `trellis` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trellis::commands::{self, esd::EsdOptions, esd::ModelSource, run::RunOptions};

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Train models; every method is a plugin."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the run a config file describes.
    Run {
        /// The run config (TOML).
        config: PathBuf,
        /// Override any key of the config: `--set train.epochs=5 --set optimizer.lr=0.05`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The run directory (default: runs/<config name>-<unix time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use this plugin manifest instead of the config's `plugins`.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Continue the run in --out: from its last checkpoint, or from the start if it has
        /// none yet. Its state.json says which.
        #[arg(long, requires = "out")]
        resume: bool,
        /// Stop after this many epochs (with a checkpoint), to continue later with --resume.
        #[arg(long, value_name = "EPOCHS")]
        stop_after: Option<usize>,
        /// No progress bar, only log lines.
        #[arg(long)]
        quiet: bool,
        /// Train data-parallel on N local processes (ranks), as torchrun would start them; each
        /// takes its slice of every batch (train.batch_size stays the global batch). Under
        /// torchrun or srun, leave it out: the ranks come from the environment.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Run every combination of a grid of config values, each as its own `trellis run` in
    /// OUT/<id>, `--jobs` at a time; re-running the same command skips finished runs and resumes
    /// the others.
    #[command(after_help = SWEEP_EXAMPLES)]
    Sweep {
        /// A sweep file (`config = "base.toml"` and a [grid] table), or a run config whose grid
        /// is given with --grid.
        file: PathBuf,
        /// One more axis: `--grid train.seed=0,1,2` (values read as TOML, else as strings).
        #[arg(long, value_name = "KEY=V1,V2,...")]
        grid: Vec<String>,
        /// The sweep's directory: runs.tsv, one run directory per run, logs/.
        #[arg(long)]
        out: PathBuf,
        /// Runs at a time on this machine; the CPU threads are split between them.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// CPU threads to split between the jobs (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Use this plugin manifest instead of each config's `plugins`.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Write a cluster script instead of running: `slurm` writes OUT/sweep.sbatch, an
        /// `sbatch --array` job whose task N runs line N of runs.tsv.
        #[arg(long, value_enum)]
        emit: Option<commands::sweep::Emit>,
        /// No progress bars, only a line per run.
        #[arg(long)]
        quiet: bool,
        /// Each run as N data-parallel ranks (`trellis run --nproc N`; with --emit slurm, N
        /// Slurm tasks started by srun).
        #[arg(long, value_name = "N", default_value_t = 1)]
        nproc: usize,
    },
    /// Tables of mean ± std over seeds of finished runs, one row per group (with a baseline:
    /// the difference, Welch's t-test and a bootstrap interval), and their learning curves.
    #[command(after_help = REPORT_EXAMPLES)]
    Report {
        /// Run directories, or directories holding them (a sweep's OUT).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Config keys whose values make the groups: `--group-by pruner.use,pruner.sparsity`
        /// (default: every key the runs differ in, except seeds and threads).
        #[arg(long, value_delimiter = ',', value_name = "KEY,...")]
        group_by: Vec<String>,
        /// A test metric to tabulate (repeatable; default: every metric of the runs).
        #[arg(long = "metric", value_name = "NAME")]
        metrics: Vec<String>,
        /// The group the others are compared with: `--baseline pruner.use=random`.
        #[arg(long, value_name = "KEY=VALUE")]
        baseline: Option<String>,
        /// Which epoch of each run counts.
        #[arg(long, value_enum, default_value = "final")]
        at: commands::report::At,
        /// How the table is printed.
        #[arg(long, value_enum, default_value = "markdown")]
        format: commands::report::Format,
        /// Also write OUT/report.md with the figures, table.{md,csv,tex} and figures/*.png.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Per-layer heavy-tailed spectral diagnostics (power-law alpha of each layer's ESD) of a
    /// saved model.
    Esd {
        /// The weights, e.g. a run directory's model.safetensors.
        weights: PathBuf,
        /// The run config that describes the model (e.g. the run directory's config.toml): any
        /// model, a plugin's too. Without it, --arch, --width and --classes describe it.
        #[arg(long, conflicts_with_all = ["arch", "width", "classes"])]
        config: Option<PathBuf>,
        /// The architecture the weights belong to.
        #[arg(long, default_value = "resnet18", value_parser = trellis::esd::parse_arch)]
        arch: trellis::models::Arch,
        /// The model's width multiplier ([model] width).
        #[arg(long, default_value_t = 1.0)]
        width: f64,
        /// The number of classes of the model's head.
        #[arg(long, default_value_t = 10)]
        classes: i64,
        /// How xmin is chosen: median or goodness-of-fit.
        #[arg(long, default_value = "median")]
        fit: trellis_spectral::Fit,
    },
    /// Compute a config's pruning masks without training on: the run is set up as `trellis run`
    /// would (same model, seed and scoring batch), trained up to `[pruner] at_step`, and pruned.
    Prune {
        /// The run config (TOML) with a [pruner] table.
        config: PathBuf,
        /// Where to write the masks (safetensors, one 0/1 tensor per prunable weight).
        #[arg(long)]
        out: PathBuf,
        /// Also write the pruner's raw scores here.
        #[arg(long)]
        scores: Option<PathBuf>,
        /// Also write the network's weights at the pruning point, before masking, here.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Also write the exact scoring batch here (`inputs`, `targets`, `batch_sizes`).
        #[arg(long)]
        batch: Option<PathBuf>,
        /// Override any key of the config: `--set pruner.sparsity=0.98`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Use this plugin manifest instead of the config's `plugins`.
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Print the libtorch this binary runs on and the devices it sees.
    Info,
    /// List the components the plugins of a manifest provide, or inspect one plugin file.
    Plugins {
        #[command(subcommand)]
        action: Option<PluginsAction>,
        /// The manifest (default: plugins.toml in the current directory).
        #[arg(long, default_value = "plugins.toml")]
        manifest: PathBuf,
    },
    /// Write a new plugin.
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
}

#[derive(Subcommand)]
enum PluginAction {
    /// Create an out-of-tree plugin crate in DIR/NAME that builds, tests and trains as generated.
    New {
        /// The crate's name, e.g. `my-lr-warmup`; its component is named `my_lr_warmup`.
        name: String,
        /// optimizer, scheduler, pruner, distiller, metric, model or callback.
        #[arg(long)]
        role: String,
        /// The directory to create the crate's directory in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Print what one plugin library declares.
    Inspect {
        /// The plugin's shared library (.so).
        file: PathBuf,
    },
}

const SWEEP_EXAMPLES: &str = "Examples:
  trellis sweep examples/pruning/sweep_synthetic.toml --out runs/pruning --jobs 2
  trellis sweep examples/quickstart.toml --grid train.seed=0,1,2 --grid optimizer.lr=0.05,0.1 --out runs/lr
  trellis sweep examples/pruning/sweep.toml --out /scratch/pruning --emit slurm   # then: sbatch ...

A sweep file:
  config = \"base.toml\"                  # or [\"tempbalance.toml\", \"baseline.toml\"]: one more axis
  [grid]
  \"pruner.use\" = [\"snip\", \"grasp\"]
  \"train.seed\" = [0, 1, 2]              # the last axis varies fastest

OUT/runs.tsv lists the runs (id, overrides, run directory, threads, state); OUT/logs/ID.log has
each run's output. Compare the runs with `trellis report OUT --group-by pruner.use`.";

const REPORT_EXAMPLES: &str = "Examples:
  trellis report runs/pruning --group-by pruner.use,pruner.sparsity --metric top1
  trellis report runs/pruning --group-by pruner.use --baseline pruner.use=random --out runs/pruning/report
  trellis report runs/tb runs/baseline --at best --format latex

A group's runs are its seeds: the n column counts them. With --baseline, Δ is the group's mean
minus the baseline's, p is Welch's two-sided t-test, the interval a 95 % percentile bootstrap of
Δ, and ~ marks a Δ within noise (p >= 0.05 or an interval holding 0).";

fn main() -> ExitCode {
    trellis::commands::sweep::follow_parent();
    // The ranks after the first of a data-parallel run say only what goes wrong: rank 0 reports.
    let follower = trellis::distributed::World::from_env()
        .ok()
        .flatten()
        .is_some_and(|w| w.rank > 0);
    let default_level = if follower { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(trellis::train_log::Tee)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            overrides,
            out,
            manifest,
            resume,
            stop_after,
            quiet,
            nproc,
        } => {
            let opts = RunOptions {
                config,
                overrides,
                out,
                manifest,
                resume,
                stop_after,
                progress: !quiet,
            };
            match nproc {
                Some(n) if n != 1 => commands::launch::launch(&opts, n),
                _ => commands::run::run(&opts).map(|_| ()),
            }
        }
        Command::Sweep {
            file,
            grid,
            out,
            jobs,
            threads,
            manifest,
            emit,
            quiet,
            nproc,
        } => commands::sweep::sweep(&commands::sweep::SweepOptions {
            file,
            grid,
            out,
            jobs,
            threads,
            manifest,
            emit,
            progress: !quiet,
            nproc,
        }),
        Command::Report {
            dirs,
            group_by,
            metrics,
            baseline,
            at,
            format,
            out,
        } => commands::report::report(&commands::report::ReportOptions {
            dirs,
            group_by,
            metrics,
            baseline,
            at,
            format,
            out,
        }),
        Command::Info => commands::info::info(),
        Command::Esd {
            weights,
            config,
            arch,
            width,
            classes,
            fit,
        } => commands::esd::run(&EsdOptions {
            weights,
            model: match config {
                Some(config) => ModelSource::RunConfig(config),
                None => ModelSource::Builtin {
                    arch,
                    width,
                    classes,
                },
            },
            fit,
        }),
        Command::Prune {
            config,
            out,
            scores,
            weights,
            batch,
            overrides,
            manifest,
        } => commands::prune::prune(&commands::prune::PruneOptions {
            config,
            overrides,
            manifest,
            out: out.clone(),
            scores,
            weights,
            batch,
        })
        .map(|masks| {
            println!("{}", trellis::prune::density_table(&masks));
            println!("masks: {}", out.display());
        }),
        Command::Plugins {
            action: Some(PluginsAction::Inspect { file }),
            ..
        } => commands::plugins::inspect(&file),
        Command::Plugins {
            action: None,
            manifest,
        } => commands::plugins::list(&manifest),
        Command::Plugin {
            action: PluginAction::New { name, role, dir },
        } => commands::plugin_new::new(&commands::plugin_new::NewOptions { name, role, dir }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // SIGINT or SIGTERM: not an error; the message says how the run goes on.
        Err(e) => match e.downcast_ref::<commands::run::RunInterrupted>() {
            Some(interrupted) => {
                eprintln!("{interrupted}");
                ExitCode::from(commands::run::INTERRUPTED_EXIT)
            }
            None if e.is::<commands::launch::RankFailed>() => {
                let failed = e
                    .downcast_ref::<commands::launch::RankFailed>()
                    .expect("checked");
                eprintln!("error: {failed}");
                ExitCode::from(failed.code)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
