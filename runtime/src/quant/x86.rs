//! x86-64 row-dot kernels: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI (`vpdpbusd`, on
//! 256-bit vectors). Both are generated from one body by `x86_kernels!`, differing only in the
//! unsigned×signed byte dot product primitive and the enabled target features.
//!
//! Conventions: weight quants are decoded to *unsigned* bytes (the u8 operand) and the offset
//! (Q4_0 −8, Q5_0 −16) or min (Q4_1, Q5_1, Q4_K, Q5_K) is applied with the activation block sums;
//! Q8_0 and Q6_K use the sign trick (|w| as u8, sign(w)·x as i8). No intermediate saturates:
//! the largest u8·i8 pair sum in `vpmaddubsw` is 2·128·127 = 32512 < 32767.

use super::GgmlType;
use super::kernels::{DotFn, Q8Row};
use super::reference::scale_min_k4;

macro_rules! x86_kernels {
    ($modname:ident, $feat:literal, $dot:item) => {
        pub(crate) mod $modname {
            use super::*;
            use std::arch::x86_64::*;

            /// Unsigned(a) × signed(b) byte dot product, 4 adjacent bytes per i32 lane.
            #[target_feature(enable = $feat)]
            #[inline]
            $dot

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

            /// 32 bytes: low nibbles of the 16 bytes at `p`, then their high nibbles.
            #[target_feature(enable = $feat)]
            #[inline]
            fn nibbles32(p: *const u8) -> __m256i {
                // SAFETY: callers pass a pointer to 16 readable bytes.
                let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
                let m4 = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(v, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                _mm256_set_m128i(hi, lo)
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

            #[target_feature(enable = $feat)]
            #[inline]
            fn load_x(x: &Q8Row<'_>, blk: usize) -> __m256i {
                let xq = &x.qs[32 * blk..32 * blk + 32];
                // SAFETY: `xq` is exactly 32 readable bytes.
                unsafe { _mm256_loadu_si256(xq.as_ptr() as *const __m256i) }
            }

            /// Q4_0 / Q4_1 / Q5_0 / Q5_1: `MIN` selects the d·q+m forms, `Q5` the 5-bit forms.
            #[target_feature(enable = $feat)]
            fn dot_q4q5<const Q5: bool, const MIN: bool>(w: &[u8], x: &Q8Row<'_>) -> f32 {
                let bb = 18 + if Q5 { 4 } else { 0 } + if MIN { 2 } else { 0 };
                let qh_off = if MIN { 4 } else { 2 };
                let qs_off = qh_off + if Q5 { 4 } else { 0 };
                let nb = x.d.len();
                assert!(w.len() == nb * bb && x.qs.len() == nb * 32 && x.s.len() == nb);
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut corr = 0f32;
                let wp = w.as_ptr();
                let mut b = 0;
                while b < nb {
                    // SAFETY: block b lies inside `w` (length checked above).
                    let blk = unsafe { wp.add(b * bb) };
                    let dw = f16(blk);
                    // SAFETY: the quant bytes lie inside block b.
                    let mut q = nibbles32(unsafe { blk.add(qs_off) });
                    if Q5 {
                        // SAFETY: qh (4 bytes) lies inside block b.
                        let qh = unsafe { (blk.add(qh_off) as *const u32).read_unaligned() };
                        q = _mm256_or_si256(q, bit4_from_bits32(u32::from_le(qh)));
                    }
                    let p = _mm256_cvtepi32_ps(dot(q, load_x(x, b)));
                    let s = _mm256_set1_ps(dw * x.d[b]);
                    if b % 2 == 0 {
                        acc0 = _mm256_fmadd_ps(s, p, acc0);
                    } else {
                        acc1 = _mm256_fmadd_ps(s, p, acc1);
                    }
                    if MIN {
                        // SAFETY: the f16 min sits at offset 2 inside block b.
                        corr += f16(unsafe { blk.add(2) }) * x.s[b];
                    } else {
                        corr += dw * x.s[b];
                    }
                    b += 1;
                }
                let acc = hsum(_mm256_add_ps(acc0, acc1));
                if MIN {
                    acc + corr
                } else {
                    acc - if Q5 { 16.0 } else { 8.0 } * corr
                }
            }

            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q4_0(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features (see `dot_fn`).
                unsafe { dot_q4q5::<false, false>(w, x) }
            }
            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q4_1(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features (see `dot_fn`).
                unsafe { dot_q4q5::<false, true>(w, x) }
            }
            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q5_0(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features (see `dot_fn`).
                unsafe { dot_q4q5::<true, false>(w, x) }
            }
            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q5_1(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features (see `dot_fn`).
                unsafe { dot_q4q5::<true, true>(w, x) }
            }

            #[target_feature(enable = $feat)]
            fn dot_q8_0_impl(w: &[u8], x: &Q8Row<'_>) -> f32 {
                let nb = x.d.len();
                assert!(w.len() == nb * 34 && x.qs.len() == nb * 32);
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let wp = w.as_ptr();
                for b in 0..nb {
                    // SAFETY: block b (34 bytes) lies inside `w`.
                    let blk = unsafe { wp.add(b * 34) };
                    let dw = f16(blk);
                    // SAFETY: the 32 quant bytes follow the 2-byte scale inside block b.
                    let q = unsafe { _mm256_loadu_si256(blk.add(2) as *const __m256i) };
                    let xv = load_x(x, b);
                    let p = dot(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
                    let s = _mm256_set1_ps(dw * x.d[b]);
                    if b % 2 == 0 {
                        acc0 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc0);
                    } else {
                        acc1 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc1);
                    }
                }
                hsum(_mm256_add_ps(acc0, acc1))
            }

            /// Q4_K / Q5_K super-blocks.
            #[target_feature(enable = $feat)]
            fn dot_q45_k<const Q5: bool>(w: &[u8], x: &Q8Row<'_>) -> f32 {
                let bb = if Q5 { 176 } else { 144 };
                let qs_off = if Q5 { 48 } else { 16 };
                let nsb = x.d.len() / 8;
                assert!(w.len() == nsb * bb && x.qs.len() == nsb * 256 && x.s.len() == nsb * 8);
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut accm = _mm256_setzero_ps();
                for (i, blk) in w.chunks_exact(bb).enumerate() {
                    let bp = blk.as_ptr();
                    let d = f16(bp);
                    let dmin = f16(blk[2..].as_ptr());
                    let mut sc = [0u8; 8];
                    let mut mn = [0u8; 8];
                    for s in 0..8 {
                        (sc[s], mn[s]) = scale_min_k4(s, &blk[4..16]);
                    }
                    // SAFETY: `sc`, `mn` are 8 bytes; x.d / x.s hold 8 floats from 8i.
                    let (scf, mnf, xd, xs) = unsafe {
                        (
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                sc.as_ptr() as *const __m128i,
                            ))),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                mn.as_ptr() as *const __m128i,
                            ))),
                            _mm256_loadu_ps(x.d[8 * i..8 * i + 8].as_ptr()),
                            _mm256_loadu_ps(x.s[8 * i..8 * i + 8].as_ptr()),
                        )
                    };
                    accm = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(dmin), mnf), xs, accm);
                    let scale = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d), scf), xd);
                    let mut sv = [0f32; 8];
                    // SAFETY: `sv` is 8 floats.
                    unsafe { _mm256_storeu_ps(sv.as_mut_ptr(), scale) };
                    // SAFETY: qh is 32 bytes at offset 16 (Q5_K only).
                    let qh = if Q5 {
                        unsafe { _mm256_loadu_si256(bp.add(16) as *const __m256i) }
                    } else {
                        _mm256_setzero_si256()
                    };
                    for c in 0..4 {
                        // SAFETY: qs[32c..32c+32] lies inside the block.
                        let qv = unsafe { _mm256_loadu_si256(bp.add(qs_off + 32 * c) as *const __m256i) };
                        let mut lo = _mm256_and_si256(qv, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
                        if Q5 {
                            let b1 = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
                            let b2 = _mm256_set1_epi8((2u8 << (2 * c)) as i8);
                            let h1 = _mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1);
                            let h2 = _mm256_cmpeq_epi8(_mm256_and_si256(qh, b2), b2);
                            let x10 = _mm256_set1_epi8(0x10);
                            lo = _mm256_or_si256(lo, _mm256_and_si256(h1, x10));
                            hi = _mm256_or_si256(hi, _mm256_and_si256(h2, x10));
                        }
                        let p1 = dot(lo, load_x(x, 8 * i + 2 * c));
                        let p2 = dot(hi, load_x(x, 8 * i + 2 * c + 1));
                        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(sv[2 * c]), _mm256_cvtepi32_ps(p1), acc0);
                        acc1 = _mm256_fmadd_ps(
                            _mm256_set1_ps(sv[2 * c + 1]),
                            _mm256_cvtepi32_ps(p2),
                            acc1,
                        );
                    }
                }
                hsum(_mm256_add_ps(acc0, acc1)) - hsum(accm)
            }

            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q4_k(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features (see `dot_fn`).
                unsafe { dot_q45_k::<false>(w, x) }
            }
            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q5_k(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features (see `dot_fn`).
                unsafe { dot_q45_k::<true>(w, x) }
            }

            #[target_feature(enable = $feat)]
            fn dot_q6_k_impl(w: &[u8], x: &Q8Row<'_>) -> f32 {
                let nsb = x.d.len() / 8;
                assert!(w.len() == nsb * 210 && x.qs.len() == nsb * 256);
                let m4 = _mm256_set1_epi8(0x0F);
                let off = _mm256_set1_epi8(32);
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                for (i, blk) in w.chunks_exact(210).enumerate() {
                    let bp = blk.as_ptr();
                    let d = f16(blk[208..].as_ptr());
                    for h in 0..2 {
                        // SAFETY: ql[64h..64h+64] and qh[32h..32h+32] lie inside the block.
                        let (ql0, ql1, qh) = unsafe {
                            (
                                _mm256_loadu_si256(bp.add(64 * h) as *const __m256i),
                                _mm256_loadu_si256(bp.add(64 * h + 32) as *const __m256i),
                                _mm256_loadu_si256(bp.add(128 + 32 * h) as *const __m256i),
                            )
                        };
                        let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4);
                        let h1 = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2);
                        let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
                        let h3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30));
                        let q = [
                            _mm256_or_si256(_mm256_and_si256(ql0, m4), h0),
                            _mm256_or_si256(_mm256_and_si256(ql1, m4), h1),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), h2),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h3),
                        ];
                        for g in 0..4 {
                            let xb = 8 * i + 4 * h + g;
                            let qs = _mm256_sub_epi8(q[g], off);
                            let xv = load_x(x, xb);
                            let p = dot(_mm256_sign_epi8(qs, qs), _mm256_sign_epi8(xv, qs));
                            let dd = d * x.d[xb];
                            let s0 = dd * (blk[192 + 8 * h + 2 * g] as i8) as f32;
                            let s1 = dd * (blk[192 + 8 * h + 2 * g + 1] as i8) as f32;
                            let sv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
                            if g % 2 == 0 {
                                acc0 = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(p), acc0);
                            } else {
                                acc1 = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(p), acc1);
                            }
                        }
                    }
                }
                hsum(_mm256_add_ps(acc0, acc1))
            }

            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q8_0(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features.
                unsafe { dot_q8_0_impl(w, x) }
            }
            /// # Safety
            /// The CPU must support this module's target features.
            pub(crate) unsafe fn dot_q6_k(w: &[u8], x: &Q8Row<'_>) -> f32 {
                // SAFETY: the caller guarantees the target features.
                unsafe { dot_q6_k_impl(w, x) }
            }

            /// The kernel for `ty`. Callers must have checked the CPU has `$feat`.
            pub(crate) fn dot_fn(ty: GgmlType) -> DotFn {
                match ty {
                    GgmlType::Q4_0 => dot_q4_0,
                    GgmlType::Q4_1 => dot_q4_1,
                    GgmlType::Q5_0 => dot_q5_0,
                    GgmlType::Q5_1 => dot_q5_1,
                    GgmlType::Q8_0 => dot_q8_0,
                    GgmlType::Q4_K => dot_q4_k,
                    GgmlType::Q5_K => dot_q5_k,
                    GgmlType::Q6_K => dot_q6_k,
                    _ => unreachable!("no q8 dot kernel for {ty}"),
                }
            }
        }
    };
}

x86_kernels!(
    avx2,
    "avx2,fma,f16c",
    fn dot(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
);

x86_kernels!(
    avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    fn dot(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }
);
