//! The pre-norm decoder-only transformer shared by `llama` and `qwen2`:
//! `x += attn(rmsnorm(x)); x += swiglu(rmsnorm(x))`, then the output head.
//!
//! Weights are never copied: every matrix is a byte range of the mapping,
//! read in place by the quantized kernels. Only the tiny norm vectors and
//! biases are converted to f32 at load.

use rayon::prelude::*;
use std::sync::Arc;

use ember_runtime::backend::{self, QWeightHandle};
use ember_runtime::gguf::{ArchKey, GgufFile, TensorInfo};
use ember_runtime::kv::PagedKv;
use ember_runtime::model::{BatchItem, LogitsWanted, Model, ModelConfig, ModelError};
use ember_runtime::ops::{self, AttnShape, Rope, RopeStyle};
use ember_runtime::quant::{self, GgmlType, QMatRef};

/// What differs between architectures, as data.
#[derive(Clone, Copy, Debug)]
pub struct ArchSpec {
    pub arch: &'static str,
    pub rope_style: RopeStyle,
    pub qkv_bias: bool,
    pub default_rope_base: f32,
}

/// GGUF tensor names, in one place.
#[derive(Clone, Copy, Debug)]
pub enum TensorName {
    TokenEmbd,
    OutputNorm,
    Output,
    AttnNorm(usize),
    AttnQ(usize),
    AttnK(usize),
    AttnV(usize),
    AttnQBias(usize),
    AttnKBias(usize),
    AttnVBias(usize),
    AttnOut(usize),
    FfnNorm(usize),
    FfnGate(usize),
    FfnUp(usize),
    FfnDown(usize),
}

impl TensorName {
    pub fn gguf(self) -> String {
        use TensorName::*;
        match self {
            TokenEmbd => "token_embd.weight".into(),
            OutputNorm => "output_norm.weight".into(),
            Output => "output.weight".into(),
            AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            AttnQ(l) => format!("blk.{l}.attn_q.weight"),
            AttnK(l) => format!("blk.{l}.attn_k.weight"),
            AttnV(l) => format!("blk.{l}.attn_v.weight"),
            AttnQBias(l) => format!("blk.{l}.attn_q.bias"),
            AttnKBias(l) => format!("blk.{l}.attn_k.bias"),
            AttnVBias(l) => format!("blk.{l}.attn_v.bias"),
            AttnOut(l) => format!("blk.{l}.attn_output.weight"),
            FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            FfnGate(l) => format!("blk.{l}.ffn_gate.weight"),
            FfnUp(l) => format!("blk.{l}.ffn_up.weight"),
            FfnDown(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }
}

/// A weight matrix as a byte range of the mapping.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QWeight {
    pub(crate) ty: GgmlType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: QWeight, // (n_heads·head_dim, n_embd)
    pub(crate) wk: QWeight, // (n_kv_heads·head_dim, n_embd)
    pub(crate) wv: QWeight, // (n_kv_heads·head_dim, n_embd)
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) wo: QWeight, // (n_embd, n_heads·head_dim)
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: QWeight, // (n_ff, n_embd)
    pub(crate) w_up: QWeight,   // (n_ff, n_embd)
    pub(crate) w_down: QWeight, // (n_embd, n_ff)
}

pub struct Transformer {
    pub(crate) file: Arc<GgufFile>,
    pub(crate) cfg: ModelConfig,
    pub(crate) rope: Rope,
    pub(crate) tok_embd: QWeight, // (n_vocab, n_embd)
    pub(crate) output_norm: Vec<f32>,
    pub(crate) output: QWeight, // (n_vocab, n_embd), possibly the embedding itself
    pub(crate) layers: Vec<Layer>,
    pub(crate) weight_bytes: u64,
    /// Test-only: see [`DecoderFault`].
    pub(crate) fault: Option<DecoderFault>,
}

/// The environment variable of the test-only decoder fault hook ([`DecoderFault`]).
pub const DECODER_FAULT_ENV: &str = "EMBER_TEST_DECODER_FAULT";

/// Test-only fault injection, never for real use: `EMBER_TEST_DECODER_FAULT=rope|attn|ffn`,
/// read once when a model is loaded, breaks one part of this CPU decoder so that tests can show
/// the embedded model's golden check (`ember_runtime::embedded`) catches each kind of bug.
/// `rope`: q and k are not rotated; `attn`: the attention scores are ignored (q is zeroed, so
/// every position gets the same weight); `ffn`: the SwiGLU loses its SiLU (gate · up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderFault {
    Rope,
    Attention,
    Ffn,
}

