//! Trellis against PyTorch on the same libtorch: `cargo bench -p trellis --bench speed`.
//!
//! PyTorch runs three ways, a column each ([`Variant`]): as users run it (eager, NCHW, glibc's
//! malloc); "tuned", given the two CPU settings Trellis has built in that any PyTorch user can
//! switch on (channels-last, and jemalloc configured as Trellis's); and `torch.compile`
//! (inductor) on top of the tuned set-up, what a PyTorch user picks for speed, where it runs.
//! Every case runs on every side in this one session, alternating (Trellis first, then the
//! other way round, rep after rep), so machine noise lands on all. Each PyTorch side is
//! `core/benches/pytorch_reference.py`, started once and driven over stdin/stdout. All sides get
//! the same model (kuangliu's CIFAR ResNet18, loaded from the same initial weights), batch, dtype
//! and thread counts, and the training cases first check that Trellis and PyTorch compute the
//! same logits and the same SGD step.
//!
//! Flags (after `--`): `--quick` (a smoke run: fewer, smaller repetitions), `--threads N` (default:
//! every core), `--cases a,b` (of train, autocast: the full-width training step under CPU bf16
//! autocast on both sides, optimizer, eval, data, dispatch, memory, epoch,
//! linearized: f_lin against f, both Trellis; prune: global magnitude masks against
//! Synaptic-Flow's kthvalue threshold),
//! `--device cpu|cuda` (where the `epoch` case trains; the others are CPU cases), `--python PATH`
//! (default: the `.torch-python` link that scripts/setup.sh makes), `--python-env KEY=VALUE`
//! (environment for every PyTorch side), `--pytorch eager,tuned,compiled` (the PyTorch columns;
//! all three by default), `--max-load L` (before each case, wait for the 1-minute load average
//! to drop below L).
//!
//! The printed table gives medians and the ratios Trellis/PyTorch of times (lower is faster), or
//! of peak memory, one per PyTorch column. docs/PERFORMANCE.md explains each case.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use trellis::data::{Dataset, Loader, LoaderOptions, Normalize, CIFAR10_MEAN, CIFAR10_STD};
use trellis::models::{Arch, ModelConfig, Network};
use trellis::plugin_host::Registry;
use trellis::services::{RunHost, RunState, SharedModel};
use trellis_sdk::{
    Batch, Component, EpochInfo, Events, Host, Metric, Optimizer, Outputs, ParamGroup,
    PruneRequest, Role, Scope,
};

const BATCH: usize = 128;
const EVAL_BATCH: usize = 500;
const LR: f64 = 0.1;
const MOMENTUM: f64 = 0.9;
const WEIGHT_DECAY: f64 = 5e-4;
/// "Width 16": ResNet18's stem at 16 channels instead of 64.
const WIDTH_16: f64 = 0.25;

// -------------------------------------------------------------------------------------------
// Command line

struct Args {
    quick: bool,
    threads: usize,
    cases: Vec<String>,
    python: Option<PathBuf>,
    /// `--python-env KEY=VALUE`: environment for every PyTorch side.
    python_env: Vec<(String, String)>,
    /// `--pytorch a,b`: the PyTorch columns.
    variants: Vec<Variant>,
    /// `--max-load L`: before each case, wait (up to 15 minutes) for the 1-minute load average
    /// to drop below L, on machines shared with other work.
    max_load: Option<f64>,
    /// `--device`: where the `epoch` case trains.
    device: Device,
    /// Internal: `--memory-child WIDTH STEPS`, one training session in a process of its own.
    memory_child: Option<(f64, usize)>,
}

const CASES: [&str; 10] = [
    "train",
    "autocast",
    "optimizer",
    "eval",
    "data",
    "dispatch",
    "memory",
    "epoch",
    "linearized",
    "prune",
];

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cases: CASES.iter().map(|c| c.to_string()).collect(),
        python: None,
        python_env: Vec::new(),
        variants: Variant::ALL.to_vec(),
        max_load: None,
        device: Device::Cpu,
        memory_child: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| anyhow!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--pytorch" => {
                args.variants = value("--pytorch")?
                    .split(',')
                    .map(Variant::parse)
                    .collect::<Result<_>>()?;
            }
            "--max-load" => args.max_load = Some(value("--max-load")?.parse()?),
            "--threads" => args.threads = value("--threads")?.parse()?,
            "--device" => {
                args.device = match value("--device")?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    other => bail!("--device takes cpu or cuda, not `{other}`"),
                }
            }
            "--python" => args.python = Some(value("--python")?.into()),
            "--python-env" => {
                let pair = value("--python-env")?;
                let (key, val) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--python-env takes KEY=VALUE, got `{pair}`"))?;
                args.python_env.push((key.to_string(), val.to_string()));
            }
            "--cases" => {
                args.cases = value("--cases")?.split(',').map(str::to_string).collect();
                if let Some(bad) = args.cases.iter().find(|c| !CASES.contains(&c.as_str())) {
                    bail!("unknown case `{bad}`; the cases are {}", CASES.join(", "));
                }
            }
            "--memory-child" => {
                let width = value("--memory-child")?.parse()?;
                let steps = value("--memory-child")?.parse()?;
                args.memory_child = Some((width, steps));
            }
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            other => bail!(
                "unknown argument `{other}`\n  usage: cargo bench -p trellis --bench speed -- \
                 [--quick] [--threads N] [--cases {}] [--python PATH] [--python-env KEY=VALUE] \
                 [--pytorch eager,tuned,compiled] [--max-load L] [--device cpu|cuda]",
                CASES.join(",")
            ),
        }
    }
    ensure!(args.threads >= 1, "--threads must be at least 1");
    Ok(args)
}

/// The checkout this binary sits in (`<root>/target/release/deps/speed-<hash>`), which may not
/// be where it was compiled: a GPU machine without a Rust toolchain runs a copy of the checkout
/// with the built binaries carried along.
fn workspace_root() -> PathBuf {
    let compiled_in = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core/ has a parent")
        .to_path_buf();
    profile_dir()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.to_path_buf()))
        .filter(|root| root.join("core/benches/pytorch_reference.py").exists())
        .unwrap_or(compiled_in)
}

/// target/release: this binary is target/release/deps/speed-<hash>.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected bench location {}", exe.display()))?
        .to_path_buf())
}

// -------------------------------------------------------------------------------------------
// The PyTorch side

struct PyTorch {
    variant: Variant,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
}

/// The interpreter of the torch venv. `.torch-python` is a link to `<venv>/bin/python`; Python
/// finds its venv (and torch) only when started by that path, not through a link elsewhere.
fn python_path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let link = workspace_root().join(".torch-python");
    let target = std::fs::read_link(&link).with_context(|| {
        format!(
            "{} is missing\n  help: run scripts/setup.sh, which installs torch and makes the link, \
             or pass --python <venv>/bin/python",
            link.display()
        )
    })?;
    Ok(if target.is_absolute() {
        target
    } else {
        workspace_root().join(target)
    })
}

fn reference_script() -> PathBuf {
    workspace_root().join("core/benches/pytorch_reference.py")
}

