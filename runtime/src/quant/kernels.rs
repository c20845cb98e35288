//! Activation quantization (ggml's "vec_dot_type" formats) and the portable row-dot kernels.
//!
//! llama.cpp never multiplies a quantized weight by f32 activations: it first converts each
//! activation row into the weight type's vec_dot_type and runs integer block dots. This module
//! reproduces those quantizers exactly (they fix the numerics; every kernel — portable, AVX2,
//! AVX-512, NEON — then differs from llama.cpp only in float summation order):
//!
//! * **Q8_0** (for Q4_0, Q5_0, Q8_0, IQ4_NL weights): blocks of 32, `d = amax/127` stored as f16,
//!   `q = roundf(x / d)` (ties away from zero).
//! * **Q8_1** (for Q4_1, Q5_1): as Q8_0, plus `s = f16(d_f32 · Σq)`.
//! * **Q8_K** (for Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS): blocks of 256; `max` = the signed element of largest
//!   magnitude, `iscale = −127/max`, `q = min(127, nearest_int(iscale·x))` (ties to even),
//!   `d = 1/iscale` kept as f32 (may be negative), `bsums` = sums of q over each 16.
//!
//! Every quantized row also carries `sum32` (Σq per 32 elements, exact integers) so SIMD kernels
//! that decode weights to unsigned bytes can apply the Q4_0/Q5_0 offset in the integer domain.

use super::GgmlType;
use super::blocks::{self, BlockFormat, Format, KVALUES_IQ4NL};
use super::reference::{iq4_xs_scale, q2_k_quant, q3_k_quant, q3_k_scales, rd_f16, scale_min_k4};
use half::f16;

/// Which vec_dot_type a weight type multiplies against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub(crate) enum ActKind {
    Q8_0,
    Q8_1,
    Q8_K,
}

/// (The activation format of each weight format is [`BlockFormat::act`].)
impl ActKind {
    pub fn block_len(self) -> usize {
        if self == ActKind::Q8_K { 256 } else { 32 }
    }
}

/// One quantized activation row (borrowed from a [`QAct`]).
///
/// * `qs`: the i8 quants (`cols`).
/// * `d`: one f32 scale per block (32 or 256 elements); already f16-rounded for Q8_0/Q8_1.
/// * `s`: Q8_1 only, one f16-rounded `d·Σq` per block (empty otherwise).
/// * `sum32`: Σq per 32 elements (all kinds).
/// * `bs16`: Q8_K only, Σq per 16 elements (empty otherwise).
/// * `gq`, `gd`, `gs`, `gsum`, `gm`: Q8_0/Q8_1 only (empty otherwise), the rows in *groups* for
///   the x86 group kernels. A row's whole groups of 8 blocks come first. In such a group,
///   vector k (32 bytes, k = 0..8) holds in its 4-byte lane j the quants 4k..4k+4 of block j: a
///   dword transpose, so one `vpdpbusd` lane accumulates one block; `gd`/`gs`/`gsum` lane j are
///   block j's `d`/`s`/`sum32`. The blocks after the last whole group follow in *pairs*, one
///   per group slot (a lone last block pairs with zeros): vector 0 holds quants 0..16 of block
///   A then of block B, vector 1 their quants 16..32, so i32 lanes 0..4 belong to A and 4..8 to
///   B; `gd` holds A's d in lanes 0..4 and B's in 4..8, `gs`/`gsum` hold A's in lane 0 and B's
///   in lane 4, and everything else in the slot is zero. The layout is group-major
///   over all `gm` rows of the [`QAct`]: this row's group g starts at `gq[256·g·gm]` (and
///   `gd[8·g·gm]`), and the next row's groups follow each of this row's, so a tile of
///   consecutive rows is addressed from one pointer. The slices run from this row's first
///   group to the end of the buffers.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct QRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sum32: &'a [i32],
    pub bs16: &'a [i16],
    pub gq: &'a [i8],
    pub gd: &'a [f32],
    pub gs: &'a [f32],
    pub gsum: &'a [i32],
    pub gm: usize,
}

