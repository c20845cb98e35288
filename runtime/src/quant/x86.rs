//! x86-64 tile kernels: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI (`vpdpbusd` /
//! `vpdpwssd` on 256-bit vectors, 32 vector registers). Both run the same `#[inline(always)]`
//! generic bodies (`tile_g8`, `tile_k45`, `tile_q6k`, `tile_q2k`, `tile_q3k`, `tile_iq4xs`),
//! which take the path's byte-dot primitives as a type ([`Simd`]) and the block format as a type
//! ([`Format`]: offsets from `blocks.rs`, constants after monomorphization); `isa_tiles!` only
//! stamps out the `#[target_feature]` wrappers and tables per path, which also differ in the
//! tile shape (R weight rows × C activation rows; C up to 8 on AVX-512 for the 32-element
//! formats).
//!
//! **32-element formats** (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL, `tile_g8`): a weight row is read in
//! groups of 8 blocks. A group is transposed in registers (4-byte lanes across the 8 blocks) so
//! that i32 lane j of the byte dot accumulates block j alone, against activations stored in the
//! same transposed, group-major layout ([`QRow::gq`]); the 8 block scales are then applied with
//! one convert, multiply and FMA, and one decoded group serves all C activation rows. Blocks
//! after a row's last whole group go two at a time (i32 lanes 0..4 for one block, 4..8 for the
//! other) through the same epilogue, into the same accumulators.
//!
//! **K-quants** (`tile_k45`, `tile_q6k`, `tile_q2k`, `tile_q3k`, `tile_iq4xs`): a tile walks the
//! super-blocks of R weight rows once; each is decoded into registers and multiplied against all
//! C activation rows. Q2_K/Q3_K (sub-blocks of 16) and IQ4_XS (pairs of sub-blocks of 32) take
//! the two scales of a vector from one register of the super-block's scales with a byte shuffle
//! (`scale_pair`).
//!
//! Every (row, activation) pair keeps its own accumulators and performs exactly the same
//! operations whatever R and C are, so results do not depend on the tiling, the batch or the
//! thread count (`batched_rows_equal_rows_alone_bit_for_bit`).
//!
//! Numerics (see `kernels.rs` for the formulas): weight quants are decoded to *unsigned* bytes.
//! The Q4_0/Q5_0 offset is applied in the integer domain (−off·Σx seeded into the block's i32
//! accumulator), so each 32-block contributes `f16(d_w)·d_x·(exact integer)`; Q8_0 is `q + 128`
//! with `−128·Σx` seeded on VNNI and uses the sign trick on AVX2; IQ4_NL's 4-bit indices go
//! through `vpshufb` on the table into the same signed (AVX2) or + 128 (VNNI) bytes. K-quants
//! accumulate `Σ_j sc_j·Σ(q·x)` exactly in i32 over the whole super-block (`vpmaddwd` with the
//! sub-block scale instead of ones), with the Q6_K −32 (Q3_K −4) offset seeded as
//! `−32·Σ sc_j·bsum_j` and the Q2_K/Q4_K/Q5_K mins as a second integer dot with the bsums;
//! IQ4_XS's signed table levels take the sign trick on both paths. No intermediate saturates:
//! the largest u8·i8 pair sum in `vpmaddubsw` is 2·127·127 = 32258 (the sign trick; 2·63·127 for
//! Q6_K), and a VNNI lane sums at most 32 products of 255·127.

use super::GgmlType;
use super::blocks::{self, BlockFormat, Format};
use super::kernels::{GROUP, MAX_C, QRow, TileFn, Tiles};
use super::reference::scale_min_k4;
use std::arch::x86_64::*;

// Every `unsafe fn` below needs the CPU features of the path it runs on (AVX2 + FMA + F16C, and
// AVX-512 F/BW/VL + VNNI for `Avx512`), besides what its comment says about pointers. They are
// `#[inline(always)]` so that they compile inside the `#[target_feature]` wrappers that
// `isa_tiles!` stamps out at the end of this file, where the intrinsics inline.

/// How far ahead of the block being decoded the kernels prefetch each weight row.
const PREFETCH_BYTES: usize = 4096;

/// A 32-byte-aligned stack object. A kernel that pins one ([`realign_frame`]) has its frame
/// realigned to 32 bytes, so its 32-byte register spills never straddle a cache line: left
/// 16-byte aligned, a code change elsewhere that moved the spill slots by 16 bytes made the
/// AVX2 kernels 1.2–1.5× slower at m = 8 (split spill stores, failed store forwarding).
#[repr(C, align(32))]
struct Align32([u8; 32]);

/// Pin an [`Align32`] in the caller's frame when the path asks for it ([`Simd::REALIGN`]).
#[inline(always)]
fn realign_frame<I: Simd>() {
    if I::REALIGN {
        let pin = Align32([0; 32]);
        std::hint::black_box(&pin);
    }
}

/// The byte-dot primitives that distinguish the two x86 paths.
trait Simd {
    /// `vpdpbusd` (unsigned × signed bytes, no saturation) is available. Q8_0 weights are then
    /// decoded as `q + 128` with `−128·Σx` seeded; without it they use the sign trick.
    const VNNI: bool;

    /// Realign the kernels' frames to 32 bytes ([`Align32`]): AVX2's 16 vector registers make
    /// its kernels spill; AVX-512's 32 barely do, and there the frame pointer that realigning
    /// takes from the allocator cost ~3% (Q6_K at m = 8).
    const REALIGN: bool;

    /// `acc + Σ a·b` over groups of 4 unsigned(a) × signed(b) bytes, per i32 lane.
    unsafe fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;

