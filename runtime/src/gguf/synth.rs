//! Synthetic GGUFs: a real model's metadata (its tokenizer and chat template included), tensor
//! names, shapes and block types, with made-up weights. For measuring speed where the real file
//! cannot go, such as a lent GPU machine that takes at most 64 MiB: speed does not depend on the
//! weights' values, and llama.cpp reads the same file, so comparisons stay side by side. The
//! outputs are meaningless.
//!
//! Each tensor is one seeded random row, quantized to the tensor's own type, and repeated for
//! every row. The arithmetic is realistic (real scales, every quant value in play), and the file
//! compresses to about one row per tensor (`xz`).

use super::{GgufFile, GgufWriter, Value};
use crate::quant::{self, GgmlType, QuantError};

/// Why a file could not be synthesised.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("tensor {name}: {source}")]
    Quantize {
        name: String,
        #[source]
        source: QuantError,
    },
    #[error(
        "tensor {name} has type {ty}, which ember cannot encode; nothing to synthesise it from"
    )]
    Unsupported { name: String, ty: GgmlType },
    #[error(
        "the tokenizer source has no tokenizer.ggml.tokens: nothing to take the vocabulary from"
    )]
    NoTokenizer,
    #[error("{0}: no such tensor or metadata key to leave out")]
    NothingToLeaveOut(String),
}

/// Metadata key set to true in every synthetic file, so that no run mistakes it for the model.
pub const SYNTHETIC_KEY: &str = "ember.synthetic";

/// A GGUF like `src`: the same metadata (plus [`SYNTHETIC_KEY`], and "(synthetic)" after
/// `general.name`) and the same tensors, in the same order and alignment, with weights from
/// `seed`.
pub fn synth_like(src: &GgufFile, seed: u64) -> Result<GgufWriter, SynthError> {
    let mut w = GgufWriter::new();
    // `general.alignment`, when the source has it, is copied with the rest of the metadata.
    w.alignment = src.alignment;
    w.version = src.version;
    let mut named = false;
    for (k, v) in src.metadata.iter() {
        let v = match (k, v) {
            ("general.name", Value::String(n)) => {
                named = true;
                Value::String(format!("{n} (synthetic)"))
            }
            _ => v.clone(),
        };
        w.kv(k, v);
    }
    if !named {
        w.kv("general.name", Value::String("synthetic".into()));
    }
    w.kv(SYNTHETIC_KEY, Value::Bool(true));
    for (i, t) in src.tensors.iter().enumerate() {
        let cols = t.dims.first().copied().unwrap_or(1).max(1) as usize;
        let rows = (t.n_elements() as usize / cols).max(1);
        let norm = t.name.ends_with("norm.weight");
        let row = random_row(
            cols,
            seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            norm,
        );
        if !t.ty.is_supported() {
            return Err(SynthError::Unsupported {
                name: t.name.clone(),
                ty: t.ty,
            });
        }
        let one = quant::quantize(t.ty, &row).map_err(|source| SynthError::Quantize {
            name: t.name.clone(),
            source,
        })?;
        w.tensor(&t.name, &t.dims, t.ty, one.repeat(rows));
    }
    Ok(w)
}

/// `n` values from `seed`: near 1 for a norm's weight (as trained norms are), else small and
/// centred, as trained matrices are.
fn random_row(n: usize, seed: u64, norm: bool) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5; // [-0.5, 0.5)
            if norm { 1.0 + 0.1 * u } else { 0.1 * u }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tiny models of architectures with no real file at hand.

/// The architectures [`tiny`] builds: small random-weight models laid out exactly as llama.cpp
/// reads each architecture (its `llama-model.cpp` tensor list and hyper-parameters, the keys
/// its converter writes), so that llama.cpp run on the very file gives the reference logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyArch {
    /// `qwen3`: RMSNorm of each head's q and k (`attn_q_norm`/`attn_k_norm`), no QKV bias,
    /// NeoX RoPE, a head width that is not `n_embd / n_head` (`attention.key_length`), tied
    /// output head. Q4_K/Q6_K weights, as a Q4_K_M file.
    Qwen3,
    /// `phi3`: fused `attn_qkv` and fused gate|up (`ffn_up`, 2·n_ff rows), NeoX RoPE with
    /// LongRoPE factors (`rope_factors_long`/`rope_factors_short`) and the attention factor
    /// its converter writes, untied output head. Q8_0 weights.
    Phi3,
    /// `llama` with `rope_freqs.weight`: Llama 3.1/3.2 RoPE scaling as Meta's `llama3` rope type
    /// defines it, tied output head. Q8_0 weights.
    LlamaRopeFreqs,
}