/// One cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line([i8; 64]);

/// Bytes that start on a cache line, so that 32-byte SIMD loads at multiples of 32 never
/// straddle two lines.
#[derive(Default)]
pub(crate) struct Lines(Vec<Line>, usize);

impl Lines {
    pub fn zeroed(n: usize) -> Lines {
        Lines(vec![Line([0; 64]); n.div_ceil(64)], n)
    }

    pub fn as_slice(&self) -> &[i8] {
        // SAFETY: the Vec holds at least `self.1` initialised bytes (64 per Line, no padding).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const i8, self.1) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [i8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut i8, self.1) }
    }
}

/// Blocks per group in the [`QRow`] group layout.
pub(crate) const GROUP: usize = 8;

/// From this many 32-blocks on (a batch of rows), Q8_0/Q8_1 activations are quantized on two
/// threads: 8 rows of 576 are 144 blocks, ~3 µs of work against ~1 µs to fork and join.
const PAR_MIN_QUANT_BLOCKS: usize = 128;

/// `m` activation rows quantized to one [`ActKind`].
pub(crate) struct QAct {
    pub kind: ActKind,
    pub cols: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub sum32: Vec<i32>,
    pub bs16: Vec<i16>,
    /// Groups per row in the group layout (0 for Q8_K).
    pub ng: usize,
    pub gq: Lines,
    pub gd: Vec<f32>,
    pub gs: Vec<f32>,
    pub gsum: Vec<i32>,
}

