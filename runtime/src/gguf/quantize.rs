//! `ember quantize`: re-encode a GGUF as one of llama.cpp's quantization mixes, producing the
//! file `llama-quantize` writes for the same input and type (without an importance matrix),
//! byte for byte.
//!
//! What that takes, from llama.cpp's `src/llama-quant.cpp` (0c1e570):
//!
//! * **Which tensors change** ([`allows_quantization`]): 2-D and 3-D tensors whose name ends
//!   in `weight`, except norms, MoE routers, positional embeddings and a list of small
//!   special tensors; everything else (norms, biases, 1-D tensors) is copied as it is.
//! * **To what** ([`plan`], `llama_tensor_get_type`): the mix's default block type, except
//!   for the tensors each mix treats specially — the output projection (and the token
//!   embeddings when they are tied to it) at Q6_K, `attn_v` / `ffn_down` at more bits in the
//!   first and last eighths of the layers and every third layer between ("use_more_bits"),
//!   `attn_output` for the low-bit mixes — counting the layers as llama.cpp does; then a
//!   fallback when a row is not a whole number of blocks (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K →
//!   Q8_0, Q2_K/Q3_K → Q4_0, IQ4_XS → IQ4_NL, else F16).
//! * **The bytes**: each changed tensor is dequantized to f32 ([`crate::quant::dequantize`],
//!   bit-identical to ggml's `to_float`) and encoded by [`crate::quant::ggml_quantize`] (ggml's
//!   quantizers, bit for bit); unchanged tensors are copied.
//! * **The file**: GGUF v3; the input's metadata in its order, minus the split keys, then
//!   `general.quantization_version` = 2 and `general.file_type` = the mix's id (both moved to
//!   the end, as `gguf_set_val_u32` does); tensors sorted by layer number, then name (the
//!   loader's `weight_name_comparer`), each with as many dims as ggml counts (trailing 1s
//!   dropped), data aligned to 32 bytes and the last tensor padded too.
//!
//! The metadata are copied as the input's raw bytes, so strings that are not UTF-8 and arrays
//! of any element type come out exactly as they went in.
//!
//! Memory: the output is written as it is made: the header first (all sizes are known from
//! the plan), then one tensor after another, each read from the input file in slabs of rows
//! (at most [`SLAB_ELEMENTS`] elements at a time, with plain reads rather than through the
//! memory map, so the process does not keep every input page it touched), encoded on rayon's
//! threads row by row and written in order — the bytes do not depend on the number of
//! threads.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{GgufFile, TensorInfo, keys};
use crate::quant::{self, GgmlType, QuantError, ggml_quantize};

/// `GGML_QNT_VERSION`, which llama-quantize writes as `general.quantization_version`.
pub const QUANTIZATION_VERSION: u32 = 2;
/// The data alignment llama-quantize writes (`GGUF_DEFAULT_ALIGNMENT`).
pub const ALIGNMENT: u64 = 32;
/// Elements read, encoded and written at a time (whole rows, at least one): bounds the memory
/// a large tensor takes (Qwen2.5's 151936 × 896 embeddings are 545 MB as f32; a slab of an F32
/// input is 16 MiB).
pub const SLAB_ELEMENTS: usize = 4 << 20;

/// A quantization mix (llama.cpp's `llama_ftype`) that ember writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q5_K_S,
    Q5_1,
    Q5_0,
    Q4_K_M,
    Q4_K_S,
    Q4_1,
    Q4_0,
    Q3_K_L,
    Q3_K_M,
    Q3_K_S,
    Q2_K,
    IQ4_NL,
    IQ4_XS,
}

impl FileType {
    /// Every mix, as `ember quantize --help` lists them.
    pub const ALL: [FileType; 19] = [
        FileType::Q8_0,
        FileType::Q6_K,
        FileType::Q5_K_M,
        FileType::Q5_K_S,
        FileType::Q5_1,
        FileType::Q5_0,
        FileType::Q4_K_M,
        FileType::Q4_K_S,
        FileType::Q4_1,
        FileType::Q4_0,
        FileType::IQ4_XS,
        FileType::IQ4_NL,
        FileType::Q3_K_L,
        FileType::Q3_K_M,
        FileType::Q3_K_S,
        FileType::Q2_K,
        FileType::F16,
        FileType::BF16,
        FileType::F32,
    ];

