//! `qwen3`: Qwen3 (dense). Qwen2's decoder without Q/K/V biases, with a per-head RMSNorm of q
//! and k before RoPE (`attn_q_norm`, `attn_k_norm`); head size from `attention.key_length`.

use std::sync::Arc;

use ember_runtime::gguf::GgufFile;
use ember_runtime::model::ModelError;
use ember_runtime::ops::RopeStyle;

use crate::transformer::{ArchSpec, Transformer};

pub const ARCH: &str = "qwen3";

pub const SPEC: ArchSpec = ArchSpec {
    qk_norm: true,
    ..ArchSpec::base(ARCH, RopeStyle::Neox, 1_000_000.0)
};

pub fn load(file: Arc<GgufFile>) -> Result<Transformer, ModelError> {
    Transformer::load(file, &SPEC)
}
