//! The quantized ggml block formats, each described once.
//!
//! A `#[repr(C)]` struct of byte arrays per format gives the layout as ggml declares it (in the
//! spirit of candle's `BlockQ4K`), with a compile-time assert that its size is ggml's; the
//! [`BlockFormat`] descriptors read their sizes and field offsets off those structs, and add what
//! the kernels need besides bytes: bits per quant, the zero point, and the activation format the
//! weight multiplies against. Every kernel (portable, AVX2, AVX-512, NEON), the reference
//! dequantizer/quantizer, the device repacker and [`GgmlType::block_bytes`] read their offsets
//! here; SIMD kernels take the format as a type parameter ([`Format`]) so that the offsets stay
//! compile-time constants in their loops.
//!
//! All multi-byte fields are little-endian; `d`, `m` and `dmin` are f16.

use super::GgmlType;
use super::kernels::ActKind;
use std::mem::{offset_of, size_of};

/// An f16 as stored (little-endian bytes: the blocks are byte-aligned).
type F16 = [u8; 2];

/// Elements per block of the 32-element formats (ggml's `QK4_0` = `QK8_0` = 32).
const QK: usize = 32;
/// Elements per K-quant super-block (ggml's `QK_K`).
const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in a Q4_K/Q5_K super-block (ggml's `K_SCALE_SIZE`).
const K_SCALE_SIZE: usize = 12;

// The layouts. Never constructed: the descriptors below measure them with `size_of` and
// `offset_of`, and the kernels read the bytes in place.

/// x = d·(q − 8); element j is the low nibble of qs[j], element j + 16 the high nibble.
#[allow(dead_code)]
#[repr(C)]
struct BlockQ4_0 {
    d: F16,
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 2 + QK / 2);

/// x = d·q + m; quants as Q4_0.
#[allow(dead_code)]
#[repr(C)]
struct BlockQ4_1 {
    d: F16,
    m: F16,
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 2 * 2 + QK / 2);

/// x = d·(q − 16); bit j of `qh` (a u32) is bit 4 of element j.
#[allow(dead_code)]
#[repr(C)]
struct BlockQ5_0 {
    d: F16,
    qh: [u8; 4],
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 2 + 4 + QK / 2);

/// x = d·q + m; quants as Q5_0.
#[allow(dead_code)]
#[repr(C)]
struct BlockQ5_1 {
    d: F16,
    m: F16,
    qh: [u8; 4],
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 2 * 2 + 4 + QK / 2);

/// x = d·q, q signed.
#[allow(dead_code)]
#[repr(C)]
struct BlockQ8_0 {
    d: F16,
    qs: [u8; QK],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 2 + QK);

/// 8 sub-blocks of 32: x = d·sc·q − dmin·m with 6-bit (sc, m) packed in `scales`; chunk c
/// (64 elements) uses qs[32c..32c + 32], low nibbles for sub-block 2c, high for 2c + 1.
#[allow(dead_code)]
#[repr(C)]
struct BlockQ4K {
    d: F16,
    dmin: F16,
    scales: [u8; K_SCALE_SIZE],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 2 * 2 + K_SCALE_SIZE + QK_K / 2);

/// As Q4_K, plus bit 4 of element l of sub-block s is bit s of qh[l].
#[allow(dead_code)]
#[repr(C)]
struct BlockQ5K {
    d: F16,
    dmin: F16,
    scales: [u8; K_SCALE_SIZE],
    qh: [u8; QK_K / 8],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 2 * 2 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2);

/// 16 sub-blocks of 16: x = d·sc·(q − 32), low 4 bits in `ql`, high 2 in `qh`, i8 scales
/// (bit positions: `reference::deq_q6_k`).
#[allow(dead_code)]
#[repr(C)]
struct BlockQ6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [u8; QK_K / 16],
    d: F16,
}
const _: () = assert!(size_of::<BlockQ6K>() == QK_K / 2 + QK_K / 4 + QK_K / 16 + 2);

/// 16 sub-blocks of 16: x = d·(sc & 15)·q − dmin·(sc >> 4), q 2-bit. Half n (128 elements)
/// uses qs[32n..32n + 32]: element 128n + 32j + l (j < 4, l < 32) is bits 2j..2j + 2 of
/// qs[32n + l], its sub-block (and `scales` byte) 8n + 2j + l / 16.
#[allow(dead_code)]
#[repr(C)]
struct BlockQ2K {
    scales: [u8; QK_K / 16],
    qs: [u8; QK_K / 4],
    d: F16,
    dmin: F16,
}
const _: () = assert!(size_of::<BlockQ2K>() == QK_K / 16 + QK_K / 4 + 2 * 2);