    /// The name llama-quantize takes and prints.
    pub fn name(self) -> &'static str {
        use FileType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            Q8_0 => "Q8_0",
            Q6_K => "Q6_K",
            Q5_K_M => "Q5_K_M",
            Q5_K_S => "Q5_K_S",
            Q5_1 => "Q5_1",
            Q5_0 => "Q5_0",
            Q4_K_M => "Q4_K_M",
            Q4_K_S => "Q4_K_S",
            Q4_1 => "Q4_1",
            Q4_0 => "Q4_0",
            Q3_K_L => "Q3_K_L",
            Q3_K_M => "Q3_K_M",
            Q3_K_S => "Q3_K_S",
            Q2_K => "Q2_K",
            IQ4_NL => "IQ4_NL",
            IQ4_XS => "IQ4_XS",
        }
    }

    /// The `llama_ftype` id, written as `general.file_type`.
    pub fn id(self) -> u32 {
        use FileType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q8_0 => 7,
            Q5_0 => 8,
            Q5_1 => 9,
            Q2_K => 10,
            Q3_K_S => 11,
            Q3_K_M => 12,
            Q3_K_L => 13,
            Q4_K_S => 14,
            Q4_K_M => 15,
            Q5_K_S => 16,
            Q5_K_M => 17,
            Q6_K => 18,
            IQ4_NL => 25,
            IQ4_XS => 30,
            BF16 => 32,
        }
    }

    /// The block type most tensors get (`llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlType {
        use FileType::*;
        match self {
            F32 => GgmlType::F32,
            F16 => GgmlType::F16,
            BF16 => GgmlType::BF16,
            Q8_0 => GgmlType::Q8_0,
            Q6_K => GgmlType::Q6_K,
            Q5_K_M | Q5_K_S => GgmlType::Q5_K,
            Q5_1 => GgmlType::Q5_1,
            Q5_0 => GgmlType::Q5_0,
            Q4_K_M | Q4_K_S => GgmlType::Q4_K,
            Q4_1 => GgmlType::Q4_1,
            Q4_0 => GgmlType::Q4_0,
            Q3_K_L | Q3_K_M | Q3_K_S => GgmlType::Q3_K,
            Q2_K => GgmlType::Q2_K,
            IQ4_NL => GgmlType::IQ4_NL,
            IQ4_XS => GgmlType::IQ4_XS,
        }
    }

    /// A mix by name, case-insensitively, with llama-quantize's aliases (Q3_K = Q3_K_M,
    /// Q4_K = Q4_K_M, Q5_K = Q5_K_M) and its numeric ids.
    pub fn parse(s: &str) -> Option<FileType> {
        let up = s.trim().to_ascii_uppercase();
        let alias = match up.as_str() {
            "Q3_K" => "Q3_K_M",
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            other => other,
        };
        Self::ALL
            .into_iter()
            .find(|t| t.name() == alias)
            .or_else(|| {
                let id: u32 = up.parse().ok()?;
                Self::ALL.into_iter().find(|t| t.id() == id)
            })
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(
        "{path}: missing metadata '{key}' (llama-quantize needs the layer count to choose the mix)"
    )]
    MissingKey { path: PathBuf, key: String },
    #[error(
        "{path}: general.alignment is {alignment}; llama-quantize always writes 32-byte alignment \
         (with the key copied, a broken file), so ember refuses"
    )]
    Alignment { path: PathBuf, alignment: u64 },
    #[error(
        "{count} tensor(s) are already quantized ({example} is {from}); requantizing loses \
         quality compared to quantizing from 16 or 32 bits: pass --allow-requantize to do it anyway"
    )]
    RequantizeNotAllowed {
        count: usize,
        example: String,
        from: GgmlType,
    },
    #[error("tensor {name}: ember cannot read {ty} to re-encode it")]
    CannotDequantize { name: String, ty: GgmlType },
    #[error("tensor {name}: no fallback type for {ty} with rows of {ncols}")]
    NoFallback {
        name: String,
        ty: GgmlType,
        ncols: u64,
    },
    #[error("tensor {name}: {what}")]
    Layer { name: String, what: String },
    #[error("tensor {name}: {source}")]
    Quantize {
        name: String,
        #[source]
        source: QuantError,
    },
    #[error("{path}: malformed metadata: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// One output tensor: where it comes from and what it becomes.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    /// Index into the source's [`GgufFile::tensors`].
    pub src: usize,
    pub name: String,
    /// As written: ggml's dims (trailing 1s dropped, at least one).
    pub dims: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
    /// The mix's choice did not fit the row length and was replaced (llama.cpp's fallback).
    pub fallback: bool,
    /// Bytes in the source and in the output (before padding).
    pub src_bytes: u64,
    pub out_bytes: u64,
    /// Offset in the output's data section.
    pub offset: u64,
}

impl PlannedTensor {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Whether the bytes change (else they are copied).
    pub fn converts(&self) -> bool {
        self.from != self.to
    }
}

/// What [`plan`] decided: the output tensors in output order.
#[derive(Clone, Debug)]
pub struct Plan {
    pub ftype: FileType,
    pub tensors: Vec<PlannedTensor>,
    /// How many tensors fell back to another type (llama-quantize's `n_fallback`).
    pub n_fallback: usize,
    /// The output's metadata and tensor table, padded (everything before the data).
    header: Vec<u8>,
}

