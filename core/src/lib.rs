//! Trellis: a training core whose methods are plugins.
//!
//! - [`config`]: the run config and its errors; [`schedule`]: the global learning rate.
//! - [`data`]: datasets and the batch pipeline; [`models`]: the model zoo.
//! - [`plugin_host`]: loading plugins and creating components; [`services`]: what components
//!   can ask the host for.
//! - [`train`]: the loop; [`checkpoint`]: saving and resuming; [`report`]: logs and tables.
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod models;
pub mod plugin_host;
pub mod report;
pub mod schedule;
pub mod services;
pub mod source;
pub mod train;
