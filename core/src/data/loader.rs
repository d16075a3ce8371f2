//! The batch pipeline: one background thread per epoch prepares batches ahead of the training
//! step and hands them over through a small bounded channel.
//!
//! For the CPU the thread crops, flips and normalises in plain Rust ([`augment_into`]). For a GPU
//! it keeps the u8 images on the device (a dataset already there is used as it is, otherwise it
//! is uploaded once per epoch) and augments there with tensor operations ([`augment_batch`]):
//! per batch only the sample indices and the draws cross to the device, in one small copy. Both
//! paths take the same draws and give the same bits.

use std::borrow::Borrow;
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::thread::JoinHandle;

use tch::{Device, Kind, Tensor};

use super::augment::{augment_batch, augment_into, lookup_table_tensor, Normalize, PAD};
use super::rng::Rng;
use super::Dataset;

/// Batches prepared ahead: enough to absorb jitter in batch preparation, few enough that the
/// memory they hold (on the device) stays small.
pub const PREFETCH: usize = 3;

const SHUFFLE_STREAM: u64 = 0x5348_5546; // "SHUF"
const AUGMENT_STREAM: u64 = 0x4155_474D; // "AUGM"

/// One training or evaluation batch.
#[derive(Debug)]
pub struct Batch {
    /// f32 `[B, C, H, W]` on the loader's device, normalised.
    pub inputs: Tensor,
    /// i64 `[B]` on the loader's device.
    pub targets: Tensor,
}

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub shuffle: bool,
    pub augment: bool,
    /// Drop the final partial batch.
    pub drop_last: bool,
    /// The shuffle order and every augmentation draw are a function of `(seed, epoch)`.
    pub seed: u64,
    pub epoch: usize,
    pub device: Device,
    pub normalize: Normalize,
}

/// Which part of each epoch one rank of a data-parallel run takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shard {
    /// Everything: a run of one process.
    Whole,
    /// Training: every batch of the shuffled order is the global batch; rank `rank` takes its
    /// contiguous slice of it ([`Shard::rows`]), so `world` ranks together see exactly the
    /// batches (and augmentation draws) one process would.
    Rows { rank: usize, world: usize },
    /// Evaluation: whole batches, batch `b` to rank `b % world`.
    Batches { rank: usize, world: usize },
}

impl Shard {
    /// The rows `[start, end)` of a global batch of `len` that rank `rank` of `world` takes: the
    /// first `len % world` ranks one more than the others.
    pub fn rows(len: usize, rank: usize, world: usize) -> (usize, usize) {
        let (base, extra) = (len / world, len % world);
        let start = rank * base + rank.min(extra);
        (start, start + base + usize::from(rank < extra))
    }
}

/// A batch as the worker thread hands it over.
enum Prepared {
    /// Made on the CPU: plain buffers, which become tensors on the thread that takes them. Even
    /// `Tensor::from_slice` is a parallel libtorch operation (it zero-fills before copying) once
    /// a batch passes 32,768 values, and with OpenMP a thread that starts one gets a team of its
    /// own for as long as it lives. With that second team alive, OpenMP counts more threads than
    /// cores and stops spin-waiting: the training step's threads then sleep and wake at every
    /// parallel region (about 2,000 times a second per thread, a fifth of a width-16 ResNet18
    /// step on 2 cores).
    Host {
        inputs: Vec<f32>,
        shape: [i64; 4],
        targets: Vec<i64>,
    },
    /// Made on an accelerator by its kernels, which leave the CPU's threads alone.
    Device(Batch),
}

impl Prepared {
    fn into_batch(self) -> Batch {
        match self {
            Prepared::Host {
                inputs,
                shape,
                targets,
            } => Batch {
                inputs: Tensor::from_slice(&inputs).view(shape),
                targets: Tensor::from_slice(&targets),
            },
            Prepared::Device(batch) => batch,
        }
    }
}

/// The batches of one epoch, as an iterator. Build a new `Loader` for every epoch.
pub struct Loader {
    // An Option so that Drop can close the channel before joining the worker.
    rx: Option<Receiver<Prepared>>,
    worker: Option<JoinHandle<()>>,
    total: usize,
    yielded: usize,
    waits: usize,
}

