//! The decoder's layer order, written once: `x += attn(rmsnorm(x)); x += ffn(rmsnorm(x))`
//! per layer (with Gemma's extra norms on each branch's output inside the ops), then the output head, over a small set of decoder ops ([`DecoderOps`]) that an
//! executor implements: the CPU fast path on host buffers (`crate::host`) and the burn-tensor
//! path on a device (`crate::device`). The batch preparation both need (validation, KV
//! reservation, each item's rows and positions, committing tokens, which rows get logits) is
//! the [`BatchPlan`].
//!
//! A new architecture is one `ArchSpec` plus, where its layer differs, one op here and in each
//! executor; a new executor (CUDA) is one more `DecoderOps`.

use ember_runtime::gguf::GgufFile;
use ember_runtime::kv::PagedKv;
use ember_runtime::model::{BatchItem, LogitsWanted, ModelError};
use ember_runtime::quant::{self, GgmlType, QMatRef};

/// A weight matrix as a byte range of the mapping.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QWeight {
    pub(crate) ty: GgmlType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl QWeight {
    /// The matrix's blocks in `file`'s mapping.
    pub(crate) fn mat<'f>(&self, file: &'f GgufFile) -> QMatRef<'f> {
        QMatRef {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: &file.bytes()[self.start..self.start + self.len],
        }
    }
}

/// One layer's weights: `M` is how an executor holds a matrix, `V` a vector (norm weights,
/// biases). The host holds byte ranges and `Vec<f32>`; the device, uploaded handles and
/// tensors ([`Layer::try_map`] makes one from the other).
pub(crate) struct Layer<M, V> {
    pub(crate) attn_norm: V,
    pub(crate) wq: M, // (n_heads·head_dim, n_embd)
    pub(crate) wk: M, // (n_kv_heads·head_dim, n_embd)
    pub(crate) wv: M, // (n_kv_heads·head_dim, n_embd)
    pub(crate) bq: Option<V>,
    pub(crate) bk: Option<V>,
    pub(crate) bv: Option<V>,
    /// Per-head RMSNorm weights of q and k (head_dim each), applied before RoPE.
    pub(crate) q_norm: Option<V>,
    pub(crate) k_norm: Option<V>,
    pub(crate) wo: M, // (n_embd, n_heads·head_dim)
    /// RMSNorm of the attention output before its residual add.
    pub(crate) post_attn_norm: Option<V>,
    pub(crate) ffn_norm: V,
    pub(crate) w_gate: M, // (n_ff, n_embd)
    pub(crate) w_up: M,   // (n_ff, n_embd)
    pub(crate) w_down: M, // (n_embd, n_ff)
    /// RMSNorm of the FFN output before its residual add.
    pub(crate) post_ffn_norm: Option<V>,
}

impl<M, V> Layer<M, V> {
    /// The weight of the layer's `which` norm.
    pub(crate) fn norm(&self, which: Norm) -> &V {
        match which {
            Norm::Attn => &self.attn_norm,
            Norm::Ffn => &self.ffn_norm,
        }
    }

    /// The same layer with each matrix through `fm` and each vector through `fv`.
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub(crate) fn try_map<M2, V2, E>(
        &self,
        mut fm: impl FnMut(&M) -> Result<M2, E>,
        mut fv: impl FnMut(&V) -> V2,
    ) -> Result<Layer<M2, V2>, E> {
        Ok(Layer {
            attn_norm: fv(&self.attn_norm),
            wq: fm(&self.wq)?,
            wk: fm(&self.wk)?,
            wv: fm(&self.wv)?,
            bq: self.bq.as_ref().map(&mut fv),
            bk: self.bk.as_ref().map(&mut fv),
            bv: self.bv.as_ref().map(&mut fv),
            q_norm: self.q_norm.as_ref().map(&mut fv),
            k_norm: self.k_norm.as_ref().map(&mut fv),
            wo: fm(&self.wo)?,
            post_attn_norm: self.post_attn_norm.as_ref().map(&mut fv),
            ffn_norm: fv(&self.ffn_norm),
            w_gate: fm(&self.w_gate)?,
            w_up: fm(&self.w_up)?,
            w_down: fm(&self.w_down)?,
            post_ffn_norm: self.post_ffn_norm.as_ref().map(&mut fv),
        })
    }
}

/// One item's rows in the stacked batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    /// First row of the item in the batch.
    pub(crate) r0: usize,
    /// Rows (new tokens) of the item.
    pub(crate) len: usize,
    /// Cache position of its first new token.
    pub(crate) pos0: usize,
}

/// A forward pass's batch: the non-empty items, in order, with room reserved in the cache.
pub(crate) struct BatchPlan<'b, 'a> {
    pub(crate) items: Vec<&'b BatchItem<'a>>,
    pub(crate) segs: Vec<Seg>,
    /// Rows in the batch (tokens over all items).
    pub(crate) n: usize,
}

