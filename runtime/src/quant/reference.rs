//! Scalar reference dequantizers and quantizers for the ggml block layouts.
//!
//! The block layouts are described in `blocks.rs` ([`BlockFormat`]); every offset here is read
//! from there.

use super::blocks::{BlockFormat, KVALUES_IQ4NL};
use super::{GgmlType, QuantError};
use half::{bf16, f16};

#[inline]
pub(crate) fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

#[inline]
fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn wr_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The 6-bit (scale, min) pair of sub-block `j` (0..8) of a Q4_K/Q5_K `scales[12]` array.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`scale_min_k4`]: pack 8 six-bit scales and mins into 12 bytes.
pub(crate) fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    q
}

fn check(ty: GgmlType, n: usize, src_len: usize) -> Result<(), QuantError> {
    if !ty.is_supported() {
        return Err(QuantError::Unsupported(ty));
    }
    let expected = ty.row_bytes(n).ok_or(QuantError::NotBlockMultiple {
        ty,
        n,
        block_len: ty.block_len(),
    })?;
    if src_len != expected {
        return Err(QuantError::BadSrcLen {
            ty,
            n,
            expected,
            got: src_len,
        });
    }
    Ok(())
}

/// Reference (scalar) dequantizer: `src` holds exactly the blocks for `dst.len()` elements.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check(ty, dst.len(), src.len())?;
    let bb = ty.block_bytes();
    let bl = ty.block_len();
    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bl)) {
        dequantize_block(ty, b, y);
    }
    Ok(())
}

/// Dequantize one block (`b.len() == block_bytes`, `y.len() == block_len`).
#[inline(always)]
pub(crate) fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = rd_f16(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let f = BlockFormat::Q4_0;
            let d = rd_f16(b, f.d);
            for j in 0..16 {
                let q = b[f.qs + j];
                y[j] = d * ((q & 0x0F) as i32 - f.zero) as f32;
                y[j + 16] = d * ((q >> 4) as i32 - f.zero) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let f = BlockFormat::Q4_1;
            let d = rd_f16(b, f.d);
            let m = rd_f16(b, f.m_off());
            for j in 0..16 {
                let q = b[f.qs + j];
                y[j] = d * (q & 0x0F) as f32 + m;
                y[j + 16] = d * (q >> 4) as f32 + m;
            }
        }
        GgmlType::Q5_0 => {
            let f = BlockFormat::Q5_0;
            let d = rd_f16(b, f.d);
            let qh = rd_u32(b, f.qh_off());
            for j in 0..16 {
                let q = b[f.qs + j];
                let lo = (q & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                y[j] = d * (lo as i32 - f.zero) as f32;
                y[j + 16] = d * (hi as i32 - f.zero) as f32;
            }
        }
        GgmlType::Q5_1 => {
            let f = BlockFormat::Q5_1;
            let d = rd_f16(b, f.d);
            let m = rd_f16(b, f.m_off());
            let qh = rd_u32(b, f.qh_off());
            for j in 0..16 {
                let q = b[f.qs + j];
                let lo = (q & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                y[j] = d * lo as f32 + m;
                y[j + 16] = d * hi as f32 + m;
            }
        }
        GgmlType::Q8_0 => {
            let f = BlockFormat::Q8_0;
            let d = rd_f16(b, f.d);
            for j in 0..32 {
                y[j] = d * (b[f.qs + j] as i8) as f32;
            }
        }
        GgmlType::Q4_K => {
            let f = BlockFormat::Q4_K;
            let d = rd_f16(b, f.d);
            let dmin = rd_f16(b, f.m_off());
            let scales = &b[f.scales_off()..f.scales_off() + 12];
            let qs = &b[f.qs..f.qs + 128];
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                for l in 0..32 {
                    let q = qs[32 * c + l];
                    y[64 * c + l] = d * sc1 as f32 * (q & 0x0F) as f32 - dmin * m1 as f32;
                    y[64 * c + 32 + l] = d * sc2 as f32 * (q >> 4) as f32 - dmin * m2 as f32;
                }
            }
        }
        GgmlType::Q5_K => {
            let f = BlockFormat::Q5_K;
            let d = rd_f16(b, f.d);
            let dmin = rd_f16(b, f.m_off());
            let scales = &b[f.scales_off()..f.scales_off() + 12];
            let qh = &b[f.qh_off()..f.qh_off() + 32];
            let qs = &b[f.qs..f.qs + 128];
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                for l in 0..32 {
                    let q = qs[32 * c + l];
                    let h1 = (qh[l] >> (2 * c)) & 1;
                    let h2 = (qh[l] >> (2 * c + 1)) & 1;
                    let q1 = (q & 0x0F) | (h1 << 4);
                    let q2 = (q >> 4) | (h2 << 4);
                    y[64 * c + l] = d * sc1 as f32 * q1 as f32 - dmin * m1 as f32;
                    y[64 * c + 32 + l] = d * sc2 as f32 * q2 as f32 - dmin * m2 as f32;
                }
            }
        }
        GgmlType::Q6_K => deq_q6_k(b, y),
        GgmlType::Q2_K => {
            let f = BlockFormat::Q2_K;
            let d = rd_f16(b, f.d);
            let dmin = rd_f16(b, f.m_off());
            let sc = &b[f.scales_off()..f.scales_off() + 16];
            for s in 0..16 {
                let dl = d * (sc[s] & 0x0F) as f32;
                let ml = dmin * (sc[s] >> 4) as f32;
                for l in 0..16 {
                    y[16 * s + l] = dl * q2_k_quant(b, 16 * s + l) as f32 - ml;
                }
            }
        }
        GgmlType::Q3_K => {
            let d = rd_f16(b, BlockFormat::Q3_K.d);
            let sc = q3_k_scales(b);
            for s in 0..16 {
                let dl = d * sc[s] as f32;
                for l in 0..16 {
                    y[16 * s + l] = dl * q3_k_quant(b, 16 * s + l) as f32;
                }
            }
        }
        GgmlType::IQ4_NL => {
            let f = BlockFormat::IQ4_NL;
            let d = rd_f16(b, f.d);
            for j in 0..16 {
                let q = b[f.qs + j];
                y[j] = d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
                y[j + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
            }
        }
        GgmlType::IQ4_XS => {
            let f = BlockFormat::IQ4_XS;
            let d = rd_f16(b, f.d);
            for s in 0..8 {
                let dl = d * iq4_xs_scale(b, s) as f32;
                for j in 0..16 {
                    let q = b[f.qs + 16 * s + j];
                    y[32 * s + j] = dl * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
                    y[32 * s + 16 + j] = dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
                }
            }
        }
        _ => unreachable!("dequantize_block: unsupported {ty}"),
    }
}