/// 16 sub-blocks of 16: x = d·(sc − 32)·(q − 4), q 3-bit: the low 2 bits as Q2_K's, bit 2 of
/// element 128n + 32j + l is bit 4n + j of hmask[l]; the 6-bit scales packed in 12 bytes
/// (`reference::q3_k_scales`).
#[allow(dead_code)]
#[repr(C)]
struct BlockQ3K {
    hmask: [u8; QK_K / 8],
    qs: [u8; QK_K / 4],
    scales: [u8; K_SCALE_SIZE],
    d: F16,
}
const _: () = assert!(size_of::<BlockQ3K>() == QK_K / 8 + QK_K / 4 + K_SCALE_SIZE + 2);

/// x = d·kvalues_iq4nl[q] (the non-linear table [`KVALUES_IQ4NL`]); nibbles as Q4_0.
#[allow(dead_code)]
#[repr(C)]
struct BlockIQ4NL {
    d: F16,
    qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockIQ4NL>() == 2 + QK / 2);

/// 8 sub-blocks of 32: x = d·(ls − 32)·kvalues_iq4nl[q]; sub-block s has its nibbles in
/// qs[16s..16s + 16] as Q4_0's, and the 6-bit `ls` = nibble s of `scales_l` (low nibble for
/// even s) | bits 2s..2s + 2 of the little-endian u16 `scales_h`, << 4.
#[allow(dead_code)]
#[repr(C)]
struct BlockIQ4XS {
    d: F16,
    scales_h: [u8; 2],
    scales_l: [u8; QK_K / 64],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockIQ4XS>() == 2 + 2 + QK_K / 64 + QK_K / 2);
// The descriptor below names `scales_h`; `scales_l` follows it.
const _: () = assert!(offset_of!(BlockIQ4XS, scales_l) == offset_of!(BlockIQ4XS, scales_h) + 2);

/// ggml's `kvalues_iq4nl`: the 16 levels of the IQ4_NL and IQ4_XS codes.
pub(crate) const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// One quantized block format: sizes, field offsets (bytes from the block start) and numerics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockFormat {
    pub ty: GgmlType,
    /// Elements per block.
    pub len: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// The f16 scale `d`.
    pub d: usize,
    /// The f16 min: `m` (added, Q4_1/Q5_1) or `dmin` (times the sub-block min, subtracted;
    /// Q4_K/Q5_K).
    pub m: Option<usize>,
    /// The high bits of the quants (bit 4 for Q5_*, bits 4..6 for Q6_K, Q3_K's `hmask`).
    pub qh: Option<usize>,
    /// The low bits of the quants (Q6_K's `ql`; Q8_0's whole i8 quants).
    pub qs: usize,
    /// The K-quant sub-block scales (6-bit packed with the mins for Q4_K/Q5_K; i8 for Q6_K;
    /// 4-bit scale | 4-bit min for Q2_K; 6-bit packed for Q3_K; IQ4_XS's `scales_h`, then
    /// `scales_l`).
    pub scales: Option<usize>,
    /// Bits per quant (the index bits for the table formats).
    pub bits: u32,
    /// Subtracted from each unsigned quant (Q4_0: 8, Q5_0: 16, Q6_K: 32, Q3_K: 4; 0 otherwise).
    pub zero: i32,
    /// The table a quant indexes (IQ4_NL, IQ4_XS: [`KVALUES_IQ4NL`]); `None` for the linear
    /// formats.
    pub table: Option<&'static [i8; 16]>,
    /// The activation format (ggml's vec_dot_type) this weight format multiplies against.
    pub act: ActKind,
}

