//! `qwen2`: Qwen2 / Qwen2.5 (and -Coder). Like llama, plus biases on Q/K/V,
//! NEOX-style RoPE (rotating halves), and usually an untied output head.

use std::sync::Arc;

use ember_runtime::gguf::GgufFile;
use ember_runtime::model::ModelError;
use ember_runtime::ops::RopeStyle;

use crate::transformer::{ArchSpec, Transformer};

pub const ARCH: &str = "qwen2";

pub const SPEC: ArchSpec = ArchSpec {
    qkv_bias: true,
    ..ArchSpec::base(ARCH, RopeStyle::Neox, 1_000_000.0)
};

pub fn load(file: Arc<GgufFile>) -> Result<Transformer, ModelError> {
    Transformer::load(file, &SPEC)
}
