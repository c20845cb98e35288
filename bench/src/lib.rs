//! ember's benchmark harness. The runtime emits events; this crate owns the
//! clocks that turn into figures: workloads and loads driven through the engine
//! (`harness`), the llama-bench-compatible mode, the metrics, the SQLite results
//! store and what reads it (compare, report, export), and the self-test.

pub mod compare;
pub mod export;
pub mod harness;
pub mod live;
pub mod llamabench;
pub mod load;
pub mod metrics;
pub mod profile;
pub mod provenance;
pub mod record;
pub mod report;
pub mod selftest;
pub mod slo;
pub mod store;
pub mod table;
pub mod workload;