impl Plan {
    /// Size of the output file.
    pub fn output_len(&self) -> u64 {
        self.header.len() as u64
            + self
                .tensors
                .last()
                .map(|t| t.offset + t.out_bytes.next_multiple_of(ALIGNMENT))
                .unwrap_or(0)
    }
    /// Tensors re-encoded from an already quantized type.
    pub fn requantized(&self) -> impl Iterator<Item = &PlannedTensor> {
        self.tensors
            .iter()
            .filter(|t| t.converts() && is_quantized(t.from))
    }
    /// Sum of tensor bytes in the source and in the output (llama-quantize's "model size" and
    /// "quant size").
    pub fn sizes(&self) -> (u64, u64) {
        self.tensors
            .iter()
            .fold((0, 0), |(a, b), t| (a + t.src_bytes, b + t.out_bytes))
    }
}

/// `ggml_is_quantized`: a block type (not a float or integer type).
pub fn is_quantized(ty: GgmlType) -> bool {
    use GgmlType::*;
    !matches!(ty, F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64)
}

/// ggml's dimension count: the last dimension above 1, at least one.
fn ggml_dims(dims: &[u64]) -> Vec<u64> {
    let n = dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1);
    let mut v: Vec<u64> = dims.iter().copied().take(n).collect();
    v.resize(n, 1);
    v
}

/// The layer of `blk.N.…` as `sscanf(name, "blk.%d.", &l)` reads it (`None` if it does not).
fn layer_of(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("blk.")?;
    let rest = rest.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, digits) = match rest.as_bytes().first() {
        Some(b'-') => (true, &rest[1..]),
        Some(b'+') => (false, &rest[1..]),
        _ => (false, rest),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    // sscanf's %d stores an int: digits beyond that range are undefined in C; saturate.
    let v = digits[..end]
        .parse::<i64>()
        .unwrap_or(i64::MAX)
        .min(i32::MAX as i64);
    Some(if neg { -v } else { v })
}

/// The order of llama.cpp's `weights_map` (`weight_name_comparer`): by layer (tensors outside
/// the layers first), then by name.
fn tensor_order(a: &str, b: &str) -> std::cmp::Ordering {
    let la = layer_of(a).unwrap_or(-1);
    let lb = layer_of(b).unwrap_or(-1);
    la.cmp(&lb).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// llama.cpp's `tensor_category`: broad roles by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    AttentionQ,
    AttentionV,
    AttentionK,
    AttentionQkv,
    AttentionKvB,
    AttentionOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Output,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        return Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return TokenEmbd;
    }
    for (pat, cat) in [
        ("attn_qkv.weight", AttentionQkv),
        ("attn_kv_b.weight", AttentionKvB),
        ("attn_v.weight", AttentionV),
        ("attn_k.weight", AttentionK),
        ("attn_q.weight", AttentionQ),
        ("attn_output.weight", AttentionOutput),
        ("ffn_up", FfnUp),
        ("ffn_gate", FfnGate),
        ("ffn_down", FfnDown),
    ] {
        if name.contains(pat) {
            return cat;
        }
    }
    Other
}

fn is_attn_v_like(c: Category) -> bool {
    matches!(
        c,
        Category::AttentionV | Category::AttentionQkv | Category::AttentionKvB
    )
}

/// llama.cpp's `tensor_allows_quantization` (with llama-quantize's defaults: the output
/// tensor may be quantized, not only copying): whether the mix applies to this tensor.
pub fn allows_quantization(arch: &str, name: &str, dims: &[u64]) -> bool {
    if ggml_dims(dims).len() < 2 {
        return false;
    }
    // `name.rfind("weight") == name.size() - 6`, unsigned: a 5-byte name passes too.
    let ends_weight = match name.rfind("weight") {
        Some(p) => p + 6 == name.len(),
        None => name.len() == 5,
    };
    let has = |s: &str| name.contains(s);
    let mut q = ends_weight && !has("_norm.weight");
    q &= !has("ffn_gate_inp.weight") && !has("ffn_gate_tid2eid.weight");
    q &= !has("altup") && !has("laurel") && !has("per_layer_model_proj");
    q &= name != "position_embd.weight" && name != "token_types.weight";
    q &= !has("ssm_conv1d") && !has("shortconv.conv.weight");
    q &= !has("indexer.k_proj.weight") && !has("indexer.q_proj.weight");
    if arch == "glm5-next" {
        for s in [
            "hc_",
            "indexer.attn_q_b",
            "indexer.attn_k",
            "indexer.proj",
            "indexer_compressor_gate",
            "indexer_compressor_ape",
            "ssm_f_a.weight",
            "ssm_f_b.weight",
            "ssm_g_a.weight",
            "ssm_g_b.weight",
            "ssm_beta.weight",
            "attn_kv_a_mqa.weight",
            "attn_k_b.weight",
            "attn_v_b.weight",
        ] {
            q &= !has(s);
        }
    }
    for s in [
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ] {
        q &= !has(s);
    }
    q
}

/// The hyper-parameters the mix rules read (llama.cpp's `hparams` and `model.type`).
struct ModelInfo {
    arch: String,
    n_layer: i64,
    n_expert: u64,
    /// `n_head / n_head_kv` of layer 0 (0 without KV heads).
    n_gqa: u64,
    /// llama.cpp classifies the model as 70B (attn_v gets Q5_K instead of Q3_K/Q4_K).
    is_70b: bool,
}

