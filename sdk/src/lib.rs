//! # trellis-sdk: write a Trellis plugin
//!
//! A plugin is a `cdylib` crate that implements one or more *components* (an optimizer, a
//! schedule, a pruner, a distiller, a metric) and exports them with one macro line. The
//! `trellis` host loads it from a TOML manifest, checks it was built against the same ABI,
//! tch and libtorch, and creates components by name from the run config:
//!
//! ```toml
//! [optimizer]
//! use = "lion"        # the component's name
//! beta1 = 0.9         # everything else is the component's own configuration
//! ```
//!
//! ## A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "my-plugin"
//! version = "0.1.0"
//! edition = "2021"          # abi_stable's macros do not support 2024
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! trellis-sdk = "0.1"
//! abi_stable = "0.11"       # the export macro expands to abi_stable paths
//! tch = "=0.24.0"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`: a metric that counts evaluation samples whose top-1 prediction is class 0.
//!
//! ```no_run
//! use tch::Tensor;
//! use trellis_sdk::{Batch, Component, EpochInfo, Host, Metric, MetricValues, Outputs, Plugin, Result};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! #[serde(deny_unknown_fields, default)]
//! pub struct Config {
//!     class: i64,
//! }
//!
//! impl Default for Config {
//!     fn default() -> Self {
//!         Config { class: 0 }
//!     }
//! }
//!
//! pub struct PredictedShare {
//!     class: i64,
//!     hits: i64,
//!     seen: i64,
//! }
//!
//! impl Component for PredictedShare {
//!     const NAME: &'static str = "predicted_share";
//!     const DESCRIPTION: &'static str = "fraction of evaluation images predicted as one class";
//!     type Config = Config;
//!     fn new(config: Config, _host: Host) -> Result<Self> {
//!         Ok(PredictedShare { class: config.class, hits: 0, seen: 0 })
//!     }
//! }
//!
//! impl Metric for PredictedShare {
//!     fn reset(&mut self) -> Result<()> {
//!         (self.hits, self.seen) = (0, 0);
//!         Ok(())
//!     }
//!     fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
//!         let predicted: Tensor = outputs.logits.argmax(-1, false);
//!         self.hits += predicted.eq(self.class).sum(tch::Kind::Int64).int64_value(&[]);
//!         self.seen += batch.targets.size()[0];
//!         Ok(())
//!     }
//!     fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
//!         let share = self.hits as f64 / self.seen.max(1) as f64;
//!         Ok(MetricValues { scalars: vec![("predicted_share".into(), share)], ..Default::default() })
//!     }
//! }
//!
//! trellis_sdk::export_plugin!(
//!     Plugin::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"), "My first plugin")
//!         .metric::<PredictedShare>()
//! );
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release`, list it in a manifest and name it in a run config:
//!
//! ```toml
//! # plugins.toml
//! [[plugin]]
//! name = "my-plugin"
//! path = "target/release/libmy_plugin.so"
//!
//! # run.toml
//! plugins = "plugins.toml"
//! [[metrics]]
//! use = "predicted_share"
//! class = 3
//! ```
//!
//! ## Rules of the boundary
//! - Tensors are tch tensors on both sides; they cross as handles ([`TensorHandle`] owns,
//!   [`TensorRef`] borrows) and share storage, so a parameter handed to a plugin *is* the
//!   model's parameter.
//! - A panic in a component (a tch op on the wrong shape, say) does not abort the process: the
//!   host reports it naming plugin and component, and the run stops cleanly.
//! - `tracing` events emitted in a plugin appear in the host's log with the plugin's name as
//!   target.
//! - Every role can save and restore state ([`State`]) for checkpoints; return everything a
//!   resumed run needs to continue exactly.

pub mod abi;
pub mod adapt;
mod error;
pub mod host;
mod logging;
pub mod plugin;
pub mod roles;
pub mod tensor;
pub mod testing;

pub use abi::{LayerKind, Role};
pub use error::{Error, Result};
pub use host::{Host, HostServices, Model, Normalization};
pub use plugin::{parse_config, Component, Plugin};
pub use roles::*;
pub use tch;
pub use tensor::{TensorHandle, TensorRef};
