//! ember's benchmark harness. The runtime emits events; this crate owns the
//! clocks that turn into figures. So far: the llama-bench-compatible mode.

pub mod llamabench;
pub mod record;