impl ModelInfo {
    fn read(src: &GgufFile) -> Result<ModelInfo, QuantizeError> {
        let md = &src.metadata;
        let arch = md.architecture().unwrap_or("").to_string();
        // A per-layer array: its first entry (llama.cpp's n_head(0)).
        let first = |key: String| -> Option<u64> {
            match md.get(&key)? {
                super::Value::Array(a) => match a {
                    super::Array::U32(v) => v.first().map(|&x| x as u64),
                    super::Array::I32(v) => v.first().map(|&x| x.max(0) as u64),
                    super::Array::Other(v) => v.first().and_then(super::Value::as_u64),
                    _ => None,
                },
                v => v.as_u64(),
            }
        };
        let key = format!("{arch}.block_count");
        let n_layer = md.get_u64(&key).ok_or_else(|| QuantizeError::MissingKey {
            path: src.path().to_path_buf(),
            key,
        })? as i64;
        let n_head = first(format!("{arch}.attention.head_count")).unwrap_or(0);
        let n_head_kv = first(format!("{arch}.attention.head_count_kv")).unwrap_or(n_head);
        let n_expert = md.get_u64(&format!("{arch}.expert_count")).unwrap_or(0);
        let n_gqa = n_head.checked_div(n_head_kv).unwrap_or(0);
        let is_70b = match arch.as_str() {
            "llama" => n_expert != 8 && n_layer == 80 && n_head != n_head_kv,
            "qwen2" | "deci" | "olmo" => n_layer == 80,
            "jais2" => n_layer == 68,
            _ => false,
        };
        Ok(ModelInfo {
            arch,
            n_layer,
            n_expert,
            n_gqa,
            is_70b,
        })
    }
}

/// llama.cpp's `quantize_state_impl`: the counters the mix rules walk with.
struct State<'a> {
    m: &'a ModelInfo,
    ftype: FileType,
    tied: bool,
    n_attention_wv: i64,
    i_attention_wv: i64,
    i_ffn_down: i64,
    i_ffn_gate: i64,
    i_ffn_up: i64,
}

fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

impl State<'_> {
    /// `layer_info`: the layer counter, or for MoE models the layer in the name.
    fn layer(&self, counter: i64, name: &str) -> Result<(i64, i64), QuantizeError> {
        let n = self.m.n_layer;
        if self.m.n_expert.max(1) > 1 {
            let l = layer_of(name).ok_or_else(|| QuantizeError::Layer {
                name: name.to_string(),
                what: "failed to determine its layer".into(),
            })?;
            if l < 0 || l >= n {
                return Err(QuantizeError::Layer {
                    name: name.to_string(),
                    what: format!("bad layer {l}: must be in [0, {n})"),
                });
            }
            return Ok((l, n));
        }
        Ok((counter, n))
    }

    /// `llama_tensor_get_type_impl` for the mixes ember writes (the IQ1/IQ2/IQ3, TQ and
    /// MXFP4 branches cannot be reached from them).
    fn mix_type(
        &mut self,
        mut t: GgmlType,
        name: &str,
        ncols: u64,
        cat: Category,
    ) -> Result<GgmlType, QuantizeError> {
        use Category::*;
        use FileType as F;
        use GgmlType as G;
        let ft = self.ftype;
        let m = self.m;
        let falcon = m.arch == "falcon";
        if m.arch == "glm5-next"
            && (name.contains("attn_q_a")
                || name.contains("attn_q_b")
                || name.contains("nextn.eh_proj"))
            && !matches!(t, G::F32 | G::BF16 | G::F16)
        {
            return Ok(G::Q8_0);
        }
        if cat == Output || (self.tied && cat == TokenEmbd) {
            if falcon || !ncols.is_multiple_of(t.block_len() as u64) {
                t = G::Q8_0;
            } else if t != G::Q8_0 {
                t = G::Q6_K;
            }
        } else if cat == TokenEmbd {
            // Only the IQ1/IQ2/IQ3/TQ mixes change the token embeddings.
        } else if is_attn_v_like(cat) {
            let (i, n) = (self.i_attention_wv, self.n_attention_wv);
            match ft {
                F::Q2_K => t = if m.n_gqa >= 4 { G::Q4_K } else { G::Q3_K },
                F::Q3_K_M => t = if i < 2 { G::Q5_K } else { G::Q4_K },
                F::Q3_K_L => t = G::Q5_K,
                F::IQ4_NL | F::IQ4_XS if m.n_gqa >= 4 => t = G::Q5_K,
                F::Q4_K_M | F::Q5_K_M if use_more_bits(i, n) => t = G::Q6_K,
                F::Q4_K_S if i < 4 => t = G::Q5_K,
                _ => {}
            }
            if m.is_70b && matches!(t, G::Q3_K | G::Q4_K) {
                t = G::Q5_K;
            }
            if m.n_expert == 8 {
                t = G::Q8_0;
            }
            self.i_attention_wv += 1;
        } else if cat == AttentionK {
            if m.n_expert == 8 {
                t = G::Q8_0;
            }
        } else if cat == AttentionQ {
            // Only the IQ3 mixes change attn_q.
        } else if cat == FfnDown {
            let (i, n) = self.layer(self.i_ffn_down, name)?;
            match ft {
                F::Q2_K => t = G::Q3_K,
                F::Q3_K_M => {
                    t = if i < n / 16 {
                        G::Q5_K
                    } else if !falcon || use_more_bits(i, n) {
                        G::Q4_K
                    } else {
                        G::Q3_K
                    }
                }
                F::Q3_K_L => t = if falcon { G::Q4_K } else { G::Q5_K },
                F::Q4_K_M => {
                    if falcon {
                        t = if i < n / 16 {
                            G::Q6_K
                        } else if use_more_bits(i, n) {
                            G::Q5_K
                        } else {
                            G::Q4_K
                        };
                    } else if use_more_bits(i, n) {
                        t = G::Q6_K;
                    }
                }
                // (without an importance matrix)
                F::IQ4_NL | F::IQ4_XS if i < n / 8 => t = G::Q5_K,
                F::Q5_K_M if use_more_bits(i, n) => t = G::Q6_K,
                F::Q4_K_S if !falcon && i < n / 8 => t = G::Q5_K,
                _ => {}
            }
            self.i_ffn_down += 1;
        } else if cat == AttentionOutput {
            if !falcon {
                if m.n_expert == 8 {
                    if matches!(
                        ft,
                        F::Q2_K
                            | F::Q3_K_S
                            | F::Q3_K_M
                            | F::IQ4_NL
                            | F::Q4_K_S
                            | F::Q4_K_M
                            | F::IQ4_XS
                    ) {
                        t = G::Q5_K;
                    }
                } else {
                    match ft {
                        F::Q2_K => t = G::Q3_K,
                        F::Q3_K_M => t = G::Q4_K,
                        F::Q3_K_L => t = G::Q5_K,
                        _ => {}
                    }
                }
            } else if ft == F::Q3_K_L {
                t = G::Q4_K;
            }
        } else if cat == AttentionQkv {
            // Unreachable in llama.cpp too: attn_qkv is attn_v-like, handled above.
        } else if cat == FfnGate {
            self.layer(self.i_ffn_gate, name)?;
            self.i_ffn_gate += 1;
        } else if cat == FfnUp {
            self.layer(self.i_ffn_up, name)?;
            self.i_ffn_up += 1;
        }
        Ok(t)
    }
}