/// The hyper-parameters of a [`TinyArch`] model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TinyShape {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// `{arch}.context_length`.
    pub n_ctx_train: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

/// Llama 3 RoPE scaling (`rope_scaling` with `rope_type: llama3` in the model's config): the
/// parameters [`llama3_rope_freqs`] turns into `rope_freqs.weight`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// The scaling of the `llama-rope-freqs` tiny model: Llama 3.2's factor and bands
/// (32, 1, 4), with an original context of 1024 instead of 8192 so that, at the few hundred
/// positions a test runs, the scaled dimensions have turned far enough for a model that
/// ignores them to be caught (see `tools/llama-ref/README.md`).
pub const TINY_LLAMA3_SCALING: Llama3Scaling = Llama3Scaling {
    factor: 32.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 1024.0,
};

/// `phi3.rope.scaling.original_context_length` of the tiny phi3: llama.cpp takes the long
/// factors when the context it runs with is larger than this, else the short ones.
pub const TINY_PHI3_ORIGINAL_CONTEXT: usize = 512;

impl TinyArch {
    pub const ALL: [TinyArch; 3] = [TinyArch::Qwen3, TinyArch::Phi3, TinyArch::LlamaRopeFreqs];

    /// The name `ember synth --arch` takes.
    pub fn name(self) -> &'static str {
        match self {
            TinyArch::Qwen3 => "qwen3",
            TinyArch::Phi3 => "phi3",
            TinyArch::LlamaRopeFreqs => "llama-rope-freqs",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }

    /// `general.architecture`.
    pub fn architecture(self) -> &'static str {
        match self {
            TinyArch::Qwen3 => "qwen3",
            TinyArch::Phi3 => "phi3",
            TinyArch::LlamaRopeFreqs => "llama",
        }
    }

    pub fn shape(self) -> TinyShape {
        let base = TinyShape {
            n_embd: 256,
            n_layer: 4,
            n_head: 8,
            n_head_kv: 2,
            head_dim: 32,
            n_ff: 512,
            n_ctx_train: 2048,
            rope_base: 10000.0,
            rms_eps: 1e-5,
        };
        match self {
            // Qwen3-0.6B's proportions: 16 heads of 128 over a 1024-wide stream, so the
            // attention is twice as wide as the model (q 512 over 256 here).
            TinyArch::Qwen3 => TinyShape {
                head_dim: 64,
                n_ctx_train: 40960,
                rope_base: 1e6,
                rms_eps: 1e-6,
                ..base
            },
            // Phi-3.5-mini's ratio of trained to original context (32), and GQA as Phi-4-mini.
            TinyArch::Phi3 => TinyShape {
                n_head_kv: 4,
                n_ctx_train: 32 * TINY_PHI3_ORIGINAL_CONTEXT,
                ..base
            },
            TinyArch::LlamaRopeFreqs => TinyShape {
                n_ctx_train: 16 * TINY_LLAMA3_SCALING.original_max_position_embeddings as usize,
                rope_base: 500000.0,
                ..base
            },
        }
    }
}

