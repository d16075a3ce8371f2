//! `trellis run CONFIG --nproc N`: N ranks of one data-parallel run on this machine, as torchrun
//! starts them — each a `trellis run` of its own, told its place by `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` ([`crate::distributed::World`]).
//!
//! The launcher waits for them all. When one fails, the others fail too within
//! `[distributed] timeout_s` (their next collective breaks); any still running after that is
//! killed, and the launcher exits with the first failure's status, naming the rank. SIGINT and
//! SIGTERM are passed on to every rank, which agree on the step to stop at and checkpoint.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::run::{RunInterrupted, RunOptions, INTERRUPTED_EXIT};
use crate::config::LoadedConfig;
use crate::run_dir::{read_state, Phase};

/// Set by the launcher for its ranks: how many it started, so that the command rank 0 prints to
/// resume the run starts as many.
pub const NPROC_ENV: &str = "TRELLIS_NPROC";

/// How the ranks ended, when one did not succeed.
#[derive(Debug)]
pub struct RankFailed {
    pub message: String,
    pub code: u8,
}

impl std::fmt::Display for RankFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RankFailed {}

/// Starts `nproc` ranks of the run `opts` describes and waits for them.
pub fn launch(opts: &RunOptions, nproc: usize) -> Result<()> {
    if nproc == 0 {
        bail!("--nproc 0: a run needs at least one process");
    }
    // Refuse a bad config once, here, rather than once per rank.
    let cfg = LoadedConfig::load(&opts.config, &opts.overrides)?;
    let grace = Duration::from_secs_f64(cfg.config.distributed.timeout_s) + Duration::from_secs(10);
    // Every rank must name the same directory, and a default one has the time in its name.
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| super::run::default_run_dir(&opts.config));
    let port = free_port()?;
    let threads = threads_per_rank(nproc);
    let exe = std::env::current_exe().context("cannot find the trellis binary to start ranks")?;
    let signals = ForwardedSignals::install()?;
    let mut ranks: Vec<(usize, Child)> = Vec::new();
    for rank in 0..nproc {
        let mut command = Command::new(&exe);
        command.args(rank_args(opts, &out, rank));
        for name in crate::distributed::WORLD_VARIABLES {
            command.env_remove(name);
        }
        command
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if let Some(threads) = threads {
            command.env("OMP_NUM_THREADS", threads.to_string());
        }
        command.env(NPROC_ENV, nproc.to_string());
        // A rank ends (with a checkpoint, on SIGTERM) when the launcher dies.
        command.env(super::sweep::PARENT_ENV, std::process::id().to_string());
        // Their own process group: a Ctrl-C reaches the launcher alone, which passes it on
        // once, so no rank takes it for the second signal that exits at once.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        match command.spawn() {
            Ok(child) => ranks.push((rank, child)),
            Err(e) => {
                kill_all(&mut ranks);
                bail!("cannot start rank {rank} ({}): {e}", exe.display());
            }
        }
    }
    tracing::info!(
        "started {nproc} ranks (pids {}) meeting at 127.0.0.1:{port}{}",
        ranks
            .iter()
            .map(|(_, c)| c.id().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        threads.map_or(String::new(), |t| {
            format!(", {t} CPU thread{} each", if t == 1 { "" } else { "s" })
        })
    );
    let mut ended: Vec<Option<ExitStatus>> = vec![None; nproc];
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    loop {
        if let Some(signal) = signals.take() {
            // Only ranks not yet reaped: a reaped rank's pid may belong to another process now.
            for (_, child) in ranks.iter().filter(|(rank, _)| ended[*rank].is_none()) {
                let _ =
                    rustix::process::kill_process(rustix::process::Pid::from_child(child), signal);
            }
        }
        let mut failed_now = Vec::new();
        for (rank, child) in &mut ranks {
            if ended[*rank].is_none() {
                if let Some(status) = child.try_wait()? {
                    ended[*rank] = Some(status);
                    if !status.success() {
                        failed_now.push((*rank, status));
                    }
                }
            }
        }
        // Of ranks seen ending together, one killed by a signal is the cause: the others
        // failed because they lost it.
        failed_now.sort_by_key(|(_, status)| {
            std::os::unix::process::ExitStatusExt::signal(status).is_none()
        });
        if let (None, Some(&(rank, status))) = (first_failure, failed_now.first()) {
            first_failure = Some((rank, status, Instant::now()));
        }
        if ended.iter().all(Option::is_some) {
            break;
        }
        if let Some((_, _, at)) = first_failure {
            if at.elapsed() > grace {
                for (rank, child) in &mut ranks {
                    if ended[*rank].is_none() {
                        tracing::warn!(
                            "rank {rank} still runs {grace:?} after another failed; killing it"
                        );
                        let _ = child.kill();
                        ended[*rank] = Some(child.wait()?);
                    }
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some((rank, status, _)) = first_failure else {
        return Ok(());
    };
    let code = exit_code(status);
    let states: Vec<String> = ended
        .iter()
        .enumerate()
        .map(|(r, s)| format!("rank {r} {}", describe(s.expect("all ended"))))
        .collect();
    if code == INTERRUPTED_EXIT
        && ended
            .iter()
            .all(|s| s.is_some_and(|s| exit_code(s) == INTERRUPTED_EXIT))
    {
        return Err(RunInterrupted {
            message: format!("every rank stopped on the signal ({})", states.join(", ")),
        }
        .into());
    }
    // A run directory that holds something to go on with (rather than none, or a finished run
    // that a rank refused to write over) gets the resume hint.
    let resumable = read_state(&out)
        .ok()
        .flatten()
        .is_some_and(|state| state.state != Phase::Finished);
    Err(RankFailed {
        message: if resumable {
            format!(
                "rank {rank} {} first ({}); what rank 0 managed to checkpoint is in {}\n  help: \
                 fix what its output says, then continue with the same command and --resume (any \
                 number of ranks)",
                describe(status),
                states.join(", "),
                out.display()
            )
        } else {
            format!(
                "rank {rank} {} first ({}); its output says why",
                describe(status),
                states.join(", "),
            )
        },
        code,
    }
    .into())
}

/// The arguments of rank `rank`: the launcher's own, with the run directory fixed and without
/// a progress bar outside rank 0.
fn rank_args(opts: &RunOptions, out: &std::path::Path, rank: usize) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["run".into(), opts.config.clone().into()];
    for o in &opts.overrides {
        args.push("--set".into());
        args.push(o.into());
    }
    args.push("--out".into());
    args.push(out.into());
    if let Some(m) = &opts.manifest {
        args.push("--manifest".into());
        args.push(PathBuf::from(m).into());
    }
    if opts.resume {
        args.push("--resume".into());
    }
    if let Some(stop) = opts.stop_after {
        args.push("--stop-after".into());
        args.push(stop.to_string().into());
    }
    if !opts.progress || rank > 0 {
        args.push("--quiet".into());
    }
    args
}

/// The cores split between the ranks, as torchrun sets `OMP_NUM_THREADS` (libtorch reads it
/// for its thread pool); `None` when the environment already sets it.
fn threads_per_rank(nproc: usize) -> Option<usize> {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / nproc).max(1))
}

/// A TCP port nobody listens on now, for rank 0's store.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free local port for the ranks to meet at")?;
    Ok(listener.local_addr()?.port())
}