/// `tensor_type_fallback`: a type whose blocks fit rows of `ncols`; `Ok(None)` when `t`
/// already fits.
fn fallback(t: GgmlType, ncols: u64, name: &str) -> Result<Option<GgmlType>, QuantizeError> {
    use GgmlType as G;
    if ncols.is_multiple_of(t.block_len() as u64) {
        return Ok(None);
    }
    let mut r = match t {
        G::IQ1_S
        | G::IQ1_M
        | G::IQ2_XXS
        | G::IQ2_XS
        | G::IQ2_S
        | G::IQ3_XXS
        | G::IQ3_S
        | G::IQ4_XS => G::IQ4_NL,
        G::Q2_K | G::Q3_K | G::TQ1_0 | G::TQ2_0 => G::Q4_0,
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        _ if t.block_len() <= 32 => t,
        _ => {
            return Err(QuantizeError::NoFallback {
                name: name.to_string(),
                ty: t,
                ncols,
            });
        }
    };
    if !ncols.is_multiple_of(r.block_len() as u64) {
        r = G::F16;
    }
    Ok(Some(r))
}

/// Decide every output tensor's type, order and offset, and build the output header, as
/// llama-quantize does for `ftype` (no importance matrix, no overrides).
pub fn plan(src: &GgufFile, ftype: FileType) -> Result<Plan, QuantizeError> {
    plan_with(src, ftype, false)
}

