//! ember runtime: GGUF on mmap, quantized kernels, tokenizer, KV cache,
//! sampling and the engine loop. The runtime emits timestamped events and
//! never prints; measuring is the bench crate's job.
//!
//! What lives where:
//!
//! - Files and numbers: [`gguf`] (the mmap reader, writer, typed keys), [`quant`] (one
//!   descriptor per block format, reference dequantizers, the SIMD kernels per ISA, the
//!   GPU repack), `backend` (the quantized matmul as a burn backend extension; CubeCL
//!   kernels), [`ops`] (rmsnorm, RoPE, attention on host buffers) and `tensor_ops` (the same
//!   as burn tensor code), [`accel`] (`--backend`, adapters), [`opcheck`] (the one table of
//!   op checks: inputs, f64 reference, host and device runs, budgets).
//! - Text: [`tokenizer`] (llama.cpp's BPE and SPM), [`chat`] (GGUF chat templates).
//! - State: [`kv`] (the paged cache: block manager apart from host/device storage),
//!   [`model`] (the `Model` trait the architectures in `ember-models` implement),
//!   [`sample`].
//! - Serving, from the outside in: [`serve`] is the interface (`Server`, `ServeRequest`,
//!   `ServeEvent`, `ServerStats`); [`scheduler`] is its one implementation (continuous
//!   batching over the paged KV cache; `Scheduler::sequential`/`SequentialServer` is the same
//!   loop with one running sequence on a cache of its own); [`request`] is one request's
//!   state machine (validation, sampling, stop strings, logprobs, its end), used for every
//!   request; [`spec`] is speculative decoding (prompt lookup, a draft model) that the
//!   scheduler verifies; [`engine`] holds the model, tokenizer and thread pool, and `Engine::generate`
//!   runs one request on a sequential scheduler.
//! - [`embedded`]: the tiny built-in model; [`sys`]: memory and CPU facts.
pub mod accel;
#[cfg(feature = "burn")]
pub mod backend;
pub mod chat;
pub mod embedded;
pub mod engine;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod opcheck;
pub mod ops;
pub mod quant;
pub mod request;
pub mod sample;
pub mod scheduler;
pub mod serve;
pub mod spec;
pub mod sys;
#[cfg(feature = "burn")]
pub mod tensor_ops;
pub mod tokenizer;
