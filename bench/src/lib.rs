//! ember's benchmark harness. The runtime emits events; this crate owns the
//! clocks that turn into figures.
//!
//! - Running: [`session`] takes an engine and a typed plan (workload source, load mode, SLO,
//!   server) and returns the figures, storing the run as it goes; it drives [`harness`] (one
//!   thread feeding a `Server` under a [`load`], turning its events into records, sampling
//!   memory; progress and each finished record go to the caller through `harness::Hooks`)
//!   over a [`workload`], and [`live`] commits each request to the store as it finishes.
//!   [`llamabench`] is the llama-bench-compatible pp/tg mode; [`remote`] is the harness's
//!   server over HTTP (`ember bench --url`: any OpenAI-compatible endpoint).
//! - Figures: [`metrics`] (TTFT, ITL, TPOT, percentiles, goodput), [`slo`] verdicts,
//!   [`record`] (what a run is), [`table`] (the terminal table), [`provenance`] and device
//!   [`profile`]s.
//! - The SQLite results [`store`] and what reads it: [`compare`], [`report`], [`export`].
//! - [`eval`]: quality from logits (perplexity, KL divergence against a base model).
//! - [`selftest`]: is this device healthy, and what can it do.

pub mod compare;
pub mod eval;
pub mod export;
pub mod harness;
pub mod live;
pub mod llamabench;
pub mod load;
pub mod metrics;
pub mod power;
pub mod profile;
pub mod provenance;
pub mod record;
pub mod remote;
pub mod report;
pub mod score;
pub mod selftest;
pub mod session;
pub mod slo;
pub mod store;
pub mod table;
pub mod workload;
