//! `gemma3`: Gemma 3 (text). Embeddings scaled by √n_embd; RMSNorm before and after both
//! attention and FFN (the GGUF converter folded Gemma's `1 + w` into the weights); per-head
//! RMSNorm of q and k; GeGLU with GELU's tanh approximation; five sliding-window (local) layers
//! for every global one, the local ones with their own RoPE base (10 000 unless the file says);
//! NEOX RoPE; the output head tied to the embeddings.

use std::sync::Arc;

use ember_runtime::gguf::GgufFile;
use ember_runtime::model::{FfnAct, ModelError};
use ember_runtime::ops::RopeStyle;

use crate::transformer::{ArchSpec, SwaSpec, Transformer};

pub const ARCH: &str = "gemma3";

pub const SPEC: ArchSpec = ArchSpec {
    qk_norm: true,
    post_norms: true,
    ffn_act: FfnAct::GeluTanh,
    scale_embeddings: true,
    swa: Some(SwaSpec {
        default_pattern: 6,
        swa_rope_base: 10_000.0,
    }),
    ..ArchSpec::base(ARCH, RopeStyle::Neox, 1_000_000.0)
};

pub fn load(file: Arc<GgufFile>) -> Result<Transformer, ModelError> {
    Transformer::load(file, &SPEC)
}