impl DecoderFault {
    fn from_env() -> Option<DecoderFault> {
        let v = std::env::var(DECODER_FAULT_ENV).ok()?;
        let f = match v.as_str() {
            "rope" => DecoderFault::Rope,
            "attn" => DecoderFault::Attention,
            "ffn" => DecoderFault::Ffn,
            _ => {
                log::warn!("{DECODER_FAULT_ENV}={v}: unknown fault (rope, attn, ffn); ignored");
                return None;
            }
        };
        log::warn!("{DECODER_FAULT_ENV}={v}: the decoder is broken on purpose (test only)");
        Some(f)
    }
}

struct Binder<'a> {
    file: &'a GgufFile,
    path: String,
    bytes: u64,
}

impl Binder<'_> {
    fn shape_err(&self, t: &TensorInfo, expected: String) -> ModelError {
        ModelError::BadShape {
            path: self.path.clone(),
            name: t.name.clone(),
            dims: t.dims.clone(),
            expected,
        }
    }
    /// A matrix with GGUF dims `[cols, rows]`.
    fn matrix(&mut self, n: TensorName, rows: usize, cols: usize) -> Result<QWeight, ModelError> {
        let file = self.file;
        let t = file.require_tensor(&n.gguf())?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(self.shape_err(t, format!("[{cols}, {rows}]")));
        }
        if !t.ty.is_supported() {
            return Err(ModelError::UnsupportedType {
                path: self.path.clone(),
                name: t.name.clone(),
                ty: t.ty,
            });
        }
        let start = (self.file.data_offset() + t.offset) as usize;
        self.bytes += t.n_bytes;
        Ok(QWeight {
            ty: t.ty,
            rows,
            cols,
            start,
            len: t.n_bytes as usize,
        })
    }
    /// A vector converted to f32.
    fn vector(&mut self, n: TensorName, len: usize) -> Result<Vec<f32>, ModelError> {
        let file = self.file;
        let t = file.require_tensor(&n.gguf())?;
        if t.n_elements() != len as u64 {
            return Err(self.shape_err(t, format!("[{len}]")));
        }
        if !t.ty.is_supported() {
            return Err(ModelError::UnsupportedType {
                path: self.path.clone(),
                name: t.name.clone(),
                ty: t.ty,
            });
        }
        let mut v = vec![0f32; len];
        quant::dequantize(t.ty, self.file.tensor_bytes(t), &mut v).map_err(|e| {
            ModelError::BadHparams {
                path: self.path.clone(),
                what: format!("tensor '{}': {e}", t.name),
            }
        })?;
        self.bytes += t.n_bytes;
        Ok(v)
    }
    fn optional_vector(
        &mut self,
        n: TensorName,
        len: usize,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        if self.file.tensor(&n.gguf()).is_none() {
            return Ok(None);
        }
        self.vector(n, len).map(Some)
    }
}

