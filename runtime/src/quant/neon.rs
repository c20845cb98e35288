//! aarch64 NEON row-dot kernels (baseline ASIMD only: `vmull_s8` + pairwise adds, so no
//! `dotprod` feature is required). Same numerics as the portable kernels in `kernels.rs`: weight
//! quants are decoded to signed bytes (offsets applied in the integer domain), 32-blocks
//! contribute `f16(d_w)·d_x·Σq·x` (+ `f16(m_w)·s_x`), K-quant super-blocks
//! `d_x·f16(d)·Σ_j sc_j·Σq·x − d_x·f16(dmin)·Σ_j m_j·bsum_j` with exact integer inner sums.

use super::GgmlType;
use super::blocks::{BlockFormat, Format};
use super::kernels::{DotFn, QRow, RowDots, Tiles, row_tiles};
use super::reference::{iq4_xs_scale, q3_k_scales, scale_min_k4};
use std::arch::aarch64::*;

/// Σ a·b over 16 signed byte pairs, as 4 i32 partial sums (|a|,|b| ≤ 128: no overflow).
#[inline(always)]
unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is baseline on aarch64; pure register operations.
    unsafe {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_s8(vget_high_s8(a), vget_high_s8(b));
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

#[inline(always)]
fn f16(b: &[u8], off: usize) -> f32 {
    super::reference::rd_f16(b, off)
}

#[inline(always)]
unsafe fn ld16(p: *const u8) -> uint8x16_t {
    // SAFETY: callers pass 16 readable bytes.
    unsafe { vld1q_u8(p) }
}

#[inline(always)]
unsafe fn ldx(x: &QRow<'_>, off: usize) -> int8x16_t {
    let s = &x.qs[off..off + 16];
    // SAFETY: `s` is 16 readable bytes.
    unsafe { vld1q_s8(s.as_ptr()) }
}

/// Expand bits `base..base+16` of `qh` to bytes of 0x10 / 0.
#[inline(always)]
unsafe fn bit4_16(qh: u32, base: u32) -> uint8x16_t {
    let mut t = [0u8; 16];
    for (j, v) in t.iter_mut().enumerate() {
        *v = (((qh >> (base + j as u32)) & 1) << 4) as u8;
    }
    // SAFETY: `t` is 16 readable bytes.
    unsafe { vld1q_u8(t.as_ptr()) }
}

unsafe fn dot_q4q5<F: Format>(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = F::F;
    let (q5, min, bb) = (f.qh.is_some(), f.m.is_some(), f.bytes);
    let off = f.zero as i8;
    let nb = x.d.len();
    assert!(w.len() == nb * bb && x.qs.len() == nb * 32);
    let mut acc = 0f32;
    // SAFETY: all loads are inside block b of `w` or activation block b (lengths checked).
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let offv = vdupq_n_s8(off);
        for (b, blk) in w.chunks_exact(bb).enumerate() {
            let q = ld16(blk.as_ptr().add(f.qs));
            let mut lo = vandq_u8(q, m4);
            let mut hi = vshrq_n_u8::<4>(q);
            if q5 {
                let o = f.qh_off();
                let qh = u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
                lo = vorrq_u8(lo, bit4_16(qh, 0));
                hi = vorrq_u8(hi, bit4_16(qh, 16));
            }
            let lo = vsubq_s8(vreinterpretq_s8_u8(lo), offv);
            let hi = vsubq_s8(vreinterpretq_s8_u8(hi), offv);
            let p = dot16(
                dot16(vdupq_n_s32(0), lo, ldx(x, 32 * b)),
                hi,
                ldx(x, 32 * b + 16),
            );
            let i = vaddvq_s32(p);
            acc += f16(blk, f.d) * x.d[b] * i as f32;
            if min {
                acc += f16(blk, f.m_off()) * x.s[b];
            }
        }
    }
    acc
}