/// [`plan`], or with `pure` (llama-quantize's `--pure`) without the mix's per-tensor choices:
/// every tensor that may be quantized gets the default type (or its fallback).
pub fn plan_with(src: &GgufFile, ftype: FileType, pure: bool) -> Result<Plan, QuantizeError> {
    if let Some(a) = src.metadata.get_u64(keys::ALIGNMENT)
        && a != ALIGNMENT
    {
        return Err(QuantizeError::Alignment {
            path: src.path().to_path_buf(),
            alignment: a,
        });
    }
    let info = ModelInfo::read(src)?;
    let mut order: Vec<usize> = (0..src.tensors.len()).collect();
    order.sort_by(|&a, &b| tensor_order(&src.tensors[a].name, &src.tensors[b].name));
    let cats: Vec<Category> = order
        .iter()
        .map(|&i| category(&src.tensors[i].name))
        .collect();
    let mut st = State {
        m: &info,
        ftype,
        tied: !cats.contains(&Category::Output),
        n_attention_wv: cats.iter().filter(|c| is_attn_v_like(**c)).count() as i64,
        i_attention_wv: 0,
        i_ffn_down: 0,
        i_ffn_gate: 0,
        i_ffn_up: 0,
    };
    let default = ftype.default_type();
    let mut tensors = Vec::with_capacity(order.len());
    let mut n_fallback = 0;
    let mut offset = 0u64;
    for (&i, &cat) in order.iter().zip(&cats) {
        let t: &TensorInfo = &src.tensors[i];
        let dims = ggml_dims(&t.dims);
        let ncols = dims[0];
        let mut to = t.ty;
        let mut fell_back = false;
        if allows_quantization(&info.arch, &t.name, &t.dims) {
            to = default;
            if is_quantized(default) {
                if !pure {
                    to = st.mix_type(to, &t.name, ncols, cat)?;
                }
                if let Some(f) = fallback(to, ncols, &t.name)? {
                    to = f;
                    fell_back = true;
                    n_fallback += 1;
                }
            }
        }
        let rows = t.n_elements() / ncols.max(1);
        let out_bytes = if to == t.ty {
            t.n_bytes
        } else {
            to.row_bytes(ncols as usize)
                .ok_or_else(|| QuantizeError::Quantize {
                    name: t.name.clone(),
                    source: QuantError::NotBlockMultiple {
                        ty: to,
                        n: ncols as usize,
                        block_len: to.block_len(),
                    },
                })? as u64
                * rows
        };
        tensors.push(PlannedTensor {
            src: i,
            name: t.name.clone(),
            dims,
            from: t.ty,
            to,
            fallback: fell_back,
            src_bytes: t.n_bytes,
            out_bytes,
            offset,
        });
        offset += out_bytes.next_multiple_of(ALIGNMENT);
    }
    let header = header(src, ftype, &tensors)?;
    Ok(Plan {
        ftype,
        tensors,
        n_fallback,
        header,
    })
}

/// The byte spans of each metadata key-value pair of `src` (key, type and value, as stored),
/// with its key, in file order.
fn raw_kvs(src: &GgufFile) -> Result<Vec<(String, &[u8])>, QuantizeError> {
    let b = src.bytes();
    let bad = |what: &str| QuantizeError::Malformed {
        path: src.path().to_path_buf(),
        what: what.to_string(),
    };
    let rd = |pos: usize, n: usize| -> Result<&[u8], QuantizeError> {
        b.get(pos..pos.checked_add(n).ok_or_else(|| bad("overflow"))?)
            .ok_or_else(|| bad("truncated"))
    };
    let u32_at = |pos| -> Result<u32, QuantizeError> {
        Ok(u32::from_le_bytes(rd(pos, 4)?.try_into().unwrap()))
    };
    let u64_at = |pos| -> Result<u64, QuantizeError> {
        Ok(u64::from_le_bytes(rd(pos, 8)?.try_into().unwrap()))
    };
    // Size of a value of scalar type `t` at `pos`.
    let scalar = |t: u32, pos: usize| -> Result<usize, QuantizeError> {
        Ok(match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => 8usize
                .checked_add(u64_at(pos)? as usize)
                .ok_or_else(|| bad("string length"))?,
            _ => return Err(bad(&format!("value type {t}"))),
        })
    };
    let n_kv = u64_at(16)?;
    let mut pos = 24usize;
    let mut out = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let start = pos;
        let klen = u64_at(pos)? as usize;
        let key = String::from_utf8_lossy(rd(pos + 8, klen)?).into_owned();
        pos += 8 + klen;
        let t = u32_at(pos)?;
        pos += 4;
        if t == 9 {
            let et = u32_at(pos)?;
            let n = u64_at(pos + 4)?;
            pos += 12;
            for _ in 0..n {
                pos += scalar(et, pos)?;
            }
        } else {
            pos += scalar(t, pos)?;
        }
        out.push((key, rd(start, pos - start)?));
    }
    Ok(out)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The keys llama-quantize drops: the split bookkeeping (the output is one file) and the two
/// it sets again at the end.
const DROPPED_KEYS: [&str; 5] = [
    "general.quantization_version",
    keys::FILE_TYPE,
    "split.no",
    "split.count",
    "split.tensors.count",
];

/// Everything before the tensor data: header, metadata, tensor table, padding.
fn header(
    src: &GgufFile,
    ftype: FileType,
    tensors: &[PlannedTensor],
) -> Result<Vec<u8>, QuantizeError> {
    let kvs = raw_kvs(src)?;
    let kept: Vec<&[u8]> = kvs
        .iter()
        .filter(|(k, _)| !DROPPED_KEYS.contains(&k.as_str()))
        .map(|(_, raw)| *raw)
        .collect();
    let mut out = Vec::new();
    out.extend_from_slice(&super::GGUF_MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kept.len() as u64 + 2).to_le_bytes());
    for raw in kept {
        out.extend_from_slice(raw);
    }
    for (k, v) in [
        ("general.quantization_version", QUANTIZATION_VERSION),
        (keys::FILE_TYPE, ftype.id()),
    ] {
        put_str(&mut out, k);
        out.extend_from_slice(&4u32.to_le_bytes()); // GGUF_TYPE_UINT32
        out.extend_from_slice(&v.to_le_bytes());
    }
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.to.id().to_le_bytes());
        out.extend_from_slice(&t.offset.to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT as usize), 0);
    Ok(out)
}