/// The 2-bit quant (0..3) of element `e` (0..256) of a Q2_K block (also Q3_K's low 2 bits,
/// read from `qs` of format `f`): element 128n + 32j + l is bits 2j.. of qs[32n + l].
#[inline(always)]
fn low2_k(b: &[u8], qs: usize, e: usize) -> u8 {
    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
    (b[qs + 32 * n + l] >> (2 * j)) & 3
}

/// The 2-bit quant (0..3) of element `e` (0..256) of a Q2_K block.
#[inline(always)]
pub(crate) fn q2_k_quant(b: &[u8], e: usize) -> i32 {
    low2_k(b, BlockFormat::Q2_K.qs, e) as i32
}

/// The signed 3-bit quant (−4..3) of element `e` (0..256) of a Q3_K block: the low 2 bits, and
/// 4 subtracted where its `hmask` bit (bit 4n + j of hmask[l]) is clear.
#[inline(always)]
pub(crate) fn q3_k_quant(b: &[u8], e: usize) -> i32 {
    let f = BlockFormat::Q3_K;
    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
    let hi = (b[f.qh_off() + l] >> (4 * n + j)) & 1;
    (low2_k(b, f.qs, e) | (hi << 2)) as i32 - f.zero
}

/// The 16 sub-block scales of a Q3_K block, minus 32 (−32..31). Scale s has its low 4 bits in
/// the low nibble of scales[s] (s < 8) or the high nibble of scales[s − 8] (s ≥ 8), and its
/// high 2 bits at bits 2·(s / 4).. of scales[8 + s % 4].
#[inline(always)]
pub(crate) fn q3_k_scales(b: &[u8]) -> [i8; 16] {
    let o = BlockFormat::Q3_K.scales_off();
    let q = &b[o..o + 12];
    std::array::from_fn(|s| {
        let lo = if s < 8 { q[s] & 0x0F } else { q[s - 8] >> 4 };
        let hi = (q[8 + s % 4] >> (2 * (s / 4))) & 3;
        (lo | (hi << 4)) as i8 - 32
    })
}

/// The scale of sub-block `s` (0..8) of an IQ4_XS block, minus 32 (−32..31).
#[inline(always)]
pub(crate) fn iq4_xs_scale(b: &[u8], s: usize) -> i32 {
    let o = BlockFormat::IQ4_XS.scales_off();
    let h = u16::from_le_bytes([b[o], b[o + 1]]);
    let lo = (b[o + 2 + s / 2] >> (4 * (s % 2))) & 0x0F;
    let hi = ((h >> (2 * s)) & 3) as u8;
    (lo | (hi << 4)) as i32 - 32
}