impl Loader {
    /// Starts the worker thread for one epoch of `ds`.
    ///
    /// `ds` may be a `&Dataset`, an `Arc<Dataset>` or a `Dataset`: the worker takes its own
    /// shallow handles to the tensors, so nothing is borrowed past this call. Prefer `&Dataset`,
    /// since clippy flags `Arc::new` of a type that is not `Sync`, as `Dataset` is not.
    ///
    /// Panics if `batch_size` is 0 or `normalize` does not match the image channels, both
    /// programming errors rather than data problems.
    pub fn new<D: Borrow<Dataset>>(ds: D, opts: LoaderOptions) -> Loader {
        Loader::sharded(ds, opts, Shard::Whole)
    }

    /// [`Loader::new`] for one rank of a data-parallel run: the same order and draws as one
    /// process, of which this rank gets its `shard`. With [`Shard::Rows`] a rank's slice of a
    /// batch with fewer rows than ranks is empty (the trainer refuses such batches).
    pub fn sharded<D: Borrow<Dataset>>(ds: D, opts: LoaderOptions, shard: Shard) -> Loader {
        let ds: &Dataset = ds.borrow();
        assert!(
            opts.batch_size > 0,
            "LoaderOptions::batch_size must be at least 1"
        );
        let [c, h, w] = ds.image_shape().map(|d| d as usize);
        let tables = opts.normalize.lookup_tables(c);
        let n = ds.len();
        let global_total = Loader::batches_per_epoch(n, opts.batch_size, opts.drop_last);
        let total = match shard {
            Shard::Batches { rank, world } => global_total.saturating_sub(rank).div_ceil(world),
            Shard::Whole | Shard::Rows { .. } => global_total,
        };
        // `Dataset` is not `Sync`, so the worker gets its own handles to the same storage.
        let data = ds.shallow_clone();
        let (tx, rx) = sync_channel::<Prepared>(PREFETCH);
        let augment = opts.augment;
        let worker = std::thread::Builder::new()
            // Short enough to survive the kernel's 15-byte limit on thread names whole.
            .name(format!("loader-e{}", opts.epoch))
            .spawn(move || {
                let mut order: Vec<i64> = (0..n as i64).collect();
                if opts.shuffle {
                    Rng::derive(opts.seed, &[SHUFFLE_STREAM, opts.epoch as u64])
                        .shuffle(&mut order);
                }
                let mut aug_rng = Rng::derive(opts.seed, &[AUGMENT_STREAM, opts.epoch as u64]);
                let (on_device, labels) = match opts.device {
                    Device::Cpu => (None, data.label_vec()),
                    device => (Some(DeviceData::new(&data, &tables, device)), Vec::new()),
                };
                for (b, chunk) in order.chunks(opts.batch_size).take(global_total).enumerate() {
                    // Three draws per sample, in batch order: the draws depend on (seed, epoch)
                    // only, not on how or where the work is done.
                    let draws: Vec<Draw> = chunk
                        .iter()
                        .map(|_| Draw::new(&mut aug_rng, augment))
                        .collect();
                    let (chunk, draws) = match shard {
                        Shard::Whole => (chunk, &draws[..]),
                        Shard::Rows { rank, world } => {
                            let (start, end) = Shard::rows(chunk.len(), rank, world);
                            (&chunk[start..end], &draws[start..end])
                        }
                        Shard::Batches { rank, world } if b % world == rank => (chunk, &draws[..]),
                        Shard::Batches { .. } => continue,
                    };
                    let batch = match &on_device {
                        Some(d) => Prepared::Device(d.batch(chunk, draws)),
                        None => host_batch(&data, &labels, chunk, draws, [c, h, w], &tables),
                    };
                    if tx.send(batch).is_err() {
                        // The Loader was dropped mid-epoch: nobody wants the rest.
                        return;
                    }
                }
            })
            .expect("cannot spawn the data loader thread");
        Loader {
            rx: Some(rx),
            worker: Some(worker),
            total,
            yielded: 0,
            waits: 0,
        }
    }

