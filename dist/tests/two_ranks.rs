//! Two Gloo ranks on 127.0.0.1, each a child process running this test binary again: the test
//! `rank_process` acts as the rank that `TRELLIS_DIST_TEST_RANK` names and passes trivially
//! when run on its own. The parent spawns both, enforces a deadline (a hang is a failure, not a
//! stuck CI job), and fails with both ranks' output if either fails.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use trellis_dist::{nccl_compiled, Op, ProcessGroup, Store};

const RANK: &str = "TRELLIS_DIST_TEST_RANK";
const PORT: &str = "TRELLIS_DIST_TEST_PORT";
const SCENARIO: &str = "TRELLIS_DIST_TEST_SCENARIO";

/// What a rank prints once it is past the barrier of a failure scenario, so that the parent can
/// kill it at a known point.
const READY: &str = "TRELLIS_DIST_TEST_READY";

/// Short, so that the failure tests finish in seconds; the collectives themselves take
/// milliseconds.
const FAILURE_TIMEOUT: Duration = Duration::from_secs(3);
const TIMEOUT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("no free port on 127.0.0.1")
        .port()
}

struct Rank {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: thread::JoinHandle<String>,
}

fn spawn(scenario: &str, rank: usize, port: u16) -> Rank {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["rank_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(RANK, rank.to_string())
        .env(PORT, port.to_string())
        .env(SCENARIO, scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning a rank");
    let (lines, stdout) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    Rank {
        child,
        stdout,
        stderr,
    }
}

struct Finished {
    success: bool,
    output: String,
}

/// Waits for `rank` until `deadline`, killing it (and failing) past that.
fn finish(mut rank: Rank, deadline: Instant) -> Finished {
    let status = loop {
        if let Some(status) = rank.child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = rank.child.kill();
            let _ = rank.child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout: Vec<String> = rank.stdout.try_iter().collect();
    let output = format!(
        "{}\n{}",
        stdout.join("\n"),
        rank.stderr.join().unwrap_or_default()
    );
    match status {
        Some(status) => Finished {
            success: status.success(),
            output,
        },
        None => Finished {
            success: false,
            output: format!("HUNG past its deadline, killed\n{output}"),
        },
    }
}

fn assert_all_passed(scenario: &str, ranks: Vec<Finished>) {
    if ranks.iter().all(|rank| rank.success) {
        // Shown with --nocapture: the errors c10d gave, as the ranks saw them.
        for (index, rank) in ranks.iter().enumerate() {
            eprintln!("--- {scenario}, rank {index} ---\n{}", rank.output);
        }
        return;
    }
    let mut report = format!("scenario {scenario} failed:\n");
    for (index, rank) in ranks.iter().enumerate() {
        report += &format!(
            "--- rank {index} ({}) ---\n{}\n",
            if rank.success { "ok" } else { "FAILED" },
            rank.output
        );
    }
    panic!("{report}");
}

/// Both ranks run `scenario` to the end.
fn run_both(scenario: &str) {
    let port = free_port();
    let ranks: Vec<Rank> = (0..2).map(|rank| spawn(scenario, rank, port)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = ranks.into_iter().map(|r| finish(r, deadline)).collect();
    assert_all_passed(scenario, finished);
}

/// Rank 1 gets past the barrier and is then killed (SIGKILL: no destructor, no goodbye) or left
/// alive but silent; rank 0 must come back from its next collective with an error, in time.
fn run_with_lost_peer(scenario: &str, kill: bool) {
    let port = free_port();
    let survivor = spawn(scenario, 0, port);
    let mut lost = spawn(scenario, 1, port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        match lost.stdout.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(READY) => break true,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => break false,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    if kill && ready {
        lost.child.kill().unwrap();
    }
    let survivor = finish(survivor, deadline);
    // Its job (being absent) is done once the survivor has finished; a silent one is ended here.
    let _ = lost.child.kill();
    let lost = finish(lost, deadline);
    assert!(
        ready,
        "rank 1 never reached the barrier:\n{}\nrank 0:\n{}",
        lost.output, survivor.output
    );
    assert_all_passed(scenario, vec![survivor]);
}

#[test]
fn sum_mean_broadcast_all_gather_barrier_on_two_ranks() {
    run_both("collectives");
}

#[test]
fn sync_batch_norm_of_two_ranks_is_batch_norm_of_their_rows_together() {
    run_both("sync_batch_norm");
}

#[test]
fn a_killed_peer_is_an_error_within_the_timeout() {
    run_with_lost_peer("peer_killed", true);
}

#[test]
fn a_silent_peer_is_an_error_after_the_timeout() {
    run_with_lost_peer("peer_silent", false);
}

#[test]
fn a_rendezvous_without_its_master_times_out() {
    let port = free_port();
    let start = Instant::now();
    let result = Store::tcp("127.0.0.1", port, 2, false, Duration::from_secs(1));
    let elapsed = start.elapsed();
    let error = result.err().expect("joined a store nobody serves");
    eprintln!("rendezvous error after {elapsed:?}: {error}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(error.to_string().contains(&format!("127.0.0.1:{port}")));
}

#[test]
fn a_rank_outside_the_world_is_refused() {
    let store = Store::tcp("127.0.0.1", free_port(), 1, true, TIMEOUT).unwrap();
    let error = ProcessGroup::gloo(&store, 1, 1, TIMEOUT).err().unwrap();
    assert!(error.message().contains("rank 1 is not below"), "{error}");
}

/// CI has no GPU: there NCCL must refuse cleanly, naming why. With a GPU, one rank all-reduces.
#[test]
fn nccl_refuses_cleanly_without_a_gpu() {
    let store = Store::tcp("127.0.0.1", free_port(), 1, true, TIMEOUT).unwrap();
    let result = ProcessGroup::nccl(&store, 0, 1, TIMEOUT);
    if nccl_compiled() && tch::Cuda::is_available() {
        let group = result.expect("NCCL on the local GPU");
        let mut t = Tensor::from_slice(&[1.5f32, -2.0]).to_device(Device::Cuda(0));
        group.all_reduce(&mut t, Op::Mean).unwrap();
        group.barrier().unwrap();
        assert_eq!(values(&t), [1.5, -2.0]);
        return;
    }
    let error = result.err().expect("NCCL without a GPU");
    eprintln!("nccl: {error}");
    let message = error.message();
    assert!(
        message.contains("CUDA") || message.contains("without NCCL"),
        "{error}"
    );
}

/// Runs as a rank when spawned by one of the tests above; passes trivially otherwise.
#[test]
fn rank_process() {
    let Ok(rank) = std::env::var(RANK) else {
        return;
    };
    let rank: usize = rank.parse().unwrap();
    let port: u16 = std::env::var(PORT).unwrap().parse().unwrap();
    match std::env::var(SCENARIO).unwrap().as_str() {
        "collectives" => collectives(rank, port),
        "peer_killed" => lost_peer(rank, port, true),
        "peer_silent" => lost_peer(rank, port, false),
        "sync_batch_norm" => sync_batch_norm(rank, port),
        other => panic!("unknown scenario {other}"),
    }
}

fn values(tensor: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        tensor
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .flatten(0, -1),
    )
    .unwrap()
}

fn tensor(data: &[f64], shape: &[i64], kind: Kind) -> Tensor {
    Tensor::from_slice(data).reshape(shape).to_kind(kind)
}

fn collectives(rank: usize, port: u16) {
    let store = Store::tcp("127.0.0.1", port, 2, rank == 0, TIMEOUT).unwrap();
    let group = ProcessGroup::gloo(&store, rank, 2, TIMEOUT).unwrap();
    assert_eq!((group.rank(), group.world_size()), (rank, 2));

    // Every value and every result is exact in bf16 (8 significant bits), so each dtype is
    // checked for equality, not closeness.
    let mine: [[f64; 6]; 2] = [
        [1.0, 2.0, -3.0, 0.5, 8.0, 100.0],
        [2.0, 4.0, -2.5, 1.5, -8.0, 28.0],
    ];
    let sum = [3.0, 6.0, -5.5, 2.0, 0.0, 128.0];
    let mean = [1.5, 3.0, -2.75, 1.0, 0.0, 64.0];
    for kind in [Kind::Float, Kind::Double, Kind::BFloat16] {
        let mut t = tensor(&mine[rank], &[2, 3], kind);
        group.all_reduce(&mut t, Op::Sum).unwrap();
        assert_eq!((t.kind(), t.size()), (kind, vec![2, 3]));
        assert_eq!(values(&t), sum, "sum of {kind:?}");

        let mut t = tensor(&mine[rank], &[2, 3], kind);
        group.all_reduce(&mut t, Op::Mean).unwrap();
        assert_eq!(t.kind(), kind);
        assert_eq!(values(&t), mean, "mean of {kind:?}");

        let mut t = if rank == 1 {
            tensor(&[7.0, 8.0, 9.5], &[3], kind)
        } else {
            Tensor::zeros([3], (kind, Device::Cpu))
        };
        group.broadcast(&mut t, 1).unwrap();
        assert_eq!(values(&t), [7.0, 8.0, 9.5], "broadcast of {kind:?}");

        // What the training loop will broadcast first: parameters, which require grad.
        let start = if rank == 0 { [1.25, -2.0] } else { [9.0, 9.0] };
        let mut parameter = tensor(&start, &[2], kind).set_requires_grad(true);
        group.broadcast(&mut parameter, 0).unwrap();
        assert_eq!(values(&parameter), [1.25, -2.0], "parameter of {kind:?}");
        assert!(parameter.requires_grad());

        let r = rank as f64;
        let gathered = group
            .all_gather(&tensor(&[r * 10.0 + 1.0, r * 10.0 + 2.0, -r], &[3], kind))
            .unwrap();
        assert_eq!(gathered.len(), 2);
        for (from, part) in gathered.iter().enumerate() {
            let f = from as f64;
            assert_eq!(part.kind(), kind);
            assert_eq!(
                values(part),
                [f * 10.0 + 1.0, f * 10.0 + 2.0, -f],
                "gather of {kind:?}"
            );
        }
    }

    // Counts (a metric's correct predictions) reduce as integers.
    let mut counts = Tensor::from_slice(&[1i64 + rank as i64, 10]);
    group.all_reduce(&mut counts, Op::Sum).unwrap();
    assert_eq!(Vec::<i64>::try_from(&counts).unwrap(), [3, 20]);

    // Rank 1 arrives late: rank 0 must wait for it.
    let start = Instant::now();
    if rank == 1 {
        thread::sleep(Duration::from_millis(400));
    }
    group.barrier().unwrap();
    if rank == 0 {
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300),
            "barrier returned after {waited:?}"
        );
    }

    // Gloo reduces strided views in place too (a transposed 0..16, doubled).
    let mut strided = Tensor::arange(16, (Kind::Float, Device::Cpu))
        .reshape([4, 4])
        .transpose(0, 1);
    group.all_reduce(&mut strided, Op::Sum).unwrap();
    let doubled: Vec<f64> = (0..16)
        .map(|i| f64::from((i % 4) * 4 + i / 4) * 2.0)
        .collect();
    assert_eq!(values(&strided), doubled);

    // Refused tensors are errors on both ranks, and the group still works after them.
    let mut integers = Tensor::from_slice(&[1i64, 2]);
    let error = group.all_reduce(&mut integers, Op::Mean).unwrap_err();
    assert!(error.message().contains("floating-point"), "{error}");
    let mut float8 = Tensor::ones([3], (Kind::Float8e4m3fn, Device::Cpu));
    let error = group.all_reduce(&mut float8, Op::Sum).unwrap_err();
    eprintln!("rank {rank}: {error}");
    assert_eq!(error.message(), "Invalid scalar type");
    assert!(error.to_string().contains("Float8e4m3fn"), "{error}");
    let error = group.broadcast(&mut integers, 2).unwrap_err();
    assert!(error.message().contains("root 2"), "{error}");
    let mut ones = Tensor::ones([3], (Kind::Float, Device::Cpu));
    group.all_reduce(&mut ones, Op::Sum).unwrap();
    assert_eq!(values(&ones), [2.0, 2.0, 2.0]);
    group.barrier().unwrap();
}

fn lost_peer(rank: usize, port: u16, killed: bool) {
    let store = Store::tcp("127.0.0.1", port, 2, rank == 0, TIMEOUT).unwrap();
    let group = ProcessGroup::gloo(&store, rank, 2, FAILURE_TIMEOUT).unwrap();
    group.barrier().unwrap();
    if rank == 1 {
        println!("{READY}");
        // Killed by the parent, or silent until the parent ends it.
        thread::sleep(Duration::from_secs(60));
        return;
    }
    if killed {
        // Let the kill land first, so the collective meets a closed connection.
        thread::sleep(Duration::from_millis(300));
    }
    let mut t = Tensor::ones([1 << 16], (Kind::Float, Device::Cpu));
    let start = Instant::now();
    let result = group.all_reduce(&mut t, Op::Sum);
    let elapsed = start.elapsed();
    let error = result.expect_err("all_reduce with a lost peer succeeded");
    eprintln!("rank 0 after {elapsed:?}: {error}");
    let slack = Duration::from_secs(2);
    assert!(
        elapsed <= FAILURE_TIMEOUT + slack,
        "the error took {elapsed:?}, past the {FAILURE_TIMEOUT:?} timeout"
    );
    if !killed {
        assert!(
            elapsed >= FAILURE_TIMEOUT / 2,
            "a silent peer was given up on after {elapsed:?}, before the timeout"
        );
    }
    assert!(error.to_string().contains("rank 0 of 2"), "{error}");
    // A second collective on the broken group fails too, rather than hanging or aborting.
    let again = group.all_reduce(&mut t, Op::Sum);
    eprintln!(
        "rank 0 again: {:?}",
        again.as_ref().err().map(|e| e.to_string())
    );
    assert!(again.is_err());
}

/// Both ranks build the same global batch (unequal halves: 5 rows and 3) and weights; each
/// normalises its rows over both ranks. Outputs, running statistics and gradients must equal
/// libtorch's batch norm of the whole batch, the gradients of scale and shift once summed.
fn sync_batch_norm(rank: usize, port: u16) {
    let store = Store::tcp("127.0.0.1", port, 2, rank == 0, TIMEOUT).unwrap();
    let group = ProcessGroup::gloo(&store, rank, 2, TIMEOUT).unwrap();
    tch::manual_seed(11);
    let options = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([8, 3, 4, 4], options) * 1.5 + 0.3;
    let upstream = Tensor::randn([8, 3, 4, 4], options);
    let weight = (Tensor::rand([3], options) + 0.5).set_requires_grad(true);
    let bias = Tensor::randn([3], options).set_requires_grad(true);
    let (start, rows) = if rank == 0 { (0, 5) } else { (5, 3) };

    let mine = x.narrow(0, start, rows).copy().set_requires_grad(true);
    let mut mean = Tensor::zeros([3], options);
    let mut var = Tensor::ones([3], options);
    let out = group
        .sync_batch_norm(&mine, &weight, &bias, &mut mean, &mut var, 0.1, 1e-5)
        .unwrap();
    (&out * upstream.narrow(0, start, rows))
        .sum(Kind::Float)
        .backward();
    let mut grad_weight = weight.grad().copy();
    let mut grad_bias = bias.grad().copy();
    group.all_reduce(&mut grad_weight, Op::Sum).unwrap();
    group.all_reduce(&mut grad_bias, Op::Sum).unwrap();

    let whole = x.copy().set_requires_grad(true);
    let (weight_b, bias_b) = (
        weight.detach().copy().set_requires_grad(true),
        bias.detach().copy().set_requires_grad(true),
    );
    let mean_b = Tensor::zeros([3], options);
    let var_b = Tensor::ones([3], options);
    let reference = whole.batch_norm(
        Some(&weight_b),
        Some(&bias_b),
        Some(&mean_b),
        Some(&var_b),
        true,
        0.1,
        1e-5,
        false,
    );
    (&reference * &upstream).sum(Kind::Float).backward();
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-5, "rank {rank}: {what} differs by {d}");
    };
    close(&out, &reference.narrow(0, start, rows), "output");
    close(&mean, &mean_b, "running mean");
    close(&var, &var_b, "running var");
    close(
        &mine.grad(),
        &whole.grad().narrow(0, start, rows),
        "input gradient",
    );
    close(&grad_weight, &weight_b.grad(), "weight gradient");
    close(&grad_bias, &bias_b.grad(), "bias gradient");
}
