//! The pre-norm decoder-only transformer shared by `llama` and `qwen2`, as loaded: what
//! differs between architectures ([`ArchSpec`]), the GGUF tensor names, the hyper-parameters
//! and binding every weight to its byte range of the mapping. The layer order is
//! [`crate::decoder`]'s; this file's [`Model`] runs it on the CPU executor (`crate::host`).
//!
//! Weights are never copied: every matrix is a byte range of the mapping,
//! read in place by the quantized kernels. Only the tiny norm vectors and
//! biases are converted to f32 at load.

use std::sync::Arc;

use ember_runtime::gguf::{ArchKey, GgufFile, TensorInfo};
use ember_runtime::kv::PagedKv;
use ember_runtime::model::{BatchItem, Model, ModelConfig, ModelError};
use ember_runtime::ops::{Rope, RopeStyle};
use ember_runtime::quant;

use crate::decoder::{self, QWeight};
use crate::host::HostPass;

/// A layer as the CPU decoder holds it: matrices as byte ranges, vectors in f32.
pub(crate) type Layer = decoder::Layer<QWeight, Vec<f32>>;

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
        let mut pass = HostPass::new(self);
        decoder::forward(&mut pass, c.n_layers, c.n_vocab, items, kv, logits)
    }
}