    pub fn batches_per_epoch(n: usize, batch_size: usize, drop_last: bool) -> usize {
        assert!(batch_size > 0, "batch_size must be at least 1");
        if drop_last {
            n / batch_size
        } else {
            n.div_ceil(batch_size)
        }
    }

    /// How many times `next()` found no batch ready and had to block.
    pub fn waits(&self) -> usize {
        self.waits
    }

    /// How many batches have been handed out.
    pub fn yielded(&self) -> usize {
        self.yielded
    }

    /// Re-raises a panic of the worker on the caller's thread, where it can be reported.
    fn join_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// One sample's augmentation: the crop offset into the padded image and the flip.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Draw {
    dy: usize,
    dx: usize,
    flip: bool,
}

impl Draw {
    fn new(rng: &mut Rng, augment: bool) -> Draw {
        if augment {
            let dy = rng.below(2 * PAD as u64 + 1) as usize;
            let dx = rng.below(2 * PAD as u64 + 1) as usize;
            Draw {
                dy,
                dx,
                flip: rng.coin(),
            }
        } else {
            // The centre crop of the padded image: the image itself.
            Draw {
                dy: PAD,
                dx: PAD,
                flip: false,
            }
        }
    }
}

/// A batch built on the CPU in plain Rust, without a libtorch operation (see [`Prepared::Host`]):
/// each image is copied out on its own rather than gathered with `index_select`.
fn host_batch(
    data: &Dataset,
    labels: &[i64],
    chunk: &[i64],
    draws: &[Draw],
    [c, h, w]: [usize; 3],
    tables: &[[f32; 256]],
) -> Prepared {
    let b = chunk.len();
    let per_image = c * h * w;
    let mut image = vec![0u8; per_image];
    let mut out = vec![0f32; b * per_image];
    for ((&i, dst), d) in chunk.iter().zip(out.chunks_exact_mut(per_image)).zip(draws) {
        data.images.get(i).copy_data(&mut image, per_image);
        augment_into(&image, dst, [c, h, w], d.dy, d.dx, d.flip, tables);
    }
    Prepared::Host {
        inputs: out,
        shape: [b as i64, c as i64, h as i64, w as i64],
        targets: chunk.iter().map(|&i| labels[i as usize]).collect(),
    }
}

/// The dataset and lookup tables on an accelerator, for batches built there.
struct DeviceData {
    images: Tensor,
    labels: Tensor,
    tables: Tensor,
    device: Device,
}

impl DeviceData {
    fn new(data: &Dataset, tables: &[[f32; 256]], device: Device) -> DeviceData {
        DeviceData {
            images: data.images.to_device(device),
            labels: data.labels.to_device(device),
            tables: lookup_table_tensor(tables, device),
            device,
        }
    }

