//! The `trellis` subcommands, one module each: what `main.rs` dispatches to. Each drives the
//! library (the loop in [`crate::train`], pruning in [`crate::prune`], the plugin host) and owns
//! only its command's options and output.
pub mod esd;
pub mod info;
pub mod launch;
pub mod plugin_new;
pub mod plugins;
pub mod prune;
pub mod report;
pub mod run;
pub mod sweep;