fn hparams(file: &GgufFile, spec: &ArchSpec) -> Result<ModelConfig, ModelError> {
    let path = file.path().display().to_string();
    let md = &file.metadata;
    let a = spec.arch;
    let req =
        |k: ArchKey| -> Result<usize, ModelError> { Ok(file.require_u64(&k.key(a))? as usize) };
    let n_embd = req(ArchKey::EmbeddingLength)?;
    let n_layers = req(ArchKey::BlockCount)?;
    let n_heads = req(ArchKey::HeadCount)?;
    let n_kv_heads = md
        .arch_u64(a, ArchKey::HeadCountKv)
        .map(|v| v as usize)
        .unwrap_or(n_heads);
    let n_ff = req(ArchKey::FeedForwardLength)?;
    let n_ctx_train = md.arch_u64(a, ArchKey::ContextLength).unwrap_or(2048) as usize;
    let bad = |what: String| ModelError::BadHparams {
        path: path.clone(),
        what,
    };
    if n_embd == 0 || n_layers == 0 || n_heads == 0 || n_kv_heads == 0 || n_ff == 0 {
        return Err(bad(format!(
            "zero-sized model (embd {n_embd}, layers {n_layers}, heads {n_heads}/{n_kv_heads}, ff {n_ff})"
        )));
    }
    if n_embd % n_heads != 0 || n_heads % n_kv_heads != 0 {
        return Err(bad(format!(
            "n_embd {n_embd}, heads {n_heads}, kv heads {n_kv_heads} do not divide"
        )));
    }
    if n_embd > 1 << 20 || n_layers > 4096 || n_ff > 1 << 22 || n_heads > 4096 {
        return Err(bad("implausibly large hyper-parameters".into()));
    }
    let head_dim = md
        .get_u64(&format!("{a}.attention.key_length"))
        .map(|v| v as usize)
        .unwrap_or(n_embd / n_heads);
    let n_rot = md
        .arch_u64(a, ArchKey::RopeDimensionCount)
        .map(|v| v as usize)
        .unwrap_or(head_dim);
    if n_rot > head_dim || !n_rot.is_multiple_of(2) || head_dim == 0 {
        return Err(bad(format!("rope dims {n_rot} vs head dim {head_dim}")));
    }
    let rope_base = md
        .arch_f64(a, ArchKey::RopeFreqBase)
        .unwrap_or(spec.default_rope_base as f64) as f32;
    refuse_rope_scaling(file, a)?;
    let rms_eps = md.arch_f64(a, ArchKey::LayerNormRmsEpsilon).unwrap_or(1e-5) as f32;
    let embd = file.require_tensor(&TensorName::TokenEmbd.gguf())?;
    if embd.dims.len() != 2 || embd.dims[0] != n_embd as u64 {
        return Err(ModelError::BadShape {
            path,
            name: embd.name.clone(),
            dims: embd.dims.clone(),
            expected: format!("[{n_embd}, n_vocab]"),
        });
    }
    let n_vocab = embd.dims[1] as usize;
    let tied_embeddings = file.tensor(&TensorName::Output.gguf()).is_none();
    Ok(ModelConfig {
        arch: a.to_string(),
        n_vocab,
        n_embd,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        n_ff,
        n_ctx_train,
        rope_base,
        rope_style: spec.rope_style,
        n_rot,
        rms_eps,
        tied_embeddings,
    })
}

/// RoPE scaling changes every position's angles (Llama 3.1+ `rope_freqs.weight`, the linear,
/// YaRN and LongRoPE `rope.scaling.*` keys). ember does not implement it yet, so a file that
/// asks for it is refused with what it asks for, never run with plain RoPE.
fn refuse_rope_scaling(file: &GgufFile, a: &str) -> Result<(), ModelError> {
    let md = &file.metadata;
    let what = if file.tensor("rope_freqs.weight").is_some() {
        Some("RoPE frequency scaling (tensor 'rope_freqs.weight', Llama 3.1 and later)".to_string())
    } else if let Some(t) = md
        .get_str(&format!("{a}.rope.scaling.type"))
        .filter(|t| *t != "none")
    {
        Some(format!("RoPE scaling '{t}' ({a}.rope.scaling.type)"))
    } else {
        md.get_f64(&format!("{a}.rope.scaling.factor"))
            .filter(|f| *f != 0.0 && *f != 1.0)
            .map(|f| format!("RoPE scaling by a factor of {f} ({a}.rope.scaling.factor)"))
    };
    match what {
        Some(what) => Err(ModelError::Unsupported {
            path: file.path().display().to_string(),
            what,
        }),
        None => Ok(()),
    }
}

impl Transformer {
    pub fn load(file: Arc<GgufFile>, spec: &ArchSpec) -> Result<Self, ModelError> {
        use TensorName::*;
        let cfg = hparams(&file, spec)?;
        let mut b = Binder {
            file: &file,
            path: file.path().display().to_string(),
            bytes: 0,
        };
        let (d, q_dim, kv_dim, ff) = (
            cfg.n_embd,
            cfg.n_heads * cfg.head_dim,
            cfg.kv_dim(),
            cfg.n_ff,
        );
        let tok_embd = b.matrix(TokenEmbd, cfg.n_vocab, d)?;
        let output_norm = b.vector(OutputNorm, d)?;
        let output = if cfg.tied_embeddings {
            tok_embd
        } else {
            b.matrix(Output, cfg.n_vocab, d)?
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let bias = |b: &mut Binder, n, len| {
                if spec.qkv_bias {
                    b.optional_vector(n, len)
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                attn_norm: b.vector(AttnNorm(l), d)?,
                wq: b.matrix(AttnQ(l), q_dim, d)?,
                wk: b.matrix(AttnK(l), kv_dim, d)?,
                wv: b.matrix(AttnV(l), kv_dim, d)?,
                bq: bias(&mut b, AttnQBias(l), q_dim)?,
                bk: bias(&mut b, AttnKBias(l), kv_dim)?,
                bv: bias(&mut b, AttnVBias(l), kv_dim)?,
                wo: b.matrix(AttnOut(l), d, q_dim)?,
                ffn_norm: b.vector(FfnNorm(l), d)?,
                w_gate: b.matrix(FfnGate(l), ff, d)?,
                w_up: b.matrix(FfnUp(l), ff, d)?,
                w_down: b.matrix(FfnDown(l), d, ff)?,
            });
        }
        let weight_bytes = b.bytes;
        let rope = Rope::new(cfg.rope_style, cfg.head_dim, cfg.n_rot, cfg.rope_base);
        Ok(Transformer {
            file,
            cfg,
            rope,
            tok_embd,
            output_norm,
            output,
            layers,
            weight_bytes,
            fault: DecoderFault::from_env(),
        })
    }

