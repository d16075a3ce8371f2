//! The run directory as a state machine (started / checkpointed / finished / failed), end to end:
//! `kill -9` anywhere, the checkpoint switch, signals, the lock, refused resumes, and
//! `metrics.jsonl` kept byte for byte. Every resumed run must end bit-identical to the same run
//! uninterrupted: the weights byte for byte, and every line of `metrics.jsonl` equal as text
//! (less its timings).
//!
//! `kill_9_at_random_points` is the long measurement (ignored by default; `scripts/kill_test.sh`
//! runs it with N trials); `kill_9_at_a_few_random_points` is its bounded version in the suite.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use trellis_tests::*;

/// A tiny run: two epochs of five steps, one thread, so that runs are fast and deterministic.
fn config(epochs: usize, extra: &str) -> String {
    small_config(extra)
        .replace("width = 0.125", "width = 0.0625")
        .replace("train_size = 1000", "train_size = 160")
        .replace("test_size = 500", "test_size = 80")
        .replace("epochs = 2", &format!("epochs = {epochs}"))
        .replace("batch_size = 50", "batch_size = 32")
        .replace("device = \"cpu\"", "device = \"cpu\"\nthreads = 1")
}

fn run_args<'a>(out: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "run.toml", "--out", out, "--quiet"];
    args.extend_from_slice(more);
    args
}

fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(trellis_bin())
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trellis starts")
}

fn run_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    spawn(dir, args, env).wait_with_output().unwrap()
}

/// Polls `ready` every 2 ms for up to 60 s.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args(["-s", name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -s {name} failed");
}

fn state(run_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run_dir.join("state.json"))
        .unwrap_or_else(|e| panic!("{}/state.json: {e}", run_dir.display()));
    serde_json::from_str(&text).unwrap()
}

