//! Data-parallel runs on Gloo: `--nproc 2` trains what one process trains, ranks hold rank 0's
//! weights whatever they started from, a dead rank ends the run within the timeout, and a run
//! goes on from its checkpoint with any number of ranks.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tch::Tensor;
use trellis_tests::*;

/// A BN-free model (batch norm sees each rank's slice only), a training set whose last batch is
/// short (330 = 5 × 64 + 10) and a test set whose last evaluation batch is short too: the
/// suite's small config otherwise.
fn config() -> String {
    [
        (
            "arch = \"resnet18\"\nwidth = 0.125",
            "arch = \"mlp\"\nhidden = [64]",
        ),
        (
            "train_size = 1000\ntest_size = 500",
            "train_size = 330\ntest_size = 170",
        ),
        (
            "epochs = 2\nbatch_size = 50",
            "epochs = 3\nbatch_size = 64\neval_batch_size = 50",
        ),
        ("device = \"cpu\"", "device = \"cpu\"\nthreads = 1"),
    ]
    .iter()
    .fold(small_config(""), |text, (from, to)| {
        assert!(text.contains(from), "small_config no longer has {from:?}");
        text.replace(from, to)
    })
}

fn trellis_with(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(trellis_bin());
    command.args(args).current_dir(dir).env("RUST_LOG", "info");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("trellis runs")
}

