//! Sync batch norm on a group of one rank is batch norm: outputs, running statistics and the
//! gradients of input, scale and shift equal libtorch's own training-mode `batch_norm`.
//! (Across two ranks it is checked end to end in tests/tests/distributed.rs.)

use std::time::Duration;

use tch::{Device, Kind, Tensor};
use trellis_dist::{ProcessGroup, Store};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("no free port on 127.0.0.1")
        .port()
}

#[test]
fn sync_batch_norm_of_one_rank_is_batch_norm() {
    let timeout = Duration::from_secs(20);
    let store = Store::tcp("127.0.0.1", free_port(), 1, true, timeout).unwrap();
    let group = ProcessGroup::gloo(&store, 0, 1, timeout).unwrap();
    tch::manual_seed(7);
    let x = (Tensor::randn([32, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 + 0.5)
        .set_requires_grad(true);
    let weight = (Tensor::rand([3], (Kind::Float, Device::Cpu)) + 0.5).set_requires_grad(true);
    let bias = Tensor::randn([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    // Weights the output elements unevenly, so every gradient term matters.
    let upstream = Tensor::randn([32, 3, 32, 32], (Kind::Float, Device::Cpu));

    let mut mean_a = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let mut var_a = Tensor::ones([3], (Kind::Float, Device::Cpu));
    let synced = group
        .sync_batch_norm(&x, &weight, &bias, &mut mean_a, &mut var_a, 0.1, 1e-5)
        .unwrap();
    (&synced * &upstream).sum(Kind::Float).backward();
    let grads_a = [x.grad().copy(), weight.grad().copy(), bias.grad().copy()];
    for t in [&x, &weight, &bias] {
        let _ = t.grad().zero_();
    }

    let mean_b = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let var_b = Tensor::ones([3], (Kind::Float, Device::Cpu));
    let reference = x.batch_norm(
        Some(&weight),
        Some(&bias),
        Some(&mean_b),
        Some(&var_b),
        true,
        0.1,
        1e-5,
        false,
    );
    (&reference * &upstream).sum(Kind::Float).backward();
    let grads_b = [x.grad(), weight.grad(), bias.grad()];

    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let d = (a - b).abs().max().double_value(&[]);
        // Relative: the scale's gradient sums 32k products (float32 rounding, ~1e-7).
        let scale = b.abs().max().double_value(&[]).max(1.0);
        assert!(d < 1e-6 * scale, "{what} differs by {d} (of {scale})");
    };
    close(&synced, &reference, "output");
    close(&mean_a, &mean_b, "running mean");
    close(&var_a, &var_b, "running var");
    for ((a, b), what) in grads_a
        .iter()
        .zip(&grads_b)
        .zip(["input", "weight", "bias"])
    {
        close(a, b, &format!("gradient of {what}"));
    }
}