impl QAct {
    /// Quantize `m = x.len() / cols` rows. `cols` must be a multiple of the kind's block length.
    pub fn quantize(kind: ActKind, x: &[f32], cols: usize) -> QAct {
        let bl = kind.block_len();
        assert!(cols.is_multiple_of(bl) && x.len().is_multiple_of(cols.max(1)));
        let nb = x.len() / bl;
        let mut a = QAct {
            kind,
            cols,
            qs: vec![0; x.len()],
            d: vec![0.0; nb],
            s: if kind == ActKind::Q8_1 {
                vec![0.0; nb]
            } else {
                Vec::new()
            },
            sum32: vec![0; x.len() / 32],
            bs16: if kind == ActKind::Q8_K {
                vec![0; x.len() / 16]
            } else {
                Vec::new()
            },
            ng: 0,
            gq: Lines::default(),
            gd: Vec::new(),
            gs: Vec::new(),
            gsum: Vec::new(),
        };
        match kind {
            ActKind::Q8_0 | ActKind::Q8_1 => {
                let block = q8_0_block_fn();
                // Blocks b0.. of the rows: quants, scales, (Q8_1) d·Σq, Σq.
                let run =
                    |x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], sum32: &mut [i32]| {
                        for (b, (xb, qb)) in
                            x.chunks_exact(32).zip(qs.chunks_exact_mut(32)).enumerate()
                        {
                            // SAFETY: `block` runs on this CPU (chosen by feature detection).
                            let (db, sb, sum) =
                                unsafe { block(xb.try_into().unwrap(), qb.try_into().unwrap()) };
                            d[b] = db;
                            if let Some(o) = s.get_mut(b) {
                                *o = sb;
                            }
                            sum32[b] = sum;
                        }
                    };
                let m = x.len() / cols.max(1);
                if m >= 2 && nb >= PAR_MIN_QUANT_BLOCKS && rayon::current_num_threads() > 1 {
                    // A batch of rows: the two halves on two threads (this also has the pool's
                    // second worker running when the matmul's parallel section starts, rather
                    // than asleep after the serial ops before it).
                    let (hb, hx) = (m / 2 * cols / 32, m / 2 * cols);
                    let (x0, x1) = x.split_at(hx);
                    let (q0, q1) = a.qs.split_at_mut(hx);
                    let (d0, d1) = a.d.split_at_mut(hb);
                    let ns = hb.min(a.s.len());
                    let (s0, s1) = a.s.split_at_mut(ns);
                    let (u0, u1) = a.sum32.split_at_mut(hb);
                    rayon::join(|| run(x0, q0, d0, s0, u0), || run(x1, q1, d1, s1, u1));
                } else {
                    run(x, &mut a.qs, &mut a.d, &mut a.s, &mut a.sum32);
                }
                a.fill_groups();
            }
            ActKind::Q8_K => {
                for (b, (xb, qb)) in x
                    .chunks_exact(256)
                    .zip(a.qs.chunks_exact_mut(256))
                    .enumerate()
                {
                    let bs: &mut [i16; 16] = (&mut a.bs16[16 * b..16 * b + 16]).try_into().unwrap();
                    a.d[b] =
                        quantize_block_q8_k(xb.try_into().unwrap(), qb.try_into().unwrap(), bs);
                    for j in 0..8 {
                        a.sum32[8 * b + j] = bs[2 * j] as i32 + bs[2 * j + 1] as i32;
                    }
                }
            }
        }
        a
    }

    /// Build the group layout (see [`QRow`]) from `qs`, `d`, `s` and `sum32` (32-blocks only).
    fn fill_groups(&mut self) {
        let nb = self.cols / 32;
        let m = if nb == 0 {
            0
        } else {
            self.qs.len() / self.cols
        };
        let (ngf, tail) = (nb / GROUP, nb % GROUP);
        let ng = ngf + tail.div_ceil(2);
        self.ng = ng;
        self.gq = Lines::zeroed(m * ng * 256);
        self.gd = vec![0.0; m * ng * GROUP];
        self.gs = vec![0.0; m * ng * GROUP];
        self.gsum = vec![0; m * ng * GROUP];
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        for i in 0..m {
            // Whole groups: the dword transpose of 8 blocks.
            for g in 0..ngf {
                // Group g of row i sits at group index g·m + i; its lane j is block 8g + j.
                let gi = g * m + i;
                let b0 = i * nb + g * GROUP;
                let src = &self.qs[b0 * 32..(b0 + GROUP) * 32];
                let dst = &mut self.gq.as_mut_slice()[gi * 256..(gi + 1) * 256];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 was detected at run time.
                    unsafe { transpose_group_avx2(src, dst) };
                } else {
                    transpose_group(src, dst);
                }
                #[cfg(not(target_arch = "x86_64"))]
                transpose_group(src, dst);
                let lanes = gi * GROUP..(gi + 1) * GROUP;
                let blocks = b0..b0 + GROUP;
                self.gd[lanes.clone()].copy_from_slice(&self.d[blocks.clone()]);
                if !self.s.is_empty() {
                    self.gs[lanes.clone()].copy_from_slice(&self.s[blocks.clone()]);
                }
                self.gsum[lanes].copy_from_slice(&self.sum32[blocks]);
            }
            // The tail blocks in pairs (a lone last block pairs with zeros): see [`QRow`].
            for p in 0..tail.div_ceil(2) {
                let gi = (ngf + p) * m + i;
                let a = i * nb + ngf * GROUP + 2 * p;
                let n = 2.min(tail - 2 * p);
                let dst = &mut self.gq.as_mut_slice()[gi * 256..gi * 256 + 64];
                for h in 0..n {
                    let q = &self.qs[(a + h) * 32..(a + h + 1) * 32];
                    dst[16 * h..16 * h + 16].copy_from_slice(&q[..16]);
                    dst[32 + 16 * h..48 + 16 * h].copy_from_slice(&q[16..]);
                    let l = gi * GROUP + 4 * h;
                    self.gd[l..l + 4].fill(self.d[a + h]);
                    if !self.s.is_empty() {
                        self.gs[l] = self.s[a + h];
                    }
                    self.gsum[l] = self.sum32[a + h];
                }
            }
        }
    }

    pub fn row(&self, i: usize) -> QRow<'_> {
        let c = self.cols;
        let nb = c / self.kind.block_len();
        let gm = if self.ng == 0 {
            0
        } else {
            self.gd.len() / (self.ng * GROUP)
        };
        let grp = |v: usize| {
            if self.ng == 0 {
                0..0
            } else {
                i * v..self.ng * gm * v
            }
        };
        QRow {
            qs: &self.qs[i * c..(i + 1) * c],
            d: &self.d[i * nb..(i + 1) * nb],
            s: if self.s.is_empty() {
                &[]
            } else {
                &self.s[i * nb..(i + 1) * nb]
            },
            sum32: &self.sum32[i * c / 32..(i + 1) * c / 32],
            bs16: if self.bs16.is_empty() {
                &[]
            } else {
                &self.bs16[i * c / 16..(i + 1) * c / 16]
            },
            gq: &self.gq.as_slice()[grp(256)],
            gd: &self.gd[grp(GROUP)],
            gs: &self.gs[grp(GROUP)],
            gsum: &self.gsum[grp(GROUP)],
            gm,
        }
    }
}

