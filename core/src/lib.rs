//! Trellis: a training core whose methods are plugins.
//!
//! - [`config`]: the run config and its errors; [`schedule`]: the global learning rate.
//! - [`data`]: datasets and the batch pipeline; [`models`]: the model zoo.
//! - [`plugin_host`]: loading plugins and creating components; [`services`]: what components
//!   can ask the host for.
//! - [`train`]: the loop; [`prune`]: masks and their enforcement; [`checkpoint`]: saving and
//!   resuming; [`report`]: logs and tables.
//! - [`distributed`]: data-parallel ranks and what they do together.
//! - [`esd`]: the per-layer spectral diagnostics `trellis esd` prints.
//! - [`commands`]: one module per `trellis` subcommand, driving the above.
pub mod best;
pub mod checkpoint;
pub mod commands;
pub mod compare;
pub mod config;
pub mod data;
pub mod distributed;
pub mod esd;
pub mod layers;
pub mod models;
pub mod plugin_host;
pub mod prune;
pub mod report;
pub mod run_dir;
pub mod schedule;
pub mod services;
pub mod sinks;
pub mod source;
pub mod sweep;
pub mod train;
pub mod train_log;

/// jemalloc serves every allocation in the process, libtorch's too (it is linked with unprefixed
/// `malloc`/`free`, which take precedence over glibc's). glibc gives blocks over 32 MB back to the
/// kernel when they are freed, so a full-width ResNet18 step faulted its ~2 GB of activations in
/// again (~500k page faults, each a zeroed page) every step; jemalloc, configured in
/// .cargo/config.toml (`JEMALLOC_SYS_WITH_MALLOC_CONF`), keeps freed pages for reuse.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