/// What [`write`] reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    /// `elements` more of the model's elements are done (copied or encoded).
    Elements(u64),
    /// Tensor `index` (into [`Plan::tensors`]) is written.
    TensorDone(usize, &'a PlannedTensor),
}

/// Where tensor bytes are read from: the input file, a slab at a time with positioned reads
/// (so that the process holds only the slab, not every page of the input it has touched), or,
/// for an input parsed from memory, its bytes.
enum Input<'a> {
    File(std::fs::File),
    Memory(&'a [u8]),
}

impl Input<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Input::File(f) => {
                use std::io::{Read, Seek, SeekFrom};
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(buf)
            }
            Input::Memory(b) => {
                let s = offset as usize;
                buf.copy_from_slice(&b[s..s + buf.len()]);
                Ok(())
            }
        }
    }
}

/// Write the output file for `plan` to `out`, streaming: the header, then tensor after tensor,
/// each read from the input and written a slab of rows at a time. Converted tensors are
/// dequantized and encoded row by row on rayon's threads (the bytes do not depend on their
/// number).
pub fn write<W: Write>(
    src: &GgufFile,
    plan: &Plan,
    out: &mut W,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<(), std::io::Error> {
    let mut input = match std::fs::File::open(src.path()) {
        Ok(f) if f.metadata()?.len() == src.file_len() => Input::File(f),
        _ => Input::Memory(src.bytes()),
    };
    out.write_all(&plan.header)?;
    let zeros = [0u8; ALIGNMENT as usize];
    let mut src_buf = Vec::new();
    let mut dst_buf = Vec::new();
    for (k, t) in plan.tensors.iter().enumerate() {
        let info = &src.tensors[t.src];
        let start = src.data_offset() + info.offset;
        let ncols = t.dims[0] as usize;
        let rows = (t.n_elements() / t.dims[0]) as usize;
        let src_row = info.n_bytes as usize / rows.max(1);
        let dst_row = t.out_bytes as usize / rows.max(1);
        let slab_rows = (SLAB_ELEMENTS / ncols).max(1);
        for r0 in (0..rows).step_by(slab_rows) {
            let n = slab_rows.min(rows - r0);
            src_buf.resize(n * src_row, 0);
            input.read_at(start + (r0 * src_row) as u64, &mut src_buf)?;
            if t.converts() {
                dst_buf.resize(n * dst_row, 0);
                encode_rows(t, &src_buf, &mut dst_buf)?;
                out.write_all(&dst_buf)?;
            } else {
                out.write_all(&src_buf)?;
            }
            progress(Progress::Elements((n * ncols) as u64));
        }
        let pad = (t.out_bytes.next_multiple_of(ALIGNMENT) - t.out_bytes) as usize;
        out.write_all(&zeros[..pad])?;
        progress(Progress::TensorDone(k, t));
    }
    out.flush()
}

/// Dequantize and re-encode whole rows of `t`: `src` holds them in the input's type, `dst`
/// receives them in the output's.
fn encode_rows(t: &PlannedTensor, src: &[u8], dst: &mut [u8]) -> Result<(), std::io::Error> {
    let ncols = t.dims[0] as usize;
    let rows = src.len() / t.from.row_bytes(ncols).unwrap_or(src.len()).max(1);
    let (src_row, dst_row) = (src.len() / rows.max(1), dst.len() / rows.max(1));
    dst.par_chunks_mut(dst_row)
        .zip(src.par_chunks(src_row))
        .try_for_each_init(
            || vec![0f32; ncols],
            |f, (d, s)| {
                quant::dequantize(t.from, s, f)?;
                ggml_quantize::quantize_into(t.to, f, d)
            },
        )
        .map_err(|e| std::io::Error::other(format!("tensor {}: {e}", t.name)))
}

/// Check that `plan` can be carried out: every converted tensor's source type can be read and
/// its target type encoded, and (unless `allow_requantize`) none is already quantized.
pub fn check(plan: &Plan, allow_requantize: bool) -> Result<(), QuantizeError> {
    for t in plan.tensors.iter().filter(|t| t.converts()) {
        if !t.from.is_supported() {
            return Err(QuantizeError::CannotDequantize {
                name: t.name.clone(),
                ty: t.from,
            });
        }
        if !ggml_quantize::can_quantize(t.to) {
            return Err(QuantizeError::Quantize {
                name: t.name.clone(),
                source: QuantError::Unsupported(t.to),
            });
        }
    }
    if !allow_requantize {
        let req: Vec<&PlannedTensor> = plan.requantized().collect();
        if let Some(first) = req.first() {
            return Err(QuantizeError::RequantizeNotAllowed {
                count: req.len(),
                example: first.name.clone(),
                from: first.from,
            });
        }
    }
    Ok(())
}

/// Check `plan` and write it to `out_path`, through `OUT.tmp` renamed at the end: a failure
/// leaves no file at `out_path` (and removes the temporary one). `threads`: the encoding
/// threads (default: rayon's pool).
pub fn quantize_to_path(
    src: &GgufFile,
    plan: &Plan,
    allow_requantize: bool,
    out_path: &Path,
    threads: Option<usize>,
    progress: impl FnMut(Progress<'_>) + Send,
) -> Result<(), QuantizeError> {
    check(plan, allow_requantize)?;
    if let Some(n) = threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| QuantizeError::Io {
                path: out_path.to_path_buf(),
                err: std::io::Error::other(format!("starting {n} worker threads: {e}")),
            })?;
        return pool.install(|| write_to_path(src, plan, out_path, progress));
    }
    write_to_path(src, plan, out_path, progress)
}