    fn mat(&self, w: &QWeight) -> QMatRef<'_> {
        QMatRef {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            data: &self.file.bytes()[w.start..w.start + w.len],
        }
    }

    /// The weight as a [`QWeightHandle`] on the mapping (no copy).
    fn handle(&self, w: &QWeight) -> QWeightHandle {
        QWeightHandle::new(
            self.file.clone(),
            w.ty,
            w.rows,
            w.cols,
            w.start..w.start + w.len,
        )
        .expect("weight ranges are checked at load")
    }

    /// y[m × rows] = x[m × cols] · Wᵀ (+ bias) for several projections of the same input
    /// (q/k/v, gate/up) in one fused call: one activation quantization and one parallel section
    /// on the mmapped GGUF blocks (`backend::qmatmul_many_host`, the host-buffer form of the
    /// `QuantOps` burn extension's CPU kernel). Outputs reuse the callers' buffers: no allocation
    /// per call once they have grown (a fresh 1.5 MiB lm-head buffer per step cost page faults).
    fn linear_many<const N: usize>(
        &self,
        ws: [(&QWeight, Option<&[f32]>); N],
        x: &[f32],
        m: usize,
        ys: [&mut Vec<f32>; N],
    ) {
        let hs: Vec<QWeightHandle> = ws.iter().map(|(w, _)| self.handle(w)).collect();
        let hr: Vec<&QWeightHandle> = hs.iter().collect();
        let mut bufs: Vec<Vec<f32>> = Vec::with_capacity(N);
        let mut ys = ys;
        for y in ys.iter_mut() {
            bufs.push(std::mem::take(*y));
        }
        backend::qmatmul_many_host(x, m, &hr, &mut bufs);
        for ((y, buf), (w, bias)) in ys.into_iter().zip(bufs).zip(ws) {
            *y = buf;
            add_bias(y, w.rows, bias);
        }
    }

    fn linear(&self, w: &QWeight, bias: Option<&[f32]>, x: &[f32], m: usize, y: &mut Vec<f32>) {
        self.linear_many([(w, bias)], x, m, [y]);
    }
}

/// Add `bias` (one value per output feature) to every `rows`-wide row of `y`.
fn add_bias(y: &mut [f32], rows: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(rows) {
            row.iter_mut().zip(b).for_each(|(o, &bb)| *o += bb);
        }
    }
}