/// One way of running PyTorch: a column of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// As users run it: eager, NCHW, glibc's malloc.
    Eager,
    /// Eager with Trellis's two CPU settings that a PyTorch user can switch on: channels-last
    /// convolutions, and jemalloc as the allocator, configured as Trellis's.
    Tuned,
    /// `torch.compile` (inductor) of the tuned set-up.
    Compiled,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Eager, Variant::Tuned, Variant::Compiled];

    fn parse(name: &str) -> Result<Variant> {
        Ok(match name {
            "eager" => Variant::Eager,
            "tuned" => Variant::Tuned,
            "compiled" => Variant::Compiled,
            other => bail!("--pytorch takes eager, tuned and compiled, not `{other}`"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Eager => "PyTorch",
            Variant::Tuned => "PyTorch tuned",
            Variant::Compiled => "torch.compile",
        }
    }

    fn tuned(self) -> bool {
        self != Variant::Eager
    }
}

/// The allocator configuration Trellis compiles into its jemalloc (`.cargo/config.toml`), for
/// the tuned PyTorch sides.
const TRELLIS_MALLOC_CONF: &str = env!("JEMALLOC_SYS_WITH_MALLOC_CONF");

/// jemalloc for the tuned PyTorch sides: the `.libjemalloc.so` link scripts/setup.sh makes.
fn jemalloc_path() -> Result<PathBuf> {
    let link = workspace_root().join(".libjemalloc.so");
    ensure!(
        link.exists(),
        "{} is missing: the tuned PyTorch sides preload jemalloc from it\n  help: run \
         scripts/setup.sh (it unpacks Debian's libjemalloc2), or leave those sides out with \
         --pytorch eager",
        link.display()
    );
    Ok(link)
}

/// The reference script for `variant`, with the session's threads and `--python-env`.
fn python_command(args: &Args, variant: Variant) -> Result<Command> {
    let mut command = Command::new(python_path(args.python.as_deref())?);
    if variant.tuned() {
        command
            .env("LD_PRELOAD", jemalloc_path()?)
            .env("MALLOC_CONF", TRELLIS_MALLOC_CONF);
    }
    command
        .envs(args.python_env.iter().map(|(k, v)| (k, v)))
        .arg(reference_script())
        .args([
            "--threads",
            &args.threads.to_string(),
            "--interop-threads",
            "1",
        ]);
    if variant.tuned() {
        command.arg("--channels-last");
    }
    if variant == Variant::Compiled {
        command.arg("--compile");
    }
    Ok(command)
}

impl PyTorch {
    /// The side for `variant`; for `torch.compile`, `Ok(Err(why))` where it cannot run here.
    fn start(args: &Args, variant: Variant) -> Result<std::result::Result<PyTorch, String>> {
        let mut child = python_command(args, variant)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the {} side", variant.label()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut py = PyTorch {
            variant,
            child,
            stdin,
            stdout,
            version: String::new(),
        };
        let hello = py.read()?;
        py.version = hello["torch"].as_str().unwrap_or("?").to_string();
        ensure!(
            hello["threads"].as_u64() == Some(args.threads as u64),
            "PyTorch runs {} threads, not {}",
            hello["threads"],
            args.threads
        );
        if let Some(why) = hello["compile_error"].as_str() {
            return Ok(Err(why.to_string()));
        }
        Ok(Ok(py))
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(
            !line.is_empty(),
            "the PyTorch script exited (see its error above)"
        );
        let reply: Value = serde_json::from_str(&line)
            .with_context(|| format!("unexpected line from the PyTorch script: {line}"))?;
        if reply["ok"] != Value::Bool(true) {
            bail!("the PyTorch script failed: {}", reply["error"]);
        }
        Ok(reply)
    }

    fn call(&mut self, cmd: &str, mut args: Value) -> Result<Value> {
        args["cmd"] = json!(cmd);
        writeln!(self.stdin, "{args}")?;
        self.stdin.flush()?;
        let label = self.variant.label();
        self.read()
            .with_context(|| format!("{label} side, `{cmd}`"))
    }

    fn seconds(&mut self, cmd: &str, args: Value) -> Result<Vec<f64>> {
        let reply = self.call(cmd, args)?;
        seconds_of(&reply, cmd)
    }
}

/// The `phases` of a `time_train` reply: [forward, backward, optimizer] seconds per step.
fn phases_of(reply: &Value) -> Result<Vec<[f64; 3]>> {
    let steps = reply["phases"]
        .as_array()
        .ok_or_else(|| anyhow!("`time_train` returned no phases"))?;
    steps
        .iter()
        .map(|step| {
            let v: Vec<f64> = step
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            <[f64; 3]>::try_from(v).map_err(|v| anyhow!("a step's phases are {v:?}"))
        })
        .collect()
}

/// "a / b / c" of the phases' medians, in milliseconds.
fn phase_medians(phases: &[[f64; 3]]) -> String {
    (0..3)
        .map(|i| {
            let xs: Vec<f64> = phases.iter().map(|p| p[i]).collect();
            format!("{:.1}", median(&xs) * 1e3)
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn seconds_of(reply: &Value, cmd: &str) -> Result<Vec<f64>> {
    reply["seconds"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .ok_or_else(|| anyhow!("`{cmd}` returned no seconds"))
}

/// CPU time and minor page faults of a process: where a step's time goes besides the kernels.
/// Page faults are the kernel handing out (and zeroing) fresh memory.
#[derive(Default)]
struct ProcessTimes {
    user: f64,
    system: f64,
    minor_faults: f64,
}

impl ProcessTimes {
    /// This process's totals so far, from /proc/self/stat.
    fn now() -> Result<ProcessTimes> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        // Fields after the parenthesised command name, which may itself contain spaces.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("cannot parse /proc/self/stat"))?;
        let fields: Vec<f64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(f64::NAN))
            .collect();
        // Field numbers of proc(5), counted from 1 with the pid, so field k is fields[k - 3].
        // Times are in clock ticks, 100 per second on Linux.
        let ticks = 100.0;
        Ok(ProcessTimes {
            minor_faults: fields[10 - 3],
            user: fields[14 - 3] / ticks,
            system: fields[15 - 3] / ticks,
        })
    }

    fn from_reply(reply: &Value) -> ProcessTimes {
        let get = |k: &str| reply[k].as_f64().unwrap_or(f64::NAN);
        ProcessTimes {
            user: get("user_seconds"),
            system: get("system_seconds"),
            minor_faults: get("minor_faults"),
        }
    }

    fn since(&self, before: &ProcessTimes) -> ProcessTimes {
        ProcessTimes {
            user: self.user - before.user,
            system: self.system - before.system,
            minor_faults: self.minor_faults - before.minor_faults,
        }
    }

    fn add(&mut self, other: &ProcessTimes) {
        self.user += other.user;
        self.system += other.system;
        self.minor_faults += other.minor_faults;
    }
}

impl Drop for PyTorch {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

// -------------------------------------------------------------------------------------------
// The Trellis side

fn normalize() -> Normalize {
    Normalize {
        mean: CIFAR10_MEAN.to_vec(),
        std: CIFAR10_STD.to_vec(),
    }
}

/// Random CIFAR-shaped u8 images; timing does not depend on their content.
fn random_dataset(n: usize, seed: i64) -> Result<Dataset> {
    tch::manual_seed(seed);
    let images = Tensor::randint(256, [n as i64, 3, 32, 32], (Kind::Uint8, Device::Cpu));
    let labels = Tensor::arange(n as i64, (Kind::Int64, Device::Cpu)).remainder(10);
    Dataset::new(images, labels, 10)
}

fn resnet18(width: f64, seed: i64) -> Result<Network> {
    tch::manual_seed(seed);
    let cfg = ModelConfig {
        width,
        ..ModelConfig::new(Arch::Resnet18)
    };
    Network::build(&cfg, 10, 3, 32, Device::Cpu)
}

fn host(model: &Rc<SharedModel>, data: &Rc<Dataset>) -> RunHost {
    let state = RunState::new(
        10,
        Device::Cpu,
        0,
        data.clone(),
        BATCH,
        true,
        normalize(),
        None,
        std::env::temp_dir(),
    );
    state.set_model(model.clone());
    RunHost(state)
}

fn param_group(net: &Network) -> ParamGroup {
    ParamGroup {
        name: "all".into(),
        params: net
            .parameters()
            .into_iter()
            .map(|(name, _, t)| (name, t))
            .collect(),
        lr: LR,
        weight_decay: WEIGHT_DECAY,
    }
}

/// The optimizer and metric plugins, built in this profile and loaded as `trellis run` loads them.
struct Plugins {
    registry: Registry,
    /// The manifest `registry` was loaded from, for runs of the `trellis` binary.
    manifest: PathBuf,
    _dir: tempfile::TempDir,
}

impl Plugins {
    fn load() -> Result<Plugins> {
        let profile = profile_dir()?;
        let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "trellis-optim",
                "-p",
                "trellis-metrics",
                "-p",
                "trellis-fixture-misbehaving",
                "-p",
                "trellis-linearized",
                "-p",
                "trellis-pai-baselines",
            ])
            .current_dir(workspace_root());
        if profile.ends_with("release") {
            build.arg("--release");
        }
        match build.status() {
            Ok(status) => ensure!(status.success(), "building the plugins failed"),
            // No toolchain (a machine the binaries were carried to): use the plugins beside
            // this binary, which Registry::load checks like any manifest's.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "no cargo here: using the plugins already built in {}",
                    profile.display()
                )
            }
            Err(e) => return Err(e).context("cannot run cargo to build the plugins"),
        }
        let dir = tempfile::tempdir()?;
        let mut manifest = String::new();
        for package in [
            "trellis-optim",
            "trellis-metrics",
            "trellis-fixture-misbehaving",
            "trellis-linearized",
            "trellis-pai-baselines",
        ] {
            let file = profile.join(format!("lib{}.so", package.replace('-', "_")));
            manifest.push_str(&format!(
                "[[plugin]]\nname = \"{package}\"\npath = \"{}\"\n\n",
                file.display()
            ));
        }
        let path = dir.path().join("plugins.toml");
        std::fs::write(&path, manifest)?;
        Ok(Plugins {
            registry: Registry::load(&path)?,
            manifest: path,
            _dir: dir,
        })
    }

    fn sgd(&self, host: &RunHost) -> Result<Box<dyn Optimizer>> {
        let text = format!("momentum = {MOMENTUM}\n");
        self.registry
            .create(Role::Optimizer, "sgd", &text, Host::new(host.clone()))?
            .into_optimizer()
            .ok_or_else(|| anyhow!("sgd is not an optimizer"))
    }

    fn metrics(&self, host: &RunHost) -> Result<Vec<Box<dyn Metric>>> {
        ["accuracy", "loss"]
            .iter()
            .map(|name| {
                self.registry
                    .create(Role::Metric, name, "", Host::new(host.clone()))?
                    .into_metric()
                    .ok_or_else(|| anyhow!("{name} is not a metric"))
            })
            .collect()
    }
}