unsafe fn dot_q8_0(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q8_0;
    let nb = x.d.len();
    assert!(w.len() == nb * f.bytes && x.qs.len() == nb * 32);
    let mut acc = 0f32;
    // SAFETY: loads are inside block b of `w` / activation block b.
    unsafe {
        for (b, blk) in w.chunks_exact(f.bytes).enumerate() {
            let q0 = vreinterpretq_s8_u8(ld16(blk.as_ptr().add(f.qs)));
            let q1 = vreinterpretq_s8_u8(ld16(blk.as_ptr().add(f.qs + 16)));
            let p = dot16(
                dot16(vdupq_n_s32(0), q0, ldx(x, 32 * b)),
                q1,
                ldx(x, 32 * b + 16),
            );
            acc += f16(blk, f.d) * x.d[b] * vaddvq_s32(p) as f32;
        }
    }
    acc
}

unsafe fn dot_q45_k<F: Format>(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = F::F;
    let (q5, bb, qs_off, sc_off) = (f.qh.is_some(), f.bytes, f.qs, f.scales_off());
    let nsb = x.d.len();
    assert!(w.len() == nsb * bb && x.qs.len() == nsb * 256 && x.bs16.len() == nsb * 16);
    let mut acc = 0f32;
    // SAFETY: loads are inside super-block i of `w` / its 256 activation quants.
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let x10 = vdupq_n_u8(0x10);
        for (i, blk) in w.chunks_exact(bb).enumerate() {
            let mut isum = 0i32;
            let mut msum = 0i32;
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, &blk[sc_off..sc_off + 12]);
                let (sc2, m2) = scale_min_k4(2 * c + 1, &blk[sc_off..sc_off + 12]);
                let mut p1 = vdupq_n_s32(0);
                let mut p2 = vdupq_n_s32(0);
                for half in 0..2 {
                    // Bytes 16·half.. of the 32 quant bytes of chunk c.
                    let q = ld16(blk.as_ptr().add(qs_off + 32 * c + 16 * half));
                    let mut lo = vandq_u8(q, m4);
                    let mut hi = vshrq_n_u8::<4>(q);
                    if q5 {
                        let qh = ld16(blk.as_ptr().add(f.qh_off() + 16 * half));
                        let b1 = vdupq_n_u8(1 << (2 * c));
                        let b2 = vdupq_n_u8(2 << (2 * c));
                        lo = vorrq_u8(lo, vandq_u8(vtstq_u8(qh, b1), x10));
                        hi = vorrq_u8(hi, vandq_u8(vtstq_u8(qh, b2), x10));
                    }
                    let e1 = 256 * i + 64 * c + 16 * half;
                    p1 = dot16(p1, vreinterpretq_s8_u8(lo), ldx(x, e1));
                    p2 = dot16(p2, vreinterpretq_s8_u8(hi), ldx(x, e1 + 32));
                }
                isum += sc1 as i32 * vaddvq_s32(p1) + sc2 as i32 * vaddvq_s32(p2);
                let bs = &x.bs16[16 * i + 4 * c..16 * i + 4 * c + 4];
                msum += m1 as i32 * (bs[0] as i32 + bs[1] as i32)
                    + m2 as i32 * (bs[2] as i32 + bs[3] as i32);
            }
            let d = x.d[i] * f16(blk, f.d);
            let dmin = x.d[i] * f16(blk, f.m_off());
            acc += d * isum as f32 - dmin * msum as f32;
        }
    }
    acc
}

unsafe fn dot_q6_k(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q6_K;
    let (ql_off, qh_off, sc_off) = (f.qs, f.qh_off(), f.scales_off());
    let nsb = x.d.len();
    assert!(w.len() == nsb * f.bytes && x.qs.len() == nsb * 256);
    let mut acc = 0f32;
    // SAFETY: loads are inside super-block i of `w` / its activation quants.
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let m3 = vdupq_n_u8(0x03);
        let off = vdupq_n_s8(f.zero as i8);
        for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
            let p = blk.as_ptr();
            let mut isum = 0i32;
            for h in 0..2 {
                // 16-element piece k (0/1) of each of the 4 groups: one scale each.
                for k in 0..2 {
                    let ql0 = ld16(p.add(ql_off + 64 * h + 16 * k));
                    let ql1 = ld16(p.add(ql_off + 64 * h + 32 + 16 * k));
                    let qh = ld16(p.add(qh_off + 32 * h + 16 * k));
                    let q = [
                        vorrq_u8(vandq_u8(ql0, m4), vshlq_n_u8::<4>(vandq_u8(qh, m3))),
                        vorrq_u8(
                            vandq_u8(ql1, m4),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qh), m3)),
                        ),
                        vorrq_u8(
                            vshrq_n_u8::<4>(ql0),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qh), m3)),
                        ),
                        vorrq_u8(vshrq_n_u8::<4>(ql1), vshlq_n_u8::<4>(vshrq_n_u8::<6>(qh))),
                    ];
                    for g in 0..4 {
                        let qs = vsubq_s8(vreinterpretq_s8_u8(q[g]), off);
                        let s = dot16(
                            vdupq_n_s32(0),
                            qs,
                            ldx(x, 256 * i + 128 * h + 32 * g + 16 * k),
                        );
                        let sc = blk[sc_off + 8 * h + 2 * g + k] as i8 as i32;
                        isum += sc * vaddvq_s32(s);
                    }
                }
            }
            acc += x.d[i] * f16(blk, f.d) * isum as f32;
        }
    }
    acc
}

