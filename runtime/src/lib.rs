//! ember runtime: GGUF on mmap, quantized kernels, tokenizer, KV cache,
//! sampling and the engine loop. The runtime emits timestamped events and
//! never prints; measuring is the bench crate's job.
pub mod accel;
#[cfg(feature = "burn")]
pub mod backend;
pub mod chat;
pub mod embedded;
pub mod engine;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod ops;
pub mod quant;
pub mod sample;
pub mod scheduler;
pub mod serve;
pub mod sys;
#[cfg(feature = "burn")]
pub mod tensor_ops;
pub mod tokenizer;
