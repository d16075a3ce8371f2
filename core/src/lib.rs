//! Trellis: a training core whose methods are plugins.
pub mod data;
pub mod models;
pub mod plugin_host;
pub mod source;
