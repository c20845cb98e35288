//! `llama`: Llama 1/2/3, SmolLM2, TinyLlama, Mistral.
//! RMSNorm, GQA, SwiGLU, RoPE on adjacent pairs (GGUF's converter permuted
//! Q/K for that), no biases, output head optionally tied to the embeddings.

use std::sync::Arc;

use ember_runtime::gguf::GgufFile;
use ember_runtime::model::ModelError;
use ember_runtime::ops::RopeStyle;

use crate::transformer::{ArchSpec, Transformer};

pub const ARCH: &str = "llama";

pub const SPEC: ArchSpec = ArchSpec::base(ARCH, RopeStyle::Normal, 10_000.0);

pub fn load(file: Arc<GgufFile>) -> Result<Transformer, ModelError> {
    Transformer::load(file, &SPEC)
}
