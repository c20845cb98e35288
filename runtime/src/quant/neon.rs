//! aarch64 NEON row-dot kernels (baseline ASIMD only: `vmull_s8` + pairwise adds, so no
//! `dotprod` feature is required). Same numerics as the portable kernels in `kernels.rs`: weight
//! quants are decoded to signed bytes (offsets applied in the integer domain), 32-blocks
//! contribute `f16(d_w)·d_x·Σq·x` (+ `f16(m_w)·s_x`), K-quant super-blocks
//! `d_x·f16(d)·Σ_j sc_j·Σq·x − d_x·f16(dmin)·Σ_j m_j·bsum_j` with exact integer inner sums.

use super::GgmlType;
use super::kernels::{MAX_C, QRow, Tiles, tile_by_rows};
use super::reference::scale_min_k4;
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

unsafe fn dot_q4q5<const Q5: bool, const MIN: bool>(w: &[u8], x: &QRow<'_>) -> f32 {
    let bb = 18 + if Q5 { 4 } else { 0 } + if MIN { 2 } else { 0 };
    let qh_off = if MIN { 4 } else { 2 };
    let qs_off = qh_off + if Q5 { 4 } else { 0 };
    let off: i8 = if MIN {
        0
    } else if Q5 {
        16
    } else {
        8
    };
    let nb = x.d.len();
    assert!(w.len() == nb * bb && x.qs.len() == nb * 32);
    let mut acc = 0f32;
    // SAFETY: all loads are inside block b of `w` or activation block b (lengths checked).
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let offv = vdupq_n_s8(off);
        for (b, blk) in w.chunks_exact(bb).enumerate() {
            let q = ld16(blk.as_ptr().add(qs_off));
            let mut lo = vandq_u8(q, m4);
            let mut hi = vshrq_n_u8::<4>(q);
            if Q5 {
                let qh = u32::from_le_bytes([
                    blk[qh_off],
                    blk[qh_off + 1],
                    blk[qh_off + 2],
                    blk[qh_off + 3],
                ]);
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
            acc += f16(blk, 0) * x.d[b] * i as f32;
            if MIN {
                acc += f16(blk, 2) * x.s[b];
            }
        }
    }
    acc
}

unsafe fn dot_q4_0(w: &[u8], x: &QRow<'_>) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q4q5::<false, false>(w, x) }
}
unsafe fn dot_q4_1(w: &[u8], x: &QRow<'_>) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q4q5::<false, true>(w, x) }
}
unsafe fn dot_q5_0(w: &[u8], x: &QRow<'_>) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q4q5::<true, false>(w, x) }
}
unsafe fn dot_q5_1(w: &[u8], x: &QRow<'_>) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q4q5::<true, true>(w, x) }
}

unsafe fn dot_q8_0(w: &[u8], x: &QRow<'_>) -> f32 {
    let nb = x.d.len();
    assert!(w.len() == nb * 34 && x.qs.len() == nb * 32);
    let mut acc = 0f32;
    // SAFETY: loads are inside block b of `w` / activation block b.
    unsafe {
        for (b, blk) in w.chunks_exact(34).enumerate() {
            let q0 = vreinterpretq_s8_u8(ld16(blk.as_ptr().add(2)));
            let q1 = vreinterpretq_s8_u8(ld16(blk.as_ptr().add(18)));
            let p = dot16(
                dot16(vdupq_n_s32(0), q0, ldx(x, 32 * b)),
                q1,
                ldx(x, 32 * b + 16),
            );
            acc += f16(blk, 0) * x.d[b] * vaddvq_s32(p) as f32;
        }
    }
    acc
}

