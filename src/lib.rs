//! The `tidemark` binary's composition: wires the library crates into the
//! single-process deployment (`run`, `demo`), the scale-out services
//! (`ingest`, `process`, `serve` from `tidemark-services`, feature `kafka`), the traffic generator and the
//! benchmarks. Logic lives in the crates; this only assembles them.

pub mod args;
pub mod cli;
#[cfg(feature = "kafka")]
pub mod config_file;
pub mod promote;
