//! `phi3`: Phi-3 / Phi-3.5 / Phi-4-mini. Llama's decoder with q|k|v in one `attn_qkv` matrix and
//! gate|up in one `ffn_up` (gate rows first), NEOX RoPE, and LongRoPE where the file has
//! `rope_factors_long`/`rope_factors_short` (the long ones when the context exceeds
//! `rope.scaling.original_context_length`, as llama.cpp chooses). The fused matrices are bound
//! as row ranges of the mapping, so the executors see ordinary q, k, v, gate and up weights.
//! A `phi3.attention.sliding_window` is ignored with a warning, as llama.cpp ignores it.

use std::sync::Arc;

use ember_runtime::gguf::GgufFile;
use ember_runtime::model::ModelError;
use ember_runtime::ops::RopeStyle;

use crate::transformer::{ArchSpec, Transformer};

pub const ARCH: &str = "phi3";

pub const SPEC: ArchSpec = ArchSpec {
    ignore_sliding_window: true,
    ..ArchSpec::base(ARCH, RopeStyle::Neox, 10_000.0)
};

pub fn load(file: Arc<GgufFile>) -> Result<Transformer, ModelError> {
    Transformer::load(file, &SPEC)
}