/// Q2_K: 2-bit quants (bits 2j of the 32 bytes of half n are elements 128n + 32j..), each
/// 16 against its 4-bit scale; the mins against the bsums.
unsafe fn dot_q2_k(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q2_K;
    let nsb = x.d.len();
    assert!(w.len() == nsb * f.bytes && x.qs.len() == nsb * 256 && x.bs16.len() == nsb * 16);
    let mut acc = 0f32;
    // SAFETY: loads are inside super-block i of `w` / its 256 activation quants.
    unsafe {
        let m3 = vdupq_n_u8(3);
        for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
            let sc = &blk[f.scales_off()..f.scales_off() + 16];
            let (mut isum, mut msum) = (0i32, 0i32);
            for n in 0..2 {
                let q0 = ld16(blk.as_ptr().add(f.qs + 32 * n));
                let q1 = ld16(blk.as_ptr().add(f.qs + 32 * n + 16));
                for j in 0..4 {
                    let sh = vdupq_n_s8(-2 * j as i8);
                    let a0 = vandq_u8(vshlq_u8(q0, sh), m3);
                    let a1 = vandq_u8(vshlq_u8(q1, sh), m3);
                    let e = 256 * i + 128 * n + 32 * j;
                    let p0 = dot16(vdupq_n_s32(0), vreinterpretq_s8_u8(a0), ldx(x, e));
                    let p1 = dot16(vdupq_n_s32(0), vreinterpretq_s8_u8(a1), ldx(x, e + 16));
                    let s = 8 * n + 2 * j;
                    isum += (sc[s] & 0x0F) as i32 * vaddvq_s32(p0)
                        + (sc[s + 1] & 0x0F) as i32 * vaddvq_s32(p1);
                }
            }
            for j in 0..16 {
                msum += (sc[j] >> 4) as i32 * x.bs16[16 * i + j] as i32;
            }
            let d = x.d[i] * f16(blk, f.d);
            let dmin = x.d[i] * f16(blk, f.m_off());
            acc += d * isum as f32 - dmin * msum as f32;
        }
    }
    acc
}