impl BlockFormat {
    pub const Q4_0: BlockFormat = BlockFormat {
        ty: GgmlType::Q4_0,
        len: QK,
        bytes: size_of::<BlockQ4_0>(),
        d: offset_of!(BlockQ4_0, d),
        m: None,
        qh: None,
        qs: offset_of!(BlockQ4_0, qs),
        scales: None,
        bits: 4,
        zero: 8,
        act: ActKind::Q8_0,
        table: None,
    };
    pub const Q4_1: BlockFormat = BlockFormat {
        ty: GgmlType::Q4_1,
        len: QK,
        bytes: size_of::<BlockQ4_1>(),
        d: offset_of!(BlockQ4_1, d),
        m: Some(offset_of!(BlockQ4_1, m)),
        qh: None,
        qs: offset_of!(BlockQ4_1, qs),
        scales: None,
        bits: 4,
        zero: 0,
        act: ActKind::Q8_1,
        table: None,
    };
    pub const Q5_0: BlockFormat = BlockFormat {
        ty: GgmlType::Q5_0,
        len: QK,
        bytes: size_of::<BlockQ5_0>(),
        d: offset_of!(BlockQ5_0, d),
        m: None,
        qh: Some(offset_of!(BlockQ5_0, qh)),
        qs: offset_of!(BlockQ5_0, qs),
        scales: None,
        bits: 5,
        zero: 16,
        act: ActKind::Q8_0,
        table: None,
    };
    pub const Q5_1: BlockFormat = BlockFormat {
        ty: GgmlType::Q5_1,
        len: QK,
        bytes: size_of::<BlockQ5_1>(),
        d: offset_of!(BlockQ5_1, d),
        m: Some(offset_of!(BlockQ5_1, m)),
        qh: Some(offset_of!(BlockQ5_1, qh)),
        qs: offset_of!(BlockQ5_1, qs),
        scales: None,
        bits: 5,
        zero: 0,
        act: ActKind::Q8_1,
        table: None,
    };
    pub const Q8_0: BlockFormat = BlockFormat {
        ty: GgmlType::Q8_0,
        len: QK,
        bytes: size_of::<BlockQ8_0>(),
        d: offset_of!(BlockQ8_0, d),
        m: None,
        qh: None,
        qs: offset_of!(BlockQ8_0, qs),
        scales: None,
        bits: 8,
        zero: 0,
        act: ActKind::Q8_0,
        table: None,
    };
    pub const Q4_K: BlockFormat = BlockFormat {
        ty: GgmlType::Q4_K,
        len: QK_K,
        bytes: size_of::<BlockQ4K>(),
        d: offset_of!(BlockQ4K, d),
        m: Some(offset_of!(BlockQ4K, dmin)),
        qh: None,
        qs: offset_of!(BlockQ4K, qs),
        scales: Some(offset_of!(BlockQ4K, scales)),
        bits: 4,
        zero: 0,
        act: ActKind::Q8_K,
        table: None,
    };
    pub const Q5_K: BlockFormat = BlockFormat {
        ty: GgmlType::Q5_K,
        len: QK_K,
        bytes: size_of::<BlockQ5K>(),
        d: offset_of!(BlockQ5K, d),
        m: Some(offset_of!(BlockQ5K, dmin)),
        qh: Some(offset_of!(BlockQ5K, qh)),
        qs: offset_of!(BlockQ5K, qs),
        scales: Some(offset_of!(BlockQ5K, scales)),
        bits: 5,
        zero: 0,
        act: ActKind::Q8_K,
        table: None,
    };
    pub const Q6_K: BlockFormat = BlockFormat {
        ty: GgmlType::Q6_K,
        len: QK_K,
        bytes: size_of::<BlockQ6K>(),
        d: offset_of!(BlockQ6K, d),
        m: None,
        qh: Some(offset_of!(BlockQ6K, qh)),
        qs: offset_of!(BlockQ6K, ql),
        scales: Some(offset_of!(BlockQ6K, scales)),
        bits: 6,
        zero: 32,
        act: ActKind::Q8_K,
        table: None,
    };
    pub const Q2_K: BlockFormat = BlockFormat {
        ty: GgmlType::Q2_K,
        len: QK_K,
        bytes: size_of::<BlockQ2K>(),
        d: offset_of!(BlockQ2K, d),
        m: Some(offset_of!(BlockQ2K, dmin)),
        qh: None,
        qs: offset_of!(BlockQ2K, qs),
        scales: Some(offset_of!(BlockQ2K, scales)),
        bits: 2,
        zero: 0,
        act: ActKind::Q8_K,
        table: None,
    };
    pub const Q3_K: BlockFormat = BlockFormat {
        ty: GgmlType::Q3_K,
        len: QK_K,
        bytes: size_of::<BlockQ3K>(),
        d: offset_of!(BlockQ3K, d),
        m: None,
        qh: Some(offset_of!(BlockQ3K, hmask)),
        qs: offset_of!(BlockQ3K, qs),
        scales: Some(offset_of!(BlockQ3K, scales)),
        bits: 3,
        zero: 4,
        act: ActKind::Q8_K,
        table: None,
    };
    pub const IQ4_NL: BlockFormat = BlockFormat {
        ty: GgmlType::IQ4_NL,
        len: QK,
        bytes: size_of::<BlockIQ4NL>(),
        d: offset_of!(BlockIQ4NL, d),
        m: None,
        qh: None,
        qs: offset_of!(BlockIQ4NL, qs),
        scales: None,
        bits: 4,
        zero: 0,
        act: ActKind::Q8_0,
        table: Some(&KVALUES_IQ4NL),
    };
    pub const IQ4_XS: BlockFormat = BlockFormat {
        ty: GgmlType::IQ4_XS,
        len: QK_K,
        bytes: size_of::<BlockIQ4XS>(),
        d: offset_of!(BlockIQ4XS, d),
        m: None,
        qh: None,
        qs: offset_of!(BlockIQ4XS, qs),
        scales: Some(offset_of!(BlockIQ4XS, scales_h)),
        bits: 4,
        zero: 0,
        act: ActKind::Q8_K,
        table: Some(&KVALUES_IQ4NL),
    };