/// One group of the [`QRow`] layout: `src` holds up to 8 consecutive 32-byte blocks; byte
/// `32·k + 4·j` of `dst` (256 bytes, already zero) receives dword k of block j.
fn transpose_group(src: &[i8], dst: &mut [i8]) {
    for (j, block) in src.chunks_exact(32).enumerate() {
        for (k, word) in block.chunks_exact(4).enumerate() {
            dst[32 * k + 4 * j..32 * k + 4 * j + 4].copy_from_slice(word);
        }
    }
}

/// [`transpose_group`] as one 8×8 dword transpose in registers (missing blocks are zeros).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose_group_avx2(src: &[i8], dst: &mut [i8]) {
    use std::arch::x86_64::*;
    let n = src.len() / 32;
    assert!(n <= GROUP && src.len() == 32 * n && dst.len() == 256);
    let rows: [__m256; 8] = std::array::from_fn(|j| {
        if j < n {
            // SAFETY: block j (32 bytes) lies inside `src` (j < n).
            unsafe { _mm256_loadu_ps(src.as_ptr().add(32 * j) as *const f32) }
        } else {
            _mm256_setzero_ps()
        }
    });
    for (k, v) in crate::ops::transpose8(rows).into_iter().enumerate() {
        // SAFETY: vector k is bytes 32k..32k + 32 of the 256-byte `dst`.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(32 * k) as *mut f32, v) };
    }
}

/// ggml's `quantize_row_q8_0_ref` / `quantize_row_q8_1_ref` for one block of 32.
/// Returns `(f16(d), f16(d·Σq), Σq)` with the f16 values converted back to f32.
pub(crate) fn quantize_block_q8_0(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32, i32) {
    let mut amax = 0f32;
    for &v in x {
        amax = amax.max(v.abs());
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for j in 0..32 {
        let v = round_half_away(x[j] * id);
        q[j] = v as i8;
        sum += v;
    }
    let dh = f16::from_f32(d).to_f32();
    let s = f16::from_f32(d * sum as f32).to_f32();
    (dh, s, sum)
}

type Q8BlockFn = unsafe fn(&[f32; 32], &mut [i8; 32]) -> (f32, f32, i32);

/// The fastest exact [`quantize_block_q8_0`] this CPU runs.
fn q8_0_block_fn() -> Q8BlockFn {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        return quantize_block_q8_0_avx2;
    }
    |x, q| quantize_block_q8_0(x, q)
}