    /// `acc + Σ (a·b pair sums) · sc` (i16 scale per pair sum), per i32 lane.
    unsafe fn dots(acc: __m256i, a: __m256i, b: __m256i, sc: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` + `vpmaddwd`.
enum Avx2 {}

impl Simd for Avx2 {
    const VNNI: bool = false;
    const REALIGN: bool = true;

    #[inline(always)]
    unsafe fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: AVX2 (the caller's contract); register operations only.
        unsafe {
            _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)),
            )
        }
    }

    #[inline(always)]
    unsafe fn dots(acc: __m256i, a: __m256i, b: __m256i, sc: __m256i) -> __m256i {
        // SAFETY: AVX2 (the caller's contract); register operations only.
        unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), sc)) }
    }
}

/// AVX-512 VNNI on 256-bit vectors: `vpdpbusd` / `vpdpwssd`.
enum Avx512 {}

impl Simd for Avx512 {
    const VNNI: bool = true;
    const REALIGN: bool = false;

    #[inline(always)]
    unsafe fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: AVX-512 VL + VNNI (the caller's contract); register operations only.
        unsafe { _mm256_dpbusd_epi32(acc, a, b) }
    }

    #[inline(always)]
    unsafe fn dots(acc: __m256i, a: __m256i, b: __m256i, sc: __m256i) -> __m256i {
        // SAFETY: AVX-512 VL + VNNI (the caller's contract); register operations only.
        unsafe { _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(a, b), sc) }
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX (the caller's contract); register operations only.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

/// The f16 at `p` (2 readable bytes) as f32.
#[inline(always)]
unsafe fn f16(p: *const u8) -> f32 {
    // SAFETY: the caller passes 2 readable bytes and guarantees F16C.
    unsafe {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// 32 bytes at `p` (readable).
#[inline(always)]
unsafe fn ld(p: *const i8) -> __m256i {
    // SAFETY: the caller passes 32 readable bytes and guarantees AVX.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

fn check_rows<const C: usize>(xr: &[QRow<'_>], cols: usize, kblock: usize) {
    assert!(xr.len() == C);
    for x in xr {
        assert!(x.qs.len() == cols && x.d.len() == cols / kblock);
        assert!(x.sum32.len() == cols / 32);
    }
}

/// Byte i = 0x10 if bit i of `qh` is set, else 0.
#[inline(always)]
unsafe fn bit4_from_bits32(qh: u32) -> __m256i {
    // SAFETY: AVX2 (the caller's contract); register operations only.
    unsafe {
        let v = _mm256_set1_epi32(qh as i32);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bytes = _mm256_shuffle_epi8(v, shuf);
        let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mask), mask);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

/// The 4×4 dword transpose within each 128-bit lane: lane j of output k holds dword k of input
/// j (j < 4 in the low half, j − 4 of the high half).
#[inline(always)]
unsafe fn transpose4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> [__m256i; 4] {
    // SAFETY: AVX2 (the caller's contract); register operations only.
    unsafe {
        let t0 = _mm256_unpacklo_epi32(a, b);
        let t1 = _mm256_unpackhi_epi32(a, b);
        let t2 = _mm256_unpacklo_epi32(c, d);
        let t3 = _mm256_unpackhi_epi32(c, d);
        [
            _mm256_unpacklo_epi64(t0, t2),
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
        ]
    }
}

/// 16 bytes at `lo` in the low half, 16 at `hi` in the high half.
#[inline(always)]
unsafe fn ld2(lo: *const u8, hi: *const u8) -> __m256i {
    // SAFETY: the caller passes two pointers to 16 readable bytes each and guarantees AVX.
    unsafe {
        _mm256_set_m128i(
            _mm_loadu_si128(hi as *const __m128i),
            _mm_loadu_si128(lo as *const __m128i),
        )
    }
}

/// The f16 at `p + j·stride` for j = 0..8, as 8 f32.
#[inline(always)]
unsafe fn f16x8(p: *const u8, stride: usize) -> __m256 {
    // SAFETY: the caller passes 8 f16 locations inside one group of weight blocks and
    // guarantees F16C.
    unsafe {
        let h = |j: usize| (p.add(j * stride) as *const i16).read_unaligned();
        let (a, b, c, d) = (h(0), h(1), h(2), h(3));
        _mm256_cvtph_ps(_mm_setr_epi16(a, b, c, d, h(4), h(5), h(6), h(7)))
    }
}

// ---- 32-element formats: groups of 8 blocks (`tile_g8`) ------------------------------------

/// The checked geometry of one `tile_g8` call, and the tile's activation buffers: row 0's
/// group-major `gq`/`gd`/`gs`/`gsum` (row c's group g sits at group index g·gm + c).
struct G8<'a> {
    /// Blocks per weight row, in `ngf` whole groups then `npair` pair slots.
    nb: usize,
    ngf: usize,
    npair: usize,
    gm: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    xsum: *const i32,
    _rows: std::marker::PhantomData<&'a [i8]>,
}

impl<'a> G8<'a> {
    /// Check the tile's shapes and that its activation rows are consecutive rows of one
    /// group-major buffer, so that every slot `slot` reads lies inside row 0's buffers.
    #[inline(always)]
    fn new<F: Format, const R: usize, const C: usize>(
        w: &[u8],
        rb: usize,
        xr: &'a [QRow<'a>],
        out: &[f32],
    ) -> G8<'a> {
        let (bb, min) = (F::F.bytes, F::F.m.is_some());
        let nb = rb / bb;
        let (ngf, npair) = (nb / GROUP, (nb % GROUP).div_ceil(2));
        let ng = ngf + npair;
        assert!(rb == nb * bb && w.len() == R * rb && out.len() == R * C);
        assert!(xr.len() == C && C >= 1);
        let x0 = &xr[0];
        let gm = x0.gm;
        for (c, x) in xr.iter().enumerate() {
            assert!(x.gm == gm && x.gq.as_ptr() == x0.gq.as_ptr().wrapping_add(256 * c));
            assert!(x.gd.as_ptr() == x0.gd.as_ptr().wrapping_add(GROUP * c));
            assert!(x.gsum.as_ptr() == x0.gsum.as_ptr().wrapping_add(GROUP * c));
            assert!(!min || x.gs.as_ptr() == x0.gs.as_ptr().wrapping_add(GROUP * c));
        }
        if ng > 0 {
            let last = (ng - 1) * gm + C; // groups (of one row) spanned by the tile
            assert!(gm >= C && x0.gq.len() >= last * 256);
            assert!(x0.gd.len() >= last * GROUP && x0.gsum.len() >= last * GROUP);
            assert!(!min || x0.gs.len() >= last * GROUP);
        }
        check_rows::<C>(xr, nb * 32, 32);
        G8 {
            nb,
            ngf,
            npair,
            gm,
            xq: x0.gq.as_ptr(),
            xd: x0.gd.as_ptr(),
            xs: x0.gs.as_ptr(),
            xsum: x0.gsum.as_ptr(),
            _rows: std::marker::PhantomData,
        }
    }

    /// Slot g (a whole group, or a pair of tail blocks) of tile row c against the slot's
    /// decoded weight vectors `q` (8 for a group, 2 for a pair) and its block scales `dw`/`mw`
    /// by lane: the byte dots, then the scale epilogue into `acc`.
    ///
    /// # Safety
    /// `c < C` and g a slot of the tile checked by [`G8::new`]; the path's CPU features.
    #[inline(always)]
    unsafe fn slot<I: Simd, F: Format>(
        &self,
        q: &[__m256i],
        g: usize,
        c: usize,
        dw: __m256,
        mw: __m256,
        acc: __m256,
    ) -> __m256 {
        let f = F::F;
        let gi = g * self.gm + c;
        // SAFETY: slot g of tile row c lies inside row 0's buffers (gi < (ng − 1)·gm + C,
        // checked by `new`); the features are the caller's contract.
        unsafe {
            let xp = self.xq.add(256 * gi);
            let sums = _mm256_loadu_si256(self.xsum.add(GROUP * gi) as *const __m256i);
            let dx = _mm256_loadu_ps(self.xd.add(GROUP * gi));
            // The weight offset, in the integer domain: Σ(q − zero)·x = Σq·x − zero·Σx (Q8_0
            // on VNNI: the q + 128 decoding's 128).
            let zero = if f.signed8() {
                if I::VNNI { 128 } else { 0 }
            } else {
                f.zero
            };
            let z = _mm256_setzero_si256();
            let mut p = match zero {
                0 => z,
                8 => _mm256_sub_epi32(z, _mm256_slli_epi32(sums, 3)),
                16 => _mm256_sub_epi32(z, _mm256_slli_epi32(sums, 4)),
                128 => _mm256_sub_epi32(z, _mm256_slli_epi32(sums, 7)),
                _ => unreachable!("zero point {zero}"),
            };
            // Two dependency chains (even and odd k), summed exactly at the end.
            let mut p2 = _mm256_setzero_si256();
            for (k, &qk) in q.iter().enumerate() {
                // Vector k of the slot (32 bytes; k < 8).
                let xv = ld(xp.add(32 * k));
                let a = if k % 2 == 0 { &mut p } else { &mut p2 };
                *a = if f.signed8() && !I::VNNI {
                    I::dot(*a, _mm256_sign_epi8(qk, qk), _mm256_sign_epi8(xv, qk))
                } else {
                    I::dot(*a, qk, xv)
                };
            }
            let p = _mm256_add_epi32(p, p2);
            let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, dx), acc);
            if f.m.is_some() {
                // Q4_1/Q5_1: + f16(m_w)·s_x per block.
                let sx = _mm256_loadu_ps(self.xs.add(GROUP * gi));
                _mm256_fmadd_ps(mw, sx, acc)
            } else {
                acc
            }
        }
    }
}

/// Ask for the `bytes` of weights at `base` [`PREFETCH_BYTES`] ahead of use: decode streams the
/// weights from DRAM once per token (a hint; it never faults).
#[inline(always)]
unsafe fn prefetch_ahead(base: *const u8, bytes: usize) {
    let mut o = 0;
    while o < bytes {
        // SAFETY: SSE (baseline); prefetching is a hint and never faults, so the address need
        // not be valid (`wrapping_add`).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_BYTES + o) as *const i8) };
        o += 64;
    }
}

/// Bytes o..o + 16 of the 8 blocks at `base` (`bb` bytes each), transposed: lane j of vector k
/// holds bytes o + 4k..o + 4k + 4 of block j.
///
/// # Safety
/// The 8 blocks' bytes o..o + 16 are readable; AVX2.
#[inline(always)]
unsafe fn transpose16(base: *const u8, bb: usize, o: usize) -> [__m256i; 4] {
    // SAFETY: the caller's contract.
    unsafe {
        let at = |j: usize| base.add(j * bb + o);
        transpose4(
            ld2(at(0), at(4)),
            ld2(at(1), at(5)),
            ld2(at(2), at(6)),
            ld2(at(3), at(7)),
        )
    }
}

/// The table of a table format (IQ4_NL) in both 128-bit halves, for `vpshufb` on 4-bit codes:
/// its signed levels, or with VNNI the levels + 128 (unsigned, as Q8_0's `q + 128`).
#[inline(always)]
unsafe fn table_vector<I: Simd, F: Format>() -> __m256i {
    let t = F::F.table.expect("a table format");
    // SAFETY: `t` is 16 readable bytes; AVX2 (the caller's contract).
    unsafe {
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i));
        if I::VNNI {
            _mm256_xor_si256(v, _mm256_set1_epi8(-128))
        } else {
            v
        }
    }
}

/// Decode the group of 8 blocks at `base` (8 whole blocks of format `F`): the quants as 8
/// vectors in the dword-transposed layout (lane j of vector k: quants 4k..4k+4 of block j, as
/// unsigned bytes; Q8_0 and IQ4_NL as signed bytes without VNNI, + 128 with), and the blocks'
/// `d` (and `m`) by lane.
#[inline(always)]
unsafe fn decode_group<I: Simd, F: Format>(base: *const u8) -> ([__m256i; 8], __m256, __m256) {
    let f = F::F;
    let bb = f.bytes;
    // SAFETY: `base` points to 8 whole blocks (the caller's contract), so every read below
    // (d, m, qh, 16 or 32 quant bytes of block j) is inside them; the features likewise.
    unsafe {
        let blk = |j: usize| base.add(j * bb);
        let dw = f16x8(base.add(f.d), bb);
        let mw = if f.m.is_some() {
            f16x8(base.add(f.m_off()), bb)
        } else {
            _mm256_setzero_ps()
        };
        let mut q = [_mm256_setzero_si256(); 8];
        if f.bits == 8 {
            for h in 0..2 {
                let t = transpose16(base, bb, f.qs + 16 * h);
                for k in 0..4 {
                    // VNNI multiplies unsigned × signed bytes: q + 128, with the 128·Σx taken
                    // off in `slot`.
                    q[4 * h + k] = if I::VNNI {
                        _mm256_xor_si256(t[k], _mm256_set1_epi8(-128))
                    } else {
                        t[k]
                    };
                }
            }
            return (q, dw, mw);
        }
        let m4 = _mm256_set1_epi8(0x0F);
        let t = transpose16(base, bb, f.qs);
        for k in 0..4 {
            q[k] = _mm256_and_si256(t[k], m4);
            q[k + 4] = _mm256_and_si256(_mm256_srli_epi16(t[k], 4), m4);
        }
        if f.table.is_some() {
            let tab = table_vector::<I, F>();
            for v in &mut q {
                *v = _mm256_shuffle_epi8(tab, *v);
            }
            return (q, dw, mw);
        }
        if f.qh.is_some() {
            // Bit e of block j's qh is bit 4 of its element e. Vector k holds elements
            // 4k..4k+4: their bits sit in byte k/2 of qh.
            let h = |j: usize| (blk(j).add(f.qh_off()) as *const i32).read_unaligned();
            let qh = _mm256_setr_epi32(h(0), h(1), h(2), h(3), h(4), h(5), h(6), h(7));
            let x10 = _mm256_set1_epi8(0x10);
            for k in 0..8 {
                let sel = (k / 2) as i8;
                #[rustfmt::skip]
                let ctrl = _mm256_setr_epi8(
                    sel, sel, sel, sel, 4 + sel, 4 + sel, 4 + sel, 4 + sel,
                    8 + sel, 8 + sel, 8 + sel, 8 + sel, 12 + sel, 12 + sel, 12 + sel, 12 + sel,
                    sel, sel, sel, sel, 4 + sel, 4 + sel, 4 + sel, 4 + sel,
                    8 + sel, 8 + sel, 8 + sel, 8 + sel, 12 + sel, 12 + sel, 12 + sel, 12 + sel,
                );
                let sh = 4 * (k % 2) as u32;
                let bits = (0x0804_0201u32 << sh) as i32;
                let mask = _mm256_set1_epi32(bits);
                let bytes = _mm256_shuffle_epi8(qh, ctrl);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mask), mask);
                q[k] = _mm256_or_si256(q[k], _mm256_and_si256(set, x10));
            }
        }
        (q, dw, mw)
    }
}

/// 16 bytes at `o` in block A (at `ba`), then at `o` in block B (the next block, `bb` bytes
/// on) when `two`, else zeros.
///
/// # Safety
/// Bytes o..o + 16 of A (and of B when `two`) are readable; AVX2.
#[inline(always)]
unsafe fn pair16(ba: *const u8, bb: usize, two: bool, o: usize) -> __m256i {
    // SAFETY: the caller's contract; B is read only when it exists.
    unsafe {
        let lo = _mm_loadu_si128(ba.add(o) as *const __m128i);
        if two {
            _mm256_set_m128i(_mm_loadu_si128(ba.add(bb + o) as *const __m128i), lo)
        } else {
            _mm256_zextsi128_si256(lo)
        }
    }
}

/// Decode the pair of tail blocks A (at `ba`) and B (the block after it when `two`, else
/// zeros) for [`QRow::gq`]'s pair slots: i32 lanes 0..4 accumulate block A, lanes 4..8 block
/// B, and `slot` scales them as a group's (the per-block values sit in lane 0 and lane 4, and
/// the d's in all four lanes of their block).
#[inline(always)]
unsafe fn decode_pair<I: Simd, F: Format>(
    ba: *const u8,
    two: bool,
) -> ([__m256i; 2], __m256, __m256) {
    let f = F::F;
    let bb2 = ba.wrapping_add(f.bytes);
    // SAFETY: block A lies at `ba`, block B after it when `two` (the caller's contract); B is
    // read only when it exists, and every offset + length is inside a block.
    unsafe {
        // d_w (and m_w) as [A's × 4, B's (or 0) × 4]: the f16s of both blocks converted in
        // one go, then spread over their lanes.
        let h = |blk: *const u8, o: usize| (blk.add(o) as *const u16).read_unaligned() as u64;
        let hb = |o: usize| if two { h(bb2, o) } else { 0 };
        let mut bits = h(ba, f.d) | hb(f.d) << 16;
        if f.m.is_some() {
            bits |= h(ba, f.m_off()) << 32 | hb(f.m_off()) << 48;
        }
        let cvt = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64)));
        let dw = _mm256_permutevar8x32_ps(cvt, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
        let mw = if f.m.is_some() {
            _mm256_permutevar8x32_ps(cvt, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3))
        } else {
            _mm256_setzero_ps()
        };
        let m4 = _mm256_set1_epi8(0x0F);
        let mut q = if f.bits == 8 {
            [
                pair16(ba, f.bytes, two, f.qs),
                pair16(ba, f.bytes, two, f.qs + 16),
            ]
        } else {
            let t = pair16(ba, f.bytes, two, f.qs);
            [
                _mm256_and_si256(t, m4),
                _mm256_and_si256(_mm256_srli_epi16(t, 4), m4),
            ]
        };
        if f.qh.is_some() {
            // Bit e of a block's qh is bit 4 of its element e: vector 0 takes bits 0..16 of
            // A's then B's, vector 1 bits 16..32.
            let qh =
                |blk: *const u8| u32::from_le((blk.add(f.qh_off()) as *const u32).read_unaligned());
            let (ha, hb) = (qh(ba), if two { qh(bb2) } else { 0 });
            q[0] = _mm256_or_si256(q[0], bit4_from_bits32((ha & 0xFFFF) | (hb << 16)));
            q[1] = _mm256_or_si256(q[1], bit4_from_bits32((ha >> 16) | (hb & 0xFFFF_0000)));
        }
        if f.table.is_some() {
            let tab = table_vector::<I, F>();
            for v in &mut q {
                *v = _mm256_shuffle_epi8(tab, *v);
            }
        } else if f.bits == 8 && I::VNNI {
            for v in &mut q {
                *v = _mm256_xor_si256(*v, _mm256_set1_epi8(-128));
            }
        }
        (q, dw, mw)
    }
}

/// 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), a group of 8 blocks at a
/// time.
///
/// The group's quants are transposed in registers so that i32 lane j of the byte dot
/// accumulates block j alone (the activations come pre-transposed, [`QRow::gq`]): the block
/// scales are then applied to 8 blocks with one `cvt`, `mul` and `fmadd` instead of one set per
/// block, and the transpose is shared by all C activation rows. Every (row, activation) pair
/// does the same operations whatever R and C are.
#[inline(always)]
unsafe fn tile_g8<I: Simd, F: Format, const R: usize, const C: usize>(
    w: &[u8],
    rb: usize,
    xr: &[QRow<'_>],
    out: &mut [f32],
) {
    let bb = F::F.bytes;
    let t = G8::new::<F, R, C>(w, rb, xr, out);
    realign_frame::<I>();
    let wp = w.as_ptr();
    for r in 0..R {
        // Rows one after another: only one row's C accumulators are live.
        // SAFETY: the features are the caller's contract; the group's / pair's blocks lie
        // inside row r of `w` (lengths checked by `G8::new`), and every slot is one of the tile.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); C];
            for g in 0..t.ngf {
                let base = wp.add(r * rb + GROUP * g * bb);
                prefetch_ahead(base, GROUP * bb);
                let (q, dw, mw) = decode_group::<I, F>(base);
                for c in 0..C {
                    acc[c] = t.slot::<I, F>(&q, g, c, dw, mw, acc[c]);
                }
            }
            // The blocks after the last whole group, two at a time. The trip count is hidden
            // from the optimiser (it is at most 4): unrolled, the copies' live pointers spilled
            // and the loop measured slower than rolled.
            for p in 0..std::hint::black_box(t.npair) {
                let a = GROUP * t.ngf + 2 * p;
                let (q, dw, mw) = decode_pair::<I, F>(wp.add(r * rb + a * bb), a + 1 < t.nb);
                for c in 0..C {
                    acc[c] = t.slot::<I, F>(&q, t.ngf + p, c, dw, mw, acc[c]);
                }
            }
            for c in 0..C {
                out[r * C + c] = hsum(acc[c]);
            }
        }
    }
}

// ---- K-quants: super-blocks of 256 ---------------------------------------------------------

/// Check a K-quant tile's shapes; returns the super-blocks per row.
fn check_k<const R: usize, const C: usize>(
    bb: usize,
    w: &[u8],
    rb: usize,
    xr: &[QRow<'_>],
    out: &[f32],
) -> usize {
    let nsb = rb / bb;
    assert!(rb == nsb * bb && w.len() == R * rb && out.len() == R * C);
    check_rows::<C>(xr, nsb * 256, 256);
    for x in xr {
        assert!(x.bs16.len() == nsb * 16);
    }
    nsb
}

/// The header of a Q4_K/Q5_K super-block at `blk`: `d`, `dmin`, the 8 sub-block scales, and the
/// mins as 16 i16 (each twice, against the bsums of its two 16-halves).
#[inline(always)]
unsafe fn k45_header<F: Format>(blk: &[u8]) -> (f32, f32, [i16; 8], __m256i) {
    let f = F::F;
    let mut sc = [0i16; 8];
    let mut mn = [0i16; 16];
    for s in 0..8 {
        let (a, m) = scale_min_k4(s, &blk[f.scales_off()..f.scales_off() + 12]);
        sc[s] = a as i16;
        mn[2 * s] = m as i16;
        mn[2 * s + 1] = m as i16;
    }
    // SAFETY: `blk` is a whole super-block (d and dmin inside it); `mn` is 32 readable bytes;
    // the features are the caller's contract.
    unsafe {
        (
            f16(blk.as_ptr().add(f.d)),
            f16(blk.as_ptr().add(f.m_off())),
            sc,
            _mm256_loadu_si256(mn.as_ptr() as *const __m256i),
        )
    }
}

/// Q4_K / Q5_K super-blocks (× Q8_K).
#[inline(always)]
unsafe fn tile_k45<I: Simd, F: Format, const R: usize, const C: usize>(
    w: &[u8],
    rb: usize,
    xr: &[QRow<'_>],
    out: &mut [f32],
) {
    let f = F::F;
    let (bb, qs_off, q5) = (f.bytes, f.qs, f.qh.is_some());
    let nsb = check_k::<R, C>(bb, w, rb, xr, out);
    realign_frame::<I>();
    let wp = w.as_ptr();
    // SAFETY: the features are the caller's contract; every weight read is inside super-block
    // i of row r and every activation read inside row c's 256 quants / 16 bsums of super-block
    // i (lengths checked by `check_k`).
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let x10 = _mm256_set1_epi8(0x10);
        let mut accf = [[_mm256_setzero_ps(); C]; R];
        for i in 0..nsb {
            let mut sc = [[0i16; 8]; R];
            let mut mins = [_mm256_setzero_si256(); R];
            let mut dw = [0f32; R];
            let mut dmw = [0f32; R];
            for r in 0..R {
                let blk = &w[r * rb + i * bb..r * rb + (i + 1) * bb];
                prefetch_ahead(blk.as_ptr(), 128);
                (dw[r], dmw[r], sc[r], mins[r]) = k45_header::<F>(blk);
            }
            let mut acci = [[_mm256_setzero_si256(); C]; R];
            for ch in 0..4 {
                let mut lo = [_mm256_setzero_si256(); R];
                let mut hi = [_mm256_setzero_si256(); R];
                let mut s1 = [_mm256_setzero_si256(); R];
                let mut s2 = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    let bp = wp.add(r * rb + i * bb);
                    let qv = ld(bp.add(qs_off + 32 * ch) as *const i8);
                    lo[r] = _mm256_and_si256(qv, m4);
                    hi[r] = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
                    if q5 {
                        let qh = ld(bp.add(f.qh_off()) as *const i8);
                        let b1 = _mm256_set1_epi8((1u8 << (2 * ch)) as i8);
                        let b2 = _mm256_set1_epi8((2u8 << (2 * ch)) as i8);
                        let h1 = _mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1);
                        let h2 = _mm256_cmpeq_epi8(_mm256_and_si256(qh, b2), b2);
                        lo[r] = _mm256_or_si256(lo[r], _mm256_and_si256(h1, x10));
                        hi[r] = _mm256_or_si256(hi[r], _mm256_and_si256(h2, x10));
                    }
                    s1[r] = _mm256_set1_epi16(sc[r][2 * ch]);
                    s2[r] = _mm256_set1_epi16(sc[r][2 * ch + 1]);
                }
                for c in 0..C {
                    let xp = xr[c].qs.as_ptr().add(256 * i + 64 * ch);
                    let x0 = ld(xp);
                    let x1 = ld(xp.add(32));
                    for r in 0..R {
                        acci[r][c] = I::dots(acci[r][c], lo[r], x0, s1[r]);
                        acci[r][c] = I::dots(acci[r][c], hi[r], x1, s2[r]);
                    }
                }
            }
            for c in 0..C {
                let dx = *xr[c].d.get_unchecked(i);
                let bs = _mm256_loadu_si256(xr[c].bs16.as_ptr().add(16 * i) as *const __m256i);
                for r in 0..R {
                    let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins[r], bs));
                    let a =
                        _mm256_mul_ps(_mm256_set1_ps(dx * dw[r]), _mm256_cvtepi32_ps(acci[r][c]));
                    accf[r][c] = _mm256_add_ps(
                        accf[r][c],
                        _mm256_fnmadd_ps(_mm256_set1_ps(dx * dmw[r]), m, a),
                    );
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r * C + c] = hsum(accf[r][c]);
            }
        }
    }
}

/// Q6_K super-blocks (× Q8_K).
#[inline(always)]
unsafe fn tile_q6k<I: Simd, const R: usize, const C: usize>(
    w: &[u8],
    rb: usize,
    xr: &[QRow<'_>],
    out: &mut [f32],
) {
    let f = BlockFormat::Q6_K;
    let bb = f.bytes;
    let nsb = check_k::<R, C>(bb, w, rb, xr, out);
    realign_frame::<I>();
    let wp = w.as_ptr();
    // SAFETY: the features are the caller's contract; every weight read is inside super-block
    // i of row r and every activation read inside row c's 256 quants / 16 bsums of super-block
    // i (lengths checked by `check_k`).
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut accf = [[_mm256_setzero_ps(); C]; R];
        for i in 0..nsb {
            let mut dw = [0f32; R];
            let mut scm = [_mm256_setzero_si256(); R];
            for r in 0..R {
                let bp = wp.add(r * rb + i * bb);
                prefetch_ahead(bp, 256);
                dw[r] = f16(bp.add(f.d));
                // The 16 i8 scales, times −32.
                let sc =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(f.scales_off()) as *const __m128i));
                scm[r] = _mm256_mullo_epi16(sc, _mm256_set1_epi16(-f.zero as i16));
            }
            // Seed: −32·Σ_j sc_j·bsum_j (the q − 32 offset), exact in i32.
            let mut acci = [[_mm256_setzero_si256(); C]; R];
            for c in 0..C {
                let bs = _mm256_loadu_si256(xr[c].bs16.as_ptr().add(16 * i) as *const __m256i);
                for r in 0..R {
                    acci[r][c] = _mm256_madd_epi16(scm[r], bs);
                }
            }
            for h in 0..2 {
                for g in 0..4 {
                    let mut q = [_mm256_setzero_si256(); R];
                    let mut sv = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        // Group g of half h: its 32 six-bit quants as unsigned bytes (bit
                        // positions: `reference::deq_q6_k`), and its two sub-block scales as
                        // i16 (the low half of the vector scales elements 0..16, the high
                        // half 16..32).
                        let bp = wp.add(r * rb + i * bb);
                        let ql =
                            ld(bp.add(f.qs + 64 * h + if g % 2 == 1 { 32 } else { 0 })
                                as *const i8);
                        let qh = ld(bp.add(f.qh_off() + 32 * h) as *const i8);
                        let lo = if g < 2 {
                            _mm256_and_si256(ql, m4)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4)
                        };
                        let hb = match g {
                            0 => _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
                            1 => _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
                            2 => _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                            _ => _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30)),
                        };
                        q[r] = _mm256_or_si256(lo, hb);
                        let j = f.scales_off() + 8 * h + 2 * g;
                        let (a, b) = (*bp.add(j) as i8, *bp.add(j + 1) as i8);
                        sv[r] =
                            _mm256_set_m128i(_mm_set1_epi16(b as i16), _mm_set1_epi16(a as i16));
                    }
                    for c in 0..C {
                        let xv = ld(xr[c].qs.as_ptr().add(256 * i + 128 * h + 32 * g));
                        for r in 0..R {
                            acci[r][c] = I::dots(acci[r][c], q[r], xv, sv[r]);
                        }
                    }
                }
            }
            for c in 0..C {
                let dx = *xr[c].d.get_unchecked(i);
                for r in 0..R {
                    accf[r][c] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dx * dw[r]),
                        _mm256_cvtepi32_ps(acci[r][c]),
                        accf[r][c],
                    );
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r * C + c] = hsum(accf[r][c]);
            }
        }
    }
}

// ---- Q2_K, Q3_K, IQ4_XS: sub-blocks of 16 or 32 with a scale each ----------------------------

/// `v` shifted right by `n` bits per 16-bit lane (`n` a constant once the callers' loops are
/// unrolled, when LLVM emits the immediate form).
#[inline(always)]
unsafe fn srl16(v: __m256i, n: usize) -> __m256i {
    // SAFETY: AVX2 (the caller's contract); register operations only.
    unsafe { _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32)) }
}

/// `v` shifted left by `n` bits per 16-bit lane (as [`srl16`]).
#[inline(always)]
unsafe fn sll16(v: __m256i, n: usize) -> __m256i {
    // SAFETY: AVX2 (the caller's contract); register operations only.
    unsafe { _mm256_sll_epi16(v, _mm_cvtsi32_si128(n as i32)) }
}

/// From 8 i16 scales in each 128-bit half of `ss` (the same 8 in both), scale 2j broadcast
/// over the low half and scale 2j + 1 over the high half (j < 4): the `dots` scale for a vector
/// whose low 16 bytes belong to one sub-block and high 16 to the next.
#[inline(always)]
unsafe fn scale_pair(ss: __m256i, j: usize) -> __m256i {
    let a = 4 * j as i16;
    // SAFETY: AVX2 (the caller's contract); register operations only.
    unsafe {
        let ctrl = _mm256_set_m128i(
            _mm_set1_epi16(((a + 3) << 8) | (a + 2)),
            _mm_set1_epi16(((a + 1) << 8) | a),
        );
        _mm256_shuffle_epi8(ss, ctrl)
    }
}

/// Q2_K super-blocks (× Q8_K): 2-bit quants as unsigned bytes, `Σ_j sc_j·Σ(q·x)` in i32 with
/// the 4-bit scales in `dots`, the mins as a second integer dot with the bsums (the 16
/// sub-blocks of 16 are the bsums' spans).
#[inline(always)]
unsafe fn tile_q2k<I: Simd, const R: usize, const C: usize>(
    w: &[u8],
    rb: usize,
    xr: &[QRow<'_>],
    out: &mut [f32],
) {
    let f = BlockFormat::Q2_K;
    let bb = f.bytes;
    let nsb = check_k::<R, C>(bb, w, rb, xr, out);
    realign_frame::<I>();
    let wp = w.as_ptr();
    // SAFETY: the features are the caller's contract; every weight read is inside super-block
    // i of row r and every activation read inside row c's 256 quants / 16 bsums of super-block
    // i (lengths checked by `check_k`).
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(0x0F);
        let z = _mm256_setzero_si256();
        let mut accf = [[_mm256_setzero_ps(); C]; R];
        for i in 0..nsb {
            let mut dw = [0f32; R];
            let mut dmw = [0f32; R];
            let mut sch = [[z; 2]; R];
            let mut mins = [z; R];
            for r in 0..R {
                let bp = wp.add(r * rb + i * bb);
                prefetch_ahead(bp, bb);
                dw[r] = f16(bp.add(f.d));
                dmw[r] = f16(bp.add(f.m_off()));
                // Byte j: scale j in the low nibble, min j in the high one.
                let sm = _mm_loadu_si128(bp.add(f.scales_off()) as *const __m128i);
                let sc = _mm256_cvtepu8_epi16(_mm_and_si128(sm, m4));
                mins[r] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sm, 4), m4));
                // Half n's 8 scales in both 128-bit halves.
                sch[r] = [
                    _mm256_permute2x128_si256(sc, sc, 0x00),
                    _mm256_permute2x128_si256(sc, sc, 0x11),
                ];
            }
            let mut acci = [[z; C]; R];
            for n in 0..2 {
                let mut qv = [z; R];
                for r in 0..R {
                    qv[r] = ld(wp.add(r * rb + i * bb + f.qs + 32 * n) as *const i8);
                }
                for j in 0..4 {
                    // Elements 128n + 32j.. : bits 2j of the 32 bytes; sub-blocks 8n + 2j
                    // (low 16 bytes) and 8n + 2j + 1 (high 16).
                    let mut q = [z; R];
                    let mut sv = [z; R];
                    for r in 0..R {
                        q[r] = _mm256_and_si256(srl16(qv[r], 2 * j), m3);
                        sv[r] = scale_pair(sch[r][n], j);
                    }
                    for c in 0..C {
                        let xv = ld(xr[c].qs.as_ptr().add(256 * i + 128 * n + 32 * j));
                        for r in 0..R {
                            acci[r][c] = I::dots(acci[r][c], q[r], xv, sv[r]);
                        }
                    }
                }
            }
            for c in 0..C {
                let dx = *xr[c].d.get_unchecked(i);
                let bs = _mm256_loadu_si256(xr[c].bs16.as_ptr().add(16 * i) as *const __m256i);
                for r in 0..R {
                    let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins[r], bs));
                    let a =
                        _mm256_mul_ps(_mm256_set1_ps(dx * dw[r]), _mm256_cvtepi32_ps(acci[r][c]));
                    accf[r][c] = _mm256_add_ps(
                        accf[r][c],
                        _mm256_fnmadd_ps(_mm256_set1_ps(dx * dmw[r]), m, a),
                    );
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r * C + c] = hsum(accf[r][c]);
            }
        }
    }
}

/// The 16 Q3_K sub-block scales of the block at `bp`, minus 32, as i8 (the bit layout of
/// `reference::q3_k_scales`, four at a time in u32s).
#[inline(always)]
unsafe fn q3k_scales(bp: *const u8) -> __m128i {
    // SAFETY: the caller passes a whole Q3_K block at `bp`; SSE2.
    unsafe {
        let p = bp.add(BlockFormat::Q3_K.scales_off()) as *const u32;
        let (a0, a1, a2) = (
            p.read_unaligned(),
            p.add(1).read_unaligned(),
            p.add(2).read_unaligned(),
        );
        let (lo, hi) = (0x0F0F_0F0Fu32, 0x0303_0303u32);
        let s = _mm_setr_epi32(
            ((a0 & lo) | ((a2 & hi) << 4)) as i32,
            ((a1 & lo) | (((a2 >> 2) & hi) << 4)) as i32,
            (((a0 >> 4) & lo) | (((a2 >> 4) & hi) << 4)) as i32,
            (((a1 >> 4) & lo) | (((a2 >> 6) & hi) << 4)) as i32,
        );
        _mm_sub_epi8(s, _mm_set1_epi8(32))
    }
}

/// Q3_K super-blocks (× Q8_K): quants as unsigned bytes q + 4·hbit (0..7), `Σ_j sc_j·Σ(q·x)`
/// in i32 with the signed scales in `dots`, and the −4 offset seeded as `−4·Σ_j sc_j·bsum_j`.
#[inline(always)]
unsafe fn tile_q3k<I: Simd, const R: usize, const C: usize>(
    w: &[u8],
    rb: usize,
    xr: &[QRow<'_>],
    out: &mut [f32],
) {
    let f = BlockFormat::Q3_K;
    let bb = f.bytes;
    let nsb = check_k::<R, C>(bb, w, rb, xr, out);
    realign_frame::<I>();
    let wp = w.as_ptr();
    // SAFETY: as in `tile_q2k`.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let four = _mm256_set1_epi8(4);
        let z = _mm256_setzero_si256();
        let mut accf = [[_mm256_setzero_ps(); C]; R];
        for i in 0..nsb {
            let mut dw = [0f32; R];
            let mut sch = [[z; 2]; R];
            let mut scm = [z; R];
            let mut hb = [z; R];
            for r in 0..R {
                let bp = wp.add(r * rb + i * bb);
                prefetch_ahead(bp, bb);
                dw[r] = f16(bp.add(f.d));
                let sc = _mm256_cvtepi8_epi16(q3k_scales(bp));
                scm[r] = _mm256_mullo_epi16(sc, _mm256_set1_epi16(-f.zero as i16));
                sch[r] = [
                    _mm256_permute2x128_si256(sc, sc, 0x00),
                    _mm256_permute2x128_si256(sc, sc, 0x11),
                ];
                hb[r] = ld(bp.add(f.qh_off()) as *const i8);
            }
            // Seed: −4·Σ_j sc_j·bsum_j (the q − 4 offset), exact in i32.
            let mut acci = [[z; C]; R];
            for c in 0..C {
                let bs = _mm256_loadu_si256(xr[c].bs16.as_ptr().add(16 * i) as *const __m256i);
                for r in 0..R {
                    acci[r][c] = _mm256_madd_epi16(scm[r], bs);
                }
            }
            for n in 0..2 {
                let mut qv = [z; R];
                for r in 0..R {
                    qv[r] = ld(wp.add(r * rb + i * bb + f.qs + 32 * n) as *const i8);
                }
                for j in 0..4 {
                    // Bit b = 4n + j of each hmask byte, moved to bit 2 (a 16-bit shift moves
                    // bits across bytes, but never into bit 2 of a byte: masked after).
                    let b = 4 * n + j;
                    let mut q = [z; R];
                    let mut sv = [z; R];
                    for r in 0..R {
                        let h = if b >= 2 {
                            srl16(hb[r], b - 2)
                        } else {
                            sll16(hb[r], 2 - b)
                        };
                        let lo = _mm256_and_si256(srl16(qv[r], 2 * j), m3);
                        q[r] = _mm256_or_si256(lo, _mm256_and_si256(h, four));
                        sv[r] = scale_pair(sch[r][n], j);
                    }
                    for c in 0..C {
                        let xv = ld(xr[c].qs.as_ptr().add(256 * i + 128 * n + 32 * j));
                        for r in 0..R {
                            acci[r][c] = I::dots(acci[r][c], q[r], xv, sv[r]);
                        }
                    }
                }
            }
            for c in 0..C {
                let dx = *xr[c].d.get_unchecked(i);
                for r in 0..R {
                    accf[r][c] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dx * dw[r]),
                        _mm256_cvtepi32_ps(acci[r][c]),
                        accf[r][c],
                    );
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r * C + c] = hsum(accf[r][c]);
            }
        }
    }
}

/// The 8 IQ4_XS sub-block scales of the block at `bp`, minus 32, as i16 in both 128-bit
/// halves: nibble s of `scales_l` | bits 2s..2s + 2 of `scales_h` << 4.
#[inline(always)]
unsafe fn iq4xs_scales(bp: *const u8) -> __m256i {
    let f = BlockFormat::IQ4_XS;
    // SAFETY: the caller passes a whole IQ4_XS block at `bp`; AVX2.
    unsafe {
        let h = (bp.add(f.scales_off()) as *const u16).read_unaligned();
        let l = (bp.add(f.scales_off() + 2) as *const i32).read_unaligned();
        let m4 = _mm_set1_epi8(0x0F);
        let lv = _mm_cvtsi32_si128(l);
        // Byte s = nibble s (the low nibble of byte s/2 for even s).
        let nib = _mm_unpacklo_epi8(
            _mm_and_si128(lv, m4),
            _mm_and_si128(_mm_srli_epi16(lv, 4), m4),
        );
        // Lane s = (h >> 2s) & 3: bits 2s.. moved to the top of the lane, then down.
        let mul = _mm_setr_epi16(1 << 14, 1 << 12, 1 << 10, 1 << 8, 1 << 6, 1 << 4, 1 << 2, 1);
        let hi = _mm_srli_epi16(_mm_mullo_epi16(_mm_set1_epi16(h as i16), mul), 14);
        let ls = _mm_or_si128(_mm_cvtepu8_epi16(nib), _mm_slli_epi16(hi, 4));
        _mm256_broadcastsi128_si256(_mm_sub_epi16(ls, _mm_set1_epi16(32)))
    }
}

/// IQ4_XS super-blocks (× Q8_K): a pair of sub-blocks at a time, the weights' low nibbles (the
/// first 16 elements of each) against the activations' matching halves (one permute per
/// activation row, shared by the R weight rows) and likewise the high nibbles; the table levels
/// are signed, so `vpmaddubsw` gets |w| and x with w's sign; `Σ_s (ls_s − 32)·Σ(w·x)` in i32.
#[inline(always)]
unsafe fn tile_iq4xs<I: Simd, const R: usize, const C: usize>(
    w: &[u8],
    rb: usize,
    xr: &[QRow<'_>],
    out: &mut [f32],
) {
    let f = BlockFormat::IQ4_XS;
    let bb = f.bytes;
    let nsb = check_k::<R, C>(bb, w, rb, xr, out);
    realign_frame::<I>();
    let wp = w.as_ptr();
    let table = f.table.expect("IQ4_XS has a table");
    // SAFETY: as in `tile_q2k`; `table` is 16 readable bytes.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let tab = _mm256_broadcastsi128_si256(_mm_loadu_si128(table.as_ptr() as *const __m128i));
        let z = _mm256_setzero_si256();
        let mut accf = [[_mm256_setzero_ps(); C]; R];
        for i in 0..nsb {
            let mut dw = [0f32; R];
            let mut ss = [z; R];
            for r in 0..R {
                let bp = wp.add(r * rb + i * bb);
                prefetch_ahead(bp, bb);
                dw[r] = f16(bp.add(f.d));
                ss[r] = iq4xs_scales(bp);
            }
            let mut acci = [[z; C]; R];
            for p in 0..4 {
                // Sub-blocks 2p (bytes 0..16) and 2p + 1 (bytes 16..32).
                let mut wl = [z; R];
                let mut wh = [z; R];
                let mut sv = [z; R];
                for r in 0..R {
                    let v = ld(wp.add(r * rb + i * bb + f.qs + 32 * p) as *const i8);
                    wl[r] = _mm256_shuffle_epi8(tab, _mm256_and_si256(v, m4));
                    wh[r] = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
                    sv[r] = scale_pair(ss[r], p);
                }
                for c in 0..C {
                    let xp = xr[c].qs.as_ptr().add(256 * i + 64 * p);
                    let (x0, x1) = (ld(xp), ld(xp.add(32)));
                    let xl = _mm256_permute2x128_si256(x0, x1, 0x20);
                    let xh = _mm256_permute2x128_si256(x0, x1, 0x31);
                    for r in 0..R {
                        let a = I::dots(
                            acci[r][c],
                            _mm256_abs_epi8(wl[r]),
                            _mm256_sign_epi8(xl, wl[r]),
                            sv[r],
                        );
                        acci[r][c] = I::dots(
                            a,
                            _mm256_abs_epi8(wh[r]),
                            _mm256_sign_epi8(xh, wh[r]),
                            sv[r],
                        );
                    }
                }
            }
            for c in 0..C {
                let dx = *xr[c].d.get_unchecked(i);
                for r in 0..R {
                    accf[r][c] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dx * dw[r]),
                        _mm256_cvtepi32_ps(acci[r][c]),
                        accf[r][c],
                    );
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r * C + c] = hsum(accf[r][c]);
            }
        }
    }
}

// ---- The two paths: `#[target_feature]` wrappers around the generic bodies, their tables ---

/// `v` padded to [`MAX_C`] entries by repeating its last (entries past `cmax` are never called).
fn pad_tiles(v: &[TileFn]) -> [TileFn; MAX_C] {
    std::array::from_fn(|i| v[i.min(v.len() - 1)])
}

/// A [`Tiles`] family of kernel `$f` (type params `$k`, then R, C): R ∈ {rmax, 1},
/// C ∈ 1..=cmax (cmax 4 or 8).
macro_rules! family {
    (@c $f:ident, $r:literal, 4 $(, $k:ty)?) => {
        pad_tiles(&[$f::<$($k,)? $r, 1> as TileFn, $f::<$($k,)? $r, 2>, $f::<$($k,)? $r, 3>, $f::<$($k,)? $r, 4>])
    };
    (@c $f:ident, $r:literal, 8 $(, $k:ty)?) => {
        pad_tiles(&[
            $f::<$($k,)? $r, 1> as TileFn, $f::<$($k,)? $r, 2>, $f::<$($k,)? $r, 3>, $f::<$($k,)? $r, 4>,
            $f::<$($k,)? $r, 5>, $f::<$($k,)? $r, 6>, $f::<$($k,)? $r, 7>, $f::<$($k,)? $r, 8>,
        ])
    };
    ($f:ident, $rmax:literal, $cmax:tt $(, $k:ty)?) => {
        Tiles {
            rmax: $rmax,
            cmax: $cmax,
            big: family!(@c $f, $rmax, $cmax $(, $k)?),
            one: family!(@c $f, 1, $cmax $(, $k)?),
        }
    };
}

/// The `#[target_feature]` entry points of one path (`$simd` compiled with `$feat`), tiles of
/// up to `$rmax` rows for the K-quants and up to `$gc` activation rows for the group kernels.
macro_rules! isa_tiles {
    ($modname:ident, $simd:ty, $feat:literal, $rmax:literal, $gc:tt) => {
        pub(crate) mod $modname {
            use super::*;

            /// # Safety
            /// The CPU must support this module's target features.
            #[target_feature(enable = $feat)]
            unsafe fn g8<F: Format, const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the features here are all `tile_g8` needs.
                unsafe { tile_g8::<$simd, F, R, C>(w, rb, xr, out) }
            }

            /// # Safety
            /// The CPU must support this module's target features.
            #[target_feature(enable = $feat)]
            unsafe fn k45<F: Format, const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the features here are all `tile_k45` needs.
                unsafe { tile_k45::<$simd, F, R, C>(w, rb, xr, out) }
            }

            /// # Safety
            /// The CPU must support this module's target features.
            #[target_feature(enable = $feat)]
            unsafe fn q6k<const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the features here are all `tile_q6k` needs.
                unsafe { tile_q6k::<$simd, R, C>(w, rb, xr, out) }
            }

            /// # Safety
            /// The CPU must support this module's target features.
            #[target_feature(enable = $feat)]
            unsafe fn q2k<const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the features here are all `tile_q2k` needs.
                unsafe { tile_q2k::<$simd, R, C>(w, rb, xr, out) }
            }

