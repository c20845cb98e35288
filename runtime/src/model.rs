//! What every architecture exposes to the engine: its hyper-parameters and a
//! forward pass over new tokens of one sequence.

use crate::gguf::GgufError;
use crate::kv::{KvCache, KvError, KvLayout, PagedKv, SeqId};
use crate::ops::RopeStyle;
use crate::quant::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("{path}: unknown architecture '{arch}' (ember supports: {supported})")]
    UnknownArchitecture {
        path: String,
        arch: String,
        supported: String,
    },
    #[error("{path}: tensor '{name}' has shape {dims:?}, expected {expected}")]
    BadShape {
        path: String,
        name: String,
        dims: Vec<u64>,
        expected: String,
    },
    #[error("{path}: tensor '{name}' uses {ty:?}, which ember cannot compute yet")]
    UnsupportedType {
        path: String,
        name: String,
        ty: GgmlType,
    },
    #[error("{path}: bad hyper-parameter: {what}")]
    BadHparams { path: String, what: String },
    /// The file asks for something ember does not implement yet, which would change the
    /// results: refused rather than run wrongly.
    #[error(
        "{path}: {what} is not supported yet; ember refuses the file rather than compute wrong logits"
    )]
    Unsupported { path: String, what: String },
    #[error("token id {id} is outside the vocabulary ({n_vocab})")]
    BadToken { id: u32, n_vocab: usize },
    /// The device failed: an upload at load, or reading results back after a forward pass.
    #[error("{path}: device error: {what}")]
    Device { path: String, what: String },
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
    /// The FFN's gate activation.
    pub ffn_act: FfnAct,
    /// Token embeddings are multiplied by this before the first layer (Gemma: √n_embd; else 1).
    pub embd_scale: f32,
    /// The attention's score scale (1/√head_dim but where the architecture says otherwise).
    pub attn_scale: f32,
    /// Sliding-window attention: the window, for the layers marked in `swa_layers`.
    pub sliding_window: Option<usize>,
    /// Per layer: true where the layer attends through the sliding window (empty: none does).
    pub swa_layers: Vec<bool>,
    /// Final logits are `cap · tanh(logits / cap)` (Gemma 2 style soft-capping), if set.
    pub final_logit_softcap: Option<f32>,
}

/// The activation of a gated FFN: `down(act(gate(x)) ⊙ up(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnAct {
    /// SwiGLU (Llama, Qwen, Phi-3).
    Silu,
    /// GeGLU with GELU's tanh approximation (Gemma).
    GeluTanh,
}

impl ModelConfig {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// The sliding window layer `l` attends through, if any.
    pub fn window(&self, l: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.swa_layers.get(l).copied().unwrap_or(false))
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

/// One sequence's share of a batched forward pass.
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    pub seq: SeqId,
    /// New tokens, at positions `kv.seq_len(seq)..`.
    pub tokens: &'a [u32],
    pub logits: LogitsWanted,
}

/// The common start of every `Model::forward_batch`: rejects a token outside the vocabulary
/// (before any work, so nothing is half-done), clears `logits`, and returns the items that
/// have tokens to run.
pub fn batch_items<'a, 'b>(
    items: &'b [BatchItem<'a>],
    n_vocab: usize,
    logits: &mut Vec<f32>,
) -> Result<Vec<&'b BatchItem<'a>>, ModelError> {
    for it in items {
        if let Some(&id) = it.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::BadToken { id, n_vocab });
        }
    }
    logits.clear();
    Ok(items.iter().filter(|it| !it.tokens.is_empty()).collect())
}

/// Memory a GPU backend holds, as its allocator reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceMemory {
    /// Weight bytes uploaded to the device (repacked layout).
    pub weights_bytes: u64,
    /// Allocator bytes in use now (weights, KV pools, activations).
    pub in_use_bytes: u64,
    /// Allocator bytes reserved from the driver now.
    pub reserved_bytes: u64,
    /// Largest `reserved_bytes` seen after any forward pass.
    pub peak_bytes: u64,
}

pub trait Model: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// Where the forward pass runs, for logs and records: "cpu" or "wgpu".
    fn backend(&self) -> &'static str {
        "cpu"
    }
    /// The GPU adapter and driver the model runs on (`None` on the CPU).
    fn adapter(&self) -> Option<(String, String)> {
        None
    }
    /// Device memory from the backend's allocator; `None` on the CPU, where RSS covers it.
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Bytes of weights this model reads (mapped, not copied).
    fn weight_bytes(&self) -> u64;
    /// The context the engine will run with, once, before any forward pass: architectures
    /// whose RoPE depends on it (Phi-3's LongRoPE picks its long or short factors by whether
    /// the context exceeds the original one, as llama.cpp does) settle it here.
    fn set_context(&mut self, _n_ctx: usize) {}
    /// Shape of this model's KV blocks.
    fn kv_layout(&self, block_size: usize) -> KvLayout {
        let c = self.config();
        KvLayout::new(c.n_layers, c.kv_dim(), block_size)
    }
    /// Attach `kv`'s storage to the device this model runs on now, rather than at the first
    /// forward pass: a device decoder allocates its pools whole from the budget, and refuses a
    /// budget the device cannot hold. Nothing to do on the CPU.
    fn bind_kv(&self, _kv: &mut crate::kv::PagedKv) -> Result<(), ModelError> {
        Ok(())
    }
    /// A fresh single-sequence cache able to hold `n_ctx` positions.
    fn new_cache(&self, n_ctx: usize) -> KvCache {
        let c = self.config();
        KvCache::new(c.n_layers, c.kv_dim(), n_ctx)
    }
    /// Process several sequences' new tokens in one pass: every weight matrix is
    /// read once for all rows. Each item's tokens are appended to its sequence
    /// in `kv`; the wanted logits rows (`n_vocab` each) are written to `logits`
    /// in item order.
    fn forward_batch(
        &self,
        items: &[BatchItem<'_>],
        kv: &mut PagedKv,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError>;
    /// Single-sequence convenience over [`Model::forward_batch`].
    fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        wanted: LogitsWanted,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let item = BatchItem {
            seq: kv.seq,
            tokens,
            logits: wanted,
        };
        self.forward_batch(&[item], &mut kv.pages, logits)
    }
}
