//! `trellis sweep`: the runs of a grid under one directory, `--jobs` at a time on this machine,
//! or as a Slurm array script with `--emit slurm`.
//!
//! Each run is a `trellis run` of its own (a child process of this same binary) in
//! `DIR/<id>`, so a run that fails or is killed takes nothing else with it, and every run
//! directory is exactly what `trellis run` makes: `trellis report DIR` and `--resume` read it as
//! any other. Re-running the same command skips finished runs and resumes the others from their
//! checkpoints; `runs.tsv` records each run's threads, so that a resumed run gets the ones it
//! started with (they change its float sums).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::LoadedConfig;
use crate::run_dir::{read_state, Phase};
use crate::sweep::{read_tsv, shell_quote, slurm_script, write_tsv, Sweep, SweepRun, TsvLine};

/// The environment variable a sweep's runs find their sweep's pid in: a run ends (with a
/// checkpoint) when its sweep dies, even by `kill -9`, instead of running on unseen.
pub const PARENT_ENV: &str = "TRELLIS_SWEEP_PARENT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// An `sbatch --array` script, one task per run.
    Slurm,
}

#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub file: PathBuf,
    pub grid: Vec<String>,
    pub out: PathBuf,
    pub jobs: usize,
    /// CPU threads to split between the jobs (default: every core).
    pub threads: Option<usize>,
    pub manifest: Option<PathBuf>,
    pub emit: Option<Emit>,
    pub progress: bool,
    /// Each run as this many data-parallel ranks (`trellis run --nproc`), which split the run's
    /// threads; 1 for runs of one process.
    pub nproc: usize,
}

struct Job {
    index: usize,
    child: Child,
    started: Instant,
    status: Arc<Mutex<String>>,
    bar: Option<ProgressBar>,
}