/// The step control for a callback that never takes the step over.
struct NoControl;

impl trellis_sdk::StepControl for NoControl {
    fn recompute(&mut self) -> trellis_sdk::Result<f64> {
        Err(trellis_sdk::Error::msg(
            "the bench's callback does not recompute",
        ))
    }
    fn base_step(&mut self) -> trellis_sdk::Result<()> {
        Err(trellis_sdk::Error::msg(
            "the bench's callback does not step",
        ))
    }
}

fn static_sgd(host: &RunHost) -> Result<Box<dyn Optimizer>> {
    let config = trellis_optim::SgdConfig {
        momentum: MOMENTUM,
        ..Default::default()
    };
    Ok(Box::new(
        trellis_optim::Sgd::new(config, Host::new(host.clone())).map_err(sdk)?,
    ))
}

fn static_metrics(host: &RunHost) -> Result<Vec<Box<dyn Metric>>> {
    let accuracy = trellis_metrics::Accuracy::new(Default::default(), Host::new(host.clone()));
    let loss = trellis_metrics::MeanLoss::new(Default::default(), Host::new(host.clone()));
    Ok(vec![
        Box::new(accuracy.map_err(sdk)?),
        Box::new(loss.map_err(sdk)?),
    ])
}

fn sdk(e: trellis_sdk::Error) -> anyhow::Error {
    anyhow!(e.message)
}

/// A model, its optimizer and a training batch stream: the state of `trellis run`'s loop.
struct Run {
    model: Rc<SharedModel>,
    params: Vec<Tensor>,
    optimizer: Box<dyn Optimizer>,
    loader: Loader,
    loss_sum: Tensor,
    /// Convolutions and linear layers in this kind (`[train] autocast`), as `Trainer` runs them.
    autocast: Option<Kind>,
    /// Seconds of each step's phases: forward and loss, zeroed gradients and backward, the
    /// optimizer. Where a step's time goes, side by side with PyTorch's split of its own.
    phases: Vec<[f64; 3]>,
}

impl Run {
    fn new(net: Network, data: &Rc<Dataset>, optimizer: OptimizerSource) -> Result<Run> {
        let group = param_group(&net);
        let params = group
            .params
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let model = SharedModel::new(net);
        let host = host(&model, data);
        let mut optimizer = match optimizer {
            OptimizerSource::Plugin(plugins) => plugins.sgd(&host)?,
            OptimizerSource::Static => static_sgd(&host)?,
        };
        optimizer.set_param_groups(vec![group]).map_err(sdk)?;
        model.set_training(true);
        Ok(Run {
            model,
            params,
            optimizer,
            loader: train_loader(data, 0),
            loss_sum: Tensor::zeros([], (Kind::Double, Device::Cpu)),
            autocast: None,
            phases: Vec::new(),
        })
    }

    /// One step as `Trainer::train_epoch` takes it (without distillers and pruning masks, which
    /// a plain run does not have): forward, cross-entropy, zeroed gradients, backward, the
    /// optimizer, and the loss accumulated without reading it.
    fn step(&mut self, batch: &Batch) -> Result<()> {
        let model = &self.model;
        let started = Instant::now();
        let (logits, _) =
            trellis::models::autocast(self.autocast, || model.forward(&batch.inputs))?;
        let loss = logits.cross_entropy_for_logits(&batch.targets);
        let forward = Instant::now();
        for p in &mut self.params {
            p.zero_grad();
        }
        loss.backward();
        let backward = Instant::now();
        self.optimizer.step().map_err(sdk)?;
        self.phases.push([
            (forward - started).as_secs_f64(),
            (backward - forward).as_secs_f64(),
            backward.elapsed().as_secs_f64(),
        ]);
        let n = batch.targets.size()[0];
        self.loss_sum += loss.detach().to_kind(Kind::Double) * n as f64;
        Ok(())
    }

    /// Steps on the loader's batches; the time of each includes waiting for its batch.
    fn timed_steps(&mut self, steps: usize) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let started = Instant::now();
            let batch = self
                .loader
                .next()
                .ok_or_else(|| anyhow!("the training set is too small for the steps asked"))?;
            let batch = Batch {
                inputs: batch.inputs,
                targets: batch.targets,
            };
            self.step(&batch)?;
            times.push(started.elapsed().as_secs_f64());
        }
        Ok(times)
    }
}

enum OptimizerSource<'a> {
    Plugin(&'a Plugins),
    Static,
}

fn train_loader(data: &Dataset, epoch: usize) -> Loader {
    Loader::new(
        data,
        LoaderOptions {
            batch_size: BATCH,
            shuffle: true,
            augment: true,
            drop_last: true,
            seed: 0,
            epoch,
            device: Device::Cpu,
            normalize: normalize(),
        },
    )
}

fn eval_loader(data: &Dataset) -> Loader {
    Loader::new(
        data,
        LoaderOptions {
            batch_size: EVAL_BATCH,
            shuffle: false,
            augment: false,
            drop_last: false,
            seed: 0,
            epoch: 0,
            device: Device::Cpu,
            normalize: normalize(),
        },
    )
}

// -------------------------------------------------------------------------------------------
// Results

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One case: the median of each column (the first is the one the ratios divide; `None` for a
/// side the case does not run on), with sample counts and (min, max) for the log.
struct Row {
    case: String,
    unit: &'static str,
    values: Vec<Option<f64>>,
    samples: Vec<usize>,
    ranges: Vec<Option<(f64, f64)>>,
}

impl Row {
    fn new(case: &str, unit: &'static str, columns: &[Option<&[f64]>], scale: f64) -> Row {
        let range = |xs: &[f64]| {
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (lo * scale, hi * scale)
        };
        Row {
            case: case.to_string(),
            unit,
            values: columns
                .iter()
                .map(|c| c.map(|xs| median(xs) * scale))
                .collect(),
            samples: columns.iter().map(|c| c.map_or(0, <[f64]>::len)).collect(),
            ranges: columns.iter().map(|c| c.map(range)).collect(),
        }
    }

    /// A row of two columns that both ran.
    fn pair(case: &str, unit: &'static str, first: &[f64], second: &[f64], scale: f64) -> Row {
        Row::new(case, unit, &[Some(first), Some(second)], scale)
    }

    /// The first column over column `i`.
    fn ratio(&self, i: usize) -> Option<f64> {
        Some(self.values[0]? / self.values[i]?)
    }

    /// "name median unit (min–max)" for the log, one column.
    fn describe(&self, i: usize, name: &str) -> String {
        match (self.values[i], self.ranges[i]) {
            (Some(v), Some((lo, hi))) => {
                format!("{name} {v:.4} {u} ({lo:.4}–{hi:.4})", u = self.unit)
            }
            _ => format!("{name} not run"),
        }
    }
}

struct Report {
    /// Against PyTorch: Trellis, then one column per side.
    rows: Vec<Row>,
    /// The PyTorch sides' names, in column order.
    sides: Vec<&'static str>,
    /// Trellis against itself: plugins (first column) against static linking (second).
    dispatch: Option<Row>,
    /// Trellis against itself: f_lin's epoch (first column) against f's (second).
    linearized: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn add(&mut self, row: Row) {
        let mut line = format!("  {}: {}", row.case, row.describe(0, "Trellis"));
        for (i, side) in self.sides.iter().enumerate() {
            line += &format!(", {}", row.describe(i + 1, side));
            if let Some(r) = row.ratio(i + 1) {
                line += &format!(" (ratio {r:.3})");
            }
        }
        eprintln!("{line}");
        self.rows.push(row);
    }

    fn note(&mut self, note: String) {
        eprintln!("  {note}");
        self.notes.push(note);
    }

    fn print(&self) {
        let width = self
            .rows
            .iter()
            .chain(&self.dispatch)
            .chain(&self.linearized)
            .map(|r| r.case.chars().count())
            .max()
            .unwrap_or(4);
        let mut columns = vec!["Trellis"];
        columns.extend(&self.sides);
        print_table(width, &columns, &self.rows);
        if let Some(r) = &self.dispatch {
            print_table(width, &["plugins", "static"], std::slice::from_ref(r));
        }
        if !self.linearized.is_empty() {
            print_table(width, &["f_lin", "f"], &self.linearized);
        }
        println!();
        for n in &self.notes {
            println!("- {n}");
        }
    }
}

/// One Markdown table of rows: a value column per name in `columns`, then the first column's
/// ratio to each of the others ("–" where a side did not run the case).
fn print_table(width: usize, columns: &[&str], rows: &[Row]) {
    let ratios: Vec<String> = columns[1..]
        .iter()
        .map(|c| format!("{}/{c}", columns[0]))
        .collect();
    let cell = |w: usize| "-".repeat(w + 2);
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| c.chars().count().max(12))
        .chain(ratios.iter().map(|r| r.chars().count().max(6)))
        .collect();
    let mut header = format!("| {:width$} |", "case");
    let mut rule = format!("|{}|", cell(width));
    for (name, w) in columns
        .iter()
        .map(|c| c.to_string())
        .chain(ratios.iter().cloned())
        .zip(&widths)
    {
        header += &format!(" {name:>w$} |");
        rule += &format!("{}|", cell(*w));
    }
    println!();
    println!("{header} samples |");
    println!("{rule}{}|", cell(7));
    for r in rows {
        let mut line = format!("| {:width$} |", r.case);
        let values = r
            .values
            .iter()
            .map(|v| v.map_or("–".to_string(), |v| format!("{v:.4} {}", r.unit)));
        let ratios =
            (1..columns.len()).map(|i| r.ratio(i).map_or("–".to_string(), |x| format!("{x:.3}")));
        for (text, w) in values.chain(ratios).zip(&widths) {
            line += &format!(" {text:>w$} |");
        }
        let samples: Vec<String> = r.samples.iter().map(usize::to_string).collect();
        println!("{line} {:>7} |", samples.join("/"));
    }
}