    fn batch(&self, chunk: &[i64], draws: &[Draw]) -> Batch {
        let b = chunk.len() as i64;
        // Indices and draws in one host-to-device copy.
        let mut packed = chunk.to_vec();
        packed.extend(draws.iter().map(|d| d.dy as i64));
        packed.extend(draws.iter().map(|d| d.dx as i64));
        packed.extend(draws.iter().map(|d| d.flip as i64));
        let packed = Tensor::from_slice(&packed).to_device(self.device);
        let column = |i: i64| packed.narrow(0, i * b, b);
        let idx = column(0);
        let inputs = augment_batch(
            &self.images.index_select(0, &idx),
            &column(1),
            &column(2),
            &column(3),
            &self.tables,
        );
        let targets = self.labels.index_select(0, &idx);
        debug_assert_eq!(targets.kind(), Kind::Int64);
        Batch { inputs, targets }
    }
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.yielded == self.total {
            return None;
        }
        let rx = self.rx.as_ref()?;
        let batch = match rx.try_recv() {
            Ok(batch) => Some(batch),
            Err(TryRecvError::Empty) => {
                self.waits += 1;
                rx.recv().ok()
            }
            Err(TryRecvError::Disconnected) => None,
        };
        match batch {
            Some(batch) => {
                self.yielded += 1;
                Some(batch.into_batch())
            }
            None => {
                // The worker ended before sending every batch: only a panic does that.
                self.rx = None;
                self.join_worker();
                panic!(
                    "the data loader thread stopped after {} of {} batches",
                    self.yielded, self.total
                );
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.yielded;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Loader {}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel first makes a worker blocked in `send` return at once.
        self.rx = None;
        if let Some(worker) = self.worker.take() {
            // A worker panic was either already re-raised by `next` or is moot now; raising it
            // from drop could abort during unwinding.
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::augment::normalize_batch;
    use std::time::{Duration, Instant};

    /// Sample i has label i, so targets identify samples, and an image that differs per sample.
    fn toy(n: i64) -> Dataset {
        let base = Tensor::arange(3 * 8 * 8, (tch::Kind::Int64, Device::Cpu)).view([1, 3, 8, 8]);
        let offs = Tensor::arange(n, (tch::Kind::Int64, Device::Cpu)).view([n, 1, 1, 1]);
        let images = (base + offs * 7).remainder(256).to_kind(tch::Kind::Uint8);
        let labels = Tensor::arange(n, (tch::Kind::Int64, Device::Cpu));
        Dataset::new(images, labels, n).unwrap()
    }

    fn opts(batch_size: usize, epoch: usize) -> LoaderOptions {
        LoaderOptions {
            batch_size,
            shuffle: true,
            augment: true,
            drop_last: false,
            seed: 42,
            epoch,
            device: Device::Cpu,
            normalize: Normalize {
                mean: vec![0.5, 0.4, 0.3],
                std: vec![0.2, 0.25, 0.3],
            },
        }
    }

    fn cat_inputs(batches: &[Batch]) -> Tensor {
        Tensor::cat(&batches.iter().map(|b| &b.inputs).collect::<Vec<_>>(), 0)
    }

    fn cat_targets(batches: &[Batch]) -> Vec<i64> {
        let t = Tensor::cat(&batches.iter().map(|b| &b.targets).collect::<Vec<_>>(), 0);
        Vec::<i64>::try_from(&t).unwrap()
    }

    #[test]
    fn data_loader_batch_counts() {
        assert_eq!(Loader::batches_per_epoch(10, 3, false), 4);
        assert_eq!(Loader::batches_per_epoch(10, 3, true), 3);
        assert_eq!(Loader::batches_per_epoch(9, 3, true), 3);
        assert_eq!(Loader::batches_per_epoch(0, 3, false), 0);
        assert_eq!(Loader::batches_per_epoch(2, 3, true), 0);
        let ds = toy(10);
        let sizes: Vec<i64> = Loader::new(&ds, opts(3, 0))
            .map(|b| b.inputs.size()[0])
            .collect();
        assert_eq!(sizes, vec![3, 3, 3, 1]);
        let loader = Loader::new(
            &ds,
            LoaderOptions {
                drop_last: true,
                ..opts(3, 0)
            },
        );
        assert_eq!(loader.len(), 3);
        let batches: Vec<Batch> = loader.collect();
        assert_eq!(batches.len(), 3);
        assert!(batches.iter().all(|b| b.inputs.size() == [3, 3, 8, 8]));
    }

    #[test]
    fn data_loader_without_augmentation_is_normalised_images_in_order() {
        let ds = toy(10);
        let o = LoaderOptions {
            shuffle: false,
            augment: false,
            ..opts(4, 0)
        };
        let batches: Vec<Batch> = Loader::new(&ds, o.clone()).collect();
        let inputs = cat_inputs(&batches);
        assert_eq!(cat_targets(&batches), (0..10).collect::<Vec<_>>());
        assert_eq!(inputs.kind(), tch::Kind::Float);
        let mean = Tensor::from_slice(&o.normalize.mean).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&o.normalize.std).view([1, 3, 1, 1]);
        let expected = (ds.images.to_kind(tch::Kind::Float) / 255.0 - mean) / std;
        assert!(inputs.allclose(&expected, 1e-6, 1e-6, false));
        assert!(inputs.equal(&normalize_batch(&ds.images, &o.normalize, Device::Cpu)));
    }

    #[test]
    fn data_loader_covers_every_sample_once_and_is_deterministic() {
        let ds = toy(37);
        let run = |epoch| Loader::new(&ds, opts(5, epoch)).collect::<Vec<Batch>>();
        let (a, b, c) = (run(0), run(0), run(1));
        assert_eq!(a.len(), 8);
        let order = cat_targets(&a);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..37).collect::<Vec<_>>());
        assert_ne!(order, sorted, "shuffled");
        // Same (seed, epoch): the same batches, bit for bit, augmentation included.
        assert_eq!(order, cat_targets(&b));
        assert!(cat_inputs(&a).equal(&cat_inputs(&b)));
        // Another epoch: another order.
        assert_ne!(order, cat_targets(&c));
        // Another seed: another order.
        let d: Vec<Batch> = Loader::new(
            &ds,
            LoaderOptions {
                seed: 43,
                ..opts(5, 0)
            },
        )
        .collect();
        assert_ne!(order, cat_targets(&d));
        // Augmentation changes images, and only by crop and flip: with it off, the same order
        // gives the plain normalised images.
        let plain: Vec<Batch> = Loader::new(
            &ds,
            LoaderOptions {
                augment: false,
                ..opts(5, 0)
            },
        )
        .collect();
        assert_eq!(cat_targets(&plain), order);
        let idx = Tensor::from_slice(&order);
        let all = normalize_batch(&ds.images, &opts(5, 0).normalize, Device::Cpu);
        assert!(cat_inputs(&plain).equal(&all.index_select(0, &idx)));
        assert!(!cat_inputs(&a).equal(&cat_inputs(&plain)));
    }