/// [`quantize_block_q8_0`] on AVX2 and F16C, bit for bit: the same max, scale, products and
/// half-away-from-zero rounding, 8 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
pub(crate) fn quantize_block_q8_0_avx2(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32, i32) {
    use std::arch::x86_64::*;
    // SAFETY: 4 loads of 8 inside the 32-element block.
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut m = _mm256_and_ps(v[0], abs);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_and_ps(*vi, abs));
    }
    // The max over the 8 lanes, in registers (max is exact and order-free; |x| ≥ 0 also
    // covers the fold's 0 start).
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2))).max(0.0);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let idv = _mm256_set1_ps(id);
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let mut sum = _mm256_setzero_si256();
    let mut iv = [_mm256_setzero_si256(); 4];
    for i in 0..4 {
        let p = _mm256_mul_ps(v[i], idv);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let f = _mm256_sub_ps(p, t);
        let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half), one);
        let down = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(f, _mm256_set1_ps(-0.5)), one);
        iv[i] = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(t, up), down));
        sum = _mm256_add_epi32(sum, iv[i]);
    }
    // i32 → i8 (|q| ≤ 127, so the saturating packs are exact); packs interleave 128-bit lanes.
    let w0 = _mm256_packs_epi32(iv[0], iv[1]);
    let w1 = _mm256_packs_epi32(iv[2], iv[3]);
    let b = _mm256_packs_epi16(w0, w1);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `q` is 32 writable bytes.
    unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b) };
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
    // Both f16 roundings (to nearest even, as `f16::from_f32`) in one F16C round trip.
    let pair = _mm_setr_ps(d, d * sum as f32, 0.0, 0.0);
    let back = _mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(pair));
    (
        _mm_cvtss_f32(back),
        _mm_cvtss_f32(_mm_shuffle_ps::<1>(back, back)),
        sum,
    )
}

/// C `roundf` (half away from zero) to an integer, for |v| < 2^31, without a libm call (the
/// baseline x86-64 target has no rounding instruction; `f32::round` calls `roundf`).
#[inline]
pub(crate) fn round_half_away(v: f32) -> i32 {
    let t = v as i32; // truncates toward zero
    let frac = v - t as f32; // exact: |v| < 2^23 or v is already an integer
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// ggml's `nearest_int`: round to nearest, ties to even, via the 1.5·2^23 trick.
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let t = v + 12_582_912.0f32;
    (t.to_bits() as i32 & 0x007F_FFFF) - 0x0040_0000
}

