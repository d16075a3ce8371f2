//! The bad-input corpus (issue 14): the kinds of bad input a user gives `trellis`, each refused
//! with exit code 1 (never a signal or a panic), a message holding a phrase that says what is
//! wrong, in the user's words (no Rust type or variant names, no C++ backtrace), and the
//! directory holding the config — and any run directory in it — left byte for byte as it was.
//!
//! One test per family, each a table of input → expected phrase. A new reader of outside input
//! or a new config key adds its rows here. Cases already in `core.rs` (an unknown `[train]`
//! key, a plugin refusing a key or a value, an unknown optimizer, the load errors of a plugin
//! file, a NaN loss with SGD, a truncated `data_batch_1.bin`, a truncated checkpoint on
//! `--resume`) are not repeated.

use std::path::Path;

use trellis_tests::*;

/// The tiniest run: the MLP with 8 hidden units on 100 synthetic images, one epoch, one thread.
fn tiny(extra: &str) -> String {
    format!(
        r#"plugins = "plugins.toml"

[model]
arch = "mlp"
hidden = [8]

[data]
train_size = 100
test_size = 50

[train]
epochs = 1
batch_size = 50
device = "cpu"
threads = 1

[optimizer]
use = "sgd"
lr = 0.05
{extra}"#
    )
}

/// Words of Rust or of libtorch's C++ that a user's message must not hold.
const NOT_FOR_USERS: [&str; 14] = [
    "usize",
    "u64",
    "i64",
    "f64",
    "IoError",
    "Os {",
    "HeaderTooLarge",
    "HeaderTooSmall",
    "Synthetic",
    "Cpu",
    "panicked at",
    "frame #",
    "Exception raised from",
    "RUST_BACKTRACE",
];

/// The error part of stderr: from the line starting with `error:` (log lines before it are the
/// run's, not the refusal's).
fn error_part(stderr: &str) -> &str {
    stderr.find("error:").map_or(stderr, |at| &stderr[at..])
}

/// One bad input: what it is, the run config written as `run.toml` (None: leave the directory
/// as the family set it up), the arguments, and the phrase the refusal must hold.
struct Case<'a> {
    what: &'a str,
    config: Option<String>,
    args: Vec<String>,
    phrase: &'a str,
    /// Also check the message for [`NOT_FOR_USERS`] (false only where a known exception is
    /// named in the case).
    plain: bool,
}

fn case<'a, S: AsRef<str>>(
    what: &'a str,
    config: Option<String>,
    args: &[S],
    phrase: &'a str,
) -> Case<'a> {
    Case {
        what,
        config,
        args: args.iter().map(|a| a.as_ref().to_string()).collect(),
        phrase,
        plain: true,
    }
}

/// `trellis run run.toml` with `extra` arguments.
fn run_args(extra: &[&str]) -> Vec<String> {
    ["run", "run.toml"]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect()
}

/// A copy of the directory `from` (recursively) at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs every case in a fresh directory with the standard manifest (plus `more` plugins) and
/// `prepare` applied, asserting the refusal; returns how many ran.
fn refuse_all(cases: Vec<Case<'_>>, more: &[&str], prepare: &dyn Fn(&Path)) -> usize {
    let mut ran = 0;
    for c in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut plugins = vec!["trellis-optim", "trellis-metrics"];
        plugins.extend_from_slice(more);
        write_manifest(dir.path(), &plugins);
        if let Some(config) = &c.config {
            std::fs::write(dir.path().join("run.toml"), config).unwrap();
        }
        prepare(dir.path());
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let err = assert_refused(dir.path(), &args, c.phrase, dir.path());
        if c.plain {
            let message = error_part(&err);
            for word in NOT_FOR_USERS {
                assert!(
                    !message.contains(word),
                    "{}: `{word}` in the message:\n{message}",
                    c.what
                );
            }
        }
        ran += 1;
    }
    ran
}