    #[test]
    fn shards_of_the_ranks_put_back_together_are_the_one_process_batches() {
        // 37 images in batches of 5: the last batch has 2 rows, fewer than the 3 ranks.
        let ds = toy(37);
        let whole: Vec<Batch> = Loader::new(&ds, opts(5, 2)).collect();
        let world = 3;
        let rows: Vec<Vec<Batch>> = (0..world)
            .map(|rank| Loader::sharded(&ds, opts(5, 2), Shard::Rows { rank, world }).collect())
            .collect();
        for (b, batch) in whole.iter().enumerate() {
            let parts: Vec<&Batch> = rows.iter().map(|r| &r[b]).collect();
            let sizes: Vec<i64> = parts.iter().map(|p| p.targets.size()[0]).collect();
            let expected = if b == 7 { vec![1, 1, 0] } else { vec![2, 2, 1] };
            assert_eq!(sizes, expected, "batch {b}");
            let targets = Tensor::cat(&parts.iter().map(|p| &p.targets).collect::<Vec<_>>(), 0);
            let inputs = Tensor::cat(&parts.iter().map(|p| &p.inputs).collect::<Vec<_>>(), 0);
            assert!(targets.equal(&batch.targets), "batch {b}");
            assert!(inputs.equal(&batch.inputs), "batch {b}: same draws");
        }
        // Evaluation: whole batches dealt round-robin.
        for rank in 0..world {
            let mine: Vec<Batch> =
                Loader::sharded(&ds, opts(5, 2), Shard::Batches { rank, world }).collect();
            let expected: Vec<&Batch> = whole.iter().skip(rank).step_by(world).collect();
            assert_eq!(mine.len(), expected.len());
            for (m, e) in mine.iter().zip(expected) {
                assert!(m.inputs.equal(&e.inputs) && m.targets.equal(&e.targets));
            }
        }
    }

    #[test]
    fn data_loader_device_batches_equal_host_batches() {
        // The accelerator path, run on the CPU: the same draws must give the same bits.
        let ds = toy(21);
        let tables = opts(4, 0).normalize.lookup_tables(3);
        let mut rng = Rng::derive(5, &[AUGMENT_STREAM]);
        let chunk: Vec<i64> = vec![20, 3, 7, 7, 0, 11, 15, 2];
        let draws: Vec<Draw> = chunk.iter().map(|_| Draw::new(&mut rng, true)).collect();
        assert!(draws.iter().any(|d| d.flip) && draws.iter().any(|d| !d.flip));
        assert!(draws.iter().any(|d| (d.dy, d.dx) != (PAD, PAD)));
        let host =
            host_batch(&ds, &ds.label_vec(), &chunk, &draws, [3, 8, 8], &tables).into_batch();
        let device = DeviceData::new(&ds, &tables, Device::Cpu).batch(&chunk, &draws);
        assert_eq!(Vec::<i64>::try_from(&host.targets).unwrap(), chunk);
        assert!(device.targets.equal(&host.targets));
        assert!(device.inputs.equal(&host.inputs));
    }

