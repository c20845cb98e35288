//! Activation quantization (f32 rows -> 8-bit blocks of 32) and the portable row-dot kernels.
//!
//! Every kernel computes `Σ_k w[k]·x[k]` for one weight row (its raw block bytes) against one
//! quantized activation row. The activation row holds, per block `b` of 32 elements:
//! `qs[32b..32b+32]` (i8 in −127..=127), `d[b]` (f32 scale) and `s[b] = d[b]·Σ qs` (so formats
//! with an offset or a min can correct with one multiply per block).

use super::GgmlType;
use super::reference::{rd_f16, scale_min_k4};

/// One quantized activation row (borrowed from a [`Q8Buf`]).
#[derive(Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// `m` activation rows quantized to 8-bit blocks of 32.
#[derive(Default)]
pub(crate) struct Q8Buf {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub cols: usize,
}

impl Q8Buf {
    /// Quantize `m = x.len() / cols` rows. `cols` must be a multiple of 32.
    pub fn quantize(x: &[f32], cols: usize) -> Q8Buf {
        assert!(cols % 32 == 0 && x.len() % cols == 0);
        let nb = x.len() / 32;
        let mut buf = Q8Buf { qs: vec![0; x.len()], d: vec![0.0; nb], s: vec![0.0; nb], cols };
        for (((xb, qb), d), s) in x
            .chunks_exact(32)
            .zip(buf.qs.chunks_exact_mut(32))
            .zip(buf.d.iter_mut())
            .zip(buf.s.iter_mut())
        {
            (*d, *s) = quantize_block_q8(xb.try_into().unwrap(), qb.try_into().unwrap());
        }
        buf
    }

    pub fn row(&self, i: usize) -> Q8Row<'_> {
        let nb = self.cols / 32;
        Q8Row {
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
            d: &self.d[i * nb..(i + 1) * nb],
            s: &self.s[i * nb..(i + 1) * nb],
        }
    }
}

/// Quantize 32 values to i8 with a shared scale; returns `(d, d·Σq)`.
#[inline]
fn quantize_block_q8(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32) {
    let mut amax = 0f32;
    for &v in x {
        amax = amax.max(v.abs());
    }
    let d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for j in 0..32 {
        // Round to nearest (ties to even) with the 1.5·2^23 trick: branch-free and vectorizable
        // on baseline x86-64 (|x·id| ≤ 127 here, far inside the trick's ±2^22 range).
        let t = x[j] * id + 12_582_912.0f32;
        let v = t.to_bits() as i32 - 0x4B40_0000;
        q[j] = v as i8;
        sum += v;
    }
    (d, d * sum as f32)
}

/// Signature of every row-dot kernel.
pub(crate) type DotFn = unsafe fn(&[u8], &Q8Row<'_>) -> f32;

/// The portable kernel for `ty` (quantized types only).
pub(crate) fn portable_dot(ty: GgmlType) -> DotFn {
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

#[inline]
fn idot_nibbles(qs: &[u8], x: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (qs[j] & 0x0F) as i32 * x[j] as i32;
        s += (qs[j] >> 4) as i32 * x[j + 16] as i32;
    }
    s
}

#[inline]
fn idot_nibbles5(qs: &[u8], qh: u32, x: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
        let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        s += lo as i32 * x[j] as i32;
        s += hi as i32 * x[j + 16] as i32;
    }
    s
}

fn dot_q4_0(w: &[u8], x: &Q8Row<'_>) -> f32 {
    let (mut acc, mut corr) = (0f32, 0f32);
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let dw = rd_f16(blk, 0);
        let i = idot_nibbles(&blk[2..18], &x.qs[32 * b..32 * b + 32]);
        acc += dw * x.d[b] * i as f32;
        corr += dw * x.s[b];
    }
    acc - 8.0 * corr
}

fn dot_q4_1(w: &[u8], x: &Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        let (dw, mw) = (rd_f16(blk, 0), rd_f16(blk, 2));
        let i = idot_nibbles(&blk[4..20], &x.qs[32 * b..32 * b + 32]);
        acc += dw * x.d[b] * i as f32 + mw * x.s[b];
    }
    acc
}