unsafe fn dot_q45_k<const Q5: bool>(w: &[u8], x: &QRow<'_>) -> f32 {
    let bb = if Q5 { 176 } else { 144 };
    let qs_off = if Q5 { 48 } else { 16 };
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
                let (sc1, m1) = scale_min_k4(2 * c, &blk[4..16]);
                let (sc2, m2) = scale_min_k4(2 * c + 1, &blk[4..16]);
                let mut p1 = vdupq_n_s32(0);
                let mut p2 = vdupq_n_s32(0);
                for half in 0..2 {
                    // Bytes 16·half.. of the 32 quant bytes of chunk c.
                    let q = ld16(blk.as_ptr().add(qs_off + 32 * c + 16 * half));
                    let mut lo = vandq_u8(q, m4);
                    let mut hi = vshrq_n_u8::<4>(q);
                    if Q5 {
                        let qh = ld16(blk.as_ptr().add(16 + 16 * half));
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
            let d = x.d[i] * f16(blk, 0);
            let dmin = x.d[i] * f16(blk, 2);
            acc += d * isum as f32 - dmin * msum as f32;
        }
    }
    acc
}

unsafe fn dot_q4_k(w: &[u8], x: &QRow<'_>) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q45_k::<false>(w, x) }
}
unsafe fn dot_q5_k(w: &[u8], x: &QRow<'_>) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q45_k::<true>(w, x) }
}

unsafe fn dot_q6_k(w: &[u8], x: &QRow<'_>) -> f32 {
    let nsb = x.d.len();
    assert!(w.len() == nsb * 210 && x.qs.len() == nsb * 256);
    let mut acc = 0f32;
    // SAFETY: loads are inside super-block i of `w` / its activation quants.
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        let m3 = vdupq_n_u8(0x03);
        let off = vdupq_n_s8(32);
        for (i, blk) in w.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            let mut isum = 0i32;
            for h in 0..2 {
                // 16-element piece k (0/1) of each of the 4 groups: one scale each.
                for k in 0..2 {
                    let ql0 = ld16(p.add(64 * h + 16 * k));
                    let ql1 = ld16(p.add(64 * h + 32 + 16 * k));
                    let qh = ld16(p.add(128 + 32 * h + 16 * k));
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
                        let sc = blk[192 + 8 * h + 2 * g + k] as i8 as i32;
                        isum += sc * vaddvq_s32(s);
                    }
                }
            }
            acc += x.d[i] * f16(blk, 208) * isum as f32;
        }
    }
    acc
}

macro_rules! neon_tile {
    ($name:ident, $dot:ident) => {
        unsafe fn $name(w: &[u8], rb: usize, xr: &[QRow<'_>], out: &mut [f32]) {
            // SAFETY: NEON is baseline on aarch64.
            unsafe { tile_by_rows($dot, w, rb, xr, out) }
        }
    };
}
neon_tile!(tile_q4_0, dot_q4_0);
neon_tile!(tile_q4_1, dot_q4_1);
neon_tile!(tile_q5_0, dot_q5_0);
neon_tile!(tile_q5_1, dot_q5_1);
neon_tile!(tile_q8_0, dot_q8_0);
neon_tile!(tile_q4_k, dot_q4_k);
neon_tile!(tile_q5_k, dot_q5_k);
neon_tile!(tile_q6_k, dot_q6_k);

/// The NEON kernels for `ty` (row by row: R = 1).
pub(crate) fn tiles(ty: GgmlType) -> Tiles {
    let f: super::kernels::TileFn = match ty {
        GgmlType::Q4_0 => tile_q4_0,
        GgmlType::Q4_1 => tile_q4_1,
        GgmlType::Q5_0 => tile_q5_0,
        GgmlType::Q5_1 => tile_q5_1,
        GgmlType::Q8_0 => tile_q8_0,
        GgmlType::Q4_K => tile_q4_k,
        GgmlType::Q5_K => tile_q5_k,
        GgmlType::Q6_K => tile_q6_k,
        _ => unreachable!("no q8 dot kernel for {ty}"),
    };
    Tiles {
        rmax: 1,
        cmax: 4,
        big: [f; MAX_C],
        one: [f; MAX_C],
    }
}
