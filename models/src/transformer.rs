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
use ember_runtime::model::{BatchItem, FfnAct, Model, ModelConfig, ModelError};
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
    /// Q/K/V biases are read where the file has them.
    pub qkv_bias: bool,
    pub default_rope_base: f32,
    /// Per-head RMSNorm of q and k before RoPE (`attn_q_norm`, `attn_k_norm`: Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before each residual add
    /// (`post_attention_norm`, `post_ffw_norm`: Gemma 2/3).
    pub post_norms: bool,
    pub ffn_act: FfnAct,
    /// Token embeddings scaled by √n_embd (Gemma).
    pub scale_embeddings: bool,
    /// Sliding-window attention (when the file sets `{arch}.attention.sliding_window`): every
    /// layer but each `n`-th is local, `n` from `{arch}.attention.sliding_window_pattern`,
    /// else this default (Gemma 3: 6); local layers use `{arch}.rope.freq_base_swa`, else
    /// `swa_rope_base`. `None`: the architecture has no sliding window.
    pub swa: Option<SwaSpec>,
    /// A window in the file is ignored (with a warning) rather than refused: Phi-3, whose
    /// window llama.cpp disables.
    pub ignore_sliding_window: bool,
}

/// See [`ArchSpec::swa`].
#[derive(Clone, Copy, Debug)]
pub struct SwaSpec {
    pub default_pattern: u64,
    pub swa_rope_base: f32,
}

impl ArchSpec {
    /// A pre-norm SwiGLU decoder with none of the optional parts (Llama's shape).
    pub const fn base(arch: &'static str, rope_style: RopeStyle, default_rope_base: f32) -> Self {
        ArchSpec {
            arch,
            rope_style,
            qkv_bias: false,
            default_rope_base,
            qk_norm: false,
            post_norms: false,
            ffn_act: FfnAct::Silu,
            scale_embeddings: false,
            swa: None,
            ignore_sliding_window: false,
        }
    }
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
    /// q|k|v in one matrix (Phi-3).
    AttnQkv(usize),
    AttnQNorm(usize),
    AttnKNorm(usize),
    AttnPostNorm(usize),
    FfnPostNorm(usize),
    /// RoPE frequency divisors (Llama 3.1+).
    RopeFreqs,
    /// LongRoPE factors (Phi-3 128k).
    RopeFactorsLong,
    RopeFactorsShort,
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
            AttnQkv(l) => format!("blk.{l}.attn_qkv.weight"),
            AttnQNorm(l) => format!("blk.{l}.attn_q_norm.weight"),
            AttnKNorm(l) => format!("blk.{l}.attn_k_norm.weight"),
            AttnPostNorm(l) => format!("blk.{l}.post_attention_norm.weight"),
            FfnPostNorm(l) => format!("blk.{l}.post_ffw_norm.weight"),
            RopeFreqs => "rope_freqs.weight".into(),
            RopeFactorsLong => "rope_factors_long.weight".into(),
            RopeFactorsShort => "rope_factors_short.weight".into(),
        }
    }
}