pub fn sweep(opts: &SweepOptions) -> Result<()> {
    if opts.jobs == 0 {
        bail!("--jobs 0 runs nothing\n  help: pass 1 or more");
    }
    if opts.nproc == 0 {
        bail!("--nproc 0: a run needs at least one process\n  help: pass 1 or more");
    }
    this_binary()?;
    let sweep = Sweep::load(&opts.file, &opts.grid)?;
    let runs = sweep.runs();
    // Every run's config is checked before any starts: a typo in the grid fails now, not after
    // hours of the runs before it.
    for run in &runs {
        LoadedConfig::load(&run.config, &run.overrides)
            .with_context(|| format!("in run {} of the sweep", run.id))?;
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    let _lock = lock_sweep(&out)?;
    let tsv = out.join("runs.tsv");
    let total_threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // Threads of each process: a run's ranks split its share.
    let per_job = (total_threads / opts.jobs / opts.nproc).max(1);
    let mut lines = Vec::with_capacity(runs.len());
    let existing = read_tsv(&tsv)?;
    if let Some(existing) = &existing {
        if existing.len() != runs.len() {
            bail!(
                "{} holds a sweep of {} runs, this grid has {}\n  help: sweep into another --out, or \
                 re-run the command that made it",
                out.display(),
                existing.len(),
                runs.len()
            );
        }
    }
    for (i, run) in runs.iter().enumerate() {
        let mut line = TsvLine::new(run, &out, per_job, "pending");
        if let Some(old) = existing.as_ref().map(|e| &e[i]) {
            if !old.same_run(&line) {
                bail!(
                    "{}: line {} is run {} ({}), this grid's run {} is {} ({})\n  help: the sweep \
                     there was made from another grid; sweep into another --out",
                    tsv.display(),
                    i + 2,
                    old.id,
                    old.overrides,
                    i,
                    line.id,
                    line.overrides
                );
            }
            line.threads = old.threads;
        }
        line.state = run_state(&out.join(&run.id))?;
        lines.push(line);
    }
    write_tsv(&tsv, &lines)?;
    std::fs::create_dir_all(out.join("logs"))?;

    if let Some(Emit::Slurm) = opts.emit {
        let script = out.join("sweep.sbatch");
        let name = opts
            .file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sweep".into());
        let exe = this_binary()?;
        std::fs::write(&script, slurm_script(&name, &exe, &out, &runs, opts.nproc))
            .with_context(|| format!("cannot write {}", script.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        println!(
            "{} runs in {}\nsubmit them with: sbatch {}",
            runs.len(),
            tsv.display(),
            shell_quote(&script.display().to_string())
        );
        return Ok(());
    }

    let todo: Vec<usize> = (0..runs.len())
        .filter(|&i| lines[i].state != "finished")
        .collect();
    let done_before = runs.len() - todo.len();
    eprintln!(
        "sweep of {} runs in {}: {} to do{}, {} at a time with {} CPU threads each",
        runs.len(),
        out.display(),
        todo.len(),
        if done_before > 0 {
            format!(" ({done_before} finished before)")
        } else {
            String::new()
        },
        opts.jobs,
        per_job
    );
    let interrupted = Arc::new(AtomicBool::new(false));
    let mut signal_ids = Vec::new();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_ids.push(signal_hook::flag::register(signal, interrupted.clone())?);
    }
    let terminal = opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = terminal.then(MultiProgress::new);
    let overall = multi.as_ref().map(|m| {
        let bar = m.add(ProgressBar::new(runs.len() as u64));
        bar.set_style(
            ProgressStyle::with_template("sweep [{bar:30}] {pos}/{len} runs {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_position(done_before as u64);
        bar
    });
    let gpus = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    let mut queue = todo.into_iter();
    let mut active: Vec<Job> = Vec::new();
    let mut failed: Vec<usize> = Vec::new();
    let mut finished = done_before;
    let mut forwarded = false;
    loop {
        let stop = interrupted.load(Ordering::SeqCst);
        while !stop && active.len() < opts.jobs {
            let Some(index) = queue.next() else { break };
            let slot = (0..opts.jobs)
                .find(|s| !active.iter().any(|j| j.index % opts.jobs == *s))
                .unwrap_or(0);
            let gpu = (gpus > 1).then_some(slot % gpus.max(1));
            let job = start(&runs[index], index, &lines[index], &out, opts, gpu, &multi)?;
            lines[index].state = "running".into();
            write_tsv(&tsv, &lines)?;
            active.push(job);
        }
        if stop && !forwarded {
            // Ctrl-C reaches the runs through the terminal; a SIGTERM sent to the sweep alone is
            // passed on, so that each run checkpoints as it would on its own.
            for job in &active {
                if let Some(pid) = rustix::process::Pid::from_raw(job.child.id() as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
            forwarded = true;
        }
        if active.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut still = Vec::new();
        for mut job in active.drain(..) {
            match job.child.try_wait()? {
                None => {
                    if let Some(bar) = &job.bar {
                        bar.set_message(job.status.lock().map(|s| s.clone()).unwrap_or_default());
                        bar.tick();
                    }
                    still.push(job);
                }
                Some(status) => {
                    let index = job.index;
                    let state = run_state(&out.join(&runs[index].id))?;
                    let ok = status.success() && state == "finished";
                    let took = job.started.elapsed().as_secs_f64();
                    let line = format!(
                        "{} {} in {:.0}s{}",
                        runs[index].id,
                        if ok { "finished" } else { state.as_str() },
                        took,
                        if ok || stop {
                            String::new()
                        } else {
                            format!(
                                " (exit {}; see {})",
                                status.code().map_or("by signal".into(), |c| c.to_string()),
                                out.join("logs")
                                    .join(format!("{}.log", runs[index].id))
                                    .display()
                            )
                        }
                    );
                    if ok {
                        finished += 1;
                    } else if !stop {
                        failed.push(index);
                    }
                    if let Some(bar) = job.bar.take() {
                        bar.finish_and_clear();
                        if let Some(m) = &multi {
                            m.remove(&bar);
                        }
                    }
                    match (&multi, &overall) {
                        (Some(m), Some(o)) => {
                            let _ = m.println(&line);
                            o.set_position(finished as u64);
                            if !failed.is_empty() {
                                o.set_message(format!("({} failed)", failed.len()));
                            }
                        }
                        _ => eprintln!("[{}/{}] {line}", finished + failed.len(), runs.len()),
                    }
                    lines[index].state = state;
                    write_tsv(&tsv, &lines)?;
                }
            }
        }
        active = still;
    }
    for id in signal_ids {
        signal_hook::low_level::unregister(id);
    }
    if let Some(o) = overall {
        o.finish_and_clear();
    }
    let again = sweep_command(opts);
    if interrupted.load(Ordering::SeqCst) {
        return Err(crate::commands::run::RunInterrupted {
            message: format!(
                "sweep interrupted: {finished} of {} runs finished, the others keep their \
                 checkpoints; continue with `{again}`",
                runs.len()
            ),
        }
        .into());
    }
    if !failed.is_empty() {
        let ids: Vec<&str> = failed.iter().map(|&i| runs[i].id.as_str()).collect();
        bail!(
            "{} of {} runs failed: {}\n  help: their logs are in {}; `{again}` retries them and \
             skips the finished ones",
            failed.len(),
            runs.len(),
            ids.join(", "),
            out.join("logs").display()
        );
    }
    println!(
        "{} runs finished in {}\nreport: trellis report {}",
        runs.len(),
        out.display(),
        shell_quote(&out.display().to_string())
    );
    Ok(())
}

/// A run's state as `runs.tsv` shows it: its `state.json`'s, or `pending` before it started.
fn run_state(dir: &Path) -> Result<String> {
    Ok(match read_state(dir)? {
        None => "pending".into(),
        Some(s) => match s.state {
            Phase::Started => "started",
            Phase::Checkpointed => "checkpointed",
            Phase::Finished => "finished",
            Phase::Failed => "failed",
        }
        .into(),
    })
}

/// The path of this binary, read once when the sweep starts. Rebuilding trellis while a sweep
/// runs replaces the file: `/proc/self/exe` then names the deleted one, which cannot be started,
/// while the path holds the rebuilt binary that the runs after it start from.
fn this_binary() -> Result<PathBuf> {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(path) = PATH.get() {
        return Ok(path.clone());
    }
    let path = std::env::current_exe().context("cannot find this trellis binary")?;
    Ok(PATH.get_or_init(|| path).clone())
}

fn start(
    run: &SweepRun,
    index: usize,
    line: &TsvLine,
    out: &Path,
    opts: &SweepOptions,
    gpu: Option<usize>,
    multi: &Option<MultiProgress>,
) -> Result<Job> {
    let dir = out.join(&run.id);
    // A run of an earlier sweep killed with it may still be writing its checkpoint.
    wait_unlocked(&dir)?;
    let exe = this_binary()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("run").arg(&run.config);
    for o in &run.overrides {
        cmd.arg("--set").arg(o);
    }
    cmd.arg("--set")
        .arg(format!("train.threads={}", line.threads));
    if let Some(m) = &opts.manifest {
        cmd.arg("--manifest").arg(m);
    }
    cmd.arg("--out").arg(&dir).arg("--quiet");
    if opts.nproc > 1 {
        cmd.arg("--nproc").arg(opts.nproc.to_string());
    }
    if dir.join("state.json").exists() {
        cmd.arg("--resume");
    }
    cmd.env(PARENT_ENV, std::process::id().to_string());
    // Its runs are this machine's, not ranks of a job around the sweep.
    for name in crate::distributed::WORLD_VARIABLES {
        cmd.env_remove(name);
    }
    if let Some(gpu) = gpu {
        cmd.env("CUDA_VISIBLE_DEVICES", gpu.to_string());
    }
    let log_path = out.join("logs").join(format!("{}.log", run.id));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    cmd.stdout(log.try_clone()?).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        let mut message = format!("cannot start run {}: {e}", run.id);
        if e.kind() == std::io::ErrorKind::NotFound {
            message += &format!(
                "\n  help: {} was removed while the sweep ran; build or restore it and run the \
                 same command again: finished runs are kept and the others resume",
                exe.display()
            );
        }
        anyhow::anyhow!(message)
    })?;
    let status = Arc::new(Mutex::new(String::from("starting")));
    let stderr = child.stderr.take().expect("piped");
    let seen = status.clone();
    std::thread::spawn(move || {
        let mut log = log;
        for text in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{text}");
            if let Some(progress) = epoch_progress(&text) {
                if let Ok(mut s) = seen.lock() {
                    *s = progress;
                }
            }
        }
    });
    let bar = multi.as_ref().map(|m| {
        let bar = m.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("  {spinner} {prefix} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(run.id.clone());
        bar
    });
    if multi.is_none() {
        eprintln!(
            "started {} ({})",
            run.id,
            if run.overrides.is_empty() {
                "the config as written".to_string()
            } else {
                run.overrides.join(" ")
            }
        );
    }
    Ok(Job {
        index,
        child,
        started: Instant::now(),
        status,
        bar,
    })
}

/// `epoch 3/10: train loss 1.2, top1 0.41` from a run's log line, for the sweep's progress.
fn epoch_progress(line: &str) -> Option<String> {
    let at = line.find("epoch ")?;
    let rest = &line[at..];
    let colon = rest.find(':')?;
    let (done, total) = rest["epoch ".len()..colon].split_once('/')?;
    done.parse::<usize>().ok()?;
    total.parse::<usize>().ok()?;
    let end = rest.find(" (").unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

/// Waits (up to a minute) until no process holds the run directory's lock.
fn wait_unlocked(dir: &Path) -> Result<()> {
    let lock = dir.join(".lock");
    let Ok(file) = std::fs::File::open(&lock) else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = rustix::fs::flock(&file, rustix::fs::FlockOperation::Unlock);
                return Ok(());
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(_) => bail!(
                "{} is still in use by another trellis after a minute\n  help: stop it, then re-run \
                 the sweep",
                dir.display()
            ),
        }
    }
}

/// One sweep per directory at a time: a second would start the same runs again.
fn lock_sweep(out: &Path) -> Result<std::fs::File> {
    let path = out.join(".sweep.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(_) => bail!(
            "{} is in use by another trellis sweep\n  help: wait for it to end (or stop it with \
             Ctrl-C); two sweeps never share a directory",
            out.display()
        ),
    }
}

fn sweep_command(opts: &SweepOptions) -> String {
    let mut args = vec![
        "trellis".to_string(),
        "sweep".into(),
        opts.file.display().to_string(),
    ];
    for g in &opts.grid {
        args.push("--grid".into());
        args.push(g.clone());
    }
    args.push("--out".into());
    args.push(opts.out.display().to_string());
    if opts.jobs > 1 {
        args.push("--jobs".into());
        args.push(opts.jobs.to_string());
    }
    if opts.nproc > 1 {
        args.push("--nproc".into());
        args.push(opts.nproc.to_string());
    }
    if let Some(t) = opts.threads {
        args.push("--threads".into());
        args.push(t.to_string());
    }
    if let Some(m) = &opts.manifest {
        args.push("--manifest".into());
        args.push(m.display().to_string());
    }
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Called first by a run of a sweep: it ends when its sweep dies (SIGTERM: it checkpoints).
pub fn follow_parent() {
    let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    // The sweep may have died before the line above: then this process has another parent.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(parent) {
        eprintln!("error: the sweep or launcher that started this run (pid {parent}) has ended");
        std::process::exit(crate::commands::run::INTERRUPTED_EXIT.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_read_from_a_runs_epoch_lines() {
        assert_eq!(
            epoch_progress(
                "2026-12-03T10:00:00Z  INFO trellis::commands::run: epoch 3/10: train loss 1.2000, top1 0.410 (2.1s)"
            )
            .as_deref(),
            Some("epoch 3/10: train loss 1.2000, top1 0.410")
        );
        assert_eq!(epoch_progress("training resnet18 on 5 epochs"), None);
        assert_eq!(epoch_progress("the epoch x/y: no"), None);
    }
}
