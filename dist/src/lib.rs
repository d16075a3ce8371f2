//! torch.distributed's c10d from Rust: the engine PyTorch's DistributedDataParallel runs on.
//!
//! A [`Store`] is the rendezvous (c10d's TCPStore: rank 0 serves it, the others connect), a
//! [`ProcessGroup`] the communicator made from it (ProcessGroupGloo on CPU, ProcessGroupNCCL on
//! GPU), and its collectives work in place on tch tensors. Everything the C++ side throws (a
//! timeout, a dead peer, a tensor it refuses) comes back as an [`Error`]; nothing aborts.
//!
//! Every rank must issue the same collectives in the same order, as with torch.distributed.
//!
//! ```no_run
//! # fn main() -> Result<(), trellis_dist::Error> {
//! use std::time::Duration;
//! use trellis_dist::{Op, ProcessGroup, Store};
//! let (rank, world_size) = (0, 2);
//! let timeout = Duration::from_secs(30);
//! let store = Store::tcp("127.0.0.1", 29500, world_size, rank == 0, timeout)?;
//! let group = ProcessGroup::gloo(&store, rank, world_size, timeout)?;
//! let mut gradient = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu));
//! group.all_reduce(&mut gradient, Op::Mean)?;
//! # Ok(()) }
//! ```

mod ffi;

use std::fmt;
use std::time::Duration;

use tch::{Kind, Tensor};

/// A failed rendezvous or collective: what was being done, by which rank, and c10d's message.
#[derive(Debug, Clone)]
pub struct Error {
    context: String,
    message: String,
}

impl Error {
    fn new(context: impl Into<String>, message: impl Into<String>) -> Error {
        Error {
            context: context.into(),
            message: message.into(),
        }
    }

    fn from_cpp(context: impl Into<String>, raw: &str) -> Error {
        Error::new(context, trim_cpp_message(raw))
    }

    /// The C++ (or validation) message alone, without the context.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// c10d's messages carry what a reader of a training log does not need: Gloo prefixes its
/// source location (`[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:590] Read error`),
/// c10 appends where it was raised (`Exception raised from ... (most recent call first):`) and
/// the frames after it. What is left is the sentence, on one line.
fn trim_cpp_message(raw: &str) -> String {
    let mut words = Vec::new();
    for line in raw.lines() {
        let line = line.trim();
        if line.starts_with("Exception raised from") || line.starts_with("frame #") {
            break;
        }
        let mut rest = line;
        // Source locations may come first, once per layer that re-raised the message.
        while let Some(after) = strip_source_location(rest) {
            rest = after;
        }
        words.extend(rest.split_whitespace());
    }
    let message = words.join(" ");
    if message.is_empty() {
        "unknown error (c10d gave no message)".to_string()
    } else {
        message
    }
}

/// `[path/file.cc:123] rest` -> `rest`; `None` when `text` does not start with such a location.
fn strip_source_location(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('[')?;
    let end = inner.find(']')?;
    let (file, line) = inner[..end].rsplit_once(':')?;
    let is_source = [".cc", ".cpp", ".cu", ".h", ".hpp"]
        .iter()
        .any(|extension| file.ends_with(extension));
    (is_source && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()))
        .then(|| inner[end + 1..].trim_start())
}

/// The reduction of [`ProcessGroup::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Sum,
    /// The sum divided by the world size: what data-parallel training does to gradients.
    Mean,
}

/// Which c10d backend a [`ProcessGroup`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Gloo,
    Nccl,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Gloo => "gloo",
            BackendKind::Nccl => "nccl",
        })
    }
}

/// Whether this build has ProcessGroupNCCL compiled in (a CUDA libtorch and its headers were
/// found when it was built). [`ProcessGroup::nccl`] also needs a GPU at run time.
pub fn nccl_compiled() -> bool {
    ffi::has_nccl()
}

/// The rendezvous: c10d's TCPStore. Rank 0 (`is_master`) listens on `host:port`; every rank,
/// rank 0 included, connects to it. Creating it waits until all `world_size` ranks have
/// connected, or fails after `timeout`.
pub struct Store {
    handle: ffi::StoreHandle,
}

impl Store {
    pub fn tcp(
        host: &str,
        port: u16,
        world_size: usize,
        is_master: bool,
        timeout: Duration,
    ) -> Result<Store> {
        let context = format!(
            "TCPStore rendezvous at {host}:{port} ({} of {world_size} ranks)",
            if is_master { "serving" } else { "joining" }
        );
        let world = world_size_i32(world_size).map_err(|e| Error::new(&context, e))?;
        let handle = ffi::StoreHandle::tcp(host, port, world, is_master, timeout)
            .map_err(|raw| Error::from_cpp(&context, &raw))?;
        Ok(Store { handle })
    }
}

fn world_size_i32(world_size: usize) -> std::result::Result<i32, String> {
    match i32::try_from(world_size) {
        Ok(size) if size >= 1 => Ok(size),
        _ => Err(format!("world size {world_size} is not between 1 and 2^31")),
    }
}

/// One communicator over the ranks that met at a [`Store`]. Groups made from one store get key
/// prefixes of their own (the n-th group made on a rank shares the n-th prefix on every rank),
/// so a store may serve several groups if every rank makes them in the same order.
///
/// Not `Sync`: collectives must be issued in the same order on every rank, which one thread per
/// group guarantees.
pub struct ProcessGroup {
    handle: ffi::GroupHandle,
    rank: usize,
    world_size: usize,
    backend: BackendKind,
}