pub struct Transformer {
    pub(crate) file: Arc<GgufFile>,
    pub(crate) cfg: ModelConfig,
    /// RoPE of the global (or only) attention layers.
    pub(crate) rope: Rope,
    /// RoPE of the sliding-window layers, where they differ (Gemma 3's local base).
    pub(crate) rope_local: Option<Rope>,
    /// How the RoPE was built, to rebuild it for the engine's context ([`Model::set_context`]).
    pub(crate) rope_plan: RopePlan,
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
    /// Rows `r0..r0 + rows` of a matrix with GGUF dims `[cols, total]`: one part of a fused
    /// matrix (Phi-3's q|k|v, gate|up), as a byte range of the mapping like any other.
    fn matrix_rows(
        &mut self,
        n: TensorName,
        r0: usize,
        rows: usize,
        total: usize,
        cols: usize,
    ) -> Result<QWeight, ModelError> {
        let mut w = self.matrix(n, total, cols)?;
        // `matrix` counted the whole tensor; each part counts its own rows.
        self.bytes -= w.len as u64;
        let row_bytes = w.len / total;
        w.start += r0 * row_bytes;
        w.rows = rows;
        w.len = rows * row_bytes;
        self.bytes += w.len as u64;
        Ok(w)
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

/// The RoPE a file asks for, kept so that the rotation can be rebuilt for the engine's
/// context (LongRoPE's choice of factors depends on it).
#[derive(Clone, Debug)]
pub(crate) struct RopePlan {
    style: RopeStyle,
    head_dim: usize,
    n_rot: usize,
    base: f32,
    /// `1 / factor` of linear scaling; 1 without.
    freq_scale: f32,
    /// `rope_freqs` (Llama 3.1+): divisors for every context; empty when none.
    freqs: Vec<f32>,
    /// LongRoPE (Phi-3): short factors, long factors, and the original context above which
    /// llama.cpp takes the long ones.
    longrope: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// cos/sin magnitude (`{arch}.rope.scaling.attn_factor`; 1 without).
    mscale: f32,
    /// The sliding-window layers' own base (Gemma 3), unscaled as llama.cpp leaves them.
    local_base: Option<f32>,
}

impl RopePlan {
    /// The global and (where they differ) the sliding-window layers' rotations for a context
    /// of `n_ctx` positions.
    pub(crate) fn build(&self, n_ctx: usize) -> (Rope, Option<Rope>) {
        let factors = match &self.longrope {
            Some((short, long, orig)) => {
                if n_ctx > *orig {
                    long.clone()
                } else {
                    short.clone()
                }
            }
            None => self.freqs.clone(),
        };
        let rope = Rope::new(self.style, self.head_dim, self.n_rot, self.base).scaled(
            self.freq_scale,
            factors,
            self.mscale,
        );
        let local = self
            .local_base
            .map(|b| Rope::new(self.style, self.head_dim, self.n_rot, b));
        (rope, local)
    }
}

/// The file's RoPE scaling, or an error naming what ember cannot apply.
fn rope_plan(
    file: &GgufFile,
    spec: &ArchSpec,
    head_dim: usize,
    n_rot: usize,
    base: f32,
    n_ctx_train: usize,
    local_base: Option<f32>,
) -> Result<RopePlan, ModelError> {
    let md = &file.metadata;
    let a = spec.arch;
    let path = file.path().display().to_string();
    let unsupported = |what: String| ModelError::Unsupported {
        path: path.clone(),
        what,
    };
    let ty = md
        .get_str(&format!("{a}.rope.scaling.type"))
        .unwrap_or("linear")
        .to_string();
    let factor = md
        .get_f64(&format!("{a}.rope.scaling.factor"))
        .filter(|f| *f != 0.0)
        .unwrap_or(1.0) as f32;
    let mscale = md
        .get_f64(&format!("{a}.rope.scaling.attn_factor"))
        .unwrap_or(1.0) as f32;
    // One factor per rotated pair, read from an f32 tensor.
    let factors = |n: TensorName| -> Result<Option<Vec<f32>>, ModelError> {
        let Some(t) = file.tensor(&n.gguf()) else {
            return Ok(None);
        };
        if t.n_elements() != (n_rot / 2) as u64 || t.ty != ember_runtime::quant::GgmlType::F32 {
            return Err(ModelError::BadShape {
                path: path.clone(),
                name: t.name.clone(),
                dims: t.dims.clone(),
                expected: format!("[{}] of F32 (one factor per rotated pair)", n_rot / 2),
            });
        }
        let mut v = vec![0f32; n_rot / 2];
        quant::dequantize(t.ty, file.tensor_bytes(t), &mut v).map_err(|e| {
            ModelError::BadHparams {
                path: path.clone(),
                what: format!("tensor '{}': {e}", t.name),
            }
        })?;
        if v.iter().any(|f| !f.is_finite() || *f <= 0.0) {
            return Err(ModelError::BadHparams {
                path: path.clone(),
                what: format!("tensor '{}' holds a factor that is not positive", t.name),
            });
        }
        Ok(Some(v))
    };
    let freqs = factors(TensorName::RopeFreqs)?.unwrap_or_default();
    let (freq_scale, longrope) = match ty.as_str() {
        "none" => (1.0, None),
        "linear" => (1.0 / factor, None),
        "longrope" | "su" => {
            let (short, long) = (
                factors(TensorName::RopeFactorsShort)?,
                factors(TensorName::RopeFactorsLong)?,
            );
            let (Some(short), Some(long)) = (short, long) else {
                return Err(unsupported(format!(
                    "LongRoPE ({a}.rope.scaling.type = {ty}) without both 'rope_factors_short.weight' and 'rope_factors_long.weight'"
                )));
            };
            let orig = md
                .get_u64(&format!("{a}.rope.scaling.original_context_length"))
                .map(|v| v as usize)
                .unwrap_or(n_ctx_train);
            (1.0 / factor, Some((short, long, orig)))
        }
        other => {
            return Err(unsupported(format!(
                "RoPE scaling '{other}' ({a}.rope.scaling.type)"
            )));
        }
    };
    // Phi-3 files carry the factor tensors without a scaling type: llama.cpp uses them anyway.
    let longrope = match longrope {
        Some(l) => Some(l),
        None => match (
            factors(TensorName::RopeFactorsShort)?,
            factors(TensorName::RopeFactorsLong)?,
        ) {
            (Some(short), Some(long)) => {
                let orig = md
                    .get_u64(&format!("{a}.rope.scaling.original_context_length"))
                    .map(|v| v as usize)
                    .unwrap_or(n_ctx_train);
                Some((short, long, orig))
            }
            (None, None) => None,
            _ => {
                return Err(unsupported(
                    "only one of 'rope_factors_short.weight' and 'rope_factors_long.weight'".into(),
                ));
            }
        },
    };
    if longrope.is_some() && !freqs.is_empty() {
        return Err(unsupported(
            "both 'rope_freqs.weight' and LongRoPE factor tensors".into(),
        ));
    }
    Ok(RopePlan {
        style: spec.rope_style,
        head_dim,
        n_rot,
        base,
        freq_scale,
        freqs,
        longrope,
        mscale,
        local_base,
    })
}

fn hparams(file: &GgufFile, spec: &ArchSpec) -> Result<(ModelConfig, RopePlan), ModelError> {
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
    let rms_eps = md.arch_f64(a, ArchKey::LayerNormRmsEpsilon).unwrap_or(1e-5) as f32;
    // Sliding-window attention, where the architecture has it and the file sets a window.
    let window = md
        .get_u64(&format!("{a}.attention.sliding_window"))
        .filter(|&w| w > 0);
    let (sliding_window, swa_layers, local_base) = match (spec.swa, window) {
        (Some(sw), Some(w)) => {
            let key = format!("{a}.attention.sliding_window_pattern");
            let pattern = match md.get(&key) {
                None => sw.default_pattern,
                Some(v) => v.as_u64().ok_or_else(|| ModelError::Unsupported {
                    path: path.clone(),
                    what: format!("{key} given per layer (ember reads a single period)"),
                })?,
            };
            // llama.cpp's pattern: every layer local but each `pattern`-th (0: all local).
            let layers = (0..n_layers)
                .map(|l| pattern == 0 || (l as u64 % pattern) < pattern - 1)
                .collect();
            let base = md
                .get_f64(&format!("{a}.rope.freq_base_swa"))
                .unwrap_or(sw.swa_rope_base as f64) as f32;
            (Some(w as usize), layers, Some(base))
        }
        (None, Some(w)) if spec.ignore_sliding_window => {
            // llama.cpp runs Phi-3 without its window too (its converter writes one that the
            // model was not meant to use; llama.cpp warns and disables it): the same logits.
            log::warn!(
                "{path}: {a}.attention.sliding_window = {w} is ignored, as llama.cpp ignores it"
            );
            (None, Vec::new(), None)
        }
        (None, Some(w)) => {
            return Err(ModelError::Unsupported {
                path: path.clone(),
                what: format!(
                    "a sliding attention window ({a}.attention.sliding_window = {w}) on '{a}'"
                ),
            });
        }
        _ => (None, Vec::new(), None),
    };
    let rope = rope_plan(
        file,
        spec,
        head_dim,
        n_rot,
        rope_base,
        n_ctx_train,
        local_base,
    )?;
    let final_logit_softcap = md
        .get_f64(&format!("{a}.final_logit_softcapping"))
        .filter(|c| *c > 0.0)
        .map(|c| c as f32);
    if let Some(c) = md
        .get_f64(&format!("{a}.attn_logit_softcapping"))
        .filter(|c| *c > 0.0)
    {
        return Err(ModelError::Unsupported {
            path: path.clone(),
            what: format!("attention logit soft-capping ({c}, {a}.attn_logit_softcapping)"),
        });
    }
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
    let cfg = ModelConfig {
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
        ffn_act: spec.ffn_act,
        embd_scale: if spec.scale_embeddings {
            (n_embd as f32).sqrt()
        } else {
            1.0
        },
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        sliding_window,
        swa_layers,
        final_logit_softcap,
    };
    Ok((cfg, rope))
}

impl Transformer {
    pub fn load(file: Arc<GgufFile>, spec: &ArchSpec) -> Result<Self, ModelError> {
        use TensorName::*;
        let (cfg, rope_plan) = hparams(&file, spec)?;
        let mut b = Binder {
            file: &file,
            path: file.path().display().to_string(),
            bytes: 0,
        };
        let (d, q_dim, kv_dim, ff, hd) = (
            cfg.n_embd,
            cfg.n_heads * cfg.head_dim,
            cfg.kv_dim(),
            cfg.n_ff,
            cfg.head_dim,
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
            let when = |b: &mut Binder, on: bool, n, len| -> Result<Option<Vec<f32>>, ModelError> {
                if on {
                    b.vector(n, len).map(Some)
                } else {
                    Ok(None)
                }
            };
            // q|k|v as one matrix (Phi-3) or three.
            let (wq, wk, wv) = if b.file.tensor(&AttnQkv(l).gguf()).is_some() {
                let total = q_dim + 2 * kv_dim;
                (
                    b.matrix_rows(AttnQkv(l), 0, q_dim, total, d)?,
                    b.matrix_rows(AttnQkv(l), q_dim, kv_dim, total, d)?,
                    b.matrix_rows(AttnQkv(l), q_dim + kv_dim, kv_dim, total, d)?,
                )
            } else {
                (
                    b.matrix(AttnQ(l), q_dim, d)?,
                    b.matrix(AttnK(l), kv_dim, d)?,
                    b.matrix(AttnV(l), kv_dim, d)?,
                )
            };
            // gate|up as one `ffn_up` of 2·n_ff rows, gate first (Phi-3), or two.
            let (w_gate, w_up) = if b.file.tensor(&FfnGate(l).gguf()).is_none()
                && b.file
                    .tensor(&FfnUp(l).gguf())
                    .is_some_and(|t| t.dims.get(1) == Some(&(2 * ff as u64)))
            {
                (
                    b.matrix_rows(FfnUp(l), 0, ff, 2 * ff, d)?,
                    b.matrix_rows(FfnUp(l), ff, ff, 2 * ff, d)?,
                )
            } else {
                (b.matrix(FfnGate(l), ff, d)?, b.matrix(FfnUp(l), ff, d)?)
            };
            layers.push(Layer {
                attn_norm: b.vector(AttnNorm(l), d)?,
                wq,
                wk,
                wv,
                bq: bias(&mut b, AttnQBias(l), q_dim)?,
                bk: bias(&mut b, AttnKBias(l), kv_dim)?,
                bv: bias(&mut b, AttnVBias(l), kv_dim)?,
                q_norm: when(&mut b, spec.qk_norm, AttnQNorm(l), hd)?,
                k_norm: when(&mut b, spec.qk_norm, AttnKNorm(l), hd)?,
                wo: b.matrix(AttnOut(l), d, q_dim)?,
                post_attn_norm: when(&mut b, spec.post_norms, AttnPostNorm(l), d)?,
                ffn_norm: b.vector(FfnNorm(l), d)?,
                w_gate,
                w_up,
                w_down: b.matrix(FfnDown(l), d, ff)?,
                post_ffn_norm: when(&mut b, spec.post_norms, FfnPostNorm(l), d)?,
            });
        }
        let weight_bytes = b.bytes;
        let (rope, rope_local) = rope_plan.build(0);
        Ok(Transformer {
            file,
            cfg,
            rope,
            rope_local,
            rope_plan,
            tok_embd,
            output_norm,
            output,
            layers,
            weight_bytes,
            fault: DecoderFault::from_env(),
        })
    }

    /// The rotation layer `l` uses.
    pub(crate) fn rope_of(&self, l: usize) -> &Rope {
        match &self.rope_local {
            Some(r) if self.cfg.window(l).is_some() => r,
            _ => &self.rope,
        }
    }
}

impl Model for Transformer {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn set_context(&mut self, n_ctx: usize) {
        (self.rope, self.rope_local) = self.rope_plan.build(n_ctx);
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
