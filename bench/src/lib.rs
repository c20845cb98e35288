//! ember's benchmark harness. The runtime emits events; this crate owns the
//! clocks that turn into figures. So far: the llama-bench-compatible mode.

pub mod llamabench;
pub mod record;
pub mod store;
pub mod compare;
pub mod report;
pub mod export;
pub mod harness;
pub mod load;
pub mod metrics;
pub mod slo;
pub mod table;
pub mod workload;
pub mod provenance;
pub mod profile;
pub mod selftest;