/// Q3_K: the low 2 bits as Q2_K's, bit 2 from `hmask` (bit 4n + j), 4 subtracted to signed
/// bytes, each 16 against its signed 6-bit scale.
unsafe fn dot_q3_k(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::Q3_K;
    let nsb = x.d.len();
    assert!(w.len() == nsb * f.bytes && x.qs.len() == nsb * 256);
    let mut acc = 0f32;
    // SAFETY: loads are inside super-block i of `w` / its 256 activation quants.
    unsafe {
        let m3 = vdupq_n_u8(3);
        let four = vdupq_n_u8(4);
        let off = vdupq_n_s8(f.zero as i8);
        for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
            let sc = q3_k_scales(blk);
            let hm0 = ld16(blk.as_ptr().add(f.qh_off()));
            let hm1 = ld16(blk.as_ptr().add(f.qh_off() + 16));
            let mut isum = 0i32;
            for n in 0..2 {
                let q0 = ld16(blk.as_ptr().add(f.qs + 32 * n));
                let q1 = ld16(blk.as_ptr().add(f.qs + 32 * n + 16));
                for j in 0..4 {
                    let sh = vdupq_n_s8(-2 * j as i8);
                    let bit = vdupq_n_u8(1 << (4 * n + j));
                    let a0 = vorrq_u8(
                        vandq_u8(vshlq_u8(q0, sh), m3),
                        vandq_u8(vtstq_u8(hm0, bit), four),
                    );
                    let a1 = vorrq_u8(
                        vandq_u8(vshlq_u8(q1, sh), m3),
                        vandq_u8(vtstq_u8(hm1, bit), four),
                    );
                    let a0 = vsubq_s8(vreinterpretq_s8_u8(a0), off);
                    let a1 = vsubq_s8(vreinterpretq_s8_u8(a1), off);
                    let e = 256 * i + 128 * n + 32 * j;
                    let p0 = dot16(vdupq_n_s32(0), a0, ldx(x, e));
                    let p1 = dot16(vdupq_n_s32(0), a1, ldx(x, e + 16));
                    let s = 8 * n + 2 * j;
                    isum += sc[s] as i32 * vaddvq_s32(p0) + sc[s + 1] as i32 * vaddvq_s32(p1);
                }
            }
            acc += x.d[i] * f16(blk, f.d) * isum as f32;
        }
    }
    acc
}

/// The table levels of the 32 codes in the 16 bytes at `p` (low nibbles are elements 0..16).
#[inline(always)]
unsafe fn iq4_levels(tab: int8x16_t, p: *const u8) -> (int8x16_t, int8x16_t) {
    // SAFETY: the caller passes 16 readable bytes.
    unsafe {
        let q = ld16(p);
        let lo = vandq_u8(q, vdupq_n_u8(0x0F));
        let hi = vshrq_n_u8::<4>(q);
        (vqtbl1q_s8(tab, lo), vqtbl1q_s8(tab, hi))
    }
}

unsafe fn dot_iq4_nl(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::IQ4_NL;
    let nb = x.d.len();
    assert!(w.len() == nb * f.bytes && x.qs.len() == nb * 32);
    let mut acc = 0f32;
    // SAFETY: loads are inside block b of `w` / activation block b; the table is 16 bytes.
    unsafe {
        let tab = vld1q_s8(f.table.expect("a table format").as_ptr());
        for (b, blk) in w.chunks_exact(f.bytes).enumerate() {
            let (lo, hi) = iq4_levels(tab, blk.as_ptr().add(f.qs));
            let p = dot16(
                dot16(vdupq_n_s32(0), lo, ldx(x, 32 * b)),
                hi,
                ldx(x, 32 * b + 16),
            );
            acc += f16(blk, f.d) * x.d[b] * vaddvq_s32(p) as f32;
        }
    }
    acc
}

unsafe fn dot_iq4_xs(w: &[u8], x: &QRow<'_>) -> f32 {
    let f = BlockFormat::IQ4_XS;
    let nsb = x.d.len();
    assert!(w.len() == nsb * f.bytes && x.qs.len() == nsb * 256);
    let mut acc = 0f32;
    // SAFETY: loads are inside super-block i of `w` / its activation quants; the table is 16
    // bytes.
    unsafe {
        let tab = vld1q_s8(f.table.expect("a table format").as_ptr());
        for (i, blk) in w.chunks_exact(f.bytes).enumerate() {
            let mut isum = 0i32;
            for s in 0..8 {
                let (lo, hi) = iq4_levels(tab, blk.as_ptr().add(f.qs + 16 * s));
                let e = 256 * i + 32 * s;
                let p = dot16(dot16(vdupq_n_s32(0), lo, ldx(x, e)), hi, ldx(x, e + 16));
                isum += iq4_xs_scale(blk, s) * vaddvq_s32(p);
            }
            acc += x.d[i] * f16(blk, f.d) * isum as f32;
        }
    }
    acc
}

/// The NEON row dots (NEON is baseline on aarch64).
enum Neon {}

impl RowDots for Neon {
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
            ty => unreachable!("no q8 dot kernel for {ty}"),
        }
    }
}

/// The NEON kernels for `ty` (row by row: R = 1).
pub(crate) fn tiles(ty: GgmlType) -> Tiles {
    row_tiles::<Neon>(ty)
}