fn weights(run_dir: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(run_dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn max_difference(a: &Path, b: &Path) -> f64 {
    max_difference_of(a, b, |_| true)
}

/// The largest difference between the tensors of two runs' models whose names pass `which`.
fn max_difference_of(a: &Path, b: &Path, which: impl Fn(&str) -> bool) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .filter(|((name, _), _)| which(name))
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn final_test_loss(run_dir: &Path) -> f64 {
    metrics(run_dir).last().unwrap()["test"]["loss"]
        .as_f64()
        .unwrap()
}

#[test]
fn two_ranks_train_what_one_process_trains_and_resume_across_world_sizes() {
    let (dir, _) = setup(&config());
    let d = dir.path();
    assert_ok(&trellis(d, &["run", "run.toml", "--out", "one", "--quiet"]));
    let two = trellis(
        d,
        &["run", "run.toml", "--out", "two", "--nproc", "2", "--quiet"],
    );
    assert_ok(&two);
    assert!(stderr(&two).contains("started 2 ranks"), "{}", stderr(&two));
    // Started again over the finished run: the ranks refuse, and the launcher offers no resume.
    let again = trellis(
        d,
        &["run", "run.toml", "--out", "two", "--nproc", "2", "--quiet"],
    );
    assert!(!again.status.success());
    let launcher_says = stderr(&again)
        .lines()
        .find(|l| l.contains(" first ("))
        .unwrap_or_default()
        .to_string();
    assert!(
        launcher_says.ends_with("its output says why"),
        "{}",
        stderr(&again)
    );
    let (one, two) = (d.join("one"), d.join("two"));
    let diff = max_difference(&one, &two);
    eprintln!("2 ranks vs 1 process: largest weight difference {diff:e}");
    assert!(
        diff < 1e-5,
        "2 ranks vs 1 process: weights differ by {diff}"
    );
    // Sharded evaluation sees every test image once: the same loss.
    assert!((final_test_loss(&one) - final_test_loss(&two)).abs() < 1e-4);

    // Summing the ranks' gradients unweighted (each rank's mean counted whole) is caught.
    let broken = trellis_with(
        d,
        &[
            "run", "run.toml", "--out", "broken", "--nproc", "2", "--quiet",
        ],
        &[("TRELLIS_FAULT_UNWEIGHTED_GRADIENTS", "1".into())],
    );
    assert_ok(&broken);
    let diff = max_difference(&one, &d.join("broken"));
    eprintln!("unweighted sum vs 1 process: {diff:e}");
    assert!(diff > 1e-3, "a broken average went unnoticed ({diff})");

    // 2 ranks for epoch 1, one process for epoch 2, 2 ranks for epoch 3: the same run.
    let chain = ["run", "run.toml", "--out", "chain", "--quiet"];
    assert_ok(&trellis(
        d,
        &[&chain[..], &["--nproc", "2", "--stop-after", "1"]].concat(),
    ));
    assert_ok(&trellis(
        d,
        &[&chain[..], &["--resume", "--stop-after", "2"]].concat(),
    ));
    assert_ok(&trellis(
        d,
        &[&chain[..], &["--resume", "--nproc", "2"]].concat(),
    ));
    let diff = max_difference(&one, &d.join("chain"));
    eprintln!("2, 1, 2 ranks vs 1 process: {diff:e}");
    assert!(diff < 1e-5, "resumed across world sizes: differs by {diff}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the ranks of a run by hand, as torchrun would, rank `r` with `overrides[r]`.
fn start_ranks(dir: &Path, overrides: &[&str], env: &[(&str, &str)]) -> Vec<Child> {
    let port = free_port().to_string();
    (0..overrides.len())
        .map(|rank| {
            let mut command = Command::new(trellis_bin());
            command
                .args(["run", "run.toml", "--out", "seeds", "--quiet", "--set"])
                .arg(overrides[rank])
                .current_dir(dir)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", overrides.len().to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in env {
                command.env(k, v);
            }
            command.spawn().unwrap()
        })
        .collect()
}

#[test]
fn ranks_started_with_different_seeds_hold_rank_0s_weights() {
    let (dir, _) = setup(&config());
    let d = dir.path();
    // Every rank initialises its own model from its own seed; the broadcast gives them rank 0's,
    // and every epoch ends with a check that all ranks hold the same weights.
    let seeds = ["train.seed=3", "train.seed=99"];
    for child in start_ranks(d, &seeds, &[]) {
        assert_ok(&child.wait_with_output().unwrap());
    }
    // Without the broadcast the check fails the run.
    std::fs::remove_dir_all(d.join("seeds")).unwrap();
    let outputs: Vec<Output> = start_ranks(d, &seeds, &[("TRELLIS_FAULT_NO_BROADCAST", "1")])
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let err = assert_error(&outputs[0]);
    assert!(
        err.contains("the weights of rank 1 differ from rank 0's after epoch 1"),
        "{err}"
    );
}

/// `state.json`'s state and epoch.
fn run_state(run_dir: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(run_dir.join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((v["state"].as_str()?.to_string(), v["epoch"].as_u64()?))
}

/// Waits until `run_dir` holds a checkpoint after an epoch past `after`.
fn wait_for_checkpoint(run_dir: &Path, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((state, epoch)) = run_state(run_dir) {
            if state == "checkpointed" && epoch > after {
                return epoch;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint after epoch {after}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A launcher whose stderr lines arrive on the returned channel.
fn launch(dir: &Path, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(trellis_bin())
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits for `child` at most `limit`; its exit code (128 + signal when killed) and how long.
fn wait_at_most(child: &mut Child, limit: Duration) -> (i32, Duration) {
    use std::os::unix::process::ExitStatusExt;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap());
            return (code, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ranks_stop_together_on_a_signal_and_a_killed_rank_ends_the_run_within_the_timeout() {
    let (dir, _) = setup(&config());
    let d = dir.path();
    let run_dir = d.join("long");
    let args = [
        "run",
        "run.toml",
        "--out",
        "long",
        "--nproc",
        "2",
        "--quiet",
        "--set",
        "train.epochs=100000",
        "--set",
        "distributed.timeout_s=10",
    ];

    // SIGINT to the launcher: both ranks stop at the same step, rank 0 checkpoints, exit 130.
    let (mut launcher, _lines) = launch(d, &args);
    wait_for_checkpoint(&run_dir, 0);
    let pid = launcher.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let (code, _) = wait_at_most(&mut launcher, Duration::from_secs(60));
    assert_eq!(code, 130);
    let (state, stopped_at) = run_state(&run_dir).unwrap();
    assert_eq!(state, "checkpointed");

    // Resumed on 2 ranks; then rank 1 is killed: rank 0 sees it at its next collective.
    let (mut launcher, lines) = launch(d, &[&args[..], &["--resume"]].concat());
    let pids = loop {
        let line = lines.recv_timeout(Duration::from_secs(60)).unwrap();
        if let Some(rest) = line.split("started 2 ranks (pids ").nth(1) {
            let pids: Vec<String> = rest
                .split(')')
                .next()
                .unwrap()
                .split(", ")
                .map(String::from)
                .collect();
            break pids;
        }
    };
    wait_for_checkpoint(&run_dir, stopped_at);
    assert!(Command::new("kill")
        .args(["-9", &pids[1]])
        .status()
        .unwrap()
        .success());
    let (code, took) = wait_at_most(&mut launcher, Duration::from_secs(30));
    let said: Vec<String> = lines.try_iter().collect();
    let said = said.join("\n");
    assert_eq!(code, 128 + 9, "the killed rank's status:\n{said}");
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} (timeout 10 s)"
    );
    assert!(
        said.contains("rank 1 was killed by signal 9 first"),
        "{said}"
    );
    // Rank 0's own error says which rank it lost.
    assert!(
        said.contains("rank 1 stopped, hangs or cannot be reached"),
        "{said}"
    );
    let (state, epoch) = run_state(&run_dir).unwrap();
    assert_eq!(state, "failed");
    // The command it prints goes on with as many ranks.
    assert!(said.contains("--nproc 2 --resume"), "{said}");

    // One process takes the run up from rank 0's last checkpoint.
    let stop = (epoch + 1).to_string();
    let resumed = trellis(
        d,
        &[
            &args[..2],
            &args[2..4],
            &args[6..],
            &["--resume", "--stop-after", &stop],
        ]
        .concat(),
    );
    assert_ok(&resumed);
    assert!(
        stderr(&resumed).contains(&format!("from its checkpoint after epoch {epoch}")),
        "{}",
        stderr(&resumed)
    );
}

/// One training step of a ResNet: its batch norm statistics come from the forward pass alone,
/// so with `sync_bn` they are the one process's to float precision; each rank's own rows give
/// others. (The weights are compared loosely: a ReLU input within float noise of zero in one of
/// the runs changes one gradient term by a whole sample's share, and every layer below it.
/// The op itself is checked exactly against libtorch's batch norm in dist/tests/two_ranks.rs.)
#[test]
fn sync_batch_norm_normalises_over_the_global_batch_as_one_process_does() {
    let config = config()
        .replace(
            "arch = \"mlp\"\nhidden = [64]",
            "arch = \"resnet18\"\nwidth = 0.125",
        )
        .replace("epochs = 3", "epochs = 1")
        .replace("train_size = 330", "train_size = 64");
    let (dir, _) = setup(&config);
    let d = dir.path();
    let run = |out: &str, extra: &[&str]| {
        let args = [&["run", "run.toml", "--out", out, "--quiet"], extra].concat();
        assert_ok(&trellis(d, &args));
    };
    run("one", &[]);
    run(
        "synced",
        &["--nproc", "2", "--set", "distributed.sync_bn=true"],
    );
    run("local", &["--nproc", "2"]);
    let (one, synced, local) = (d.join("one"), d.join("synced"), d.join("local"));
    let statistics = |name: &str| name.contains("running_");
    let synced_stats = max_difference_of(&one, &synced, statistics);
    let local_stats = max_difference_of(&one, &local, statistics);
    let synced_weights = max_difference(&one, &synced);
    let local_weights = max_difference(&one, &local);
    eprintln!(
        "batch norm over 2 ranks vs 1 process: statistics {synced_stats:e} synced, \
         {local_stats:e} per rank; weights {synced_weights:e} synced, {local_weights:e} per rank"
    );
    assert!(
        synced_stats < 1e-4,
        "sync_bn statistics differ by {synced_stats}"
    );
    assert!(
        local_stats > 1e-3,
        "per-rank statistics equal the global ones?"
    );
    assert!(synced_weights * 10.0 < local_weights);
}

/// A plugin's model, a pruner at step 2 and a per-group scheduler train on 2 ranks as in one
/// process, and the plugins see the world they run in.
#[test]
fn plugin_models_pruners_and_schedulers_train_on_two_ranks_as_in_one_process() {
    let config = config()
        .replace(
            "arch = \"mlp\"\nhidden = [64]",
            "use = \"wrapper\"\nbase = { arch = \"mlp\", hidden = [64] }\nscale = 2.0",
        )
        .replace("epochs = 3", "epochs = 2")
        .replace(
            "[schedule]\nkind = \"cosine\"\n",
            "[scheduler]\nuse = \"tempbalance\"\n\n[pruner]\nuse = \"magnitude\"\nsparsity = 0.5\nat_step = 2\n",
        );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_manifest(
        d,
        &[
            "trellis-optim",
            "trellis-metrics",
            "trellis-pai-baselines",
            "trellis-tempbalance",
            "trellis-fixture-models",
        ],
    );
    std::fs::write(d.join("run.toml"), config).unwrap();
    let run = ["run", "run.toml", "--quiet", "--out"];
    assert_ok(&trellis(d, &[&run[..], &["one"]].concat()));
    let world = ["--set", "model.expect_world_size=2"];
    assert_ok(&trellis(
        d,
        &[&run[..], &["two", "--nproc", "2"], &world].concat(),
    ));
    let diff = max_difference(&d.join("one"), &d.join("two"));
    eprintln!("plugin model, pruner, scheduler on 2 ranks vs 1 process: {diff:e}");
    assert!(diff < 1e-5, "differs by {diff}");
    let zeros = |run: &str| {
        weights(&d.join(run))
            .iter()
            .map(|(_, t)| t.eq(0.0).sum(tch::Kind::Int64).int64_value(&[]))
            .sum::<i64>()
    };
    assert!(
        zeros("two") > 0 && zeros("two") == zeros("one"),
        "the masks"
    );
    // The fixture checks what the host tells it: one process is a world of one.
    let err = assert_error(&trellis(d, &[&run[..], &["alone"], &world].concat()));
    assert!(err.contains("rank 0 of 1, expected a world of 2"), "{err}");
}

/// `sweep --nproc 2` runs each job as two ranks, locally or as Slurm tasks that srun starts
/// (here a stand-in `srun` that starts the tasks as Slurm would, with their Slurm variables).
#[test]
fn a_sweep_runs_each_job_as_two_ranks_locally_and_under_srun() {
    let (dir, _) = setup(&config().replace("epochs = 3", "epochs = 1"));
    let d = dir.path();
    std::fs::write(
        d.join("sweep.toml"),
        "config = \"run.toml\"\n\n[grid]\n\"train.seed\" = [0, 1]\n",
    )
    .unwrap();
    let sweep = [
        "sweep",
        "sweep.toml",
        "--nproc",
        "2",
        "--threads",
        "2",
        "--quiet",
    ];
    assert_ok(&trellis(d, &[&sweep[..], &["--out", "sw"]].concat()));
    let tsv = std::fs::read_to_string(d.join("sw/runs.tsv")).unwrap();
    for id in ["000-0", "001-1"] {
        assert_eq!(run_state(&d.join("sw").join(id)).unwrap().0, "finished");
        let log = std::fs::read_to_string(d.join(format!("sw/logs/{id}.log"))).unwrap();
        assert!(log.contains("started 2 ranks"), "{log}");
        // Two cores for the run, one thread for each of its ranks.
        assert!(
            tsv.lines()
                .any(|l| l.starts_with(id) && l.contains("\t1\t")),
            "{tsv}"
        );
    }

    assert_ok(&trellis(
        d,
        &[&sweep[..], &["--out", "slurm", "--emit", "slurm"]].concat(),
    ));
    let script = d.join("slurm/sweep.sbatch");
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("#SBATCH --ntasks=2"), "{text}");
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let srun = bin.join("srun");
    std::fs::write(
        &srun,
        format!(
            "#!/bin/bash\nfor task in 0 1; do\n  SLURM_PROCID=$task SLURM_STEP_NUM_TASKS=2 \
             SLURM_LOCALID=$task SLURM_LAUNCH_NODE_IPADDR=127.0.0.1 MASTER_PORT={} \"$@\" &\n\
             done\nstatus=0\nfor job in $(jobs -p); do wait $job || status=1; done\nexit $status\n",
            free_port()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&srun, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let task = Command::new("bash")
        .arg(&script)
        .current_dir(d)
        .env("PATH", path)
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_CPUS_PER_TASK", "1")
        .env("TRELLIS", trellis_bin())
        .output()
        .unwrap();
    assert_ok(&task);
    assert_eq!(run_state(&d.join("slurm/001-1")).unwrap().0, "finished");
    assert!(!d.join("slurm/000-0").exists());
    // The same run as the local sweep's.
    let diff = max_difference(&d.join("slurm/001-1"), &d.join("sw/001-1"));
    assert!(diff < 1e-6, "{diff}");
}

/// A last batch of 2 rows cannot be split between 3 ranks: refused before anything is written,
/// with the line and the way out.
#[test]
fn a_batch_with_fewer_rows_than_ranks_is_refused() {
    let (dir, _) = setup(&config().replace("train_size = 330", "train_size = 322"));
    let d = dir.path();
    let out = trellis(
        d,
        &["run", "run.toml", "--out", "few", "--nproc", "3", "--quiet"],
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("the last batch of an epoch (322 images) has 2 rows, fewer than the 3 ranks"),
        "{err}"
    );
    assert!(
        err.contains("drop_last = true") && err.contains("run.toml:"),
        "{err}"
    );
    assert!(!d.join("few").join("state.json").exists());
}