fn dot_q5_0(w: &[u8], x: &Q8Row<'_>) -> f32 {
    let (mut acc, mut corr) = (0f32, 0f32);
    for (b, blk) in w.chunks_exact(22).enumerate() {
        let dw = rd_f16(blk, 0);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let i = idot_nibbles5(&blk[6..22], qh, &x.qs[32 * b..32 * b + 32]);
        acc += dw * x.d[b] * i as f32;
        corr += dw * x.s[b];
    }
    acc - 16.0 * corr
}

fn dot_q5_1(w: &[u8], x: &Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(24).enumerate() {
        let (dw, mw) = (rd_f16(blk, 0), rd_f16(blk, 2));
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let i = idot_nibbles5(&blk[8..24], qh, &x.qs[32 * b..32 * b + 32]);
        acc += dw * x.d[b] * i as f32 + mw * x.s[b];
    }
    acc
}

fn dot_q8_0(w: &[u8], x: &Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let dw = rd_f16(blk, 0);
        let xq = &x.qs[32 * b..32 * b + 32];
        let mut i = 0i32;
        for j in 0..32 {
            i += (blk[2 + j] as i8) as i32 * xq[j] as i32;
        }
        acc += dw * x.d[b] * i as f32;
    }
    acc
}

fn dot_q45_k<const Q5: bool>(w: &[u8], x: &Q8Row<'_>) -> f32 {
    let bb = if Q5 { 176 } else { 144 };
    let qs_off = if Q5 { 48 } else { 16 };
    let mut acc = 0f32;
    for (i, blk) in w.chunks_exact(bb).enumerate() {
        let d = rd_f16(blk, 0);
        let dmin = rd_f16(blk, 2);
        let scales = &blk[4..16];
        let qh = &blk[16..48];
        let qs = &blk[qs_off..qs_off + 128];
        for s in 0..8 {
            let (sc, mn) = scale_min_k4(s, scales);
            let c = s / 2;
            let shift = if s % 2 == 0 { 0 } else { 4 };
            let xb = 8 * i + s;
            let xq = &x.qs[32 * xb..32 * xb + 32];
            let mut isum = 0i32;
            for l in 0..32 {
                let mut q = (qs[32 * c + l] >> shift) & 0x0F;
                if Q5 {
                    q |= ((qh[l] >> s) & 1) << 4;
                }
                isum += q as i32 * xq[l] as i32;
            }
            acc += d * sc as f32 * x.d[xb] * isum as f32 - dmin * mn as f32 * x.s[xb];
        }
    }
    acc
}

fn dot_q4_k(w: &[u8], x: &Q8Row<'_>) -> f32 {
    dot_q45_k::<false>(w, x)
}

fn dot_q5_k(w: &[u8], x: &Q8Row<'_>) -> f32 {
    dot_q45_k::<true>(w, x)
}

fn dot_q6_k(w: &[u8], x: &Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (i, blk) in w.chunks_exact(210).enumerate() {
        let d = rd_f16(blk, 208);
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[128 + 32 * h..160 + 32 * h];
            for g in 0..4 {
                // Elements 128h + 32g + l, l in 0..32: one activation block.
                let xb = 8 * i + 4 * h + g;
                let xq = &x.qs[32 * xb..32 * xb + 32];
                let mut isum = [0i32; 2];
                for l in 0..32 {
                    let lo = if g % 2 == 0 { ql[l] } else { ql[l + 32] };
                    let lo = if g < 2 { lo & 0x0F } else { lo >> 4 };
                    let hi = (qh[l] >> (2 * g)) & 3;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    isum[l / 16] += q * xq[l] as i32;
                }
                let sc0 = blk[192 + 8 * h + 2 * g] as i8 as f32;
                let sc1 = blk[192 + 8 * h + 2 * g + 1] as i8 as f32;
                acc += d * x.d[xb] * (sc0 * isum[0] as f32 + sc1 * isum[1] as f32);
            }
        }
    }
    acc
}