/// Runs `first` and `second` alternately `reps` times, `first` first on even reps.
fn alternate(
    reps: usize,
    mut first: impl FnMut() -> Result<Vec<f64>>,
    mut second: impl FnMut() -> Result<Vec<f64>>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        if rep % 2 == 0 {
            a.extend(first()?);
            b.extend(second()?);
        } else {
            b.extend(second()?);
            a.extend(first()?);
        }
    }
    Ok((a, b))
}

/// Each PyTorch side's samples, in column order; `None` for a side a case leaves out.
type SideSamples = Vec<Option<Vec<f64>>>;

/// Trellis and every PyTorch side that `runs`, alternately `reps` times: Trellis, then the sides
/// in order on even reps; the sides in reverse order, then Trellis, on odd ones. Returns Trellis's
/// samples and each side's (`None` for one left out).
fn against_sides(
    reps: usize,
    sides: &mut [PyTorch],
    runs: impl Fn(Variant) -> bool,
    mut trellis: impl FnMut() -> Result<Vec<f64>>,
    mut side: impl FnMut(&mut PyTorch) -> Result<Vec<f64>>,
) -> Result<(Vec<f64>, SideSamples)> {
    let mut ours = Vec::new();
    let mut theirs: SideSamples = sides
        .iter()
        .map(|s| runs(s.variant).then(Vec::new))
        .collect();
    for rep in 0..reps {
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..sides.len()).collect()
        } else {
            (0..sides.len()).rev().collect()
        };
        if rep % 2 == 0 {
            ours.extend(trellis()?);
        }
        for i in order {
            if let Some(samples) = &mut theirs[i] {
                samples.extend(side(&mut sides[i])?);
            }
        }
        if rep % 2 == 1 {
            ours.extend(trellis()?);
        }
    }
    Ok((ours, theirs))
}

/// ", <side><how> <rate>" for every side that ran, `rate` of its samples: a note's figures for
/// the PyTorch sides after Trellis's.
fn per_side(
    sides: &[PyTorch],
    samples: &SideSamples,
    how: &str,
    rate: impl Fn(&[f64]) -> f64,
) -> String {
    sides
        .iter()
        .zip(samples)
        .filter_map(|(side, s)| {
            Some(format!(
                ", {}{how} {:.0}",
                side.variant.label(),
                rate(s.as_deref()?)
            ))
        })
        .collect()
}

/// The columns of a [`Row`] against the sides: Trellis's, then each side's.
fn columns<'a>(trellis: &'a [f64], sides: &'a SideSamples) -> Vec<Option<&'a [f64]>> {
    std::iter::once(Some(trellis))
        .chain(sides.iter().map(|s| s.as_deref()))
        .collect()
}

// -------------------------------------------------------------------------------------------
// Cases

struct Bench {
    args: Args,
    /// The PyTorch columns that run here, in order.
    sides: Vec<PyTorch>,
    plugins: Plugins,
    dir: tempfile::TempDir,
    report: Report,
}

/// The largest absolute difference between two tensors, relative to the larger magnitude.
fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = a.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

impl Bench {
    fn sizes(&self, quick: usize, full: usize) -> usize {
        if self.args.quick {
            quick
        } else {
            full
        }
    }

    /// Saves `net`'s weights and has every PyTorch side build the same ResNet18 from them.
    fn load_pytorch_model(&mut self, net: &Network, width: f64) -> Result<()> {
        let weights = self.dir.path().join("weights.safetensors");
        net.save(&weights)?;
        for side in &mut self.sides {
            side.call(
                "load_model",
                json!({
                    "width": width,
                    "weights": weights,
                    "lr": LR,
                    "momentum": MOMENTUM,
                    "weight_decay": WEIGHT_DECAY,
                    "batch_size": BATCH,
                }),
            )?;
        }
        Ok(())
    }

    /// Both sides: the logits of one training-mode forward, then one SGD step from the same
    /// weights on the same batch. PyTorch runs it in channels-last, the memory format of
    /// Trellis's convolutions on the CPU, so that both run the same kernels and the comparison
    /// checks the model and the update rule rather than two kernels' rounding: a weight decay
    /// left out would change the step by ~1 %, where kernels that sum in another order change
    /// BatchNorm parameters' gradients (sums over the batch that nearly cancel) by as much.
    /// The step is compared as a whole: |Δw_Trellis − Δw_PyTorch| / |Δw_PyTorch| over all
    /// parameters.
    fn check_agreement(&mut self, run: &mut Run, label: &str) -> Result<()> {
        tch::manual_seed(3);
        let inputs = Tensor::randn([BATCH as i64, 3, 32, 32], (Kind::Float, Device::Cpu));
        let targets = Tensor::randint(10, [BATCH as i64], (Kind::Int64, Device::Cpu));
        let batch_file = self.dir.path().join("batch.safetensors");
        Tensor::write_safetensors(&[("inputs", &inputs), ("targets", &targets)], &batch_file)?;
        let out = self.dir.path().join("pytorch_step.safetensors");
        // The check runs an uncompiled copy of the model in any case: one side will do.
        self.sides[0].call(
            "check_train",
            json!({"inputs": batch_file, "out": out, "channels_last": true}),
        )?;
        let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(&out)?.into_iter().collect();
        let initial: HashMap<String, Tensor> = run
            .model
            .net()
            .state_dict()
            .into_iter()
            .map(|(name, t)| (name, t.detach().copy()))
            .collect();

        let (logits, _) = run.model.forward(&inputs)?;
        let loss = logits.cross_entropy_for_logits(&targets);
        for p in &mut run.params {
            p.zero_grad();
        }
        loss.backward();
        run.optimizer.step().map_err(sdk)?;

        let logits_diff = relative_difference(&logits, &theirs["logits"]);
        let loss_diff = relative_difference(&loss.reshape([1]), &theirs["loss"]);
        let net = run.model.net();
        let (mut step_error, mut step_norm) = (0.0, 0.0);
        for (name, _, ours) in net.parameters() {
            let other = theirs
                .get(&name)
                .ok_or_else(|| anyhow!("the PyTorch model has no `{name}`"))?;
            let ours = (&ours.detach() - &initial[&name]).to_kind(Kind::Double);
            let other = (other - &initial[&name]).to_kind(Kind::Double);
            step_error += (&ours - &other)
                .square()
                .sum(Kind::Double)
                .double_value(&[]);
            step_norm += other.square().sum(Kind::Double).double_value(&[]);
        }
        let step_diff = (step_error / step_norm.max(1e-30)).sqrt();
        let mut stats_diff: f64 = 0.0;
        for (name, ours) in net.buffers() {
            let other = theirs
                .get(&name)
                .ok_or_else(|| anyhow!("the PyTorch model has no `{name}`"))?;
            stats_diff = stats_diff.max(relative_difference(&ours, other));
        }
        let tolerance = 1e-4;
        ensure!(
            logits_diff < tolerance
                && loss_diff < tolerance
                && step_diff < tolerance
                && stats_diff < tolerance,
            "{label}: Trellis and PyTorch disagree (relative differences): logits \
             {logits_diff:.2e}, loss {loss_diff:.2e}, SGD step {step_diff:.2e}, running \
             statistics {stats_diff:.2e}"
        );
        self.report.note(format!(
            "{label}: outputs agree before timing (relative differences): logits \
             {logits_diff:.1e}, loss {loss_diff:.1e}, one SGD step {step_diff:.1e}, BatchNorm \
             running statistics {stats_diff:.1e}"
        ));
        Ok(())
    }