    /// Every quantized format the kernels compute.
    pub const ALL: [BlockFormat; 12] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q2_K,
        Self::Q3_K,
        Self::IQ4_NL,
        Self::IQ4_XS,
    ];

    /// The descriptor of a quantized type the kernels compute (`None` for float and
    /// unsupported types).
    pub const fn of(ty: GgmlType) -> Option<&'static BlockFormat> {
        Some(match ty {
            GgmlType::Q4_0 => &Self::Q4_0,
            GgmlType::Q4_1 => &Self::Q4_1,
            GgmlType::Q5_0 => &Self::Q5_0,
            GgmlType::Q5_1 => &Self::Q5_1,
            GgmlType::Q8_0 => &Self::Q8_0,
            GgmlType::Q4_K => &Self::Q4_K,
            GgmlType::Q5_K => &Self::Q5_K,
            GgmlType::Q6_K => &Self::Q6_K,
            GgmlType::Q2_K => &Self::Q2_K,
            GgmlType::Q3_K => &Self::Q3_K,
            GgmlType::IQ4_NL => &Self::IQ4_NL,
            GgmlType::IQ4_XS => &Self::IQ4_XS,
            _ => return None,
        })
    }

    /// [`BlockFormat::of`] for a type the caller knows is quantized and supported.
    #[inline(always)]
    pub fn expect(ty: GgmlType) -> &'static BlockFormat {
        Self::of(ty).unwrap_or_else(|| unreachable!("no quantized block format for {ty}"))
    }

    /// Decoded quants are signed bytes: Q8_0's i8 and the IQ4 tables' int8 levels.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub const fn signed8(&self) -> bool {
        self.bits == 8 || self.table.is_some()
    }

    /// Offset of the min (`m` / `dmin`); 0 for formats without one (never read there).
    pub const fn m_off(&self) -> usize {
        match self.m {
            Some(o) => o,
            None => 0,
        }
    }

    /// Offset of the high bits; 0 for formats without them (never read there).
    pub const fn qh_off(&self) -> usize {
        match self.qh {
            Some(o) => o,
            None => 0,
        }
    }

    /// Offset of the sub-block scales; 0 for formats without them (never read there).
    pub const fn scales_off(&self) -> usize {
        match self.scales {
            Some(o) => o,
            None => 0,
        }
    }
}

/// A block format as a type, for kernels generic over the format (the offsets are then
/// constants after monomorphization).
pub(crate) trait Format {
    const F: BlockFormat;
}

macro_rules! format_types {
    ($($name:ident),*) => {
        $(
            #[doc = concat!("The ", stringify!($name), " format as a type ([`Format`]).")]
            #[allow(non_camel_case_types)]
            pub(crate) enum $name {}
            impl Format for $name {
                const F: BlockFormat = BlockFormat::$name;
            }
        )*
    };
}
format_types!(
    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS
);

// Each descriptor is consistent: fields inside the block, the quant bytes fill their share.
const fn consistent(f: &BlockFormat) -> bool {
    // The low 4 bits of each quant sit in `qs` (all 8 for Q8_0, the low 2 for Q2_K/Q3_K); the
    // rest in `qh`.
    let low_bits = match f.bits {
        8 => 8,
        2 | 3 => 2,
        _ => 4,
    };
    let quant_bytes = f.len * low_bits / 8;
    f.d + 2 <= f.bytes
        && f.m_off() + 2 <= f.bytes
        && f.qs + quant_bytes <= f.bytes
        && f.qh_off() < f.bytes
        && f.scales_off() < f.bytes
}
// ... and agrees with the type table's block length.
const _: () = {
    let mut i = 0;
    while i < BlockFormat::ALL.len() {
        assert!(consistent(&BlockFormat::ALL[i]));
        assert!(BlockFormat::ALL[i].ty.block_len() == BlockFormat::ALL[i].len);
        i += 1;
    }
};