/// Scratch buffers for one forward pass.
#[derive(Default)]
struct Scratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Model for Transformer {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn forward_batch(
        &self,
        items: &[BatchItem<'_>],
        kv: &mut PagedKv,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let items = ember_runtime::model::batch_items(items, c.n_vocab, logits)?;
        if items.is_empty() {
            return Ok(());
        }
        // Reserve every sequence's room before any work, so a full cache fails cleanly.
        for it in &items {
            kv.reserve(it.seq, it.tokens.len())?;
        }
        // Row ranges and start positions of each item in the stacked batch.
        let mut segs = Vec::with_capacity(items.len());
        let mut n = 0;
        for it in &items {
            segs.push((n, it.tokens.len(), kv.seq_len(it.seq)));
            n += it.tokens.len();
        }
        let d = c.n_embd;
        let (q_dim, kv_dim) = (c.n_heads * c.head_dim, c.kv_dim());
        let bs = kv.layout.block_size;
        let mut x = vec![0f32; n * d];
        let embd = self.mat(&self.tok_embd);
        let all_tokens = items.iter().flat_map(|it| it.tokens.iter());
        for (row, &t) in x.chunks_exact_mut(d).zip(all_tokens) {
            quant::dequantize_row(embd, t as usize, row);
        }
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        // RoPE angles of every row, computed once and shared by all layers' q and k.
        let half = self.rope.n_rot / 2;
        let mut angles = Vec::with_capacity(n * half);
        for &(_, len, pos0) in &segs {
            self.rope.table(pos0, len, &mut angles);
        }
        let mut s = Scratch::default();
        for (l, ly) in self.layers.iter().enumerate() {
            s.xn.resize(n * d, 0.0);
            ops::rmsnorm(&x, &ly.attn_norm, c.rms_eps, &mut s.xn);
            self.linear_many(
                [
                    (&ly.wq, ly.bq.as_deref()),
                    (&ly.wk, ly.bk.as_deref()),
                    (&ly.wv, ly.bv.as_deref()),
                ],
                &s.xn,
                n,
                [&mut s.q, &mut s.k, &mut s.v],
            );
            s.att.resize(n * q_dim, 0.0);
            for (it, &(r0, len, _)) in items.iter().zip(&segs) {
                let q = &mut s.q[r0 * q_dim..(r0 + len) * q_dim];
                let k = &mut s.k[r0 * kv_dim..(r0 + len) * kv_dim];
                let cs = &angles[r0 * half..(r0 + len) * half];
                if self.fault != Some(DecoderFault::Rope) {
                    self.rope.apply_table(q, c.n_heads, cs);
                    self.rope.apply_table(k, c.n_kv_heads, cs);
                }
                if self.fault == Some(DecoderFault::Attention) {
                    q.fill(0.0);
                }
                // The cache holds f16 (llama.cpp's default): K is rounded after RoPE, as
                // llama.cpp copies the rotated f32 K into its f16 cache.
                ops::round_f16_slice(k);
                ops::round_f16_slice(&mut s.v[r0 * kv_dim..(r0 + len) * kv_dim]);
                kv.write(it.seq, l, k, &s.v[r0 * kv_dim..(r0 + len) * kv_dim]);
            }
            // Each sequence attends over its own cache: the sequences run in parallel (a
            // decode step has one query row per sequence, too little work to split alone).
            let mut jobs = Vec::with_capacity(items.len());
            let mut att_rest = &mut s.att[..];
            for (it, &(r0, len, pos0)) in items.iter().zip(&segs) {
                let (out, rest) = std::mem::take(&mut att_rest).split_at_mut(len * q_dim);
                att_rest = rest;
                let (kb, vb) = kv.layer_blocks(it.seq, l);
                jobs.push((&s.q[r0 * q_dim..(r0 + len) * q_dim], kb, vb, pos0, out));
            }
            if jobs.len() > 1 {
                // One task per sequence; no second split inside each (nested fork/join
                // measured ~1.6% slower at 8 sequences).
                jobs.into_par_iter().for_each(|(q, kb, vb, pos0, out)| {
                    ops::attention_serial(q, &kb, &vb, bs, pos0, shape, out)
                });
            } else {
                for (q, kb, vb, pos0, out) in jobs {
                    ops::attention(q, &kb, &vb, bs, pos0, shape, out);
                }
            }
            self.linear(&ly.wo, None, &s.att, n, &mut s.proj);
            x.iter_mut().zip(&s.proj).for_each(|(a, &b)| *a += b);

            ops::rmsnorm(&x, &ly.ffn_norm, c.rms_eps, &mut s.xn);
            self.linear_many(
                [(&ly.w_gate, None), (&ly.w_up, None)],
                &s.xn,
                n,
                [&mut s.gate, &mut s.up],
            );
            if self.fault == Some(DecoderFault::Ffn) {
                s.gate.iter_mut().zip(&s.up).for_each(|(g, &u)| *g *= u);
            } else {
                ops::silu_mul(&mut s.gate, &s.up);
            }
            self.linear(&ly.w_down, None, &s.gate, n, &mut s.proj);
            x.iter_mut().zip(&s.proj).for_each(|(a, &b)| *a += b);
        }
        for it in &items {
            kv.commit(it.seq, it.tokens);
        }
        // Gather the rows whose logits are wanted, in item order.
        let mut rows = Vec::new();
        for (it, &(r0, len, _)) in items.iter().zip(&segs) {
            match it.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => {
                    rows.extend_from_slice(&x[(r0 + len - 1) * d..(r0 + len) * d])
                }
                LogitsWanted::All => rows.extend_from_slice(&x[r0 * d..(r0 + len) * d]),
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let m = rows.len() / d;
        ops::rmsnorm_inplace(&mut rows, &self.output_norm, c.rms_eps);
        self.linear(&self.output, None, &rows, m, logits);
        Ok(())
    }
}