fn kill_all(ranks: &mut [(usize, Child)]) {
    for (_, child) in ranks {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        _ => 1,
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "finished".into(),
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".into(),
    }
}

/// SIGINT and SIGTERM, caught by the launcher for its ranks.
struct ForwardedSignals {
    sigint: Arc<AtomicBool>,
    sigterm: Arc<AtomicBool>,
    ids: Vec<signal_hook::SigId>,
}

impl ForwardedSignals {
    fn install() -> Result<ForwardedSignals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let sigint = Arc::new(AtomicBool::new(false));
        let sigterm = Arc::new(AtomicBool::new(false));
        let ids = vec![
            signal_hook::flag::register(SIGINT, sigint.clone())?,
            signal_hook::flag::register(SIGTERM, sigterm.clone())?,
        ];
        Ok(ForwardedSignals {
            sigint,
            sigterm,
            ids,
        })
    }

    /// The signal received since the last call, if any.
    fn take(&self) -> Option<rustix::process::Signal> {
        if self.sigint.swap(false, Ordering::SeqCst) {
            Some(rustix::process::Signal::INT)
        } else if self.sigterm.swap(false, Ordering::SeqCst) {
            Some(rustix::process::Signal::TERM)
        } else {
            None
        }
    }
}

impl Drop for ForwardedSignals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
