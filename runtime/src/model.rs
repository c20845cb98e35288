//! What every architecture exposes to the engine: its hyper-parameters and a
//! forward pass over new tokens of one sequence.

use crate::gguf::GgufError;
use crate::kv::{KvCache, KvError};
use crate::ops::RopeStyle;
use crate::quant::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("{path}: unknown architecture '{arch}' (ember supports: {supported})")]
    UnknownArchitecture { path: String, arch: String, supported: String },
    #[error("{path}: tensor '{name}' has shape {dims:?}, expected {expected}")]
    BadShape { path: String, name: String, dims: Vec<u64>, expected: String },
    #[error("{path}: tensor '{name}' uses {ty:?}, which ember cannot compute yet")]
    UnsupportedType { path: String, name: String, ty: GgmlType },
    #[error("{path}: bad hyper-parameter: {what}")]
    BadHparams { path: String, what: String },
    #[error("token id {id} is outside the vocabulary ({n_vocab})")]
    BadToken { id: u32, n_vocab: usize },
}

/// Hyper-parameters, all read from GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx_train: usize,
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    pub n_rot: usize,
    pub rms_eps: f32,
    pub tied_embeddings: bool,
}

impl ModelConfig {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Bytes of f32 K+V per cached position.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.kv_dim() * 4
    }
}

/// Which rows of logits a forward pass should produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only for the last new token (generation).
    Last,
    /// For every new token (echo/logprobs, perplexity).
    All,
    /// None (prefill of a chunk that is not the last).
    None,
}

pub trait Model: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// Bytes of weights this model reads (mapped, not copied).
    fn weight_bytes(&self) -> u64;
    /// A fresh cache able to hold `n_ctx` positions.
    fn new_cache(&self, n_ctx: usize) -> KvCache {
        let c = self.config();
        KvCache::new(c.n_layers, c.kv_dim(), n_ctx)
    }
    /// Process `tokens` at positions `kv.len()..`, append them to `kv`, and write
    /// the wanted logits rows (`n_vocab` each) into `logits` (resized).
    fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        wanted: LogitsWanted,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError>;
}