impl ProcessGroup {
    /// A ProcessGroupGloo, for CPU tensors. Its devices are picked as torch.distributed picks
    /// them: the interfaces in `GLOO_SOCKET_IFNAME` (comma-separated), else this host's address
    /// (loopback when the hostname does not resolve). A collective that cannot finish within
    /// `timeout` (a peer that died or stopped taking part) fails with an error.
    pub fn gloo(
        store: &Store,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        ProcessGroup::new(BackendKind::Gloo, store, rank, world_size, timeout)
    }

    /// A ProcessGroupNCCL, for CUDA tensors; each rank's tensors must be on its own device
    /// (conventionally `cuda:LOCAL_RANK`). Fails with an error when this build has no NCCL or
    /// when no GPU is visible. Timeouts are raised to the waiting call (the shim sets
    /// `TORCH_NCCL_BLOCKING_WAIT=1` unless the environment already sets it) rather than left to
    /// NCCL's watchdog, which would end the process.
    pub fn nccl(
        store: &Store,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        ProcessGroup::new(BackendKind::Nccl, store, rank, world_size, timeout)
    }

    fn new(
        backend: BackendKind,
        store: &Store,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        let context = format!("creating the {backend} process group (rank {rank} of {world_size})");
        let world = world_size_i32(world_size).map_err(|e| Error::new(&context, e))?;
        if rank >= world_size {
            return Err(Error::new(
                &context,
                format!("rank {rank} is not below the world size {world_size}"),
            ));
        }
        let raw_backend = match backend {
            BackendKind::Gloo => ffi::Backend::Gloo,
            BackendKind::Nccl => ffi::Backend::Nccl,
        };
        // `rank < world_size <= i32::MAX`, so the cast is exact.
        let handle = ffi::GroupHandle::new(raw_backend, &store.handle, rank as i32, world, timeout)
            .map_err(|raw| Error::from_cpp(&context, &raw))?;
        Ok(ProcessGroup {
            handle,
            rank,
            world_size,
            backend,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    fn context(&self, what: &str, tensor: Option<&Tensor>) -> String {
        let of = tensor.map_or(String::new(), |t| {
            format!(
                " of a {:?} {:?} tensor on {:?}",
                t.kind(),
                t.size(),
                t.device()
            )
        });
        format!(
            "{what}{of} on rank {} of {} ({})",
            self.rank, self.world_size, self.backend
        )
    }

    /// Reduces `tensor` across the ranks, in place: every rank ends with the sum (or the mean).
    /// A mean is of floating-point tensors only, where dividing does not truncate.
    pub fn all_reduce(&self, tensor: &mut Tensor, op: Op) -> Result<()> {
        let context = self.context("all_reduce", Some(tensor));
        let code = match op {
            Op::Sum => 0,
            Op::Mean => {
                let kind = tensor.kind();
                if !matches!(
                    kind,
                    Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half
                ) {
                    return Err(Error::new(
                        context,
                        format!("a mean needs a floating-point tensor, got {kind:?}"),
                    ));
                }
                1
            }
        };
        self.handle
            .all_reduce(tensor, code)
            .map_err(|raw| Error::from_cpp(context, &raw))
    }

    /// Overwrites `tensor` on every rank with rank `root`'s.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let context = self.context(&format!("broadcast from rank {root}"), Some(tensor));
        if root >= self.world_size {
            return Err(Error::new(
                context,
                format!(
                    "root {root} is not below the world size {}",
                    self.world_size
                ),
            ));
        }
        self.handle
            .broadcast(tensor, root as i32)
            .map_err(|raw| Error::from_cpp(context, &raw))
    }

    /// Every rank's `tensor`, in rank order (this rank's own among them, copied).
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let context = self.context("all_gather", Some(tensor));
        let mut outputs: Vec<Tensor> = (0..self.world_size).map(|_| tensor.empty_like()).collect();
        self.handle
            .all_gather(tensor, &mut outputs)
            .map_err(|raw| Error::from_cpp(context, &raw))?;
        Ok(outputs)
    }

    /// Batch normalisation in training mode over the global batch (PyTorch's SyncBatchNorm):
    /// the statistics of every rank's rows together, and a backward pass that all-reduces what
    /// the input gradient needs, so each rank gets its rows of the global batch's gradient.
    /// `input` is `[B, C, ...]`; `running_mean` and `running_var` are updated in place, with
    /// the unbiased variance, as `torch.nn.functional.batch_norm` does. The backward pass is a
    /// collective too: every rank must run it.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        let context = self.context("sync batch norm", Some(input));
        self.handle
            .sync_batch_norm(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                momentum,
                eps,
            )
            .map_err(|raw| Error::from_cpp(context, &raw))
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        self.handle
            .barrier()
            .map_err(|raw| Error::from_cpp(self.context("barrier", None), &raw))
    }
}

#[cfg(test)]
mod tests {
    use super::trim_cpp_message;

    #[test]
    fn trims_gloo_source_locations_and_c10_context() {
        let raw = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:590] Read error \
                   [127.0.0.1]:41234: Connection reset by peer\nException raised from run at \
                   /pytorch/torch/csrc/distributed/c10d/ProcessGroupGloo.cpp:123 (most recent \
                   call first):\nframe #0: c10::Error::Error()";
        assert_eq!(
            trim_cpp_message(raw),
            "Read error [127.0.0.1]:41234: Connection reset by peer"
        );
    }

    #[test]
    fn keeps_brackets_that_are_not_source_locations() {
        assert_eq!(
            trim_cpp_message("[127.0.0.1]:5 closed\n  twice  "),
            "[127.0.0.1]:5 closed twice"
        );
        assert_eq!(trim_cpp_message(""), "unknown error (c10d gave no message)");
    }
}