            /// # Safety
            /// The CPU must support this module's target features.
            #[target_feature(enable = $feat)]
            unsafe fn q3k<const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the features here are all `tile_q3k` needs.
                unsafe { tile_q3k::<$simd, R, C>(w, rb, xr, out) }
            }

            /// # Safety
            /// The CPU must support this module's target features.
            #[target_feature(enable = $feat)]
            unsafe fn iq4xs<const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the features here are all `tile_iq4xs` needs.
                unsafe { tile_iq4xs::<$simd, R, C>(w, rb, xr, out) }
            }

            /// The kernels for `ty`. Callers must have checked the CPU has `$feat`.
            pub(crate) fn tiles(ty: GgmlType) -> Tiles {
                match ty {
                    // The group kernels walk their R rows one after another (R only amortises
                    // the call and its checks).
                    GgmlType::Q4_0 => family!(g8, 8, $gc, blocks::Q4_0),
                    GgmlType::Q4_1 => family!(g8, 8, $gc, blocks::Q4_1),
                    GgmlType::Q5_0 => family!(g8, 8, $gc, blocks::Q5_0),
                    GgmlType::Q5_1 => family!(g8, 8, $gc, blocks::Q5_1),
                    GgmlType::Q8_0 => family!(g8, 8, $gc, blocks::Q8_0),
                    GgmlType::Q4_K => family!(k45, $rmax, 4, blocks::Q4_K),
                    GgmlType::Q5_K => family!(k45, $rmax, 4, blocks::Q5_K),
                    GgmlType::Q6_K => family!(q6k, $rmax, 4),
                    GgmlType::IQ4_NL => family!(g8, 8, $gc, blocks::IQ4_NL),
                    GgmlType::Q2_K => family!(q2k, $rmax, 4),
                    GgmlType::Q3_K => family!(q3k, $rmax, 4),
                    GgmlType::IQ4_XS => family!(iq4xs, $rmax, 4),
                    _ => unreachable!("no quantized dot kernel for {ty}"),
                }
            }
        }
    };
}

isa_tiles!(avx2, Avx2, "avx2,fma,f16c", 2, 4);
isa_tiles!(
    avx512,
    Avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    4,
    8
);