/// The run config itself: syntax, schema, values the core checks.
#[test]
fn config_file_errors() {
    let t = |extra: &str| Some(tiny(extra));
    let with = |from: &str, to: &str| {
        let text = tiny("");
        assert!(text.contains(from), "{from}");
        Some(text.replacen(from, to, 1))
    };
    let run = run_args(&[]);
    let cases = vec![
        case(
            "unclosed table header",
            with("[train]", "[train"),
            &run,
            "run.toml:11:7",
        ),
        case(
            "unclosed string",
            with("\"sgd\"", "\"sgd"),
            &run,
            "run.toml:18",
        ),
        case(
            "unknown [data] key",
            with("train_size", "sorce = 1\ntrain_size"),
            &run,
            "unknown field `sorce`",
        ),
        case(
            "unknown table",
            t("[trian]\nepochs = 2\n"),
            &run,
            "unknown field `trian`",
        ),
        case(
            "a key twice",
            with("epochs = 1", "epochs = 1\nepochs = 2"),
            &run,
            "duplicate key",
        ),
        case(
            "string for a count",
            with("epochs = 1", "epochs = \"two\""),
            &run,
            "expected a whole number ≥ 0",
        ),
        case(
            "negative count",
            with("epochs = 1", "epochs = -1"),
            &run,
            "expected a whole number ≥ 0",
        ),
        case(
            "fraction for a count",
            with("batch_size = 50", "batch_size = 12.5"),
            &run,
            "expected a whole number ≥ 0",
        ),
        case(
            "negative seed",
            with("epochs = 1", "epochs = 1\nseed = -3"),
            &run,
            "expected a whole number ≥ 0",
        ),
        case(
            "number too large",
            with("epochs = 1", "epochs = 99999999999999999999"),
            &run,
            "the number is too large",
        ),
        case(
            "string for a flag",
            with("epochs = 1", "epochs = 1\ndrop_last = \"yes\""),
            &run,
            "expected true or false",
        ),
        case(
            "string for the learning rate",
            with("lr = 0.05", "lr = \"fast\""),
            &run,
            "expected a number",
        ),
        case(
            "[metrics] for [[metrics]]",
            t("[metrics]\nuse = \"accuracy\"\n"),
            &run,
            "write [[metrics]] (two brackets): each metric is its own table",
        ),
        case(
            "[metrics] twice",
            t("[metrics]\nuse = \"accuracy\"\n\n[metrics]\nuse = \"loss\"\n"),
            &run,
            "write [[metrics]] (two brackets): each metric is its own table",
        ),
        case(
            "[callbacks] for [[callbacks]]",
            t("[callbacks]\nuse = \"ema\"\n"),
            &run,
            "write [[callbacks]] (two brackets): each callback is its own table",
        ),
        case(
            "inline table for [[distillers]]",
            with("[model]", "distillers = { use = \"kd\" }\n\n[model]"),
            &run,
            "write [[distillers]] (two brackets): each distiller is its own table",
        ),
        case(
            "[[optimizer]] for [optimizer]",
            with("[optimizer]", "[[optimizer]]"),
            &run,
            "write [optimizer] (one bracket)",
        ),
        case(
            "no [optimizer]",
            Some(tiny("").split("[optimizer]").next().unwrap().to_string()),
            &run,
            "missing field `optimizer`",
        ),
        case(
            "arch and use",
            with("arch = \"mlp\"", "arch = \"mlp\"\nuse = \"wrapper\""),
            &run,
            "not both",
        ),
        case(
            "unknown architecture",
            with("arch = \"mlp\"", "arch = \"resnet50\""),
            &run,
            "unknown variant `resnet50`",
        ),
        case(
            "unknown device",
            with("device = \"cpu\"", "device = \"tpu\""),
            &run,
            "unknown variant `tpu`",
        ),
        case(
            "zero epochs",
            with("epochs = 1", "epochs = 0"),
            &run,
            "train.epochs must be at least 1",
        ),
        case(
            "zero batch size",
            with("batch_size = 50", "batch_size = 0"),
            &run,
            "train.batch_size must be at least 1",
        ),
        case(
            "NaN learning rate",
            with("lr = 0.05", "lr = nan"),
            &run,
            "optimizer.lr must be a finite number",
        ),
        case(
            "negative weight decay",
            t("weight_decay = -1.0\n"),
            &run,
            "optimizer.weight_decay must be a finite number >= 0",
        ),
        case(
            "zero width",
            with("hidden = [8]", "hidden = [8]\nwidth = 0.0"),
            &run,
            "model.width must be a positive number",
        ),
        case(
            "hidden sizes for a ResNet",
            with("arch = \"mlp\"", "arch = \"resnet18\""),
            &run,
            "model.hidden only applies",
        ),
        case(
            "bce with one logit per class",
            with("threads = 1", "threads = 1\nloss = \"bce\""),
            &run,
            "loss = \"bce\" trains a single logit",
        ),
        case(
            "unknown schedule",
            t("\n[schedule]\nkind = \"cosinus\"\n"),
            &run,
            "unknown variant `cosinus`",
        ),
        case(
            "subset with both keys",
            with(
                "test_size = 50",
                "test_size = 50\nsubset = { per_class = 1, fraction = 0.5 }",
            ),
            &run,
            "exactly one of",
        ),
        case(
            "cifar10 without a path",
            with("train_size = 100", "source = \"cifar10\"\ntrain_size = 100"),
            &run,
            "data.path is required",
        ),
        case(
            "bad pruner sparsity",
            t("\n[pruner]\nuse = \"magnitude\"\nsparsity = 1.5\n"),
            &run,
            "sparsity = 1.5 is out of range",
        ),
        case(
            "pruner and mask file",
            t("\n[pruner]\nuse = \"magnitude\"\nmasks = \"m.safetensors\"\n"),
            &run,
            "not both",
        ),
        case(
            "negative pruning step",
            t("\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\nat_step = -1\n"),
            &run,
            "expected a whole number ≥ 0",
        ),
    ];
    let n = refuse_all(cases, &[], &|_| {});
    assert!(n >= 34, "{n}");
}