    fn train(
        &mut self,
        label: &str,
        width: f64,
        warmup: usize,
        reps: usize,
        per_rep: usize,
        autocast: bool,
    ) -> Result<()> {
        eprintln!(
            "{label}: ResNet18 width {width}, batch {BATCH}, {reps}×{per_rep} steps per side{}",
            if autocast { ", bf16 autocast" } else { "" }
        );
        let steps = warmup + reps * per_rep;
        let data = Rc::new(random_dataset(steps * BATCH, 1)?);
        let net = resnet18(width, 0)?;
        self.load_pytorch_model(&net, width)?;
        let mut run = Run::new(net, &data, OptimizerSource::Plugin(&self.plugins))?;
        // In float32: the check is of the model and the update rule, which autocast leaves alone.
        self.check_agreement(&mut run, label)?;
        run.autocast = autocast.then_some(Kind::BFloat16);

        // Warm-up steps, untimed: for torch.compile they include the compilation.
        run.timed_steps(warmup)?;
        for side in &mut self.sides {
            side.call("time_train", json!({"steps": warmup, "autocast": autocast}))?;
        }
        let waits_before = run.loader.waits();
        run.phases.clear();
        let mut ours = ProcessTimes::default();
        let mut theirs: HashMap<&str, ProcessTimes> = HashMap::new();
        let mut their_phases: HashMap<&str, Vec<[f64; 3]>> = HashMap::new();
        let (t, p) = against_sides(
            reps,
            &mut self.sides,
            |_| true,
            || {
                let before = ProcessTimes::now()?;
                let times = run.timed_steps(per_rep)?;
                ours.add(&ProcessTimes::now()?.since(&before));
                Ok(times)
            },
            |side| {
                let reply = side.call(
                    "time_train",
                    json!({"steps": per_rep, "autocast": autocast}),
                )?;
                theirs
                    .entry(side.variant.label())
                    .or_default()
                    .add(&ProcessTimes::from_reply(&reply));
                their_phases
                    .entry(side.variant.label())
                    .or_default()
                    .extend(phases_of(&reply)?);
                seconds_of(&reply, "time_train")
            },
        )?;
        let waits = run.loader.waits() - waits_before;
        let steps = t.len() as f64;
        let mut cpu = format!(
            "{label}, CPU per step: Trellis {:.3} s user + {:.3} s system, {:.0} minor page faults",
            ours.user / steps,
            ours.system / steps,
            ours.minor_faults / steps,
        );
        for side in &self.sides {
            let times = &theirs[side.variant.label()];
            cpu += &format!(
                "; {} {:.3} s + {:.3} s, {:.0} faults",
                side.variant.label(),
                times.user / steps,
                times.system / steps,
                times.minor_faults / steps,
            );
        }
        self.report.note(cpu);
        let mut split = format!(
            "{label}, median ms per step of forward+loss / zero_grad+backward / optimizer: \
             Trellis {}",
            phase_medians(&run.phases)
        );
        for side in &self.sides {
            split += &format!(
                "; {} {}",
                side.variant.label(),
                phase_medians(&their_phases[side.variant.label()])
            );
        }
        self.report.note(split);
        let _ = run.loss_sum.double_value(&[]);
        self.report.add(Row::new(
            &format!("{label} (s/step)"),
            "s",
            &columns(&t, &p),
            1.0,
        ));
        self.report.note(format!(
            "{label}: {waits} of {} timed steps waited for their batch ({:.1} %)",
            t.len(),
            100.0 * waits as f64 / t.len() as f64
        ));
        Ok(())
    }

    fn optimizer(&mut self) -> Result<()> {
        // One step per turn: the sides alternate step by step, so load bursts hit both alike.
        let (reps, per_rep) = (self.sizes(3, 50), 1);
        eprintln!(
            "optimizer: SGD step over full-width ResNet18's parameters, {reps}×{per_rep} per side"
        );
        let data = Rc::new(random_dataset(2 * BATCH, 1)?);
        let net = resnet18(1.0, 0)?;
        self.load_pytorch_model(&net, 1.0)?;
        let mut run = Run::new(net, &data, OptimizerSource::Plugin(&self.plugins))?;
        // Gradients everywhere and momentum buffers in place, as in any step after the first.
        run.timed_steps(1)?;
        let batch = run.loader.next().ok_or_else(|| anyhow!("no batch"))?;
        let (logits, _) = run.model.forward(&batch.inputs)?;
        logits.cross_entropy_for_logits(&batch.targets).backward();
        // Eager sides only: the optimizer step is the same code under torch.compile.
        let eager = |v: Variant| v != Variant::Compiled;
        for side in self.sides.iter_mut().filter(|s| eager(s.variant)) {
            side.call("prepare_optimizer", json!({}))?;
        }
        let optimizer = &mut run.optimizer;
        let (t, p) = against_sides(
            reps,
            &mut self.sides,
            eager,
            || {
                (0..per_rep)
                    .map(|_| {
                        let started = Instant::now();
                        optimizer.step().map_err(sdk)?;
                        Ok(started.elapsed().as_secs_f64())
                    })
                    .collect()
            },
            |side| side.seconds("time_optimizer", json!({"steps": per_rep})),
        )?;
        self.report.add(Row::new(
            "optimizer step, full width, foreach=True (ms)",
            "ms",
            &columns(&t, &p),
            1e3,
        ));
        Ok(())
    }

    fn prune(&mut self) -> Result<()> {
        let reps = self.sizes(2, 7);
        eprintln!(
            "prune: global magnitude masks of full-width ResNet18's 11.2 M prunable weights at \
             density 0.1, applied in place, {reps} per side"
        );
        let data = Rc::new(random_dataset(BATCH, 1)?);
        let net = resnet18(1.0, 0)?;
        self.load_pytorch_model(&net, 1.0)?;
        let model = SharedModel::new(net);
        let run_host = host(&model, &data);
        let mut pruner = self
            .plugins
            .registry
            .create(Role::Pruner, "magnitude", "", Host::new(run_host.clone()))?
            .into_pruner()
            .ok_or_else(|| anyhow!("magnitude is not a pruner"))?;
        let weights: HashMap<String, Tensor> = model
            .net()
            .parameters()
            .into_iter()
            .map(|(name, _, t)| (name, t))
            .collect();
        // Every rep prunes the initial weights, as pruning at initialisation does: pruned ones
        // would rank 90 % of the scores equal (zero) from the second rep on.
        let initial: Vec<(Tensor, Tensor)> = weights
            .values()
            .map(|w| (w.shallow_clone(), w.detach().copy()))
            .collect();
        let (t, p) = against_sides(
            reps,
            &mut self.sides,
            |v| v != Variant::Compiled,
            || {
                tch::no_grad(|| {
                    for (weight, start) in &initial {
                        weight.shallow_clone().copy_(start);
                    }
                });
                // What `trellis run` does at its pruning step, less the host's checks: the
                // pruner's exact global threshold and masks, applied.
                let started = Instant::now();
                let result = pruner
                    .prune(PruneRequest {
                        density: 0.1,
                        scope: Scope::Global,
                        batches: Vec::new(),
                    })
                    .map_err(sdk)?;
                tch::no_grad(|| -> Result<()> {
                    for (name, mask) in &result.masks {
                        let weight = weights
                            .get(name)
                            .ok_or_else(|| anyhow!("a mask for unknown `{name}`"))?;
                        let _ = weight.shallow_clone().g_mul_(mask);
                    }
                    Ok(())
                })?;
                Ok(vec![started.elapsed().as_secs_f64()])
            },
            |side| side.seconds("time_prune_magnitude", json!({"density": 0.1})),
        )?;
        self.report.add(Row::new(
            "magnitude masks, full width, global (s)",
            "s",
            &columns(&t, &p),
            1.0,
        ));
        Ok(())
    }