fn metrics_lines(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A metrics.jsonl line without its timings (`data_waits` and the seconds, which come last).
fn deterministic_part(line: &str) -> &str {
    &line[..line.find(",\"data_waits\"").unwrap_or(line.len())]
}

/// Describes how `b` differs from the uninterrupted run `a`, if it does.
fn difference(a: &Path, b: &Path) -> Option<String> {
    let (wa, wb) = (
        std::fs::read(a.join("model.safetensors")),
        std::fs::read(b.join("model.safetensors")),
    );
    match (wa, wb) {
        (Ok(wa), Ok(wb)) if wa == wb => {}
        (Ok(_), Ok(_)) => return Some("model.safetensors differs".into()),
        (_, Err(e)) => return Some(format!("no model.safetensors: {e}")),
        (Err(e), _) => panic!("the reference has no model.safetensors: {e}"),
    }
    let (ma, mb) = (
        std::fs::read_to_string(a.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(b.join("metrics.jsonl")).unwrap(),
    );
    let (la, lb): (Vec<&str>, Vec<&str>) = (
        ma.lines().map(deterministic_part).collect(),
        mb.lines().map(deterministic_part).collect(),
    );
    if la != lb {
        return Some(format!("metrics.jsonl differs:\n{ma}\nvs\n{mb}"));
    }
    if state(b)["state"] != "finished" {
        return Some(format!("state.json is not finished: {}", state(b)));
    }
    None
}

fn assert_same_run(reference: &Path, resumed: &Path) {
    if let Some(d) = difference(reference, resumed) {
        panic!("{} after resuming: {d}", resumed.display());
    }
}

/// A temp dir with the standard manifest, `run.toml` = `config(epochs, extra)` and the
/// uninterrupted run of it in `straight/`.
fn with_reference(epochs: usize, extra: &str) -> (tempfile::TempDir, PathBuf) {
    let (dir, _) = setup(&config(epochs, extra));
    assert_ok(&trellis(dir.path(), &run_args("straight", &[])));
    let straight = dir.path().join("straight");
    (dir, straight)
}

#[test]
fn a_kill_before_the_first_checkpoint_is_resumed_to_the_uninterrupted_run() {
    let (dir, straight) = with_reference(2, "");
    let d = dir.path();

    // Killed while its first epoch trains.
    let mut child = spawn(d, &run_args("early", &[]), &[]);
    let early = d.join("early");
    wait_for("state.json", || early.join("state.json").is_file());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(state(&early)["state"], "started", "{}", state(&early));
    // Not re-run over, and the message says what to do instead.
    let err = assert_refused(
        d,
        &run_args("early", &[]),
        "`trellis run run.toml --out early --resume` starts it over",
        &early,
    );
    assert!(err.contains("no checkpoint yet"), "{err}");
    assert_ok(&trellis(d, &run_args("early", &["--resume"])));
    assert_same_run(&straight, &early);

    // Killed with its first checkpoint written but not yet in force: still `started`.
    let out = run_with(
        d,
        &run_args("candidate", &[]),
        &[("TRELLIS_KILL_AT", "checkpoint-written")],
    );
    assert_eq!(out.status.signal(), Some(9), "{}", stderr(&out));
    let candidate = d.join("candidate");
    assert_eq!(state(&candidate)["state"], "started");
    assert!(candidate.join("checkpoints/1/trainer.json").is_file());
    assert_ok(&trellis(d, &run_args("candidate", &["--resume"])));
    assert_same_run(&straight, &candidate);
    assert!(
        !candidate.join("checkpoints/1").exists(),
        "old checkpoint kept"
    );
}

#[test]
fn a_kill_anywhere_in_the_checkpoint_switch_is_resumed_exactly() {
    let (dir, straight) = with_reference(2, "");
    let d = dir.path();
    for point in [
        "checkpoint-model@2",
        "checkpoint-written@2",
        "checkpoint-committed@1",
        "checkpoint-committed@2",
        "model-written",
    ] {
        let name = point.replace('@', "-");
        let out = run_with(d, &run_args(&name, &[]), &[("TRELLIS_KILL_AT", point)]);
        assert_eq!(out.status.signal(), Some(9), "{point}: {}", stderr(&out));
        let run = d.join(&name);
        let s = state(&run);
        if point == "checkpoint-written@2" {
            // The case that used to be refused: a valid old and a complete new checkpoint.
            assert_eq!(
                (s["state"].as_str(), s["epoch"].as_u64()),
                (Some("checkpointed"), Some(1))
            );
            assert!(run.join("checkpoints/2/trainer.json").is_file());
        }
        let resumed = trellis(d, &run_args(&name, &["--resume"]));
        assert_ok(&resumed);
        assert_same_run(&straight, &run);
        let left: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["2"], "{point}: checkpoints left {left:?}");
        assert_eq!(
            std::fs::read_link(run.join("checkpoint")).unwrap(),
            Path::new("checkpoints/2")
        );
    }
}

#[test]
fn a_checkpoint_edited_anywhere_is_refused_with_its_path() {
    let (dir, _) = setup(&config(2, ""));
    let d = dir.path();
    assert_ok(&trellis(d, &run_args("out", &["--stop-after", "1"])));
    let out = d.join("out");
    let trainer = out.join("checkpoints/1/trainer.json");
    let text = std::fs::read_to_string(&trainer).unwrap();
    // Still valid JSON, and it would make the run "finish" early if it were believed.
    let edited = text
        .replace("\"epoch\": 1", "\"epoch\": 2")
        .replace("\"step\": 5", "\"step\": 10");
    assert_ne!(edited, text);
    std::fs::write(&trainer, edited).unwrap();
    let err = assert_refused(d, &run_args("out", &["--resume"]), "corrupt", &out);
    assert!(
        err.contains("checkpoints/1/trainer.json") && err.contains("sha256"),
        "{err}"
    );
    std::fs::write(&trainer, &text).unwrap();

    // The metrics of the epochs a checkpoint covers are checked too.
    let log = out.join("metrics.jsonl");
    let bytes = std::fs::read(&log).unwrap();
    std::fs::write(&log, String::from_utf8_lossy(&bytes).replacen("1", "2", 1)).unwrap();
    assert_refused(d, &run_args("out", &["--resume"]), "metrics.jsonl", &out);
    std::fs::write(&log, &bytes).unwrap();
    assert_ok(&trellis(d, &run_args("out", &["--resume"])));
}

#[test]
fn a_resume_that_would_change_the_run_is_refused_before_anything_is_written() {
    let (dir, straight) = with_reference(2, "");
    let d = dir.path();
    assert_ok(&trellis(d, &run_args("out", &["--stop-after", "1"])));
    let out = d.join("out");
    let err = assert_refused(
        d,
        &run_args("out", &["--resume", "--set", "optimizer.lr=0.5"]),
        "optimizer.lr: 0.05 when the run started, 0.5 now",
        &out,
    );
    assert!(
        err.contains("trellis run out/config.toml --out out --resume"),
        "{err}"
    );
    assert_refused(
        d,
        &run_args("out", &["--resume", "--set", "train.threads=2"]),
        "train.threads",
        &out,
    );
    // Another optimizer, from another config file.
    std::fs::write(
        d.join("adamw.toml"),
        config(2, "").replace(
            "use = \"sgd\"\nlr = 0.05\nmomentum = 0.9",
            "use = \"adamw\"\nlr = 0.05",
        ),
    )
    .unwrap();
    assert_refused(
        d,
        &["run", "adamw.toml", "--out", "out", "--quiet", "--resume"],
        "optimizer.use: \"sgd\" when the run started, \"adamw\" now",
        &out,
    );
    // The recorded config resumes it; checkpoint_every changes nothing the run computes.
    assert_ok(&trellis(
        d,
        &[
            "run",
            "out/config.toml",
            "--out",
            "out",
            "--quiet",
            "--resume",
            "--set",
            "train.checkpoint_every=2",
        ],
    ));
    assert_same_run(&straight, &out);
}

#[test]
fn stop_after_0_is_refused_and_writes_nothing() {
    let (dir, _) = setup(&config(2, ""));
    let d = dir.path();
    let err = assert_error(&trellis(d, &run_args("new", &["--stop-after", "0"])));
    assert!(err.contains("--stop-after 0"), "{err}");
    assert!(!d.join("new").exists(), "--stop-after 0 created its --out");

    assert_ok(&trellis(d, &run_args("out", &["--stop-after", "1"])));
    let out = d.join("out");
    assert_refused(
        d,
        &run_args("out", &["--resume", "--stop-after", "0"]),
        "--stop-after 0",
        &out,
    );
    assert_refused(
        d,
        &run_args("out", &["--resume", "--stop-after", "1"]),
        "already checkpointed after epoch 1 of 2",
        &out,
    );
}

#[test]
fn a_diverged_run_says_how_to_retry_or_restart() {
    // The rate goes up a billionfold after epoch 1: epoch 2 diverges, after a checkpoint.
    let (dir, _) = setup(&config(2, "").replace(
        "kind = \"cosine\"",
        "kind = \"step\"\nmilestones = [1]\ngamma = 1e9",
    ));
    let d = dir.path();
    let err = assert_error(&trellis(d, &run_args("out", &[])));
    assert!(err.contains("the training loss became"), "{err}");
    let retry =
        "`trellis run run.toml --out out --resume` retries it from its checkpoint after epoch 1";
    assert!(
        err.contains("out is marked failed") && err.contains(retry),
        "{err}"
    );
    let out = d.join("out");
    let s = state(&out);
    assert_eq!(
        (s["state"].as_str(), s["epoch"].as_u64()),
        (Some("failed"), Some(1))
    );
    assert!(s["reason"]
        .as_str()
        .unwrap()
        .contains("the training loss became"));
    // Re-running points at --resume, and --resume works (and, deterministic, fails again).
    let err = assert_refused(d, &run_args("out", &[]), retry, &out);
    assert!(err.contains("reason: the training loss became"), "{err}");
    let err = assert_error(&trellis(d, &run_args("out", &["--resume"])));
    assert!(
        err.contains("the training loss became") && err.contains(retry),
        "{err}"
    );
    assert_eq!(metrics(&out).len(), 1);

    // Diverged in epoch 1: no checkpoint, so --resume starts over.
    let err = assert_error(&trellis(
        d,
        &run_args("early", &["--set", "optimizer.lr=1e12"]),
    ));
    let over = "`trellis run run.toml --set optimizer.lr=1e12 --out early --resume` starts it over";
    assert!(err.contains(over), "{err}");
    let early = d.join("early");
    assert_eq!(state(&early)["state"], "failed");
    assert_refused(
        d,
        &run_args("early", &["--set", "optimizer.lr=1e12"]),
        over,
        &early,
    );
    let err = assert_error(&trellis(
        d,
        &run_args("early", &["--set", "optimizer.lr=1e12", "--resume"]),
    ));
    assert!(err.contains("the training loss became"), "{err}");
}

#[test]
fn two_processes_never_share_a_run_directory() {
    let (dir, _) = setup(&config(4, ""));
    let d = dir.path();
    let first = spawn(d, &run_args("out", &[]), &[]);
    let out = d.join("out");
    wait_for("state.json", || out.join("state.json").is_file());
    let err = assert_error(&trellis(d, &run_args("out", &["--resume"])));
    assert!(
        err.contains(&format!(
            "out is in use by another trellis (pid {})",
            first.id()
        )),
        "{err}"
    );
    let err = assert_error(&trellis(d, &run_args("out", &[])));
    assert!(err.contains("is in use by another trellis"), "{err}");
    let first = first.wait_with_output().unwrap();
    assert_ok(&first);
    let epochs: Vec<u64> = metrics(&out)
        .iter()
        .map(|r| r["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3, 4]);
}

#[test]
fn sigint_and_sigterm_checkpoint_exit_130_and_resume_exactly() {
    let (dir, straight) = with_reference(3, "");
    let d = dir.path();
    // SIGTERM with checkpoint_every = 2: epoch 1 is checkpointed from memory when interrupted.
    for (name, signals, every) in [
        ("int", &["INT"][..], 1),
        ("term", &["TERM"][..], 2),
        ("twice", &["INT", "INT"][..], 1),
    ] {
        let set = format!("train.checkpoint_every={every}");
        let args = run_args(name, &["--set", &set]);
        let child = spawn(d, &args, &[]);
        let run = d.join(name);
        wait_for("epoch 1", || metrics_lines(&run) >= 1);
        for s in signals {
            signal(&child, s);
        }
        let output = child.wait_with_output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(130),
            "{name}: {}",
            stderr(&output)
        );
        let s = state(&run);
        if signals.len() == 1 {
            let resume = format!(
                "interrupted: resume with `trellis run run.toml --set {set} --out {name} --resume`"
            );
            assert!(
                stderr(&output).contains(&resume),
                "{name}: {}",
                stderr(&output)
            );
            assert_eq!(s["state"], "checkpointed", "{name}: {s}");
            // Signalled after epoch 1 was logged: the run stops within epoch 2, at a step,
            // and the checkpoint in force is epoch 1's (written from memory when
            // checkpoint_every = 2 skipped it).
            let epoch = s["epoch"].as_u64().unwrap();
            assert_eq!(epoch, 1, "{name}: {s}");
            assert!(run
                .join(format!("checkpoints/{epoch}/trainer.json"))
                .is_file());
            assert!(s["reason"].as_str().unwrap().contains("interrupted by SIG"));
        }
        assert_ok(&trellis(d, &run_args(name, &["--set", &set, "--resume"])));
        assert_same_run(&straight, &run);
    }
}

#[test]
fn metrics_of_earlier_epochs_stay_byte_for_byte_on_resume() {
    let (dir, straight) = with_reference(3, "");
    let d = dir.path();
    assert_ok(&trellis(d, &run_args("out", &["--stop-after", "1"])));
    let out = d.join("out");
    let first = std::fs::read(out.join("metrics.jsonl")).unwrap();
    // Killed after epoch 2 was logged but before its checkpoint was in force: epoch 2's line
    // is cut off and written again, epoch 1's is not touched.
    let killed = run_with(
        d,
        &run_args("out", &["--resume"]),
        &[("TRELLIS_KILL_AT", "checkpoint-written")],
    );
    assert_eq!(killed.status.signal(), Some(9));
    assert_eq!(metrics_lines(&out), 2);
    assert_ok(&trellis(d, &run_args("out", &["--resume"])));
    let last = std::fs::read(out.join("metrics.jsonl")).unwrap();
    assert_eq!(&last[..first.len()], &first[..], "epoch 1's line changed");
    assert_same_run(&straight, &out);
}

#[test]
fn the_run_directory_says_what_it_holds_and_what_to_do() {
    let (dir, _) = setup(&config(1, ""));
    let d = dir.path();
    let o = trellis(d, &run_args("out", &[]));
    assert_ok(&o);
    let log = stderr(&o);
    assert!(
        log.contains(
            "on 160 synthetic training images (80 test) for 1 epoch, 5 steps each, on the CPU"
        ),
        "{log}"
    );
    for rust_word in ["Synthetic", "Cpu", "1 epochs"] {
        assert!(!log.contains(rust_word), "{rust_word:?} in {log}");
    }
    let out = d.join("out");
    let s = state(&out);
    assert_eq!(s["state"], "finished");
    assert_eq!(s["resume"], serde_json::Value::Null);
    assert_eq!(s["model_sha256"].as_str().unwrap().len(), 64, "{s}");
    assert_refused(d, &run_args("out", &[]), "holds a run: finished", &out);
    assert_refused(
        d,
        &run_args("out", &["--resume"]),
        "nothing to resume",
        &out,
    );

    // --resume never creates or takes over a directory that holds no run.
    let err = assert_error(&trellis(d, &run_args("missing", &["--resume"])));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!d.join("missing").exists());
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_refused(
        d,
        &run_args("empty", &["--resume"]),
        "holds no run",
        &d.join("empty"),
    );
    // A run directory without state.json (an older trellis's) is neither run over nor resumed.
    std::fs::create_dir(d.join("old")).unwrap();
    std::fs::write(d.join("old/metrics.jsonl"), "{}\n").unwrap();
    for more in [&[][..], &["--resume"][..]] {
        assert_refused(d, &run_args("old", more), "no state.json", &d.join("old"));
    }
}

/// A small deterministic generator (xorshift64*), seeded from TRELLIS_KILL_SEED or the clock.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("TRELLIS_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("kill test seed: {seed} (TRELLIS_KILL_SEED={seed} repeats it)");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const POINTS: [&str; 4] = [
    "checkpoint-model",
    "checkpoint-written",
    "checkpoint-committed",
    "model-written",
];

