//! The `trellis` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use trellis::plugin_host::{self, Registry};
use trellis::train::{self, RunOptions};

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
        /// Continue the run in --out from its last checkpoint.
        #[arg(long, requires = "out")]
        resume: bool,
        /// Stop after this many epochs (with a checkpoint), to continue later with --resume.
        #[arg(long, value_name = "EPOCHS")]
        stop_after: Option<usize>,
        /// No progress bar, only log lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Per-layer heavy-tailed spectral diagnostics (power-law alpha of each layer's ESD) of a
    /// saved model.
    Esd {
        /// The weights, e.g. a run directory's model.safetensors.
        weights: PathBuf,
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
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Print what one plugin library declares.
    Inspect {
        /// The plugin's shared library (.so).
        file: PathBuf,
    },
}

fn print_components(registry: &Registry) {
    let mut last_role = None;
    for (library, c) in registry.components() {
        if last_role != Some(c.role) {
            println!("\n{}s:", c.role);
            last_role = Some(c.role);
        }
        println!(
            "  {:<20} {} (plugin {} {})",
            c.name, c.description, library.info.name, library.info.version
        );
        for line in c.default_config.lines() {
            println!("  {:<20}   {line}", "");
        }
    }
}

fn inspect(file: &std::path::Path) -> Result<()> {
    let library = plugin_host::open(file)?;
    let info = &library.info;
    println!("plugin   {} {}", info.name, info.version);
    println!("about    {}", info.description);
    println!("file     {}", library.path.display());
    println!("sha256   {}", library.sha256);
    println!(
        "built    sdk {} (ABI {}), tch {}, libtorch {}{}",
        info.sdk_version,
        info.sdk_abi,
        info.tch_version,
        info.libtorch_version,
        if info.cuda { " with CUDA" } else { "" }
    );
    for c in &info.components {
        println!("\n{} `{}`: {}", c.role, c.name, c.description);
        if c.default_config.trim().is_empty() {
            println!("  (no configuration)");
        }
        for line in c.default_config.lines() {
            println!("  {line}");
        }
    }
    Ok(())
}

/// `trellis info`: what to check first when a GPU is not used.
fn info() -> Result<()> {
    use trellis_sdk::plugin::{LIBTORCH_CUDA, LIBTORCH_VERSION, TCH_VERSION};
    println!("trellis  {}", env!("CARGO_PKG_VERSION"));
    println!(
        "libtorch {LIBTORCH_VERSION} (tch {TCH_VERSION}), {} CPU threads",
        tch::get_num_threads()
    );
    // Linux lists every mapped library in /proc/self/maps.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let cuda_loaded = maps.contains("libtorch_cuda.so");
    let cuda = match (LIBTORCH_CUDA, cuda_loaded) {
        (false, _) => "none: this libtorch is a CPU-only build".to_string(),
        (true, false) => "libtorch_cuda is not loaded, so no GPU can be used\n  help: the linker \
                          dropped it; core/build.rs links it with --no-as-needed, rebuild trellis"
            .to_string(),
        (true, true) => match tch::Cuda::device_count() {
            0 => "libtorch_cuda loaded; no CUDA device visible".to_string(),
            n => format!(
                "libtorch_cuda loaded; {n} device(s), cuDNN {}",
                if tch::Cuda::cudnn_is_available() {
                    "available"
                } else {
                    "not available"
                }
            ),
        },
    };
    println!("cuda     {cuda}");
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
        } => train::run(&RunOptions {
            config,
            overrides,
            out,
            manifest,
            resume,
            stop_after,
            progress: !quiet,
        })
        .map(|_| ()),
        Command::Info => info(),
        Command::Esd {
            weights,
            arch,
            width,
            classes,
            fit,
        } => trellis::esd::run(&trellis::esd::EsdOptions {
            weights,
            arch,
            width,
            classes,
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
        } => trellis::prune::prune(&trellis::prune::PruneOptions {
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
        } => inspect(&file),
        Command::Plugins {
            action: None,
            manifest,
        } => Registry::load(&manifest).map(|r| print_components(&r)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