    fn eval(&mut self) -> Result<()> {
        let (images, reps) = (self.sizes(1000, 10_000), self.sizes(1, 3));
        eprintln!(
            "eval: {images} images, batch {EVAL_BATCH}, width 16, no grad, {reps} passes per side"
        );
        let data = random_dataset(images, 2)?;
        let net = resnet18(WIDTH_16, 0)?;
        self.load_pytorch_model(&net, WIDTH_16)?;
        let model = SharedModel::new(net);
        model.set_training(false);
        // As `Trainer::evaluate`: batches from the loader, forward under no_grad.
        let pass = || -> Result<Vec<f64>> {
            let started = Instant::now();
            let _no_grad = tch::no_grad_guard();
            let mut hits = Tensor::zeros([], (Kind::Int64, Device::Cpu));
            for batch in eval_loader(&data) {
                let (logits, _) = model.forward(&batch.inputs)?;
                hits += logits.argmax(1, false).eq(0).sum(Kind::Int64);
            }
            let _ = hits.int64_value(&[]);
            Ok(vec![started.elapsed().as_secs_f64()])
        };
        // One untimed pass each (for torch.compile, the compilation of the evaluation graph).
        pass()?;
        for side in &mut self.sides {
            side.call(
                "time_eval",
                json!({"images": 2 * EVAL_BATCH, "batch_size": EVAL_BATCH}),
            )?;
        }
        let (t, p) = against_sides(
            reps,
            &mut self.sides,
            |_| true,
            pass,
            |side| {
                side.seconds(
                    "time_eval",
                    json!({"images": images, "batch_size": EVAL_BATCH}),
                )
            },
        )?;
        let per_image = |s: &[f64]| s.iter().map(|x| x / images as f64).collect::<Vec<_>>();
        let p_per_image: SideSamples = p.iter().map(|s| s.as_deref().map(per_image)).collect();
        self.report.add(Row::new(
            &format!("eval, width 16, {images} images (ms/image)"),
            "ms",
            &columns(&per_image(&t), &p_per_image),
            1e3,
        ));
        let images_per_second = |samples: &[f64]| images as f64 / median(samples);
        self.report.note(format!(
            "eval throughput: Trellis {:.0} images/s{}",
            images_per_second(&t),
            per_side(&self.sides, &p, "", images_per_second)
        ));
        Ok(())
    }

    fn data(&mut self) -> Result<()> {
        let (images, batches, reps) = (10_000, self.sizes(10, 78), self.sizes(1, 3));
        eprintln!(
            "data: {batches} augmented batches of {BATCH} on one thread, {reps} passes per side"
        );
        let data = random_dataset(images, 4)?;
        // One thread on both sides: the loader's worker is one thread, and PyTorch's side sets
        // torch.set_num_threads(1) for this case.
        tch::set_num_threads(1);
        let result = against_sides(
            reps,
            &mut self.sides,
            |v| v != Variant::Compiled,
            || {
                let started = Instant::now();
                let mut loader = train_loader(&data, 0);
                let mut checksum = 0.0;
                for _ in 0..batches {
                    let batch = loader.next().ok_or_else(|| anyhow!("no batch"))?;
                    checksum += batch.inputs.double_value(&[0, 0, 0, 0]);
                }
                std::hint::black_box(checksum);
                Ok(vec![started.elapsed().as_secs_f64() / batches as f64])
            },
            |side| {
                side.seconds(
                    "time_augment",
                    json!({"images": images, "batch_size": BATCH, "batches": batches}),
                )
            },
        );
        tch::set_num_threads(self.args.threads as i32);
        let (t, p) = result?;
        self.report.add(Row::new(
            "augmented batch of 128, one thread (ms)",
            "ms",
            &columns(&t, &p),
            1e3,
        ));
        let batches_per_second = |samples: &[f64]| 1.0 / median(samples);
        self.report.note(format!(
            "data pipeline: Trellis {:.0} batches/s{}",
            batches_per_second(&t),
            per_side(&self.sides, &p, " (batched tensor ops)", batches_per_second)
        ));
        Ok(())
    }

    /// The same short run with the optimizer and metrics from the plugin dylibs and linked into
    /// this binary: both sides are Trellis, so the ratio is plugin/static.
    fn dispatch(&mut self) -> Result<()> {
        let (steps, test_images, reps) =
            (self.sizes(4, 20), self.sizes(500, 2000), self.sizes(2, 5));
        eprintln!(
            "dispatch: {steps} steps + evaluation of {test_images} images with accuracy and loss, \
             plugins vs static, {reps} runs each"
        );
        let data = Rc::new(random_dataset(steps * BATCH, 5)?);
        let test = random_dataset(test_images, 6)?;
        let plugins = &self.plugins;
        let short_run = |plugin: bool| -> Result<Vec<f64>> {
            let net = resnet18(WIDTH_16, 0)?;
            let source = if plugin {
                OptimizerSource::Plugin(plugins)
            } else {
                OptimizerSource::Static
            };
            let mut run = Run::new(net, &data, source)?;
            let host = host(&run.model, &data);
            let mut metrics = if plugin {
                plugins.metrics(&host)?
            } else {
                static_metrics(&host)?
            };
            let started = Instant::now();
            run.timed_steps(steps)?;
            run.model.set_training(false);
            for m in &mut metrics {
                m.reset().map_err(sdk)?;
            }
            {
                let _no_grad = tch::no_grad_guard();
                for batch in eval_loader(&test) {
                    let (logits, features) = run.model.forward(&batch.inputs)?;
                    let batch = Batch {
                        inputs: batch.inputs,
                        targets: batch.targets,
                    };
                    let outputs = Outputs { logits, features };
                    for m in &mut metrics {
                        m.update(&batch, &outputs).map_err(sdk)?;
                    }
                }
            }
            let info = EpochInfo {
                epoch: 1,
                epochs: 1,
                step: steps as u64,
            };
            for m in &mut metrics {
                m.compute(info).map_err(sdk)?;
            }
            Ok(vec![started.elapsed().as_secs_f64()])
        };
        let (t, p) = alternate(reps, || short_run(true), || short_run(false))?;
        let row = Row::pair(
            &format!("{steps} steps + eval of {test_images} images (s)"),
            "s",
            &t,
            &p,
            1.0,
        );
        eprintln!(
            "  {}, {}, ratio {:.3}",
            row.describe(0, "plugins"),
            row.describe(1, "static"),
            row.ratio(1).unwrap_or(f64::NAN)
        );
        self.report.dispatch = Some(row);
        self.call_overhead(&data)?;
        self.event_overhead()?;
        Ok(())
    }

    /// What callback events cost: a callback that asks for every step event and does nothing
    /// (the fixture `noop`), called as the trainer calls it, through the dylib, against the
    /// median training step at width 16 measured in the same run.
    fn event_overhead(&mut self) -> Result<()> {
        const EVENTS_PER_STEP: u64 = 5;
        let steps = self.sizes(1_000, 20_000);
        let timed_steps = self.sizes(4, 20);
        // The timed steps and one more batch for the events.
        let data = &Rc::new(random_dataset((timed_steps + 1) * BATCH, 7)?);
        let mut run = Run::new(
            resnet18(WIDTH_16, 0)?,
            data,
            OptimizerSource::Plugin(&self.plugins),
        )?;
        let host = host(&run.model, data);
        let mut callback = self
            .plugins
            .registry
            .create(Role::Callback, "noop", "", Host::new(host.clone()))?
            .into_callback()
            .ok_or_else(|| anyhow!("noop is not a callback"))?;
        let events = callback.events();
        let step_times = run.timed_steps(timed_steps)?;
        let batch = run.loader.next().ok_or_else(|| anyhow!("no batch"))?;
        let mut batch = Batch {
            inputs: batch.inputs,
            targets: batch.targets,
        };
        let (logits, features) = run.model.forward(&batch.inputs)?;
        let outputs = Outputs { logits, features };
        let loss = outputs.logits.sum(Kind::Float);
        let mut control = NoControl;
        let mut per_step = Vec::new();
        for _ in 0..self.sizes(3, 7) {
            let started = Instant::now();
            for step in 0..steps {
                let at = trellis_sdk::StepInfo {
                    step: step as u64,
                    ..Default::default()
                };
                if events.contains(Events::BATCH_START) {
                    batch = callback.batch_start(batch, at).map_err(sdk)?;
                }
                if events.contains(Events::AFTER_LOSS) {
                    callback
                        .after_loss(&batch, &outputs, &loss, at)
                        .map_err(sdk)?;
                }
                if events.contains(Events::AFTER_BACKWARD) {
                    callback.after_backward(at).map_err(sdk)?;
                }
                if events.contains(Events::OPTIMIZER_STEP) {
                    callback.optimizer_step(&mut control, at).map_err(sdk)?;
                }
                if events.contains(Events::AFTER_STEP) {
                    callback.after_step(at).map_err(sdk)?;
                }
            }
            per_step.push(started.elapsed().as_secs_f64() / steps as f64);
        }
        let events_cost = median(&per_step);
        let step = median(&step_times);
        self.report.note(format!(
            "callback events: {EVENTS_PER_STEP} events a step (batch start, after loss, after \
             backward, optimizer step, after step) to one callback through the dylib cost {:.2} µs \
             a step ({:.0} ns an event, median of {} runs of {steps} steps), {:.5} % of a training \
             step at width {WIDTH_16} ({:.4} s); events no callback asks for cost nothing",
            events_cost * 1e6,
            events_cost * 1e9 / EVENTS_PER_STEP as f64,
            per_step.len(),
            100.0 * events_cost / step,
            step
        ));
        Ok(())
    }

