//! Quantized weight formats (ggml block layouts) and the kernels that multiply by them.
//!
//! * [`GgmlType`] names every ggml tensor type id; the 15 in [`GgmlType::SUPPORTED`] are computed.
//! * [`dequantize`] / [`quantize`] are scalar reference implementations (obviously correct, slow).
//! * [`matmul`] computes `y[m × rows] = x[m × cols] · Wᵀ` for a borrowed weight matrix
//!   ([`QMatRef`], straight out of the mmap). Quantized weights, for every `m`: the activation
//!   rows are quantized to 8-bit blocks of 32 and integer dot products run against the weight
//!   blocks in place (what llama.cpp does). Float weights (F32/F16/BF16): f32 dots on activations
//!   rounded to the weight's precision, through the `gemm` crate on dequantized weight tiles when
//!   `m` is large.
//!
//! Where things live: `blocks` describes each quantized block format once (sizes, field offsets,
//! zero point, activation format); `reference` holds the scalar dequantizers/quantizers;
//! `kernels` the activation quantizers and portable row dots; `x86` / `neon` the SIMD tile
//! kernels; `matmul` the dispatch, tiling and threading; [`repack`] the device layout.
//!
//! ISA paths: portable scalar (everywhere), AVX2+FMA, AVX-512 (VNNI dot products, 256-bit),
//! NEON (aarch64). [`best_isa`] picks one at runtime; [`matmul_with`] forces one.

// Block kernels index several parallel arrays per element; explicit index loops read clearest.
#![allow(clippy::needless_range_loop)]

mod blocks;
pub mod ggml_quantize;
mod kernels;

use blocks::BlockFormat;
mod matmul;
#[cfg(target_arch = "aarch64")]
mod neon;
mod reference;
pub mod repack;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

pub use matmul::{matmul, matmul_many, matmul_with};
pub use reference::{dequantize, quantize};

/// A ggml tensor element type, by its on-disk type id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// The 15 types that [`dequantize`], [`quantize`] and [`matmul`] compute.
    pub const SUPPORTED: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];

    /// Every type this enum knows, in id order.
    pub const ALL: [GgmlType; 32] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
    ];

    /// ggml type id -> type (`None` for ids ggml never assigned or has retired, e.g. 4, 5, 31..33).
    pub fn from_u32(id: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// The ggml type id (as stored in GGUF tensor infos).
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// The name llama.cpp prints for this type.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// Elements per block (the computed quantized formats agree with their [`blocks`]
    /// descriptors: a compile-time check there).
    pub const fn block_len(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            _ => 256,
        }
    }

    /// Bytes per block (the computed quantized formats: from their [`blocks`] layouts).
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 => 2,
            BF16 => 2,
            I8 => 1,
            I16 => 2,
            I32 => 4,
            I64 => 8,
            F64 => 8,
            Q8_1 => 2 + 2 + 32,
            Q4_0 => BlockFormat::Q4_0.bytes,
            Q4_1 => BlockFormat::Q4_1.bytes,
            Q5_0 => BlockFormat::Q5_0.bytes,
            Q5_1 => BlockFormat::Q5_1.bytes,
            Q8_0 => BlockFormat::Q8_0.bytes,
            Q4_K => BlockFormat::Q4_K.bytes,
            Q5_K => BlockFormat::Q5_K.bytes,
            Q6_K => BlockFormat::Q6_K.bytes,
            Q2_K => BlockFormat::Q2_K.bytes,
            Q3_K => BlockFormat::Q3_K.bytes,
            Q8_K => 4 + 256 + 32,
            IQ2_XXS => 2 + 64,
            IQ2_XS => 2 + 64 + 8,
            IQ3_XXS => 2 + 96,
            IQ1_S => 2 + 32 + 16,
            IQ4_NL => BlockFormat::IQ4_NL.bytes,
            IQ3_S => 2 + 64 + 8 + 32 + 4,
            IQ2_S => 2 + 64 + 8 + 8,
            IQ4_XS => BlockFormat::IQ4_XS.bytes,
            IQ1_M => 32 + 16 + 8,
            TQ1_0 => 48 + 4 + 2,
            TQ2_0 => 64 + 2,
            MXFP4 => 1 + 16,
        }
    }

    /// Bytes for one row of `n` elements; `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// True for the 15 types in [`GgmlType::SUPPORTED`].
    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from [`dequantize`] / [`quantize`].
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("ggml type {0} is not supported by the quant kernels")]
    Unsupported(GgmlType),
    #[error("{ty}: {n} elements is not a multiple of the block length {block_len}")]
    NotBlockMultiple {
        ty: GgmlType,
        n: usize,
        block_len: usize,
    },
    #[error("{ty}: {n} elements need {expected} bytes of blocks, got {got}")]
    BadSrcLen {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
}

/// A borrowed row-major weight matrix: `rows` rows of `cols` elements, each row a run of blocks.
#[derive(Clone, Copy, Debug)]
pub struct QMatRef<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatRef<'a> {
    /// Bytes per row. Panics if `cols` is not a multiple of the block length.
    pub fn row_bytes(&self) -> usize {
        self.ty
            .row_bytes(self.cols)
            .unwrap_or_else(|| panic!("{}: cols {} not a block multiple", self.ty, self.cols))
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Checks that the type is supported and `data` holds exactly `rows` whole rows.
    pub fn validate(&self) -> Result<(), QuantError> {
        if !self.ty.is_supported() {
            return Err(QuantError::Unsupported(self.ty));
        }
        let rb = self
            .ty
            .row_bytes(self.cols)
            .ok_or(QuantError::NotBlockMultiple {
                ty: self.ty,
                n: self.cols,
                block_len: self.ty.block_len(),
            })?;
        let expected = rb * self.rows;
        if self.data.len() != expected {
            return Err(QuantError::BadSrcLen {
                ty: self.ty,
                n: self.rows * self.cols,
                expected,
                got: self.data.len(),
            });
        }
        Ok(())
    }
}

/// An instruction-set path for the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Scalar Rust, compiles and runs everywhere.
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI: AVX2 kernels with `vpdpbusd` integer dot products.
    Avx512,
    /// aarch64 NEON (baseline ASIMD).
    Neon,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// The path [`Isa::name`] names (case-insensitive).
    pub fn from_name(name: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon]
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU can run this path.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The fastest path this CPU supports (detected once, cached), unless `EMBER_ISA` names another
/// one it runs (`portable`, `avx2`, `avx512`, `neon`): to measure a slower path (an AVX2-only
/// machine on an AVX-512 one) or to rule one out.
pub fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        if let Ok(name) = std::env::var("EMBER_ISA") {
            match Isa::from_name(&name) {
                Some(isa) if isa.is_available() => return isa,
                _ => log::warn!(
                    "EMBER_ISA={name} is not a path this CPU runs ({}): using the fastest",
                    available_isas()
                        .iter()
                        .map(|i| i.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Neon] {
            if isa.is_available() {
                return isa;
            }
        }
        Isa::Portable
    })
}

/// Every path this CPU can run, portable first.
pub fn available_isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}

/// Dequantize row `row` of `w` into `dst` (`dst.len() == w.cols`). Panics on bad shapes.
pub fn dequantize_row(w: QMatRef<'_>, row: usize, dst: &mut [f32]) {
    assert!(row < w.rows, "row {row} out of range ({} rows)", w.rows);
    assert_eq!(dst.len(), w.cols, "dequantize_row: dst length");
    matmul::dequant_row_fast(w.ty, w.row(row), dst);
}