impl<'b, 'a> BatchPlan<'b, 'a> {
    /// Reserve every sequence's room before any work, so a full cache fails cleanly.
    fn reserve(items: Vec<&'b BatchItem<'a>>, kv: &mut PagedKv) -> Result<Self, ModelError> {
        for it in &items {
            kv.reserve(it.seq, it.tokens.len())?;
        }
        let mut segs = Vec::with_capacity(items.len());
        let mut n = 0;
        for it in &items {
            segs.push(Seg {
                r0: n,
                len: it.tokens.len(),
                pos0: kv.seq_len(it.seq),
            });
            n += it.tokens.len();
        }
        Ok(BatchPlan { items, segs, n })
    }

    /// Each item with its rows.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'b BatchItem<'a>, Seg)> + '_ {
        self.items.iter().copied().zip(self.segs.iter().copied())
    }

    /// The cache position of every row.
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub(crate) fn positions(&self) -> Vec<usize> {
        self.segs
            .iter()
            .flat_map(|s| s.pos0..s.pos0 + s.len)
            .collect()
    }

    /// Every row's token embedding, dequantized from the mapping (`n × n_embd`).
    pub(crate) fn embed(&self, file: &GgufFile, tok_embd: &QWeight) -> Vec<f32> {
        let d = tok_embd.cols;
        let mut x = vec![0f32; self.n * d];
        let embd = tok_embd.mat(file);
        let tokens = self.items.iter().flat_map(|it| it.tokens.iter());
        for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
            quant::dequantize_row(embd, t as usize, row);
        }
        x
    }

    /// The rows whose logits are wanted, in item order.
    fn logits_rows(&self) -> Vec<usize> {
        let mut rows = Vec::new();
        for (it, s) in self.iter() {
            match it.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push(s.r0 + s.len - 1),
                LogitsWanted::All => rows.extend(s.r0..s.r0 + s.len),
            }
        }
        rows
    }
}

/// Which of a layer's two norms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Norm {
    Attn,
    Ffn,
}

/// The steps of one forward pass, in the order [`forward`] calls them. An executor keeps the
/// pass's activations itself (host scratch buffers reused across layers; device tensors):
/// `x` is the residual stream (`n × n_embd`), `xn` its normed copy, `q`/`k`/`v` and `att`
/// the attention's.
pub(crate) trait DecoderOps {
    /// Before any block is reserved: a device executor attaches its KV storage here, so that
    /// the reservation makes room in it and not in host memory.
    /// Fails when the storage cannot be made (a budget the device cannot hold).
    fn bind_kv(&mut self, _kv: &mut PagedKv) -> Result<(), ModelError> {
        Ok(())
    }
    /// `x` = the token embeddings of `plan`'s rows, plus whatever the pass shares between
    /// layers (RoPE angles, cache slots).
    fn begin(&mut self, plan: &BatchPlan, kv: &mut PagedKv) -> Result<(), ModelError>;
    /// `xn = rmsnorm(x)` with layer `l`'s `which` norm.
    fn norm(&mut self, l: usize, which: Norm);
    /// `q, k, v = xn · (Wq, Wk, Wv)ᵀ (+ biases)`.
    fn qkv(&mut self, l: usize);
    /// Normalize q and k per head where the layer has q/k norms, rotate them (with the layer's
    /// RoPE), round k and v to the cache's f16 precision and write them into the cache at each
    /// item's new positions.
    fn rope_store(&mut self, l: usize, plan: &BatchPlan, kv: &mut PagedKv);
    /// `att` = each item's causal attention of its q rows over its cached k and v (through the
    /// layer's sliding window, if it has one).
    fn attend(&mut self, l: usize, plan: &BatchPlan, kv: &PagedKv);
    /// `x += att · Woᵀ` (the product RMS-normed first where the layer has a post-attention norm).
    fn attn_out(&mut self, l: usize);
    /// `x += (act(xn · Wgateᵀ) ⊙ (xn · Wupᵀ)) · Wdownᵀ`, `act` the model's (SiLU, GELU), the
    /// product RMS-normed first where the layer has a post-FFN norm.
    fn ffn(&mut self, l: usize);
    /// The output norm and head over `rows` of `x` (then the final soft-cap, if the model has
    /// one), into `logits` (`rows.len() × n_vocab`);
    /// `rows` may be empty (nothing wanted), then `logits` stays empty.
    fn logits(&mut self, rows: &[usize], logits: &mut Vec<f32>) -> Result<(), ModelError>;
}

/// One forward pass over a batch of sequences: the shared body of `Model::forward_batch`.
pub(crate) fn forward<O: DecoderOps>(
    ops: &mut O,
    n_layers: usize,
    n_vocab: usize,
    items: &[BatchItem<'_>],
    kv: &mut PagedKv,
    logits: &mut Vec<f32>,
) -> Result<(), ModelError> {
    let items = ember_runtime::model::batch_items(items, n_vocab, logits)?;
    if items.is_empty() {
        return Ok(());
    }
    ops.bind_kv(kv)?;
    let plan = BatchPlan::reserve(items, kv)?;
    ops.begin(&plan, kv)?;
    for l in 0..n_layers {
        ops.norm(l, Norm::Attn);
        ops.qkv(l);
        ops.rope_store(l, &plan, kv);
        ops.attend(l, &plan, kv);
        ops.attn_out(l);
        ops.norm(l, Norm::Ffn);
        ops.ffn(l);
    }
    for it in &plan.items {
        kv.commit(it.seq, it.tokens);
    }
    ops.logits(&plan.logits_rows(), logits)
}
