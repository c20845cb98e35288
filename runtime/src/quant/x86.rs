//! x86-64 tile kernels: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI (`vpdpbusd` /
//! `vpdpwssd` on 256-bit vectors, 32 vector registers). Both are generated from one body by
//! `x86_kernels!`, differing in the byte-dot primitives, the enabled target features and the tile
//! shape (R weight rows × C activation rows; C up to 8 on AVX-512 for the 32-element formats).
//!
//! **32-element formats** (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, `tile_g8`): a weight row is read in groups
//! of 8 blocks. A group is transposed in registers (4-byte lanes across the 8 blocks) so that
//! i32 lane j of the byte dot accumulates block j alone, against activations stored in the same
//! transposed, group-major layout ([`QRow::gq`]); the 8 block scales are then applied with one
//! convert, multiply and FMA, and one decoded group serves all C activation rows. Blocks after a
//! row's last whole group go two at a time (i32 lanes 0..4 for one block, 4..8 for the other)
//! through the same epilogue, into the same accumulators.
//!
//! **K-quants** (`tile_k45`, `tile_q6k`): a tile walks the super-blocks of R weight rows once;
//! each is decoded into registers and multiplied against all C activation rows.
//!
//! Every (row, activation) pair keeps its own accumulators and performs exactly the same
//! operations whatever R and C are, so results do not depend on the tiling, the batch or the
//! thread count (`batched_rows_equal_rows_alone_bit_for_bit`).
//!
//! Numerics (see `kernels.rs` for the formulas): weight quants are decoded to *unsigned* bytes.
//! The Q4_0/Q5_0 offset is applied in the integer domain (−off·Σx seeded into the block's i32
//! accumulator), so each 32-block contributes `f16(d_w)·d_x·(exact integer)`; Q8_0 is `q + 128`
//! with `−128·Σx` seeded on VNNI and uses the sign trick on AVX2. K-quants accumulate
//! `Σ_j sc_j·Σ(q·x)` exactly in i32 over the whole super-block (`vpmaddwd` with the sub-block
//! scale instead of ones), with the Q6_K −32 offset seeded as `−32·Σ sc_j·bsum_j` and the
//! Q4_K/Q5_K mins as a second integer dot with the bsums. No intermediate saturates: the largest
//! u8·i8 pair sum in `vpmaddubsw` is 2·63·127 = 16002, and a VNNI lane sums at most 32 products
//! of 255·127.

use super::GgmlType;
use super::kernels::{GROUP, MAX_C, QRow, TileFn, Tiles};
use super::reference::scale_min_k4;

/// How far ahead of the block being decoded the kernels prefetch each weight row.
const PREFETCH_BYTES: usize = 4096;

/// `v` padded to [`MAX_C`] entries by repeating its last (entries past `cmax` are never called).
fn pad_tiles(v: &[TileFn]) -> [TileFn; MAX_C] {
    std::array::from_fn(|i| v[i.min(v.len() - 1)])
}

/// A [`Tiles`] family of kernel `$f` (const params `$k`, then R, C): R ∈ {rmax, 1}, C ∈ 1..=cmax
/// (cmax 4 or 8).
macro_rules! family {
    (@c $f:ident, $r:literal, 4 $(, $k:expr)?) => {
        pad_tiles(&[$f::<$($k,)? $r, 1> as TileFn, $f::<$($k,)? $r, 2>, $f::<$($k,)? $r, 3>, $f::<$($k,)? $r, 4>])
    };
    (@c $f:ident, $r:literal, 8 $(, $k:expr)?) => {
        pad_tiles(&[
            $f::<$($k,)? $r, 1> as TileFn, $f::<$($k,)? $r, 2>, $f::<$($k,)? $r, 3>, $f::<$($k,)? $r, 4>,
            $f::<$($k,)? $r, 5>, $f::<$($k,)? $r, 6>, $f::<$($k,)? $r, 7>, $f::<$($k,)? $r, 8>,
        ])
    };
    ($f:ident, $rmax:literal, $cmax:tt $(, $k:expr)?) => {
        Tiles {
            rmax: $rmax,
            cmax: $cmax,
            big: family!(@c $f, $rmax, $cmax $(, $k)?),
            one: family!(@c $f, 1, $cmax $(, $k)?),
        }
    };
}