    #[test]
    fn data_loader_on_cuda_gives_the_cpu_batches() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let ds = toy(37);
        let cpu: Vec<Batch> = Loader::new(&ds, opts(5, 1)).collect();
        let cuda: Vec<Batch> = Loader::new(
            &ds,
            LoaderOptions {
                device: Device::Cuda(0),
                ..opts(5, 1)
            },
        )
        .collect();
        assert_eq!(cuda[0].inputs.device(), Device::Cuda(0));
        assert_eq!(cuda[0].targets.device(), Device::Cuda(0));
        let to_cpu = |b: &[Batch]| -> Vec<Batch> {
            b.iter()
                .map(|b| Batch {
                    inputs: b.inputs.to_device(Device::Cpu),
                    targets: b.targets.to_device(Device::Cpu),
                })
                .collect()
        };
        let cuda = to_cpu(&cuda);
        assert_eq!(cat_targets(&cuda), cat_targets(&cpu));
        assert!(cat_inputs(&cuda).equal(&cat_inputs(&cpu)));
    }

    /// A libtorch operation on the worker thread would give it an OpenMP team whose threads
    /// live as long as it does, and the training step's threads stop spin-waiting once OpenMP
    /// counts more threads than cores (see [`Prepared::Host`]). A thread starts with its
    /// creator's name, so such a team shows up as a second thread under the worker's name.
    #[cfg(target_os = "linux")]
    #[test]
    fn data_loader_worker_starts_no_openmp_team() {
        if tch::get_num_threads() < 2 {
            tch::set_num_threads(2);
        }
        // Batches of 16 images of 3×32×32: past the 32,768 values at which libtorch goes
        // parallel. An epoch number no other test uses names this worker alone.
        let n = 160;
        let images = Tensor::arange(n * 3 * 32 * 32, (tch::Kind::Int64, Device::Cpu))
            .remainder(256)
            .to_kind(tch::Kind::Uint8)
            .view([n, 3, 32, 32]);
        let ds = Dataset::new(
            images,
            Tensor::arange(n, (tch::Kind::Int64, Device::Cpu)),
            n,
        )
        .unwrap();
        let epoch = 424_242;
        let mut loader = Loader::new(&ds, opts(16, epoch));
        let first = loader.next().unwrap();
        assert_eq!(first.inputs.size(), [16, 3, 32, 32]);
        // The worker is alive, blocked on handing over batch 5 of 10.
        let name = format!("loader-e{epoch}");
        let named: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|comm| comm.trim_end().to_string())
            .filter(|comm| *comm == name)
            .collect();
        assert_eq!(named.len(), 1, "threads named {name}: {named:?}");
    }

    #[test]
    fn data_loader_dropped_early_does_not_hang() {
        let ds = toy(200);
        let started = Instant::now();
        for epoch in 0..5 {
            let mut loader = Loader::new(&ds, opts(1, epoch));
            let _first = loader.next().unwrap();
            // Let the worker fill the channel and block in send.
            std::thread::sleep(Duration::from_millis(20));
            drop(loader);
            // Dropped before the first batch, too.
            drop(Loader::new(&ds, opts(1, epoch)));
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn data_loader_counts_waits() {
        let ds = toy(64);
        // Callers holding an `Arc<Dataset>` can pass it as it is.
        let shared: std::sync::Arc<Dataset> = std::sync::Arc::from(ds);
        let mut loader = Loader::new(shared.clone(), opts(8, 0));
        let mut n = 0;
        for _batch in loader.by_ref() {
            n += 1;
            // A slow consumer: the worker stays ahead, so later batches are ready.
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!((n, loader.yielded()), (8, 8));
        assert!(loader.waits() < n / 2, "waits {}", loader.waits());
        assert!(loader.next().is_none());
    }
}