/// ggml's `quantize_row_q8_K_ref` for one block of 256: fills `q` and `bsums`, returns `d`.
pub(crate) fn quantize_block_q8_k(x: &[f32; 256], q: &mut [i8; 256], bsums: &mut [i16; 16]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for j in 0..256 {
        q[j] = nearest_int(iscale * x[j]).min(127) as i8;
    }
    for (j, b) in bsums.iter_mut().enumerate() {
        *b = q[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum();
    }
    1.0 / iscale
}

/// Round every element to f16 (for F16 weights) or bf16 (for BF16 weights) and back, as llama.cpp
/// converts activations to the weight type before its float dot.
pub(crate) fn round_activations(ty: GgmlType, x: &[f32]) -> Option<Vec<f32>> {
    match ty {
        GgmlType::F16 => {
            use half::slice::HalfFloatSliceExt;
            let mut h = vec![f16::ZERO; x.len()];
            h.convert_from_f32_slice(x);
            let mut out = vec![0f32; x.len()];
            h.convert_to_f32_slice(&mut out);
            Some(out)
        }
        GgmlType::BF16 => Some(
            x.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// Signature of every tile kernel: `out[r·C + c] = dot(weight row r, activation row c)` for
/// `R = w.len() / rb` consecutive weight rows (`rb` bytes each) and `C = xr.len()` activation
/// rows. SIMD kernels are instantiated for fixed (R, C) and assert them.
pub(crate) type TileFn = unsafe fn(&[u8], usize, &[QRow<'_>], &mut [f32]);

/// A kernel family: `big[c − 1]` handles `rmax` weight rows × `c` activation rows (c ≤ cmax),
/// `one[c − 1]` a single weight row × `c` activation rows.
pub(crate) struct Tiles {
    pub rmax: usize,
    pub cmax: usize,
    pub big: [TileFn; MAX_C],
    pub one: [TileFn; MAX_C],
}

/// The most activation rows any tile kernel takes at once.
pub(crate) const MAX_C: usize = 8;

/// The most weight rows any tile kernel takes at once.
pub(crate) const MAX_R: usize = 8;

/// Signature of a row-dot kernel.
pub(crate) type DotFn = unsafe fn(&[u8], &QRow<'_>) -> f32;

/// A family of row-dot kernels (R = 1 tiles): the portable ones here and NEON's.
pub(crate) trait RowDots {
    /// The row dot for format `F`. The caller of the returned function must ensure the
    /// family's CPU features.
    fn dot<F: Format>() -> DotFn;
}

/// A row-dot kernel as a tile kernel for any R, C (loops over the pairs).
///
/// # Safety
/// The CPU must support `D`'s features.
unsafe fn row_tile<D: RowDots, F: Format>(w: &[u8], rb: usize, xr: &[QRow<'_>], out: &mut [f32]) {
    let dot = D::dot::<F>();
    let c = xr.len();
    for (r, wr) in w.chunks_exact(rb).enumerate() {
        for (j, x) in xr.iter().enumerate() {
            // SAFETY: forwarded contract (dot's ISA is available).
            out[r * c + j] = unsafe { dot(wr, x) };
        }
    }
}

/// The tiles of the row-dot family `D` for `ty` (quantized types only).
pub(crate) fn row_tiles<D: RowDots>(ty: GgmlType) -> Tiles {
    let f: TileFn = match ty {
        GgmlType::Q4_0 => row_tile::<D, blocks::Q4_0>,
        GgmlType::Q4_1 => row_tile::<D, blocks::Q4_1>,
        GgmlType::Q5_0 => row_tile::<D, blocks::Q5_0>,
        GgmlType::Q5_1 => row_tile::<D, blocks::Q5_1>,
        GgmlType::Q8_0 => row_tile::<D, blocks::Q8_0>,
        GgmlType::Q4_K => row_tile::<D, blocks::Q4_K>,
        GgmlType::Q5_K => row_tile::<D, blocks::Q5_K>,
        GgmlType::Q6_K => row_tile::<D, blocks::Q6_K>,
        GgmlType::Q2_K => row_tile::<D, blocks::Q2_K>,
        GgmlType::Q3_K => row_tile::<D, blocks::Q3_K>,
        GgmlType::IQ4_NL => row_tile::<D, blocks::IQ4_NL>,
        GgmlType::IQ4_XS => row_tile::<D, blocks::IQ4_XS>,
        _ => unreachable!("no quantized dot kernel for {ty}"),
    };
    Tiles {
        rmax: 1,
        cmax: 4,
        big: [f; MAX_C],
        one: [f; MAX_C],
    }
}

/// The portable row dots (no requirements).
pub(crate) enum Portable {}

impl RowDots for Portable {
    #[inline(always)]
    fn dot<F: Format>() -> DotFn {
        match F::F.ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => dot_q4q5::<F>,
            GgmlType::Q8_0 => dot_q8_0,
            GgmlType::Q4_K | GgmlType::Q5_K => dot_q45_k::<F>,
            GgmlType::Q6_K => dot_q6_k,
            GgmlType::Q2_K => dot_q2_k,
            GgmlType::Q3_K => dot_q3_k,
            GgmlType::IQ4_NL => dot_iq4_nl,
            GgmlType::IQ4_XS => dot_iq4_xs,
            ty => unreachable!("no quantized dot kernel for {ty}"),
        }
    }
}

/// The portable kernels for `ty` (quantized types only).
pub(crate) fn portable_tiles(ty: GgmlType) -> Tiles {
    row_tiles::<Portable>(ty)
}

/// 4-bit (and optional 5th bit) quants of a 32-block as unsigned values: element j and j+16.
#[inline]
fn unpack_q4q5(qs: &[u8], qh: Option<u32>) -> [i32; 32] {
    let mut q = [0i32; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) as i32;
        q[j + 16] = (qs[j] >> 4) as i32;
    }
    if let Some(qh) = qh {
        for (j, v) in q.iter_mut().enumerate() {
            *v |= (((qh >> j) & 1) << 4) as i32;
        }
    }
    q
}

#[inline]
fn idot(q: &[i32; 32], off: i32, x: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..32 {
        s += (q[j] - off) * x[j] as i32;
    }
    s
}

/// Q4_0/Q5_0 (× Q8_0): Σ_b f16(d_w)·d_x·Σ(q − zero)·x.
/// Q4_1/Q5_1 (× Q8_1): Σ_b f16(d_w)·d_x·Σ q·x + f16(m_w)·s_x.
fn dot_q4q5<F: Format>(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = F::F;
    let (q5, min) = (f.qh.is_some(), f.m.is_some());
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(f.bytes).enumerate() {
        let qh = q5.then(|| {
            let o = f.qh_off();
            u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]])
        });
        let q = unpack_q4q5(&blk[f.qs..f.qs + 16], qh);
        let i = idot(&q, f.zero, &x.qs[32 * b..32 * b + 32]);
        acc += rd_f16(blk, f.d) * x.d[b] * i as f32;
        if min {
            acc += rd_f16(blk, f.m_off()) * x.s[b];
        }
    }
    acc
}

fn dot_q8_0(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q8_0;
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(f.bytes).enumerate() {
        let xq = &x.qs[32 * b..32 * b + 32];
        let mut i = 0i32;
        for j in 0..32 {
            i += (blk[f.qs + j] as i8) as i32 * xq[j] as i32;
        }
        acc += rd_f16(blk, f.d) * x.d[b] * i as f32;
    }
    acc
}

/// Q4_K/Q5_K (× Q8_K): per super-block, `d = d_x·f16(d_w)`, `dmin = d_x·f16(dmin_w)`,
/// `d·Σ_j sc_j·Σ(q·x) − dmin·Σ_j m_j·(bsum[2j] + bsum[2j+1])`.
fn dot_q45_k<F: Format>(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = F::F;
    let q5 = f.qh.is_some();
    let mut acc = 0f32;
    for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
        let scales = &blk[f.scales_off()..f.scales_off() + 12];
        let qh = &blk[f.qh_off()..f.qh_off() + 32];
        let qs = &blk[f.qs..f.qs + 128];
        let (mut isum, mut msum) = (0i32, 0i32);
        for s in 0..8 {
            let (sc, mn) = scale_min_k4(s, scales);
            let (c, shift) = (s / 2, 4 * (s % 2));
            let xq = &x.qs[256 * i + 32 * s..256 * i + 32 * s + 32];
            let mut sub = 0i32;
            for l in 0..32 {
                let mut q = (qs[32 * c + l] >> shift) & 0x0F;
                if q5 {
                    q |= ((qh[l] >> s) & 1) << 4;
                }
                sub += q as i32 * xq[l] as i32;
            }
            isum += sc as i32 * sub;
            msum += mn as i32 * (x.bs16[16 * i + 2 * s] as i32 + x.bs16[16 * i + 2 * s + 1] as i32);
        }
        let d = x.d[i] * rd_f16(blk, f.d);
        let dmin = x.d[i] * rd_f16(blk, f.m_off());
        acc += d * isum as f32 - dmin * msum as f32;
    }
    acc
}

/// The 6-bit quant (0..63) of element `e` (0..256) of a Q6_K block.
#[inline]
pub(crate) fn q6_k_quant(blk: &[u8], e: usize) -> i32 {
    let f = BlockFormat::Q6_K;
    let (h, r) = (e / 128, e % 128);
    let (g, l) = (r / 32, r % 32);
    let ql = blk[f.qs + 64 * h + l + if g % 2 == 1 { 32 } else { 0 }];
    let lo = if g < 2 { ql & 0x0F } else { ql >> 4 };
    let hi = (blk[f.qh_off() + 32 * h + l] >> (2 * g)) & 3;
    (lo | (hi << 4)) as i32
}

/// Q6_K (× Q8_K): `d_x·f16(d_w)·Σ_{16 sub-blocks} sc_j·Σ((q − 32)·x)`.
fn dot_q6_k(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q6_K;
    let mut acc = 0f32;
    for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
        let mut isum = 0i32;
        for j in 0..16 {
            let sc = blk[f.scales_off() + j] as i8 as i32;
            let mut sub = 0i32;
            for e in 16 * j..16 * j + 16 {
                sub += (q6_k_quant(blk, e) - f.zero) * x.qs[256 * i + e] as i32;
            }
            isum += sc * sub;
        }
        acc += x.d[i] * rd_f16(blk, f.d) * isum as f32;
    }
    acc
}

/// Q2_K (× Q8_K): per super-block, `d_x·f16(d)·Σ_j (sc_j & 15)·Σ(q·x)
/// − d_x·f16(dmin)·Σ_j (sc_j >> 4)·bsum_j` over its 16 sub-blocks of 16 (ggml's
/// `vec_dot_q2_K_q8_K`).
fn dot_q2_k(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q2_K;
    let mut acc = 0f32;
    for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
        let sc = &blk[f.scales_off()..f.scales_off() + 16];
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..16 {
            let mut sub = 0i32;
            for e in 16 * j..16 * j + 16 {
                sub += q2_k_quant(blk, e) * x.qs[256 * i + e] as i32;
            }
            isum += (sc[j] & 0x0F) as i32 * sub;
            msum += (sc[j] >> 4) as i32 * x.bs16[16 * i + j] as i32;
        }
        let d = x.d[i] * rd_f16(blk, f.d);
        let dmin = x.d[i] * rd_f16(blk, f.m_off());
        acc += d * isum as f32 - dmin * msum as f32;
    }
    acc
}