macro_rules! x86_kernels {
    ($modname:ident, $feat:literal, $rmax:literal, $gc:tt, $vnni:literal, $dot:item, $dots:item) => {
        pub(crate) mod $modname {
            use super::*;
            use std::arch::x86_64::*;

            /// `acc + Σ a·b` over groups of 4 unsigned(a) × signed(b) bytes, per i32 lane.
            #[target_feature(enable = $feat)]
            #[inline]
            $dot

            /// `acc + Σ (a·b pair sums) · sc` (i16 scale per pair sum), per i32 lane.
            #[target_feature(enable = $feat)]
            #[inline]
            $dots

            #[target_feature(enable = $feat)]
            #[inline]
            fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }

            #[target_feature(enable = $feat)]
            #[inline]
            fn f16(p: *const u8) -> f32 {
                // SAFETY: callers pass a pointer to 2 readable bytes inside a weight block.
                let bits = unsafe { (p as *const u16).read_unaligned() };
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            #[target_feature(enable = $feat)]
            #[inline]
            fn ld(p: *const i8) -> __m256i {
                // SAFETY: callers pass 32 readable bytes.
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
            #[target_feature(enable = $feat)]
            #[inline]
            fn bit4_from_bits32(qh: u32) -> __m256i {
                let v = _mm256_set1_epi32(qh as i32);
                let shuf = _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                );
                let bytes = _mm256_shuffle_epi8(v, shuf);
                let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mask), mask);
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
            }

            /// The 4×4 dword transpose within each 128-bit lane: lane j of output k holds dword k
            /// of input j (j < 4 in the low half, j − 4 of the high half).
            #[target_feature(enable = $feat)]
            #[inline]
            fn transpose4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> [__m256i; 4] {
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

            /// 16 bytes at `lo` in the low half, 16 at `hi` in the high half.
            #[target_feature(enable = $feat)]
            #[inline]
            fn ld2(lo: *const u8, hi: *const u8) -> __m256i {
                // SAFETY: callers pass two pointers to 16 readable bytes each.
                unsafe {
                    _mm256_set_m128i(
                        _mm_loadu_si128(hi as *const __m128i),
                        _mm_loadu_si128(lo as *const __m128i),
                    )
                }
            }

            /// The f16 at `p + j·stride` for j = 0..8, as 8 f32.
            #[target_feature(enable = $feat)]
            #[inline]
            fn f16x8(p: *const u8, stride: usize) -> __m256 {
                // SAFETY: callers pass 8 f16 locations inside one group of weight blocks.
                let h = |j: usize| unsafe { (p.add(j * stride) as *const i16).read_unaligned() };
                _mm256_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), h(4), h(5), h(6), h(7)))
            }

            /// 32-element block formats, a group of 8 blocks at a time. K: 0 = Q4_0, 1 = Q4_1,
            /// 2 = Q5_0, 3 = Q5_1, 4 = Q8_0.
            ///
            /// The group's quants are transposed in registers so that i32 lane j of the byte dot
            /// accumulates block j alone (the activations come pre-transposed, [`QRow::gq`]): the
            /// block scales are then applied to 8 blocks with one `cvt`, `mul` and `fmadd` instead
            /// of one set per block, and the transpose is shared by all C activation rows.
            /// Every (row, activation) pair does the same operations whatever R and C are.
            #[target_feature(enable = $feat)]
            fn tile_g8<const K: u8, const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                let q5 = K == 2 || K == 3;
                let min = K == 1 || K == 3;
                let q8 = K == 4;
                let bb = if q8 { 34 } else { 18 + if q5 { 4 } else { 0 } + if min { 2 } else { 0 } };
                let qh_off = if min { 4 } else { 2 };
                let qs_off = if q8 { 2 } else { qh_off + if q5 { 4 } else { 0 } };
                let nb = rb / bb;
                // Whole groups, then the remaining blocks in pairs (see [`QRow::gq`]).
                let (ngf, npair) = (nb / GROUP, (nb % GROUP).div_ceil(2));
                let ng = ngf + npair;
                assert!(rb == nb * bb && w.len() == R * rb && out.len() == R * C);
                // The tile's activation rows are consecutive rows of one group-major buffer:
                // row c's group g sits at (g·gm + c)·256 bytes from row 0's first group.
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
                let (xq, xd, xs, xsum) = (x0.gq.as_ptr(), x0.gd.as_ptr(), x0.gs.as_ptr(), x0.gsum.as_ptr());
                check_rows::<C>(xr, nb * 32, 32);
                let wp = w.as_ptr();
                let m4 = _mm256_set1_epi8(0x0F);
                let x10 = _mm256_set1_epi8(0x10);
                // Slot g (a whole group, or a pair of tail blocks) of tile row c against the
                // slot's decoded weight vectors `q` (8 for a group, 2 for a pair) and its block
                // scales `dw`/`mw` by lane: the byte dots, then the scale epilogue into `acc`.
                let slot = |q: &[__m256i], g: usize, c: usize, dw: __m256, mw: __m256, acc: __m256| {
                    let gi = g * gm + c;
                    // SAFETY: slot g of tile row c lies inside row 0's buffers
                    // (gi < (ng − 1)·gm + C, checked above).
                    let (xp, sums, dx) = unsafe {
                        (
                            xq.add(256 * gi),
                            _mm256_loadu_si256(xsum.add(GROUP * gi) as *const __m256i),
                            _mm256_loadu_ps(xd.add(GROUP * gi)),
                        )
                    };
                    // The weight offset, in the integer domain: Σ(q − off)·x = Σq·x − off·Σx.
                    let mut p = match (K, $vnni) {
                        (0, _) => _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 3)),
                        (2, _) => _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 4)),
                        (4, true) => _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 7)),
                        _ => _mm256_setzero_si256(),
                    };
                    // Two dependency chains (even and odd k), summed exactly at the end.
                    let mut p2 = _mm256_setzero_si256();
                    for (k, &qk) in q.iter().enumerate() {
                        // SAFETY: vector k of the slot (32 bytes; k < 8).
                        let xv = ld(unsafe { xp.add(32 * k) });
                        let a = if k % 2 == 0 { &mut p } else { &mut p2 };
                        *a = if q8 && !$vnni {
                            dot(*a, _mm256_sign_epi8(qk, qk), _mm256_sign_epi8(xv, qk))
                        } else {
                            dot(*a, qk, xv)
                        };
                    }
                    let p = _mm256_add_epi32(p, p2);
                    let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, dx), acc);
                    if min {
                        // Q4_1/Q5_1: + f16(m_w)·s_x per block.
                        // SAFETY: as above.
                        let sx = unsafe { _mm256_loadu_ps(xs.add(GROUP * gi)) };
                        _mm256_fmadd_ps(mw, sx, acc)
                    } else {
                        acc
                    }
                };
                for r in 0..R {
                    // Rows one after another: only one row's C accumulators are live.
                    let mut acc = [_mm256_setzero_ps(); C];
                    for g in 0..ngf {
                        // SAFETY: the group's blocks lie inside row r of `w` (lengths checked).
                        let base = unsafe { wp.add(r * rb + GROUP * g * bb) };
                        // Decode streams the weights from DRAM once per token: ask for the
                        // row's data ahead of use (a hint; it never faults).
                        let mut o = 0;
                        while o < GROUP * bb {
                            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_BYTES + o) as *const i8);
                            o += 64;
                        }
                        // SAFETY (all block reads below): `base` points to 8 whole blocks.
                        let blk = |j: usize| unsafe { base.add(j * bb) };
                        let dw = f16x8(base, bb);
                        let mw = if min { f16x8(blk(0).wrapping_add(2), bb) } else { _mm256_setzero_ps() };
                        let mut q = [_mm256_setzero_si256(); 8];
                        if q8 {
                            for h in 0..2 {
                                let o = qs_off + 16 * h;
                                let t = transpose4(
                                    ld2(blk(0).wrapping_add(o), blk(4).wrapping_add(o)),
                                    ld2(blk(1).wrapping_add(o), blk(5).wrapping_add(o)),
                                    ld2(blk(2).wrapping_add(o), blk(6).wrapping_add(o)),
                                    ld2(blk(3).wrapping_add(o), blk(7).wrapping_add(o)),
                                );
                                for k in 0..4 {
                                    // VNNI multiplies unsigned × signed bytes: q + 128, with
                                    // the 128·Σx taken off below.
                                    q[4 * h + k] = if $vnni { _mm256_xor_si256(t[k], _mm256_set1_epi8(-128)) } else { t[k] };
                                }
                            }
                        } else {
                            let o = qs_off;
                            let t = transpose4(
                                ld2(blk(0).wrapping_add(o), blk(4).wrapping_add(o)),
                                ld2(blk(1).wrapping_add(o), blk(5).wrapping_add(o)),
                                ld2(blk(2).wrapping_add(o), blk(6).wrapping_add(o)),
                                ld2(blk(3).wrapping_add(o), blk(7).wrapping_add(o)),
                            );
                            for k in 0..4 {
                                q[k] = _mm256_and_si256(t[k], m4);
                                q[k + 4] = _mm256_and_si256(_mm256_srli_epi16(t[k], 4), m4);
                            }
                            if q5 {
                                // Bit e of block j's qh is bit 4 of its element e. Vector k
                                // holds elements 4k..4k+4: their bits sit in byte k/2 of qh.
                                // SAFETY: qh (4 bytes) lies inside each block.
                                let h = |j: usize| unsafe { (blk(j).add(qh_off) as *const i32).read_unaligned() };
                                let qh = _mm256_setr_epi32(h(0), h(1), h(2), h(3), h(4), h(5), h(6), h(7));
                                for k in 0..8 {
                                    let sel = (k / 2) as i8;
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
                        }
                        for c in 0..C {
                            acc[c] = slot(&q, g, c, dw, mw, acc[c]);
                        }
                    }
                    // The blocks after the last whole group, two at a time ([`QRow::gq`]'s
                    // pair slots): i32 lanes 0..4 accumulate block A, lanes 4..8 block B, and
                    // `slot` scales them as a group's (the per-block values sit in lane 0 and
                    // lane 4, and the d's in all four lanes of their block).
                    for p in 0..npair {
                        let a = GROUP * ngf + 2 * p;
                        let two = a + 1 < nb;
                        // SAFETY: block a (and a + 1 when `two`) of row r lies inside `w`.
                        let ba = unsafe { wp.add(r * rb + a * bb) };
                        let bb2 = ba.wrapping_add(bb);
                        // 16 bytes at `o` in block A, then (or zeros) at `o` in block B.
                        // SAFETY: o + 16 ≤ the block length; B is read only when it exists.
                        let pair16 = |o: usize| unsafe {
                            let lo = _mm_loadu_si128(ba.add(o) as *const __m128i);
                            if two {
                                _mm256_set_m128i(_mm_loadu_si128(bb2.add(o) as *const __m128i), lo)
                            } else {
                                _mm256_zextsi128_si256(lo)
                            }
                        };
                        // d_w (and m_w) as [A's × 4, B's (or 0) × 4]: the f16s of both blocks
                        // converted in one go, then spread over their lanes.
                        // SAFETY: o + 2 ≤ the block length; B is read only when it exists.
                        let h = |blk: *const u8, o: usize| unsafe { (blk.add(o) as *const u16).read_unaligned() } as u64;
                        let hb = |o: usize| if two { h(bb2, o) } else { 0 };
                        let mut bits = h(ba, 0) | hb(0) << 16;
                        if min {
                            bits |= h(ba, 2) << 32 | hb(2) << 48;
                        }
                        let f = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64)));
                        let dw = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
                        let mw = if min {
                            _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3))
                        } else {
                            _mm256_setzero_ps()
                        };
                        let mut q = if q8 {
                            [pair16(qs_off), pair16(qs_off + 16)]
                        } else {
                            let t = pair16(qs_off);
                            [_mm256_and_si256(t, m4), _mm256_and_si256(_mm256_srli_epi16(t, 4), m4)]
                        };
                        if q5 {
                            // Bit e of a block's qh is bit 4 of its element e: vector 0 takes
                            // bits 0..16 of A's then B's, vector 1 bits 16..32.
                            // SAFETY: qh (4 bytes) lies inside each block; B read when it exists.
                            let qh = |blk: *const u8| u32::from_le(unsafe { (blk.add(qh_off) as *const u32).read_unaligned() });
                            let (ha, hb) = (qh(ba), if two { qh(bb2) } else { 0 });
                            q[0] = _mm256_or_si256(q[0], bit4_from_bits32((ha & 0xFFFF) | (hb << 16)));
                            q[1] = _mm256_or_si256(q[1], bit4_from_bits32((ha >> 16) | (hb & 0xFFFF_0000)));
                        }
                        if q8 && $vnni {
                            for v in &mut q {
                                *v = _mm256_xor_si256(*v, _mm256_set1_epi8(-128));
                            }
                        }
                        for c in 0..C {
                            acc[c] = slot(&q, ngf + p, c, dw, mw, acc[c]);
                        }
                    }
                    for c in 0..C {
                        out[r * C + c] = hsum(acc[c]);
                    }
                }
            }

            /// Q4_K / Q5_K super-blocks (× Q8_K).
            #[target_feature(enable = $feat)]
            fn tile_k45<const Q5: bool, const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                let bb = if Q5 { 176 } else { 144 };
                let qs_off = if Q5 { 48 } else { 16 };
                let nsb = rb / bb;
                assert!(rb == nsb * bb && w.len() == R * rb && out.len() == R * C);
                check_rows::<C>(xr, nsb * 256, 256);
                for x in xr {
                    assert!(x.bs16.len() == nsb * 16);
                }
                let wp = w.as_ptr();
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
                        _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(PREFETCH_BYTES) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(PREFETCH_BYTES + 64) as *const i8);
                        dw[r] = f16(blk.as_ptr());
                        dmw[r] = f16(blk[2..].as_ptr());
                        let mut mn = [0i16; 16];
                        for s in 0..8 {
                            let (a, m) = scale_min_k4(s, &blk[4..16]);
                            sc[r][s] = a as i16;
                            mn[2 * s] = m as i16;
                            mn[2 * s + 1] = m as i16;
                        }
                        // SAFETY: `mn` is 32 readable bytes.
                        mins[r] = unsafe { _mm256_loadu_si256(mn.as_ptr() as *const __m256i) };
                    }
                    let mut acci = [[_mm256_setzero_si256(); C]; R];
                    for ch in 0..4 {
                        let mut lo = [_mm256_setzero_si256(); R];
                        let mut hi = [_mm256_setzero_si256(); R];
                        let mut s1 = [_mm256_setzero_si256(); R];
                        let mut s2 = [_mm256_setzero_si256(); R];
                        for r in 0..R {
                            // SAFETY: qs[32ch..32ch+32] (and qh) lie inside super-block i of row r.
                            let bp = unsafe { wp.add(r * rb + i * bb) };
                            let qv = ld(unsafe { bp.add(qs_off + 32 * ch) } as *const i8);
                            lo[r] = _mm256_and_si256(qv, m4);
                            hi[r] = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
                            if Q5 {
                                // SAFETY: qh is 32 bytes at offset 16 of the block.
                                let qh = ld(unsafe { bp.add(16) } as *const i8);
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
                            // SAFETY: elements 256i + 64ch .. +64 lie inside x.qs (checked).
                            let xp = unsafe { xr[c].qs.as_ptr().add(256 * i + 64 * ch) };
                            let x0 = ld(xp);
                            // SAFETY: as above.
                            let x1 = ld(unsafe { xp.add(32) });
                            for r in 0..R {
                                acci[r][c] = dots(acci[r][c], lo[r], x0, s1[r]);
                                acci[r][c] = dots(acci[r][c], hi[r], x1, s2[r]);
                            }
                        }
                    }
                    for c in 0..C {
                        // SAFETY: i < nsb; bs16 holds 16 per super-block (checked).
                        let (dx, bs) = unsafe {
                            (
                                *xr[c].d.get_unchecked(i),
                                _mm256_loadu_si256(xr[c].bs16.as_ptr().add(16 * i) as *const __m256i),
                            )
                        };
                        for r in 0..R {
                            let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins[r], bs));
                            let a = _mm256_mul_ps(_mm256_set1_ps(dx * dw[r]), _mm256_cvtepi32_ps(acci[r][c]));
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

            /// Q6_K super-blocks (× Q8_K).
            #[target_feature(enable = $feat)]
            fn tile_q6k<const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                let nsb = rb / 210;
                assert!(rb == nsb * 210 && w.len() == R * rb && out.len() == R * C);
                check_rows::<C>(xr, nsb * 256, 256);
                for x in xr {
                    assert!(x.bs16.len() == nsb * 16);
                }
                let wp = w.as_ptr();
                let m4 = _mm256_set1_epi8(0x0F);
                let mut accf = [[_mm256_setzero_ps(); C]; R];
                for i in 0..nsb {
                    let mut dw = [0f32; R];
                    let mut scm = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        // SAFETY: super-block i of row r lies inside `w`.
                        let bp = unsafe { wp.add(r * rb + i * 210) };
                        for k in 0..4 {
                            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH_BYTES + 64 * k) as *const i8);
                        }
                        dw[r] = f16(unsafe { bp.add(208) });
                        // SAFETY: the 16 i8 scales sit at offset 192.
                        let sc = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(bp.add(192) as *const __m128i) });
                        scm[r] = _mm256_mullo_epi16(sc, _mm256_set1_epi16(-32));
                    }
                    // Seed: −32·Σ_j sc_j·bsum_j (the q − 32 offset), exact in i32.
                    let mut acci = [[_mm256_setzero_si256(); C]; R];
                    for c in 0..C {
                        // SAFETY: bs16 holds 16 per super-block (checked).
                        let bs = unsafe { _mm256_loadu_si256(xr[c].bs16.as_ptr().add(16 * i) as *const __m256i) };
                        for r in 0..R {
                            acci[r][c] = _mm256_madd_epi16(scm[r], bs);
                        }
                    }
                    for h in 0..2 {
                        for g in 0..4 {
                            let mut q = [_mm256_setzero_si256(); R];
                            let mut sv = [_mm256_setzero_si256(); R];
                            for r in 0..R {
                                // SAFETY: ql/qh/scales of half h lie inside super-block i of row r.
                                let bp = unsafe { wp.add(r * rb + i * 210) };
                                let ql = ld(unsafe { bp.add(64 * h + if g % 2 == 1 { 32 } else { 0 }) } as *const i8);
                                let qh = ld(unsafe { bp.add(128 + 32 * h) } as *const i8);
                                let lo = if g < 2 { _mm256_and_si256(ql, m4) } else { _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4) };
                                let hb = match g {
                                    0 => _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
                                    1 => _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
                                    2 => _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                                    _ => _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30)),
                                };
                                q[r] = _mm256_or_si256(lo, hb);
                                let j = 8 * h + 2 * g;
                                // SAFETY: scales j, j + 1 (< 16) sit at offset 192 + j.
                                let (a, b) = unsafe { (*bp.add(192 + j) as i8, *bp.add(193 + j) as i8) };
                                sv[r] = _mm256_set_m128i(_mm_set1_epi16(b as i16), _mm_set1_epi16(a as i16));
                            }
                            for c in 0..C {
                                // SAFETY: elements 256i + 128h + 32g .. +32 lie inside x.qs.
                                let xv = ld(unsafe { xr[c].qs.as_ptr().add(256 * i + 128 * h + 32 * g) });
                                for r in 0..R {
                                    acci[r][c] = dots(acci[r][c], q[r], xv, sv[r]);
                                }
                            }
                        }
                    }
                    for c in 0..C {
                        // SAFETY: i < nsb = x.d.len().
                        let dx = unsafe { *xr[c].d.get_unchecked(i) };
                        for r in 0..R {
                            accf[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dw[r]), _mm256_cvtepi32_ps(acci[r][c]), accf[r][c]);
                        }
                    }
                }
                for r in 0..R {
                    for c in 0..C {
                        out[r * C + c] = hsum(accf[r][c]);
                    }
                }
            }

            /// # Safety
            /// The CPU must support this module's target features.
            unsafe fn t_g8<const K: u8, const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the caller guarantees the target features.
                unsafe { tile_g8::<K, R, C>(w, rb, xr, out) }
            }
            /// # Safety
            /// The CPU must support this module's target features.
            unsafe fn t_k45<const Q5: bool, const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the caller guarantees the target features.
                unsafe { tile_k45::<Q5, R, C>(w, rb, xr, out) }
            }
            /// # Safety
            /// The CPU must support this module's target features.
            unsafe fn t_q6k<const R: usize, const C: usize>(
                w: &[u8],
                rb: usize,
                xr: &[QRow<'_>],
                out: &mut [f32],
            ) {
                // SAFETY: the caller guarantees the target features.
                unsafe { tile_q6k::<R, C>(w, rb, xr, out) }
            }

            /// The kernels for `ty`. Callers must have checked the CPU has `$feat`.
            pub(crate) fn tiles(ty: GgmlType) -> Tiles {
                match ty {
                    // The group kernels walk their R rows one after another (R only amortises
                    // the call and its checks).
                    GgmlType::Q4_0 => family!(t_g8, 8, $gc, 0),
                    GgmlType::Q4_1 => family!(t_g8, 8, $gc, 1),
                    GgmlType::Q5_0 => family!(t_g8, 8, $gc, 2),
                    GgmlType::Q5_1 => family!(t_g8, 8, $gc, 3),
                    GgmlType::Q8_0 => family!(t_g8, 8, $gc, 4),
                    GgmlType::Q4_K => family!(t_k45, $rmax, 4, false),
                    GgmlType::Q5_K => family!(t_k45, $rmax, 4, true),
                    GgmlType::Q6_K => family!(t_q6k, $rmax, 4),
                    _ => unreachable!("no quantized dot kernel for {ty}"),
                }
            }
        }
    };
}

x86_kernels!(
    avx2,
    "avx2,fma,f16c",
    2,
    4,
    false,
    fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)),
        )
    },
    fn dots(acc: __m256i, a: __m256i, b: __m256i, sc: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), sc))
    }
);

x86_kernels!(
    avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    4,
    8,
    true,
    fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, a, b)
    },
    fn dots(acc: __m256i, a: __m256i, b: __m256i, sc: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(a, b), sc)
    }
);