    /// The cost of one call across the plugin boundary itself: `set_learning_rates` (a one-group
    /// update of a 0-dim tensor, the same work on both sides) through the dylib and linked in.
    fn call_overhead(&mut self, data: &Rc<Dataset>) -> Result<()> {
        let calls = self.sizes(1_000, 20_000);
        let per_call = |plugin: bool| -> Result<f64> {
            let source = if plugin {
                OptimizerSource::Plugin(&self.plugins)
            } else {
                OptimizerSource::Static
            };
            let mut run = Run::new(resnet18(WIDTH_16, 0)?, data, source)?;
            let started = Instant::now();
            for i in 0..calls {
                run.optimizer
                    .set_learning_rates(&[LR * (1.0 + (i % 2) as f64)])
                    .map_err(sdk)?;
            }
            Ok(started.elapsed().as_secs_f64() / calls as f64)
        };
        let (t, p) = alternate(
            self.sizes(2, 6),
            || Ok(vec![per_call(true)?]),
            || Ok(vec![per_call(false)?]),
        )?;
        self.report.note(format!(
            "one call across the plugin boundary (Optimizer::set_learning_rates, median of {} \
             runs of {calls}): {:.2} µs through the dylib, {:.2} µs linked in; a plain training \
             step makes one plugin call (Optimizer::step), a per-step schedule one more",
            t.len(),
            median(&t) * 1e6,
            median(&p) * 1e6,
        ));
        Ok(())
    }