/// `rope_freqs.weight` for Llama 3 RoPE scaling, as Meta defines it (and llama.cpp's converter
/// writes it): per rotary pair `i` of `head_dim`, the divisor of its frequency
/// `base^(-2i/head_dim)`: 1 where the wavelength is under `original / high_freq_factor`,
/// `factor` where it is over `original / low_freq_factor`, a smooth blend between.
pub fn llama3_rope_freqs(head_dim: usize, base: f64, s: Llama3Scaling) -> Vec<f32> {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / s.factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The tiny phi3's LongRoPE factors, one per rotary pair: short 1.0 … 1.5, long 1 … 16 (the
/// frequency of pair `i` is divided by its factor). Far apart, so that taking one for the
/// other moves the logits by whole units.
pub fn tiny_phi3_rope_factors(head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let n = head_dim / 2;
    let long = (0..n)
        .map(|i| 1.0 + (15 * i) as f32 / (n - 1) as f32)
        .collect();
    let short = (0..n)
        .map(|i| 1.0 + i as f32 / (2 * (n - 1)) as f32)
        .collect();
    (long, short)
}

/// `phi3.rope.scaling.attn_factor` as llama.cpp's converter computes it for LongRoPE:
/// `sqrt(1 + ln(scale) / ln(original))`, `scale` the trained over the original context.
/// llama.cpp multiplies RoPE's cos and sin by it (q and k both), whichever factors it takes.
pub fn longrope_attn_factor(n_ctx_train: usize, original: usize) -> f32 {
    let scale = n_ctx_train as f64 / original as f64;
    if scale <= 1.0 {
        1.0
    } else {
        (1.0 + scale.ln() / (original as f64).ln()).sqrt() as f32
    }
}

/// A seeded stream of weights: splitmix64, one stream per tensor name, so a tensor's values
/// depend on (seed, name) only, not on which other tensors the file holds. Only exact integer
/// steps and correctly rounded f32 additions and products: every platform gets the same bits.
struct Stream(u64);

impl Stream {
    fn new(seed: u64, name: &str) -> Self {
        // FNV-1a of the name, mixed with the seed.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Stream(h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform on [-0.5, 0.5), a multiple of 2^-24.
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
    /// Mean 0, standard deviation 1, bell-shaped (the sum of four uniforms, within ±2√3).
    fn normal(&mut self) -> f32 {
        let s = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        s * 1.732_050_8
    }
}

/// What [`tiny_with`] builds.
struct TinyBuilder<'a> {
    w: GgufWriter,
    seed: u64,
    without: &'a [&'a str],
    left_out: Vec<&'a str>,
}

impl<'a> TinyBuilder<'a> {
    fn skip(&mut self, name: &str) -> bool {
        match self.without.iter().find(|w| **w == name) {
            Some(w) => {
                self.left_out.push(w);
                true
            }
            None => false,
        }
    }
    fn kv(&mut self, key: &str, v: Value) {
        if !self.skip(key) {
            self.w.kv(key, v);
        }
    }
    /// A matrix of `rows` × `cols` (GGUF dims `[cols, rows]`) in `ty`: row blocks of
    /// `(rows, std)`, each of normal values with that standard deviation (phi3's fused
    /// tensors hold matrices of different scales).
    fn matrix(
        &mut self,
        name: &str,
        cols: usize,
        parts: &[(usize, f32)],
        ty: GgmlType,
    ) -> Result<(), SynthError> {
        if self.skip(name) {
            return Ok(());
        }
        let mut s = Stream::new(self.seed, name);
        let rows: usize = parts.iter().map(|p| p.0).sum();
        let mut v = Vec::with_capacity(rows * cols);
        for &(n, std) in parts {
            v.extend((0..n * cols).map(|_| s.normal() * std));
        }
        // ggml's own quantizers, bit for bit: the blocks are what llama-quantize would make of
        // these values, and they stay put when ember's quantizer changes.
        let data =
            quant::ggml_quantize::quantize(ty, &v).map_err(|source| SynthError::Quantize {
                name: name.to_string(),
                source,
            })?;
        self.w.tensor(name, &[cols as u64, rows as u64], ty, data);
        Ok(())
    }
    /// An F32 vector: a norm's weight, `centre` ± `spread`/2 (uniform).
    fn norm(&mut self, name: &str, n: usize, centre: f32, spread: f32) {
        let mut s = Stream::new(self.seed, name);
        let v: Vec<f32> = (0..n).map(|_| centre + spread * s.uniform()).collect();
        self.vector(name, &v);
    }
    fn vector(&mut self, name: &str, v: &[f32]) {
        if self.skip(name) {
            return;
        }
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.w.tensor(name, &[v.len() as u64], GgmlType::F32, data);
    }
}