fn write_to_path(
    src: &GgufFile,
    plan: &Plan,
    out_path: &Path,
    progress: impl FnMut(Progress<'_>),
) -> Result<(), QuantizeError> {
    let mut tmp = out_path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| QuantizeError::Io { path, err }
    };
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        write(src, plan, &mut w, progress).map_err(io(&tmp))?;
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, out_path).map_err(io(out_path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_types_parse_like_llama_quantize() {
        assert_eq!(FileType::parse("q4_k_m"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::parse("Q4_K"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::parse("q3_k"), Some(FileType::Q3_K_M));
        assert_eq!(FileType::parse("15"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::parse("iq4_xs"), Some(FileType::IQ4_XS));
        assert_eq!(FileType::parse("Q2_K_S"), None);
        assert_eq!(FileType::parse("Q4_3"), None);
        for t in FileType::ALL {
            assert_eq!(FileType::parse(t.name()), Some(t));
            assert_eq!(FileType::parse(&t.id().to_string()), Some(t));
        }
    }

    #[test]
    fn tensors_sort_by_layer_then_name() {
        let mut v = vec![
            "blk.10.attn_q.weight",
            "blk.2.ffn_up.weight",
            "output.weight",
            "blk.2.attn_k.weight",
            "token_embd.weight",
            "blk.x.odd",
        ];
        v.sort_by(|a, b| tensor_order(a, b));
        assert_eq!(
            v,
            [
                "blk.x.odd",
                "output.weight",
                "token_embd.weight",
                "blk.2.attn_k.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_q.weight",
            ]
        );
        assert_eq!(layer_of("blk. 7.x"), Some(7));
        assert_eq!(layer_of("blk.-1.x"), Some(-1));
    }

    #[test]
    fn which_tensors_the_mix_applies_to() {
        assert!(allows_quantization(
            "llama",
            "blk.0.ffn_up.weight",
            &[576, 1536]
        ));
        assert!(allows_quantization("llama", "output.weight", &[576, 49152]));
        assert!(!allows_quantization(
            "llama",
            "blk.0.attn_norm.weight",
            &[576]
        ));
        // A 2-D tensor with a trailing 1 is 1-D to ggml.
        assert!(!allows_quantization("llama", "blk.0.x.weight", &[576, 1]));
        assert!(!allows_quantization(
            "qwen2",
            "blk.0.attn_q.bias",
            &[896, 2]
        ));
        assert!(!allows_quantization(
            "llama",
            "blk.0.ffn_norm.weight",
            &[64, 64]
        ));
        assert!(!allows_quantization(
            "llama",
            "blk.0.ffn_gate_inp.weight",
            &[64, 8]
        ));
        assert!(!allows_quantization(
            "llama",
            "position_embd.weight",
            &[64, 64]
        ));
        assert!(!allows_quantization(
            "rwkv7",
            "blk.0.time_mix_w1.weight",
            &[64, 64]
        ));
        // llama.cpp's unsigned arithmetic: any 5-byte name passes.
        assert!(allows_quantization("llama", "abcde", &[64, 64]));
    }

    #[test]
    fn rows_that_are_not_whole_blocks_fall_back_as_llama_cpp() {
        use GgmlType as G;
        let f = |t, n| fallback(t, n, "t").unwrap();
        assert_eq!(f(G::Q4_K, 576), Some(G::Q5_0));
        assert_eq!(f(G::Q5_K, 896), Some(G::Q5_1));
        assert_eq!(f(G::Q6_K, 896), Some(G::Q8_0));
        assert_eq!(f(G::Q2_K, 576), Some(G::Q4_0));
        assert_eq!(f(G::Q3_K, 576), Some(G::Q4_0));
        assert_eq!(f(G::IQ4_XS, 576), Some(G::IQ4_NL));
        assert_eq!(f(G::Q4_K, 4864), None);
        assert_eq!(f(G::Q4_K, 100), Some(G::F16));
        assert_eq!(f(G::Q8_0, 100), Some(G::F16));
    }

    #[test]
    fn use_more_bits_is_llama_cpps() {
        // 24 layers (Qwen2.5-0.5B): the first 3, the last 3, and every third from 5.
        let picked: Vec<i64> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }
}