/// Memory this machine has for its models (MemAvailable), to keep the width-64 case a refusal
/// even on a machine that could hold it.
fn available_bytes() -> u128 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
        .map_or(u128::MAX, |kb| kb * 1024)
}

/// Models too large for the machine: refused from their size before anything is allocated,
/// never left to libtorch's panic or the kernel's OOM killer.
#[test]
fn models_too_large_for_the_machine() {
    // resnet18 at width 64 is 45.7 billion parameters: 681 GiB to train, 341 GiB to load.
    let sixty_four = available_bytes() < 600 << 30;
    let width = if sixty_four { "64" } else { "1000" };
    let resnet = tiny("")
        .replace("hidden = [8]", &format!("width = {width}"))
        .replace("mlp", "resnet18");
    let train_phrase = format!("model.width = {width} makes resnet18 a model of");
    let esd_phrase = format!("--width {width} makes resnet18 a model of");
    let cases = vec![
        case(
            "width 64",
            Some(resnet.clone()),
            &run_args(&[]),
            &train_phrase,
        ),
        case(
            "width 64 when pruning",
            Some(format!(
                "{resnet}\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\n"
            )),
            &["prune", "run.toml", "--out", "masks.safetensors"],
            &train_phrase,
        ),
        case(
            "width 64 from --set",
            Some(
                tiny("")
                    .replace("hidden = [8]\n", "")
                    .replace("mlp", "resnet18"),
            ),
            &run_args(&["--set", &format!("model.width={width}")]),
            &train_phrase,
        ),
        case(
            "absurd width",
            Some(resnet.replace(&format!("width = {width}"), "width = 1e300")),
            &run_args(&[]),
            "more than 10^36 parameters",
        ),
        case(
            "huge hidden layer",
            Some(tiny("").replace("hidden = [8]", "hidden = [100000000000]")),
            &run_args(&[]),
            "makes mlp a model of",
        ),
        case(
            "esd --width 64",
            None,
            &["esd", "--width", width, "model.safetensors"],
            &esd_phrase,
        ),
        case(
            "esd --width 1e300",
            None,
            &["esd", "--width", "1e300", "model.safetensors"],
            "more than 10^36 parameters",
        ),
    ];
    let n = refuse_all(cases, &[], &|_| {});
    assert_eq!(n, 7);
}

