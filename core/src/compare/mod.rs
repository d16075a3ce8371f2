//! What `trellis report` computes and draws from finished runs: statistics over seeds, tables in
//! the formats papers use, and figures.

pub mod figures;
pub mod stats;
pub mod table;
