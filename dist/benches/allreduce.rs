//! All-reduce bandwidth of two local Gloo ranks on loopback: trellis-dist against PyTorch's own
//! torch.distributed, same sizes, same iteration counts, in the same run.
//!
//! `cargo bench -p trellis-dist --bench allreduce` (sizes in MiB of f32, default 1,4,16,64:
//! `TRELLIS_DIST_BENCH_SIZES=1,2` for a quick check). The PyTorch side runs through the checkout's
//! `.torch-python` (`./scripts/setup.sh` links it). Each rank uses one libtorch thread, the
//! machine's 2 cores being shared by the two ranks. Bandwidth is bytes reduced per second per
//! rank (for two ranks, ring all-reduce's bus bandwidth equals this).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use trellis_dist::{Op, ProcessGroup, Store};

const RANK: &str = "TRELLIS_DIST_BENCH_RANK";
const PORT: &str = "TRELLIS_DIST_BENCH_PORT";
/// `MiB:iterations,...`, handed from the parent to both ranks and to the PyTorch side.
const PLAN: &str = "TRELLIS_DIST_BENCH_PLAN";
const WARMUP: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(120);

const TORCH_SIDE: &str = r#"
import os, sys, time
from datetime import timedelta
import torch
import torch.distributed as dist

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=2, timeout=timedelta(seconds=120))
for item in os.environ["TRELLIS_DIST_BENCH_PLAN"].split(","):
    mib, iterations = (int(x) for x in item.split(":"))
    t = torch.zeros(mib * 2**20 // 4)
    for _ in range(int(sys.argv[1])):
        dist.all_reduce(t)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(t)
    seconds = (time.perf_counter() - start) / iterations
    if rank == 0:
        print(f"RESULT {mib} {seconds}", flush=True)
dist.destroy_process_group()
"#;

fn main() {
    if let Ok(rank) = std::env::var(RANK) {
        rank_main(rank.parse().expect("rank"));
        return;
    }
    let sizes: Vec<usize> = std::env::var("TRELLIS_DIST_BENCH_SIZES")
        .unwrap_or_else(|_| "1,4,16,64".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("TRELLIS_DIST_BENCH_SIZES: MiB, comma-separated")
        })
        .collect();
    // About 256 MiB reduced per size, at least 5 and at most 50 times.
    let plan: String = sizes
        .iter()
        .map(|&mib| format!("{mib}:{}", (256 / mib.max(1)).clamp(5, 50)))
        .collect::<Vec<_>>()
        .join(",");

    let exe = std::env::current_exe().unwrap();
    let ours = run_pair(|rank, port| {
        let mut command = Command::new(&exe);
        command
            .env(RANK, rank.to_string())
            .env(PORT, port.to_string())
            .env(PLAN, &plan);
        command
    });
    // `.torch-python` links to `<venv>/bin/python`, and Python finds its venv (and torch) only
    // when started by that path, not through a link elsewhere.
    let link = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.torch-python");
    let python = std::fs::read_link(&link).map(|target| link.parent().unwrap().join(target));
    let theirs = if let Ok(python) = python {
        Some(run_pair(|rank, port| {
            let mut command = Command::new(&python);
            command
                .args(["-c", TORCH_SIDE, &WARMUP.to_string()])
                .env("RANK", rank.to_string())
                .env("MASTER_PORT", port.to_string())
                .env(PLAN, &plan);
            command
        }))
    } else {
        eprintln!(
            "{} is missing (./scripts/setup.sh links it): no PyTorch comparison",
            link.display()
        );
        None
    };

    println!("all_reduce (sum) of f32 on 2 local Gloo ranks, 1 libtorch thread each");
    println!(
        "{:>8} {:>6} {:>18} {:>18} {:>8}",
        "MiB", "iters", "trellis-dist GB/s", "torch.dist GB/s", "ratio"
    );
    for item in plan.split(',') {
        let (mib, iterations) = item.split_once(':').unwrap();
        let mib: usize = mib.parse().unwrap();
        let bytes = (mib << 20) as f64;
        let gbps = |seconds: f64| bytes / seconds / 1e9;
        let ours = gbps(ours[&mib]);
        let (theirs, ratio) = match &theirs {
            Some(results) => {
                let theirs = gbps(results[&mib]);
                (format!("{theirs:.3}"), format!("{:.2}", ours / theirs))
            }
            None => ("-".into(), "-".into()),
        };
        println!("{mib:>8} {iterations:>6} {ours:>18.3} {theirs:>18} {ratio:>8}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("no free port on 127.0.0.1")
        .port()
}

/// Runs two ranks to the end and returns rank 0's seconds per all-reduce, by MiB.
fn run_pair(command: impl Fn(usize, u16) -> Command) -> BTreeMap<usize, f64> {
    let port = free_port();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            command(rank, port)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawning a rank")
        })
        .collect();
    let mut results = BTreeMap::new();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().expect("waiting for a rank");
        assert!(
            output.status.success(),
            "rank {rank} failed: {}",
            output.status
        );
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(result) = line.strip_prefix("RESULT ") {
                let (mib, seconds) = result.split_once(' ').unwrap();
                results.insert(mib.parse().unwrap(), seconds.parse().unwrap());
            }
        }
    }
    results
}

fn rank_main(rank: usize) {
    tch::set_num_threads(1);
    let port: u16 = std::env::var(PORT).unwrap().parse().unwrap();
    let store = Store::tcp("127.0.0.1", port, 2, rank == 0, TIMEOUT).unwrap();
    let group = ProcessGroup::gloo(&store, rank, 2, TIMEOUT).unwrap();
    for item in std::env::var(PLAN).unwrap().split(',') {
        let (mib, iterations) = item.split_once(':').unwrap();
        let (mib, iterations): (i64, u32) = (mib.parse().unwrap(), iterations.parse().unwrap());
        let mut t = Tensor::zeros([mib * (1 << 20) / 4], (Kind::Float, Device::Cpu));
        for _ in 0..WARMUP {
            group.all_reduce(&mut t, Op::Sum).unwrap();
        }
        group.barrier().unwrap();
        let start = Instant::now();
        for _ in 0..iterations {
            group.all_reduce(&mut t, Op::Sum).unwrap();
        }
        let seconds = start.elapsed().as_secs_f64() / f64::from(iterations);
        if rank == 0 {
            println!("RESULT {mib} {seconds}");
        }
    }
}