/// Q3_K (× Q8_K): `d_x·f16(d)·Σ_j (sc_j − 32)·Σ((q − 4)·x)` over the 16 sub-blocks of 16
/// (`q − 4` already signed in [`q3_k_quant`]).
fn dot_q3_k(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q3_K;
    let mut acc = 0f32;
    for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
        let sc = q3_k_scales(blk);
        let mut isum = 0i32;
        for j in 0..16 {
            let mut sub = 0i32;
            for e in 16 * j..16 * j + 16 {
                sub += q3_k_quant(blk, e) * x.qs[256 * i + e] as i32;
            }
            isum += sc[j] as i32 * sub;
        }
        acc += x.d[i] * rd_f16(blk, f.d) * isum as f32;
    }
    acc
}

/// The table level of nibble `j` (0..32, Q4_0's order) of the 16 quant bytes `qs`.
#[inline]
fn iq4_level(qs: &[u8], j: usize) -> i32 {
    let q = if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    };
    KVALUES_IQ4NL[q as usize] as i32
}

/// IQ4_NL (× Q8_0): Σ_b f16(d_w)·d_x·Σ kvalues[q]·x.
fn dot_iq4_nl(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::IQ4_NL;
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(f.bytes).enumerate() {
        let qs = &blk[f.qs..f.qs + 16];
        let xq = &x.qs[32 * b..32 * b + 32];
        let i: i32 = (0..32).map(|j| iq4_level(qs, j) * xq[j] as i32).sum();
        acc += rd_f16(blk, f.d) * x.d[b] * i as f32;
    }
    acc
}

/// IQ4_XS (× Q8_K): `d_x·f16(d)·Σ_s (ls_s − 32)·Σ kvalues[q]·x` over the 8 sub-blocks of 32,
/// exact in i32 over the super-block (as ggml's AVX2 kernel; its scalar one sums per sub-block
/// in f32).
fn dot_iq4_xs(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::IQ4_XS;
    let mut acc = 0f32;
    for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
        let mut isum = 0i32;
        for s in 0..8 {
            let qs = &blk[f.qs + 16 * s..f.qs + 16 * s + 16];
            let xq = &x.qs[256 * i + 32 * s..256 * i + 32 * s + 32];
            let sub: i32 = (0..32).map(|j| iq4_level(qs, j) * xq[j] as i32).sum();
            isum += iq4_xs_scale(blk, s) * sub;
        }
        acc += x.d[i] * rd_f16(blk, f.d) * isum as f32;
    }
    acc
}