/// Q6_K: each 128-element half h uses ql[64h..64h+64], qh[32h..32h+32], scales[8h..8h+8].
/// For l in 0..32 (within the half):
///   el l      = ql[l]    & 0xF | ((qh[l] >> 0) & 3) << 4, scale sc[l/16]
///   el l + 32 = ql[l+32] & 0xF | ((qh[l] >> 2) & 3) << 4, scale sc[l/16 + 2]
///   el l + 64 = ql[l]    >> 4  | ((qh[l] >> 4) & 3) << 4, scale sc[l/16 + 4]
///   el l + 96 = ql[l+32] >> 4  | ((qh[l] >> 6) & 3) << 4, scale sc[l/16 + 6]
/// and x = d · sc · (q − 32).
#[inline(always)]
fn deq_q6_k(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, BlockFormat::Q6_K.d);
    for h in 0..2 {
        let (ql, qh, sc) = q6_k_half(b, h);
        let yh = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let [q1, q2, q3, q4] = q6_k_quad(ql, qh, l).map(|q| q as i32 - 32);
            yh[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yh[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yh[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yh[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Half h (0/1) of the Q6_K block `b`: its `ql` (64 bytes), `qh` (32) and scales (8).
#[inline(always)]
pub(crate) fn q6_k_half(b: &[u8], h: usize) -> (&[u8], &[u8], &[u8]) {
    let f = BlockFormat::Q6_K;
    (
        &b[f.qs + 64 * h..f.qs + 64 * h + 64],
        &b[f.qh_off() + 32 * h..f.qh_off() + 32 * h + 32],
        &b[f.scales_off() + 8 * h..f.scales_off() + 8 * h + 8],
    )
}

/// The unsigned 6-bit quants of elements l, l + 32, l + 64, l + 96 (l < 32) of a Q6_K half
/// ([`q6_k_half`]).
#[inline(always)]
pub(crate) fn q6_k_quad(ql: &[u8], qh: &[u8], l: usize) -> [u8; 4] {
    [
        (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
        (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
    ]
}

/// Reference quantizer (round-to-nearest per block; no importance weighting). Q2_K, Q3_K,
/// IQ4_NL and IQ4_XS have no rounding quantizer here (ggml's are searches over scales): they
/// are encoded by [`super::ggml_quantize`], as llama-quantize encodes them.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    if matches!(
        ty,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::IQ4_NL | GgmlType::IQ4_XS
    ) {
        return super::ggml_quantize::quantize(ty, src);
    }
    if !ty.is_supported() {
        return Err(QuantError::Unsupported(ty));
    }
    let bl = ty.block_len();
    if !src.len().is_multiple_of(bl) {
        return Err(QuantError::NotBlockMultiple {
            ty,
            n: src.len(),
            block_len: bl,
        });
    }
    let bb = ty.block_bytes();
    let mut out = vec![0u8; src.len() / bl * bb];
    for (x, b) in src.chunks_exact(bl).zip(out.chunks_exact_mut(bb)) {
        quantize_block(ty, x, b);
    }
    Ok(out)
}

fn inv(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Element with the largest magnitude (keeping its sign).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut m = 0.0f32;
    for &v in x {
        if v.abs() > m.abs() {
            m = v;
        }
    }
    m
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (lo, hi)
}

fn quantize_block(ty: GgmlType, x: &[f32], b: &mut [u8]) {
    match ty {
        GgmlType::F32 => b.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => b.copy_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
        GgmlType::BF16 => b.copy_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let (nlev, off) = if ty == GgmlType::Q4_0 {
                (15, 8.0)
            } else {
                (31, 16.0)
            };
            // Map the signed extreme to -off exactly (uses the full negative range, as ggml).
            let mx = signed_absmax(x);
            let d = f16::from_f32(mx / -off).to_f32();
            let id = inv(d);
            let mut q = [0u8; 32];
            for j in 0..32 {
                q[j] = ((x[j] * id + off).round() as i32).clamp(0, nlev) as u8;
            }
            let f = BlockFormat::expect(ty);
            wr_f16(b, f.d, d);
            pack_q4q5(f, &q, b);
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let nlev = if ty == GgmlType::Q4_1 { 15 } else { 31 };
            let (lo, hi) = min_max(x);
            let d = f16::from_f32((hi - lo) / nlev as f32).to_f32();
            let m = f16::from_f32(lo).to_f32();
            let id = inv(d);
            let mut q = [0u8; 32];
            for j in 0..32 {
                q[j] = (((x[j] - m) * id).round() as i32).clamp(0, nlev) as u8;
            }
            let f = BlockFormat::expect(ty);
            wr_f16(b, f.d, d);
            wr_f16(b, f.m_off(), m);
            pack_q4q5(f, &q, b);
        }
        GgmlType::Q8_0 => {
            let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = f16::from_f32(amax / 127.0).to_f32();
            let id = inv(d);
            let f = BlockFormat::Q8_0;
            wr_f16(b, f.d, d);
            for j in 0..32 {
                b[f.qs + j] = ((x[j] * id).round() as i32).clamp(-128, 127) as i8 as u8;
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => quantize_q45_k(ty, x, b),
        GgmlType::Q6_K => quantize_q6_k(x, b),
        _ => unreachable!("quantize_block: unsupported {ty}"),
    }
}

/// Store the 32 unsigned quants `q` of a Q4_0/Q4_1/Q5_0/Q5_1 block: low nibbles in `qs`
/// (element j and j + 16 share byte j), bit 4 of element j in bit j of `qh` (Q5 only).
fn pack_q4q5(f: &BlockFormat, q: &[u8; 32], b: &mut [u8]) {
    if let Some(o) = f.qh {
        let mut qh = 0u32;
        for (j, &v) in q.iter().enumerate() {
            qh |= ((v as u32 >> 4) & 1) << j;
        }
        b[o..o + 4].copy_from_slice(&qh.to_le_bytes());
    }
    for j in 0..16 {
        b[f.qs + j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
    }
}

fn quantize_q45_k(ty: GgmlType, x: &[f32], b: &mut [u8]) {
    let nlev: i32 = if ty == GgmlType::Q4_K { 15 } else { 31 };
    // Per sub-block: x ≈ scale·q − minv with minv ≥ 0.
    let mut scale = [0f32; 8];
    let mut minv = [0f32; 8];
    for s in 0..8 {
        let (lo, hi) = min_max(&x[32 * s..32 * s + 32]);
        let lo = lo.min(0.0);
        scale[s] = (hi - lo) / nlev as f32;
        minv[s] = -lo;
    }
    let max_scale = scale.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = minv.iter().fold(0f32, |a, &v| a.max(v));
    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for s in 0..8 {
        sc[s] = ((scale[s] * inv(d)).round() as i32).clamp(0, 63) as u8;
        // Round the min up so the sub-block's smallest value stays representable.
        mn[s] = ((minv[s] * inv(dmin)).ceil() as i32).clamp(0, 63) as u8;
    }
    let mut q = [0u8; 256];
    for s in 0..8 {
        let ds = d * sc[s] as f32;
        let dm = dmin * mn[s] as f32;
        let id = inv(ds);
        for l in 0..32 {
            let v = x[32 * s + l];
            q[32 * s + l] = (((v + dm) * id).round() as i32).clamp(0, nlev) as u8;
        }
    }
    let f = BlockFormat::expect(ty);
    wr_f16(b, f.d, d);
    wr_f16(b, f.m_off(), dmin);
    b[f.scales_off()..f.scales_off() + 12].copy_from_slice(&pack_scale_min_k4(&sc, &mn));
    if let Some(o) = f.qh {
        let qh = &mut b[o..o + 32];
        qh.fill(0);
        for s in 0..8 {
            for l in 0..32 {
                qh[l] |= ((q[32 * s + l] >> 4) & 1) << s;
            }
        }
    }
    for c in 0..4 {
        for l in 0..32 {
            b[f.qs + 32 * c + l] = (q[64 * c + l] & 0x0F) | ((q[64 * c + 32 + l] & 0x0F) << 4);
        }
    }
}

fn quantize_q6_k(x: &[f32], b: &mut [u8]) {
    // Per 16-element sub-block: scale so the signed extreme maps to -32.
    let mut scale = [0f32; 16];
    for s in 0..16 {
        scale[s] = signed_absmax(&x[16 * s..16 * s + 16]) / -32.0;
    }
    let max_abs = scale.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = f16::from_f32(max_abs / 127.0).to_f32();
    let mut sc = [0i8; 16];
    for s in 0..16 {
        sc[s] = ((scale[s] * inv(d)).round() as i32).clamp(-127, 127) as i8;
    }
    let mut q = [0u8; 256];
    for s in 0..16 {
        let id = inv(d * sc[s] as f32);
        for l in 0..16 {
            q[16 * s + l] = ((x[16 * s + l] * id).round() as i32 + 32).clamp(0, 63) as u8;
        }
    }
    let f = BlockFormat::Q6_K;
    let (ql, qh) = (f.qs, f.qh_off());
    for h in 0..2 {
        let qh_ = &q[128 * h..128 * h + 128];
        for l in 0..32 {
            let (q1, q2, q3, q4) = (qh_[l], qh_[l + 32], qh_[l + 64], qh_[l + 96]);
            b[ql + 64 * h + l] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            b[ql + 64 * h + l + 32] = (q2 & 0x0F) | ((q4 & 0x0F) << 4);
            b[qh + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    for s in 0..16 {
        b[f.scales_off() + s] = sc[s] as u8;
    }
    wr_f16(b, f.d, d);
}