/// Files that cannot be read or written: each message names the path and the reason.
#[test]
fn files_that_cannot_be_read_or_written() {
    // One finished run, whose weights the `esd` and `prune` cases read (and must not change).
    let base = tempfile::tempdir().unwrap();
    write_manifest(base.path(), &["trellis-optim", "trellis-metrics"]);
    std::fs::write(base.path().join("run.toml"), tiny("")).unwrap();
    assert_ok(&trellis(
        base.path(),
        &["run", "run.toml", "--out", "done", "--quiet"],
    ));
    let weights = std::fs::read(base.path().join("done/model.safetensors")).unwrap();
    let copy_run = |dir: &Path| copy_dir(&base.path().join("done"), &dir.join("done"));
    let truncated = weights[..weights.len() - 100].to_vec();

    let run = run_args(&[]);
    let mut cases = vec![
        case(
            "missing config",
            None,
            &["run", "missing.toml"],
            "cannot read missing.toml",
        ),
        case(
            "config is a directory",
            None,
            &["run", "run.toml"],
            "Is a directory",
        ),
        case(
            "missing manifest",
            Some(tiny("").replace("plugins.toml", "nope.toml")),
            &run,
            "cannot read nope.toml",
        ),
        case(
            "missing data directory",
            Some(tiny("").replace(
                "train_size = 100",
                "source = \"cifar10\"\npath = \"nowhere\"",
            )),
            &run,
            "nowhere/data_batch_1.bin",
        ),
        case(
            "missing weights",
            Some(tiny("")),
            &["esd", "--arch", "mlp", "absent.safetensors"],
            "cannot read absent.safetensors: No such file",
        ),
        case(
            "weights are a directory",
            Some(tiny("")),
            &["esd", "--arch", "mlp", "done"],
            "done is a directory, not a safetensors file",
        ),
        case(
            "weights are text",
            Some(tiny("")),
            &["esd", "--arch", "mlp", "run.toml"],
            "run.toml is not a safetensors file, or is truncated",
        ),
        case(
            "truncated model.safetensors",
            Some(tiny("")),
            &["esd", "--arch", "mlp", "short.safetensors"],
            "short.safetensors is not a safetensors file, or is truncated",
        ),
        case(
            "another model's weights",
            Some(tiny("")),
            &["esd", "done/model.safetensors"],
            "does not hold the weights of this resnet18 model",
        ),
        case(
            "another config's weights",
            Some(tiny("").replace("hidden = [8]", "hidden = [9]")),
            &["esd", "done/model.safetensors", "--config", "run.toml"],
            "does not describe the model that saved",
        ),
        case(
            "prune --out in a missing directory",
            Some(tiny("\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\n")),
            &["prune", "run.toml", "--out", "nowhere/masks.safetensors"],
            "the directory nowhere does not exist",
        ),
        case(
            "prune --out is a directory",
            Some(tiny("\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\n")),
            &["prune", "run.toml", "--out", "done"],
            "cannot write done: it is a directory",
        ),
        case(
            "run --out is a file",
            Some(tiny("")),
            &["run", "run.toml", "--out", "run.toml"],
            "is a file, not a directory",
        ),
        case(
            "run over a finished run",
            Some(tiny("")),
            &["run", "run.toml", "--out", "done"],
            "holds a run",
        ),
    ];
    cases.push(case(
        "mask file is not safetensors",
        Some(tiny("\n[pruner]\nmasks = \"run.toml\"\n")),
        &["prune", "run.toml", "--out", "m.safetensors"],
        "cannot read the mask file",
    ));
    let unreadable = {
        // Root reads files whatever their mode: then there is no permission error to show.
        let probe = base.path().join("probe");
        std::fs::write(&probe, "x").unwrap();
        set_mode(&probe, 0o000);
        std::fs::read(&probe).is_err()
    };
    if unreadable {
        cases.push(case(
            "unreadable config",
            None,
            &["run", "locked.toml"],
            "cannot read locked.toml: Permission denied",
        ));
        cases.push(case(
            "unreadable weights",
            Some(tiny("")),
            &["esd", "--arch", "mlp", "locked.toml"],
            "cannot read locked.toml: Permission denied",
        ));
    }
    let n = refuse_all(cases, &[], &|dir| {
        copy_run(dir);
        std::fs::write(dir.join("short.safetensors"), &truncated).unwrap();
        if !dir.join("run.toml").exists() {
            std::fs::create_dir(dir.join("run.toml")).unwrap();
        }
        std::fs::write(dir.join("locked.toml"), tiny("")).unwrap();
        set_mode(&dir.join("locked.toml"), 0o000);
    });
    assert!(n >= 15, "{n}");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The command line: `--set`, missing tables for a command, resuming what is not there.
#[test]
fn command_line_errors() {
    let metrics = tiny("\n[[metrics]]\nuse = \"accuracy\"\n");
    let cases = vec![
        case(
            "--set without =",
            Some(tiny("")),
            &run_args(&["--set", "train.epochs"]),
            "--set expects key.path=value",
        ),
        case(
            "--set with an empty key",
            Some(tiny("")),
            &run_args(&["--set", "train..epochs=2"]),
            "--set expects key.path=value",
        ),
        case(
            "--set into a value",
            Some(tiny("")),
            &run_args(&["--set", "train.epochs.x=1"]),
            "`epochs` is not a table",
        ),
        case(
            "--set into a list without a position",
            Some(metrics.clone()),
            &run_args(&["--set", "metrics.k=1"]),
            "name one by its position",
        ),
        case(
            "--set past the list's end",
            Some(metrics.clone()),
            &run_args(&["--set", "metrics.3.k=1"]),
            "`metrics` has 1 entry, there is no `metrics.3`",
        ),
        case(
            "--set a wrong type",
            Some(tiny("")),
            &run_args(&["--set", "train.epochs=\"many\""]),
            "--> --set train.epochs=\"many\"",
        ),
        case(
            "--set a list as a table",
            Some(tiny("")),
            &run_args(&["--set", "metrics.use=accuracy"]),
            "write [[metrics]] (two brackets)",
        ),
        case(
            "prune without [pruner]",
            Some(tiny("")),
            &["prune", "run.toml", "--out", "m.safetensors"],
            "needs a [pruner] table",
        ),
        case(
            "plugins with a missing manifest",
            None,
            &["plugins", "--manifest", "missing.toml"],
            "cannot read missing.toml",
        ),
    ];
    let n = refuse_all(cases, &[], &|_| {});
    assert_eq!(n, 9);

    // The example in the help is laid out, not a literal `\n`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("run.toml"), tiny("")).unwrap();
    let err = assert_error(&trellis(dir.path(), &["prune", "run.toml", "--out", "m"]));
    assert!(
        err.contains("\n      [pruner]\n      use = \"snip\"") && !err.contains("\\n"),
        "{err}"
    );
    for command in ["run", "prune", "esd", "plugins"] {
        let out = trellis(dir.path(), &[command, "--help"]);
        assert_ok(&out);
        assert!(
            !stdout(&out).contains("\\n"),
            "{command} --help:\n{}",
            stdout(&out)
        );
    }
}

/// Components that do not exist or fail while running: the component is named, a libtorch
/// failure quoted without its C++ backtrace.
#[test]
fn component_errors() {
    let out = tempfile::tempdir().unwrap();
    let outside = |name: &str| out.path().join(name).display().to_string();
    let (nan, shape) = (outside("nan"), outside("shape"));
    let cases = vec![
        case(
            "unknown metric",
            Some(tiny("\n[[metrics]]\nuse = \"acuracy\"\n")),
            &run_args(&[]),
            "no metric named `acuracy`",
        ),
        case(
            "unknown scheduler",
            Some(tiny("\n[scheduler]\nuse = \"tempbalanse\"\n")),
            &run_args(&[]),
            "no scheduler named `tempbalanse`",
        ),
        case(
            "unknown pruner",
            Some(tiny("\n[pruner]\nuse = \"snipp\"\nsparsity = 0.5\n")),
            &run_args(&[]),
            "no pruner named `snipp`",
        ),
        case(
            "unknown callback",
            Some(tiny("\n[[callbacks]]\nuse = \"emma\"\n")),
            &run_args(&[]),
            "no callback named `emma`",
        ),
        case(
            "a plugin key of the wrong type",
            Some(tiny("momentum = \"high\"\n")),
            &run_args(&[]),
            "invalid type: string \"high\", expected a number",
        ),
        case(
            "NaN loss with adamw",
            Some(
                tiny("")
                    .replace("\"sgd\"", "\"adamw\"")
                    .replace("lr = 0.05", "lr = 1e30"),
            ),
            &run_args(&["--out", &nan, "--quiet"]),
            "the training loss became NaN",
        ),
        case(
            "libtorch error in a plugin",
            Some(tiny("\n[[metrics]]\nuse = \"shape_mismatch\"\n")),
            &run_args(&["--out", &shape, "--quiet"]),
            "panicked: libtorch: mat1 and mat2 shapes cannot be multiplied",
        ),
    ];
    let n = refuse_all(cases, &["trellis-fixture-misbehaving"], &|_| {});
    assert_eq!(n, 7);
}

/// Accepted nonsense, now recorded: `threads = 0` (libtorch's default) is written to the run's
/// config as the number of threads the run used, so a replay elsewhere uses as many.
#[test]
fn threads_left_to_libtorch_are_recorded_as_used() {
    let (dir, _) = setup(&tiny("").replace("threads = 1\n", "threads = 0\n"));
    assert_ok(&trellis(
        dir.path(),
        &["run", "run.toml", "--out", "o", "--quiet"],
    ));
    let config = std::fs::read_to_string(dir.path().join("o/config.toml")).unwrap();
    let threads: usize = config
        .lines()
        .find_map(|l| l.strip_prefix("threads = "))
        .unwrap_or_else(|| panic!("no threads in\n{config}"))
        .parse()
        .unwrap();
    assert!(threads >= 1, "{config}");
    // Replaying the resolved config uses the same number.
    let out = trellis(
        dir.path(),
        &["run", "o/config.toml", "--out", "again", "--quiet"],
    );
    assert_ok(&out);
    let again = std::fs::read_to_string(dir.path().join("again/config.toml")).unwrap();
    assert!(again.contains(&format!("threads = {threads}\n")), "{again}");
}