    fn memory(&mut self) -> Result<()> {
        let (width, steps) = if self.args.quick {
            (WIDTH_16, 2)
        } else {
            (1.0, 3)
        };
        eprintln!("memory: peak RSS of {steps} training steps at width {width}, each side in its own process");
        let exe = std::env::current_exe()?;
        let args = &self.args;
        let (trellis_kb, pytorch_kb) = against_sides(
            self.sizes(1, 2),
            &mut self.sides,
            |v| v != Variant::Compiled,
            || {
                let out = Command::new(&exe)
                    .args(["--memory-child", &width.to_string(), &steps.to_string()])
                    .args(["--threads", &args.threads.to_string()])
                    .output()?;
                ensure!(
                    out.status.success(),
                    "the memory child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(vec![peak_from(&out.stdout)?])
            },
            |side| {
                let out = python_command(args, side.variant)?
                    .args(["--memory", "--width", &width.to_string()])
                    .args(["--steps", &steps.to_string()])
                    .output()?;
                ensure!(
                    out.status.success(),
                    "the {} memory run failed: {}",
                    side.variant.label(),
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(vec![peak_from(&out.stdout)?])
            },
        )?;
        self.report.add(Row::new(
            &format!("peak RSS, {steps} steps at width {width} (MiB)"),
            "MiB",
            &columns(&trellis_kb, &pytorch_kb),
            1.0 / 1024.0,
        ));
        Ok(())
    }
}

/// The `trellis run` config of the `epoch` case: `epochs` epochs of ResNet18 at `width` on
/// `images` synthetic images, SGD as in every case, evaluated and checkpointed only at the end
/// (the case times the training steps, `train_seconds` in metrics.jsonl).
fn epoch_config(
    manifest: &Path,
    width: f64,
    images: usize,
    epochs: usize,
    device: Device,
    threads: usize,
) -> String {
    let device = if device == Device::Cpu { "cpu" } else { "cuda" };
    format!(
        r#"plugins = "{manifest}"

[model]
arch = "resnet18"
width = {width:?}

[data]
source = "synthetic"
train_size = {images}
test_size = 500

[train]
epochs = {epochs}
batch_size = {BATCH}
drop_last = true
device = "{device}"
threads = {threads}
eval_every = {epochs}
checkpoint_every = {epochs}

[optimizer]
use = "sgd"
lr = {LR:?}
momentum = {MOMENTUM:?}
weight_decay = {WEIGHT_DECAY:?}

[schedule]
kind = "constant"

[[metrics]]
use = "loss"
"#,
        manifest = manifest.display(),
    )
}

impl Bench {
    /// The last of `epochs` training epochs of `trellis run CONFIG` in a process of its own:
    /// `train_seconds` in metrics.jsonl.
    fn timed_run(&self, config: &Path, run_dir: &Path) -> Result<Vec<f64>> {
        let _ = std::fs::remove_dir_all(run_dir);
        let out = Command::new(profile_dir()?.join("trellis"))
            .arg("run")
            .arg(config)
            .arg("--out")
            .arg(run_dir)
            .arg("--quiet")
            .output()?;
        ensure!(
            out.status.success(),
            "trellis run {} failed: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
        let last: Value = serde_json::from_str(
            log.lines()
                .last()
                .ok_or_else(|| anyhow!("empty metrics.jsonl"))?,
        )?;
        let seconds = last["train_seconds"]
            .as_f64()
            .ok_or_else(|| anyhow!("no train_seconds in {last}"))?;
        Ok(vec![seconds])
    }

    /// f_lin against f (METHODS.md section 8 quotes 1.4–2.1× a step of f for forward-mode AD,
    /// 3–4.6× for double-vjp): the `epoch` case's CPU run of ResNet18 at width 16, once as
    /// itself and once wrapped in `linearized` with each JVP, alternating, each run in a process
    /// of its own with its last epoch timed.
    fn linearized(&mut self) -> Result<()> {
        let images = self.sizes(640, 2_560);
        let (epochs, reps) = (2, self.sizes(1, 3));
        eprintln!(
            "linearized: ResNet18 width {WIDTH_16} on {images} images on the CPU, f against f_lin \
             (dual, double_vjp), {epochs} epochs per run (the last timed), {reps} runs each"
        );
        let f = epoch_config(
            &self.plugins.manifest,
            WIDTH_16,
            images,
            epochs,
            Device::Cpu,
            self.args.threads,
        );
        let base_model = format!("[model]\narch = \"resnet18\"\nwidth = {WIDTH_16:?}\n");
        ensure!(
            f.contains(&base_model),
            "the epoch config's [model] changed"
        );
        let f_path = self.dir.path().join("f.toml");
        std::fs::write(&f_path, &f)?;
        let run_dir = self.dir.path().join("linearized-run");
        for jvp in ["dual", "double_vjp"] {
            let lin = f.replace(
                &base_model,
                &format!(
                    "[model]\nuse = \"linearized\"\njvp = \"{jvp}\"\n\
                     base = {{ arch = \"resnet18\", width = {WIDTH_16:?} }}\n"
                ),
            );
            let lin_path = self.dir.path().join(format!("f_lin_{jvp}.toml"));
            std::fs::write(&lin_path, lin)?;
            let (t, p) = alternate(
                reps,
                || self.timed_run(&lin_path, &run_dir),
                || self.timed_run(&f_path, &run_dir),
            )?;
            let row = Row::pair(
                &format!("epoch of {images} images, jvp = {jvp} (s)"),
                "s",
                &t,
                &p,
                1.0,
            );
            eprintln!(
                "  {}, {}, ratio {:.3}",
                row.describe(0, &format!("f_lin ({jvp})")),
                row.describe(1, "f"),
                row.ratio(1).unwrap_or(f64::NAN)
            );
            self.report.linearized.push(row);
        }
        Ok(())
    }

    /// Whole epochs through the `trellis` binary against the PyTorch script's `--epochs` mode,
    /// each in a process of its own; the last epoch of each run is timed, so that one-off
    /// start-up (cuDNN's first calls, the allocators' first blocks) is left out on both sides.
    fn epoch(&mut self) -> Result<()> {
        let device = self.args.device;
        let on_gpu = device != Device::Cpu;
        if on_gpu && !tch::Cuda::is_available() {
            bail!("--device cuda: libtorch sees no CUDA device on this machine");
        }
        // On a GPU, the issue's figure: full width on 50k images. On the CPU an epoch of that
        // takes a quarter of an hour, so width 16 on 5k images.
        let (width, images) = match (on_gpu, self.args.quick) {
            (true, false) => (1.0, 50_000),
            (true, true) => (1.0, 5_000),
            (false, false) => (WIDTH_16, 5_000),
            (false, true) => (WIDTH_16, 1_280),
        };
        let (epochs, reps) = (2, self.sizes(1, 2));
        eprintln!(
            "epoch: ResNet18 width {width} on {images} images on {device:?}, batch {BATCH}, \
             {epochs} epochs per run (the last timed), {reps} runs per side"
        );
        let config = self.dir.path().join("epoch.toml");
        std::fs::write(
            &config,
            epoch_config(
                &self.plugins.manifest,
                width,
                images,
                epochs,
                device,
                self.args.threads,
            ),
        )?;
        let run_dir = self.dir.path().join("epoch-run");
        let mut waits = Vec::new();
        let args = &self.args;
        let (t, p) = against_sides(
            reps,
            &mut self.sides,
            |_| true,
            || {
                let _ = std::fs::remove_dir_all(&run_dir);
                let out = Command::new(profile_dir()?.join("trellis"))
                    .arg("run")
                    .arg(&config)
                    .arg("--out")
                    .arg(&run_dir)
                    .arg("--quiet")
                    .output()?;
                ensure!(
                    out.status.success(),
                    "trellis run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let log = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
                let last: Value = serde_json::from_str(
                    log.lines()
                        .last()
                        .ok_or_else(|| anyhow!("empty metrics.jsonl"))?,
                )?;
                waits.push(last["data_waits"].as_u64().unwrap_or(0));
                let seconds = last["train_seconds"]
                    .as_f64()
                    .ok_or_else(|| anyhow!("no train_seconds in {last}"))?;
                Ok(vec![seconds])
            },
            |side| {
                let mut command = python_command(args, side.variant)?;
                command
                    .args(["--epochs", &epochs.to_string()])
                    .args(["--images", &images.to_string()])
                    .args(["--width", &width.to_string()])
                    .args(["--device", if on_gpu { "cuda" } else { "cpu" }]);
                let out = command.output()?;
                ensure!(
                    out.status.success(),
                    "the {} epochs failed: {}",
                    side.variant.label(),
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text
                    .lines()
                    .rev()
                    .find(|l| l.contains("train_seconds"))
                    .ok_or_else(|| anyhow!("no train_seconds in: {text}"))?;
                let v: Value = serde_json::from_str(line)?;
                let last = v["train_seconds"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(Value::as_f64)
                    .ok_or_else(|| anyhow!("bad train_seconds in {line}"))?;
                Ok(vec![last])
            },
        )?;
        let device_name = if on_gpu { "GPU" } else { "CPU" };
        self.report.add(Row::new(
            &format!("epoch, width {width}, {images} images, {device_name} (s)"),
            "s",
            &columns(&t, &p),
            1.0,
        ));
        self.report.note(format!(
            "epoch on the {device_name}: steps that waited for their batch in Trellis's timed \
             epochs: {waits:?} of {} each",
            images / BATCH
        ));
        Ok(())
    }
}

fn peak_from(stdout: &[u8]) -> Result<f64> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("peak_rss_kb"))
        .ok_or_else(|| anyhow!("no peak_rss_kb in: {text}"))?;
    let v: Value = serde_json::from_str(line)?;
    v["peak_rss_kb"]
        .as_f64()
        .ok_or_else(|| anyhow!("bad peak_rss_kb in {line}"))
}

fn peak_rss_kb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow!("no VmHWM in /proc/self/status"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("cannot parse {line}"))
}

/// A training session in this process alone, for its peak RSS: model, loader and optimizer as
/// in `trellis run` (the optimizer linked statically, which needs no manifest).
fn memory_child(width: f64, steps: usize) -> Result<()> {
    let data = Rc::new(random_dataset(steps * BATCH, 1)?);
    let net = resnet18(width, 0)?;
    let mut run = Run::new(net, &data, OptimizerSource::Static)?;
    run.timed_steps(steps)?;
    println!("{}", json!({"peak_rss_kb": peak_rss_kb()?}));
    Ok(())
}

/// Waits until the 1-minute load average is below `max`, for at most 15 minutes.
fn wait_for_quiet(max: Option<f64>) {
    let Some(max) = max else { return };
    let one_minute = || {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let started = Instant::now();
    while one_minute() >= max && started.elapsed().as_secs() < 15 * 60 {
        eprintln!("  waiting: load average {:.2} ≥ {max}", one_minute());
        std::thread::sleep(std::time::Duration::from_secs(15));
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // Before any parallel work, as libtorch requires for the inter-op pool; same on both sides.
    tch::set_num_interop_threads(1);
    tch::set_num_threads(args.threads as i32);
    if let Some((width, steps)) = args.memory_child {
        return memory_child(width, steps);
    }
    let mut sides = Vec::new();
    let mut notes = Vec::new();
    for &variant in &args.variants {
        match PyTorch::start(&args, variant)? {
            Ok(side) => sides.push(side),
            Err(why) => {
                let note = format!("{} left out: it does not run here ({why})", variant.label());
                eprintln!("{note}");
                notes.push(note);
            }
        }
    }
    ensure!(!sides.is_empty(), "no PyTorch side to compare with");
    let version = sides[0].version.clone();
    eprintln!(
        "Trellis (tch 0.24, libtorch {version}) vs PyTorch {version}: {}; {} threads (1 \
         inter-op) each side, load average {} at start{}{}",
        sides
            .iter()
            .map(|s| s.variant.label())
            .collect::<Vec<_>>()
            .join(", "),
        args.threads,
        load_average(),
        if args.quick { ", --quick" } else { "" },
        if args.python_env.is_empty() {
            String::new()
        } else {
            let env: Vec<String> = args
                .python_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(", PyTorch sides with {}", env.join(" "))
        },
    );
    if sides.iter().any(|s| s.variant.tuned()) {
        eprintln!(
            "PyTorch tuned and torch.compile: channels-last, LD_PRELOAD={} MALLOC_CONF={TRELLIS_MALLOC_CONF}",
            jemalloc_path()?.display()
        );
    }
    let plugins = Plugins::load()?;
    let mut bench = Bench {
        report: Report {
            sides: sides.iter().map(|s| s.variant.label()).collect(),
            rows: Vec::new(),
            dispatch: None,
            linearized: Vec::new(),
            notes,
        },
        sides,
        plugins,
        dir: tempfile::tempdir()?,
        args,
    };
    let cases = bench.args.cases.clone();
    let has = |c: &str| cases.iter().any(|x| x == c);
    if has("train") {
        wait_for_quiet(bench.args.max_load);
        // One step per turn: the sides alternate step by step, so load bursts hit both alike.
        let (reps, per_rep) = (bench.sizes(2, 25), 1);
        bench.train("train step, width 16", WIDTH_16, 2, reps, per_rep, false)?;
        wait_for_quiet(bench.args.max_load);
        let (reps, per_rep) = (bench.sizes(1, 6), 1);
        bench.train("train step, full width", 1.0, 1, reps, per_rep, false)?;
    }
    if has("autocast") {
        wait_for_quiet(bench.args.max_load);
        let (reps, per_rep) = (bench.sizes(1, 6), 1);
        bench.train(
            "train step, full width, bf16 autocast",
            1.0,
            1,
            reps,
            per_rep,
            true,
        )?;
    }
    if has("optimizer") {
        wait_for_quiet(bench.args.max_load);
        bench.optimizer()?;
    }
    if has("eval") {
        wait_for_quiet(bench.args.max_load);
        bench.eval()?;
    }
    if has("data") {
        wait_for_quiet(bench.args.max_load);
        bench.data()?;
    }
    if has("dispatch") {
        wait_for_quiet(bench.args.max_load);
        bench.dispatch()?;
    }
    if has("memory") {
        wait_for_quiet(bench.args.max_load);
        bench.memory()?;
    }
    if has("epoch") {
        wait_for_quiet(bench.args.max_load);
        bench.epoch()?;
    }
    if has("linearized") {
        wait_for_quiet(bench.args.max_load);
        bench.linearized()?;
    }
    if has("prune") {
        wait_for_quiet(bench.args.max_load);
        bench.prune()?;
    }
    bench
        .report
        .note(format!("load average at the end: {}", load_average()));
    bench.report.print();
    Ok(())
}