/// A tiny random-weight model of `arch` (see [`TinyArch`], [`TinyArch::shape`]) with the
/// tokenizer of `tokenizer_from` (every `tokenizer.*` key, chat template included), weights from
/// `seed`. The same arguments give the same bytes on every platform.
pub fn tiny(
    arch: TinyArch,
    tokenizer_from: &GgufFile,
    seed: u64,
) -> Result<GgufWriter, SynthError> {
    tiny_with(arch, tokenizer_from, seed, &[])
}

/// [`tiny`] without the tensors or metadata keys named in `without` (everything else
/// identical, byte for byte): the control files that show what a piece changes, e.g. the
/// `llama-rope-freqs` model without `rope_freqs.weight`. A name that matches nothing is an error.
pub fn tiny_with(
    arch: TinyArch,
    tokenizer_from: &GgufFile,
    seed: u64,
    without: &[&str],
) -> Result<GgufWriter, SynthError> {
    let n_vocab = tokenizer_from
        .metadata
        .get_strings(super::keys::TOK_TOKENS)
        .map(|t| t.len())
        .ok_or(SynthError::NoTokenizer)?;
    let sh = arch.shape();
    let a = arch.architecture();
    let mut b = TinyBuilder {
        w: GgufWriter::new(),
        seed,
        without,
        left_out: vec![],
    };
    let key = |s: &str| format!("{a}.{s}");
    let u32v = |x: usize| Value::U32(x as u32);

    b.kv(super::keys::ARCHITECTURE, Value::String(a.into()));
    b.kv(
        super::keys::NAME,
        // Not the architecture's name: llama.cpp gives a model whose name contains "phi3" or
        // "phi-3" Phi-3's special-token attributes, which this tokenizer has not the tokens for.
        Value::String("ember tiny random model (synthetic)".into()),
    );
    b.kv(SYNTHETIC_KEY, Value::Bool(true));
    b.kv(
        "ember.synthetic.recipe",
        Value::String(format!(
            "ember synth --arch {} --seed {seed}, tokenizer of {}",
            arch.name(),
            tokenizer_from
                .metadata
                .get_str(super::keys::NAME)
                .unwrap_or("an unnamed model")
        )),
    );
    b.kv(&key("block_count"), u32v(sh.n_layer));
    b.kv(&key("context_length"), u32v(sh.n_ctx_train));
    b.kv(&key("embedding_length"), u32v(sh.n_embd));
    b.kv(&key("feed_forward_length"), u32v(sh.n_ff));
    b.kv(&key("attention.head_count"), u32v(sh.n_head));
    b.kv(&key("attention.head_count_kv"), u32v(sh.n_head_kv));
    b.kv(&key("rope.freq_base"), Value::F32(sh.rope_base));
    b.kv(
        &key("attention.layer_norm_rms_epsilon"),
        Value::F32(sh.rms_eps),
    );
    // What each architecture's converter writes besides (convert_hf_to_gguf.py): Qwen3 the head
    // width; Phi-3 the rotary width, its original context, the LongRoPE attention factor and a
    // sliding window llama.cpp ignores for phi3 (Phi-3.5-mini's, beyond any context here);
    // Llama 3.2 the vocabulary size, head width and rotary width, and no `rope.scaling.*` key
    // at all: its scaling lives in `rope_freqs.weight` only.
    let file_type = match arch {
        TinyArch::Qwen3 => {
            b.kv(&key("attention.key_length"), u32v(sh.head_dim));
            b.kv(&key("attention.value_length"), u32v(sh.head_dim));
            15 // MOSTLY_Q4_K_M
        }
        TinyArch::Phi3 => {
            b.kv(&key("rope.dimension_count"), u32v(sh.head_dim));
            b.kv(
                &key("rope.scaling.original_context_length"),
                u32v(TINY_PHI3_ORIGINAL_CONTEXT),
            );
            b.kv(
                &key("rope.scaling.attn_factor"),
                Value::F32(longrope_attn_factor(
                    sh.n_ctx_train,
                    TINY_PHI3_ORIGINAL_CONTEXT,
                )),
            );
            b.kv(&key("attention.sliding_window"), u32v(262144));
            7 // MOSTLY_Q8_0
        }
        TinyArch::LlamaRopeFreqs => {
            b.kv(&key("vocab_size"), u32v(n_vocab));
            b.kv(&key("attention.key_length"), u32v(sh.head_dim));
            b.kv(&key("attention.value_length"), u32v(sh.head_dim));
            b.kv(&key("rope.dimension_count"), u32v(sh.head_dim));
            let s = TINY_LLAMA3_SCALING;
            b.kv(
                "ember.synthetic.rope_scaling",
                Value::String(format!(
                    "llama3: factor {}, low_freq_factor {}, high_freq_factor {}, \
                     original_max_position_embeddings {}",
                    s.factor,
                    s.low_freq_factor,
                    s.high_freq_factor,
                    s.original_max_position_embeddings
                )),
            );
            7
        }
    };
    b.kv(super::keys::FILE_TYPE, Value::U32(file_type));
    b.kv("general.quantization_version", Value::U32(2));
    for (k, v) in tokenizer_from.metadata.iter() {
        if k.starts_with("tokenizer.") {
            let v = v.clone();
            b.kv(k, v);
        }
    }

    // Scales: the embedding (and tied head) so that logits spread over several units; q and k
    // larger than 1/√n so that attention is peaked and positions (RoPE) matter; the rest
    // 1/√fan-in, as a trained model's are roughly.
    let d = sh.n_embd;
    let (q_dim, kv_dim) = (sh.n_head * sh.head_dim, sh.n_head_kv * sh.head_dim);
    let inv = |n: usize| 1.0 / (n as f32).sqrt();
    let qk = 1.6 * inv(d);
    let (mat, wv, wdown, embd) = match arch {
        TinyArch::Qwen3 => (
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q6_K,
            GgmlType::Q6_K,
        ),
        _ => (
            GgmlType::Q8_0,
            GgmlType::Q8_0,
            GgmlType::Q8_0,
            GgmlType::Q8_0,
        ),
    };
    let tied = arch != TinyArch::Phi3;
    let embd_std = if tied { 0.3 } else { 1.0 };
    b.matrix("token_embd.weight", d, &[(n_vocab, embd_std)], embd)?;
    if arch == TinyArch::LlamaRopeFreqs {
        let f = llama3_rope_freqs(sh.head_dim, sh.rope_base as f64, TINY_LLAMA3_SCALING);
        b.vector("rope_freqs.weight", &f);
    }
    if arch == TinyArch::Phi3 {
        let (long, short) = tiny_phi3_rope_factors(sh.head_dim);
        b.vector("rope_factors_long.weight", &long);
        b.vector("rope_factors_short.weight", &short);
    }
    for l in 0..sh.n_layer {
        let t = |s: &str| format!("blk.{l}.{s}.weight");
        b.norm(&t("attn_norm"), d, 1.0, 0.2);
        if arch == TinyArch::Phi3 {
            // Rows: q, then k, then v (llama.cpp views them in this order).
            b.matrix(
                &t("attn_qkv"),
                d,
                &[(q_dim, qk), (kv_dim, qk), (kv_dim, inv(d))],
                mat,
            )?;
        } else {
            b.matrix(&t("attn_q"), d, &[(q_dim, qk)], mat)?;
            b.matrix(&t("attn_k"), d, &[(kv_dim, qk)], mat)?;
            b.matrix(&t("attn_v"), d, &[(kv_dim, inv(d))], wv)?;
        }
        b.matrix(&t("attn_output"), q_dim, &[(d, inv(q_dim))], mat)?;
        if arch == TinyArch::Qwen3 {
            // RMSNorm of each head's q and k before RoPE: weights around 1.6, so that scores
            // spread as with the larger q/k scales of the other two.
            b.norm(&t("attn_q_norm"), sh.head_dim, 1.6, 0.4);
            b.norm(&t("attn_k_norm"), sh.head_dim, 1.6, 0.4);
        }
        b.norm(&t("ffn_norm"), d, 1.0, 0.2);
        if arch == TinyArch::Phi3 {
            // Rows: gate, then up (llama.cpp's swiglu takes silu of the first half).
            b.matrix(
                &t("ffn_up"),
                d,
                &[(sh.n_ff, inv(d)), (sh.n_ff, inv(d))],
                mat,
            )?;
        } else {
            b.matrix(&t("ffn_gate"), d, &[(sh.n_ff, inv(d))], mat)?;
            b.matrix(&t("ffn_up"), d, &[(sh.n_ff, inv(d))], mat)?;
        }
        b.matrix(&t("ffn_down"), sh.n_ff, &[(d, inv(sh.n_ff))], wdown)?;
    }
    b.norm("output_norm.weight", d, 1.0, 0.2);
    if !tied {
        b.matrix("output.weight", d, &[(n_vocab, 0.3)], mat)?;
    }
    if let Some(w) = without.iter().find(|w| !b.left_out.contains(w)) {
        return Err(SynthError::NothingToLeaveOut(w.to_string()));
    }
    Ok(b.w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Array, parse_bytes};

    /// A stand-in tokenizer source: 100 tokens, a chat template, a key that is not the
    /// tokenizer's (must not be copied).
    fn tokenizer_source() -> GgufFile {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::String("llama".into()));
        w.kv("llama.block_count", Value::U32(30));
        let tokens: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        w.kv(
            "tokenizer.ggml.tokens",
            Value::Array(Array::Strings(tokens)),
        );
        w.kv("tokenizer.ggml.model", Value::String("gpt2".into()));
        w.kv("tokenizer.chat_template", Value::String("{{ x }}".into()));
        parse_bytes(&w.to_bytes()).unwrap()
    }

    fn build(arch: TinyArch, without: &[&str]) -> (Vec<u8>, GgufFile) {
        let bytes = tiny_with(arch, &tokenizer_source(), 0, without)
            .unwrap()
            .to_bytes();
        let f = parse_bytes(&bytes).unwrap();
        (bytes, f)
    }

    /// (name, GGUF dims, type) of every tensor, in file order.
    fn layout(f: &GgufFile) -> Vec<(String, Vec<u64>, GgmlType)> {
        f.tensors
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone(), t.ty))
            .collect()
    }

    /// The tensors llama.cpp's `load_arch_tensors` asks for (src/models/{qwen3,phi3,llama}.cpp,
    /// `{n_embd, rows}` in ggml order), written out by hand for 4 layers and 100 tokens.
    fn expected(arch: TinyArch) -> Vec<(String, Vec<u64>, GgmlType)> {
        use GgmlType::*;
        let v = 100u64;
        let mut e = vec![];
        let mut t = |n: &str, d: &[u64], ty| e.push((n.to_string(), d.to_vec(), ty));
        match arch {
            TinyArch::Qwen3 => {
                t("token_embd.weight", &[256, v], Q6_K);
                for l in 0..4 {
                    let b = |s: &str| format!("blk.{l}.{s}.weight");
                    t(&b("attn_norm"), &[256], F32);
                    t(&b("attn_q"), &[256, 512], Q4_K);
                    t(&b("attn_k"), &[256, 128], Q4_K);
                    t(&b("attn_v"), &[256, 128], Q6_K);
                    t(&b("attn_output"), &[512, 256], Q4_K);
                    t(&b("attn_q_norm"), &[64], F32);
                    t(&b("attn_k_norm"), &[64], F32);
                    t(&b("ffn_norm"), &[256], F32);
                    t(&b("ffn_gate"), &[256, 512], Q4_K);
                    t(&b("ffn_up"), &[256, 512], Q4_K);
                    t(&b("ffn_down"), &[512, 256], Q6_K);
                }
                t("output_norm.weight", &[256], F32);
            }
            TinyArch::Phi3 => {
                t("token_embd.weight", &[256, v], Q8_0);
                t("rope_factors_long.weight", &[16], F32);
                t("rope_factors_short.weight", &[16], F32);
                for l in 0..4 {
                    let b = |s: &str| format!("blk.{l}.{s}.weight");
                    t(&b("attn_norm"), &[256], F32);
                    // n_embd + 2 · n_embd_gqa rows (8 heads, 4 kv heads of 32).
                    t(&b("attn_qkv"), &[256, 512], Q8_0);
                    t(&b("attn_output"), &[256, 256], Q8_0);
                    t(&b("ffn_norm"), &[256], F32);
                    // gate and up, 2 · n_ff rows.
                    t(&b("ffn_up"), &[256, 1024], Q8_0);
                    t(&b("ffn_down"), &[512, 256], Q8_0);
                }
                t("output_norm.weight", &[256], F32);
                t("output.weight", &[256, v], Q8_0);
            }
            TinyArch::LlamaRopeFreqs => {
                t("token_embd.weight", &[256, v], Q8_0);
                t("rope_freqs.weight", &[16], F32);
                for l in 0..4 {
                    let b = |s: &str| format!("blk.{l}.{s}.weight");
                    t(&b("attn_norm"), &[256], F32);
                    t(&b("attn_q"), &[256, 256], Q8_0);
                    t(&b("attn_k"), &[256, 64], Q8_0);
                    t(&b("attn_v"), &[256, 64], Q8_0);
                    t(&b("attn_output"), &[256, 256], Q8_0);
                    t(&b("ffn_norm"), &[256], F32);
                    t(&b("ffn_gate"), &[256, 512], Q8_0);
                    t(&b("ffn_up"), &[256, 512], Q8_0);
                    t(&b("ffn_down"), &[512, 256], Q8_0);
                }
                t("output_norm.weight", &[256], F32);
            }
        }
        e
    }

    #[test]
    fn tiny_models_have_the_tensors_llama_cpp_reads() {
        for arch in TinyArch::ALL {
            let (_, f) = build(arch, &[]);
            assert_eq!(layout(&f), expected(arch), "{}", arch.name());
        }
    }

    #[test]
    fn tiny_models_have_the_keys_llama_cpp_reads() {
        for arch in TinyArch::ALL {
            let (_, f) = build(arch, &[]);
            let m = &f.metadata;
            let a = arch.architecture();
            let u = |k: &str| m.get_u64(&format!("{a}.{k}"));
            assert_eq!(m.get_str("general.architecture"), Some(a));
            assert_eq!(m.get_bool(SYNTHETIC_KEY), Some(true));
            assert_eq!(u("block_count"), Some(4));
            assert_eq!(u("embedding_length"), Some(256));
            assert_eq!(u("feed_forward_length"), Some(512));
            assert_eq!(u("attention.head_count"), Some(8));
            // The tokenizer's keys, and no other key of the source.
            assert_eq!(m.get_strings("tokenizer.ggml.tokens").unwrap().len(), 100);
            assert_eq!(m.get_str("tokenizer.chat_template"), Some("{{ x }}"));
            assert_eq!(m.get_u64("llama.block_count"), (a == "llama").then_some(4));
            // No architecture name in general.name (llama.cpp's Phi-3 tokenizer quirk).
            assert!(!m.get_str("general.name").unwrap().contains("phi"));
            let f32k = |k: &str| m.get_f64(&format!("{a}.{k}")).map(|v| v as f32);
            match arch {
                TinyArch::Qwen3 => {
                    assert_eq!(u("attention.head_count_kv"), Some(2));
                    assert_eq!(u("attention.key_length"), Some(64));
                    assert_eq!(u("attention.value_length"), Some(64));
                    assert_eq!(u("rope.dimension_count"), None);
                    assert_eq!(f32k("rope.freq_base"), Some(1e6));
                    assert_eq!(f32k("attention.layer_norm_rms_epsilon"), Some(1e-6));
                    assert_eq!(u("context_length"), Some(40960));
                }
                TinyArch::Phi3 => {
                    assert_eq!(u("attention.head_count_kv"), Some(4));
                    assert_eq!(u("rope.dimension_count"), Some(32));
                    assert_eq!(u("context_length"), Some(16384));
                    assert_eq!(u("rope.scaling.original_context_length"), Some(512));
                    let af = f32k("rope.scaling.attn_factor").unwrap();
                    // sqrt(1 + ln 32 / ln 512)
                    assert!((af - 1.247_219_1).abs() < 1e-6, "{af}");
                    assert_eq!(f32k("rope.freq_base"), Some(10000.0));
                    assert_eq!(u("attention.sliding_window"), Some(262144));
                }
                TinyArch::LlamaRopeFreqs => {
                    assert_eq!(u("attention.head_count_kv"), Some(2));
                    assert_eq!(u("vocab_size"), Some(100));
                    assert_eq!(u("rope.dimension_count"), Some(32));
                    assert_eq!(u("attention.key_length"), Some(32));
                    assert_eq!(f32k("rope.freq_base"), Some(500000.0));
                    // Llama 3's scaling is in rope_freqs.weight only, as its converter writes it.
                    assert!(m.iter().all(|(k, _)| !k.starts_with("llama.rope.scaling")));
                }
            }
        }
    }

    fn vector(f: &GgufFile, name: &str) -> Vec<f32> {
        f.tensor_bytes(f.tensor(name).unwrap())
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    /// Meta's llama3 rope scaling (the converter's loop) worked out by hand: with head_dim 32
    /// and base 500000, pair i turns at 500000^(-i/16) per position, a wavelength of
    /// 2π·500000^(i/16); over 1024 (original / low_freq_factor) the factor is 32, under 256
    /// (original / high_freq_factor) 1, between a blend.
    #[test]
    fn rope_freqs_are_llama3_scaling() {
        let (_, f) = build(TinyArch::LlamaRopeFreqs, &[]);
        let got = vector(&f, "rope_freqs.weight");
        let want = [
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.724_543_8,
            10.854_686,
            32.0,
            32.0,
            32.0,
            32.0,
            32.0,
            32.0,
            32.0,
            32.0,
            32.0,
        ];
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-5 * w, "pair {i}: {g} vs {w}");
        }
        // Llama 3.2's own parameters (original context 8192): one blended pair, at 3.292262.
        let real = llama3_rope_freqs(
            32,
            500000.0,
            Llama3Scaling {
                original_max_position_embeddings: 8192.0,
                ..TINY_LLAMA3_SCALING
            },
        );
        assert_eq!(&real[..8], &[1.0; 8]);
        assert!((real[8] - 3.292_262).abs() < 1e-5, "{}", real[8]);
        assert_eq!(&real[9..], &[32.0; 7]);
    }

    #[test]
    fn phi3_long_and_short_factors_are_far_apart() {
        let (_, f) = build(TinyArch::Phi3, &[]);
        let long = vector(&f, "rope_factors_long.weight");
        let short = vector(&f, "rope_factors_short.weight");
        assert_eq!((long[0], long[15]), (1.0, 16.0));
        assert_eq!((short[0], short[15]), (1.0, 1.5));
        assert!(long.windows(2).all(|w| w[0] < w[1]) && short.windows(2).all(|w| w[0] < w[1]));
    }

    /// Same bytes every time; `without` drops exactly the one piece; a name matching nothing
    /// is an error, not a silently complete file.
    #[test]
    fn tiny_is_deterministic_and_leaves_out_only_what_it_is_told() {
        let (a, fa) = build(TinyArch::LlamaRopeFreqs, &[]);
        let (b, _) = build(TinyArch::LlamaRopeFreqs, &[]);
        assert!(a == b);
        let (_, fb) = build(TinyArch::LlamaRopeFreqs, &["rope_freqs.weight"]);
        assert!(fb.tensor("rope_freqs.weight").is_none());
        assert_eq!(fb.tensors.len() + 1, fa.tensors.len());
        for t in &fb.tensors {
            assert!(
                fa.tensor_bytes(fa.tensor(&t.name).unwrap()) == fb.tensor_bytes(t),
                "{}",
                t.name
            );
        }
        let (_, fc) = build(TinyArch::Phi3, &["phi3.rope.scaling.attn_factor"]);
        assert!(fc.metadata.get("phi3.rope.scaling.attn_factor").is_none());
        assert!(matches!(
            tiny_with(
                TinyArch::Qwen3,
                &tokenizer_source(),
                0,
                &["rope_freqs.weight"]
            ),
            Err(SynthError::NothingToLeaveOut(_))
        ));
        // Another seed, other weights.
        let c = tiny(TinyArch::LlamaRopeFreqs, &tokenizer_source(), 1)
            .unwrap()
            .to_bytes();
        assert!(a != c);
    }
}
