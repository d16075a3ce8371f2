//! # trellis-sdk: write a Trellis plugin
//!
//! A plugin is a `cdylib` crate that implements one or more *components* (a model, an
//! optimizer, a scheduler, a pruner, a distiller, a metric, a callback) and exports them with one
//! macro line. The `trellis` host loads it from a TOML manifest, checks it was built against the
//! same ABI, tch and libtorch, and creates components by name from the run config:
//!
//! ```toml
//! [optimizer]
//! use = "lion"        # the component's name
//! beta1 = 0.9         # everything else is the component's own configuration
//! ```
//!
//! A component is a type implementing [`Component`] (its name, description and configuration)
//! and its role's trait, added to the [`Plugin`] with the role's method
//! ([`Plugin::optimizer`], [`Plugin::model`], ...). `trellis plugin new NAME --role ROLE`
//! scaffolds such a crate for one role.
//!
//! ## Roles
//!
//! - **model**: [`Architecture`], `[model] use = "name"`. Built first, before every other
//!   component; `forward` on every training and test batch. The host saves its weights.
//! - **optimizer**: [`Optimizer`], `[optimizer] use = "name"` (required). Gets its
//!   [`ParamGroup`]s once before training and the learning rates whenever they change; `step`
//!   after every backward pass.
//! - **scheduler**: [`Scheduler`], `[scheduler] use = "name"`. Names its parameter groups once,
//!   then sets their learning rates at every epoch start and before each later step.
//! - **pruner**: [`Pruner`], `[pruner] use = "name"`. `prune` once, before training step
//!   `[pruner] at_step`; the host keeps the masks it returns in force for the rest of the run.
//! - **distiller**: [`Distiller`], `[[distillers]]`. `loss` on every training step; its terms
//!   are added to the loss.
//! - **metric**: [`Metric`], `[[metrics]]`. At every evaluation (every `[train] eval_every`
//!   epochs and after the last): `reset`, `update` per test batch, `compute`.
//! - **callback**: [`Callback`], `[[callbacks]]`, called in config order. On the events its
//!   [`Events`] set names: batch start, after loss, after backward, the optimizer step (which it
//!   may take over through [`StepControl`]), after step, epoch end and around evaluation.
//!
//! Every component receives a [`Host`] in [`Component::new`]: the run's model, facts about the
//! data and device, training batches of its own, models built from a spec.
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
//! ## Testing a component
//!
//! [`testing`] runs a component without the `trellis` binary: [`testing::FakeHost`] answers
//! every host service from values the test sets (classes, input shape, device, seed, batches,
//! learning rates, a model builder), [`testing::TinyNet`] is a small network with Conv2d,
//! BatchNorm and Linear layers, and [`testing::random_batch`] makes a batch. Create the component
//! with [`Component::new`] and a config (`Config::default()`, or [`parse_config`] on TOML text to
//! test that a bad key is refused with [`ErrorKind::Config`]), pass it `fake.host()`, and call
//! its role's methods as the host would; plain `#[test]`s under `cargo test` do it.
//!
//! ## Rules of the boundary
//! - Tensors are tch tensors on both sides; they cross as shallow handles that share storage,
//!   so a parameter handed to a plugin *is* the model's parameter, and a tensor a plugin returns
//!   is used as is, not copied.
//! - A panic in a component (a tch op on the wrong shape, say) does not abort the process: the
//!   host reports it naming plugin and component, and the run stops cleanly. So does an
//!   [`Error`] returned from any method.
//! - `tracing` events emitted in a plugin appear in the host's log with the plugin's name as
//!   target.
//! - Optimizers, schedulers, distillers and callbacks save and restore [`State`] for checkpoints;
//!   return everything a resumed run needs to continue exactly. The host itself saves the model,
//!   the pruning masks and distillers' trainable parameters; metrics and pruners keep no state.

#![warn(missing_docs)]

#[doc(hidden)]
pub mod abi;
#[doc(hidden)]
pub mod adapt;
mod error;
pub mod host;
mod logging;
pub mod plugin;
pub mod roles;
#[doc(hidden)]
pub mod tensor;
pub mod testing;

// Inlined, so the front page lists every item a plugin author uses.
#[doc(inline)]
pub use abi::{Boundary, ErrorKind, LayerKind, Role, SchedulePoint, Scope};
pub use error::{Error, Result};
#[doc(inline)]
pub use host::{Host, HostServices, Model, Normalization};
#[doc(inline)]
pub use plugin::{parse_config, Component, Plugin};
#[doc(inline)]
pub use roles::*;
/// The tch this SDK is built with (pinned to the host's): name tensor types through it, or pin
/// the same version in the plugin's `Cargo.toml`.
pub use tch;
#[doc(hidden)]
pub use tensor::{TensorHandle, TensorRef};