/// `trials` runs of 3 epochs, each killed with SIGKILL once or twice (at a random instant, or at
/// a random point of a checkpoint switch), then resumed as its state.json says until finished;
/// each must end bit-identical to the uninterrupted run. Returns a line per trial.
fn kill_trials(trials: usize) -> Vec<(bool, String)> {
    let (dir, straight) = with_reference(3, "");
    let d = dir.path();
    // How long a whole run takes, to spread the kills over.
    let start = Instant::now();
    assert_ok(&trellis(d, &run_args("timed", &[])));
    let span = start.elapsed().as_millis() as u64;
    let mut rng = Rng::new();
    let mut results = Vec::new();
    for trial in 0..trials {
        let name = format!("trial{trial}");
        let run = d.join(&name);
        let mut story = Vec::new();
        let kills = 1 + rng.below(2);
        for k in 0..kills {
            // What the messages say: a run killed before it made its directory is started
            // again; any other is resumed.
            let args = if k == 0 || !run.exists() {
                run_args(&name, &[])
            } else {
                run_args(&name, &["--resume"])
            };
            if rng.below(3) == 0 {
                let which = POINTS[rng.below(POINTS.len() as u64) as usize];
                // A checkpoint point is passed once per epoch, the end of the run once.
                let nth = if which == "model-written" {
                    1
                } else {
                    1 + rng.below(3)
                };
                let point = format!("{which}@{nth}");
                let out = run_with(d, &args, &[("TRELLIS_KILL_AT", &point)]);
                story.push(if out.status.signal() == Some(9) {
                    format!("killed at {point}")
                } else {
                    format!("{point} not reached (exit {:?})", out.status.code())
                });
            } else {
                let at = rng.below(span + span / 10);
                let mut child = spawn(d, &args, &[]);
                std::thread::sleep(Duration::from_millis(at));
                let _ = child.kill();
                let status = child.wait().unwrap();
                story.push(if status.signal() == Some(9) {
                    format!("killed at {:.2} s", at as f64 / 1000.0)
                } else {
                    format!("exited before {:.2} s", at as f64 / 1000.0)
                });
            }
            let s = std::fs::read_to_string(run.join("state.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            story.push(match &s {
                Some(s) => format!("-> {} {};", s["state"].as_str().unwrap(), s["epoch"]),
                None => "-> no state.json;".into(),
            });
            if s.as_ref().is_some_and(|s| s["state"] == "finished") {
                break;
            }
        }
        let finished = std::fs::read_to_string(run.join("state.json"))
            .is_ok_and(|t| t.contains("\"state\": \"finished\""));
        if !finished {
            let args = if run.exists() {
                run_args(&name, &["--resume"])
            } else {
                story.push("(no directory: run again without --resume)".into());
                run_args(&name, &[])
            };
            let out = trellis(d, &args);
            if !out.status.success() {
                results.push((
                    false,
                    format!(
                        "{name}: {}; resume failed: {}",
                        story.join(" "),
                        stderr(&out)
                    ),
                ));
                continue;
            }
        }
        let verdict = difference(&straight, &run);
        let ok = verdict.is_none();
        results.push((
            ok,
            format!(
                "{name}: {} resumed: {}",
                story.join(" "),
                verdict.unwrap_or_else(|| "bit-identical".into())
            ),
        ));
    }
    results
}

fn report(results: &[(bool, String)]) {
    for (_, line) in results {
        eprintln!("{line}");
    }
    let same = results.iter().filter(|(ok, _)| *ok).count();
    eprintln!(
        "kill -9: {same} of {} resumed runs finished bit-identical to the uninterrupted run",
        results.len()
    );
    assert_eq!(same, results.len(), "some resumed runs differ");
}

#[test]
fn kill_9_at_a_few_random_points() {
    report(&kill_trials(3));
}

/// The measurement: `TRELLIS_KILL_N` trials (default 20). `scripts/kill_test.sh` runs it.
#[test]
#[ignore]
fn kill_9_at_random_points() {
    let n = std::env::var("TRELLIS_KILL_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    report(&kill_trials(n));
}
