//! ggml's f32 → block quantizers, bit for bit: what `llama-quantize` writes for a tensor when
//! it has no importance matrix.
//!
//! `llama-quantize` encodes rows through `ggml_quantize_chunk`, which for these types and no
//! importance matrix calls: `quantize_row_{q4_0,q4_1,q5_0,q5_1,q8_0}_ref`,
//! `quantize_row_{q2_K,q3_K,q4_K,q5_K,q6_K}_ref` (the `_impl` search runs only with an
//! importance matrix), and for IQ4_NL / IQ4_XS `quantize_iq4_{nl,xs}` with a 15-step scale search
//! (`ntry` 7 — *not* the `_ref` entry points, which search less and give other bytes), the
//! importance weight of each element being x². F16 and BF16 are ggml's own scalar roundings
//! (round to nearest even; a NaN becomes a quiet NaN).
//!
//! Everything below follows ggml-quants.c operation for operation, in f32, in the same order:
//! ggml-base is compiled for baseline x86-64 (no FMA, so no contraction) and Rust never fuses
//! either, so the same IEEE operations give the same bits. Three helpers carry C semantics that
//! Rust spells differently: [`nearest_int`] (ggml's magic-number rounding: ties to even),
//! [`cvtt`] (a C float → int conversion as x86 does it: out of range and NaN give `i32::MIN`,
//! where Rust's `as` saturates) and [`fp32_to_fp16`] (ggml's bit-twiddling rounding). The
//! layouts are ggml-common.h's `block_*` structs, field by field.
//!
//! Each block depends only on its own 32 or 256 inputs, so rows and blocks can be encoded in
//! any order and on any number of threads with the same bytes.

use super::reference::scale_min_k4;
use super::{GgmlType, QuantError};

/// Elements per block of the 32-element formats.
const QK: usize = 32;
/// Elements per K-quant super-block.
const QK_K: usize = 256;
/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `kvalues_iq4nl`: the 16 levels of IQ4_NL / IQ4_XS.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The types [`quantize_into`] encodes.
pub const TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

// Field offsets inside each block (ggml-common.h; every f16 is little-endian).
/// block_q4_0 / block_iq4_nl: d, qs[16].
const Q4_0_QS: usize = 2;
/// block_q4_1: d, m, qs[16].
const Q4_1_QS: usize = 4;
/// block_q5_0: d, qh[4], qs[16].
const Q5_0_QH: usize = 2;
const Q5_0_QS: usize = 6;
/// block_q5_1: d, m, qh[4], qs[16].
const Q5_1_QH: usize = 4;
const Q5_1_QS: usize = 8;
/// block_q2_K: scales[16], qs[64], d, dmin.
const Q2_K_QS: usize = 16;
const Q2_K_D: usize = 80;
const Q2_K_DMIN: usize = 82;
/// block_q3_K: hmask[32], qs[64], scales[12], d.
const Q3_K_QS: usize = 32;
const Q3_K_SCALES: usize = 96;
const Q3_K_D: usize = 108;
/// block_q4_K / block_q5_K: d, dmin, scales[12], (q5: qh[32]), qs[128].
const QK_SCALES: usize = 4;
const Q4_K_QS: usize = 16;
const Q5_K_QH: usize = 16;
const Q5_K_QS: usize = 48;
/// block_q6_K: ql[128], qh[64], scales[16], d.
const Q6_K_QH: usize = 128;
const Q6_K_SCALES: usize = 192;
const Q6_K_D: usize = 208;
/// block_iq4_xs: d, scales_h (u16), scales_l[4], qs[128].
const IQ4_XS_SCALES_H: usize = 2;
const IQ4_XS_SCALES_L: usize = 4;
const IQ4_XS_QS: usize = 8;

/// Whether [`quantize_into`] encodes `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    TYPES.contains(&ty)
}

/// Encode `src` (a whole number of blocks of `ty`) as ggml does without an importance matrix.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let bl = ty.block_len();
    let mut out = vec![0u8; (src.len() / bl) * ty.block_bytes()];
    quantize_into(ty, src, &mut out)?;
    Ok(out)
}

/// [`quantize`] into `dst`, which must hold exactly the blocks for `src.len()` elements.
pub fn quantize_into(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    if !can_quantize(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let expected = ty
        .row_bytes(src.len())
        .ok_or(QuantError::NotBlockMultiple {
            ty,
            n: src.len(),
            block_len: ty.block_len(),
        })?;
    if dst.len() != expected {
        return Err(QuantError::BadSrcLen {
            ty,
            n: src.len(),
            expected,
            got: dst.len(),
        });
    }
    let block: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => |x, y| y.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, y| y.copy_from_slice(&fp32_to_fp16(x[0]).to_le_bytes()),
        GgmlType::BF16 => |x, y| y.copy_from_slice(&fp32_to_bf16(x[0]).to_le_bytes()),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::IQ4_NL => iq4_nl,
        GgmlType::IQ4_XS => iq4_xs,
        _ => unreachable!("checked by can_quantize"),
    };
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    for (x, y) in src.chunks_exact(bl).zip(dst.chunks_exact_mut(bb)) {
        block(x, y);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scalar conversions with ggml's semantics.

/// ggml's `ggml_compute_fp32_to_fp16`: round to nearest even through float arithmetic (the
/// FP16 library's trick), NaN → 0x7E00 with the sign kept.
pub fn fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16)
        | if shl1_w > 0xFF00_0000 {
            0x7E00
        } else {
            nonsign
        }) as u16
}

/// ggml's `ggml_compute_fp32_to_bf16`: round to nearest even, NaN made quiet.
pub fn fp32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn fp16_to_fp32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// Store `v` as an f16 at `off` and return the stored value as f32 (what ggml reads back with
/// `GGML_FP16_TO_FP32(y->d)`).
#[inline(always)]
fn put_f16(b: &mut [u8], off: usize, v: f32) -> f32 {
    let h = fp32_to_fp16(v);
    b[off..off + 2].copy_from_slice(&h.to_le_bytes());
    fp16_to_fp32(h)
}

/// ggml's `nearest_int`: add 1.5·2²³ and read the low mantissa bits (round half to even for
/// |x| < 2²²; outside that range the same garbage as ggml, bit for bit).
#[inline(always)]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// A C float → integer conversion as x86 `cvttss2si` does it: truncation, and the "integer
/// indefinite" `i32::MIN` for NaN and out-of-range values (Rust's `as` saturates instead). The
/// narrower C conversions (`(int8_t)f`, `(uint8_t)f`) keep the low byte of this.
#[inline(always)]
fn cvtt(f: f32) -> i32 {
    if f.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&f) {
        i32::MIN
    } else {
        f as i32
    }
}

/// `d ? 1.0f/d : 0.0f` (a NaN `d` is true in C, as `!= 0.0` is in Rust).
#[inline(always)]
fn inv_or_zero(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

// ---------------------------------------------------------------------------------------------
// The 32-element formats: quantize_row_*_ref.

/// The element of largest magnitude (the first one on ties) and that magnitude.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

/// C's `if (v < min) min = v; if (v > max) max = v;` from ±FLT_MAX.
#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Q4_0/Q4_1's packing: `q[j] | q[j + 16] << 4`, unmasked as in ggml (the quants are ≤ 15).
#[inline(always)]
fn pack_q4(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = q[j] | (q[j + 16] << 4);
    }
}

/// Q5_0/Q5_1's packing: the low nibbles of q[0..16] and q[16..32].
#[inline(always)]
fn pack_nibbles(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
    }
}

/// Bit 4 of each of the 32 quants, bit j for element j.
#[inline(always)]
fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 & 0x10) >> 4) << j;
    }
    qh.to_le_bytes()
}

fn q4_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = inv_or_zero(d);
    put_f16(y, 0, d);
    let mut q = [0u8; 32];
    for j in 0..32 {
        // MIN(15, (int8_t)(x*id + 8.5f)), stored as uint8_t.
        q[j] = (cvtt(x[j] * id + 8.5) as i8 as i32).min(15) as u8;
    }
    pack_q4(&q, &mut y[Q4_0_QS..Q4_0_QS + 16]);
}

fn q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv_or_zero(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut q = [0u8; 32];
    for j in 0..32 {
        q[j] = (cvtt((x[j] - min) * id + 0.5) as i8 as i32).min(15) as u8;
    }
    pack_q4(&q, &mut y[Q4_1_QS..Q4_1_QS + 16]);
}

fn q5_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = inv_or_zero(d);
    put_f16(y, 0, d);
    let mut q = [0u8; 32];
    for j in 0..32 {
        q[j] = (cvtt(x[j] * id + 16.5) as i8 as i32).min(31) as u8;
    }
    y[Q5_0_QH..Q5_0_QH + 4].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut y[Q5_0_QS..Q5_0_QS + 16]);
}

fn q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv_or_zero(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut q = [0u8; 32];
    for j in 0..32 {
        // (uint8_t)(x + 0.5f): no clamp in ggml.
        q[j] = cvtt((x[j] - min) * id + 0.5) as u8;
    }
    y[Q5_1_QH..Q5_1_QH + 4].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut y[Q5_1_QS..Q5_1_QS + 16]);
}

fn q8_0(x: &[f32], y: &mut [u8]) {
    let mut amax = 0f32;
    for &v in x {
        // MAX(amax, fabsf(v)) = amax > |v| ? amax : |v|
        amax = if amax > v.abs() { amax } else { v.abs() };
    }
    let d = amax / 127.0;
    let id = inv_or_zero(d);
    put_f16(y, 0, d);
    for j in 0..QK {
        // roundf: half away from zero, as f32::round.
        y[2 + j] = cvtt((x[j] * id).round()) as u8;
    }
}

// ---------------------------------------------------------------------------------------------
// The K-quants: quantize_row_*_K_ref and their helpers.

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (weights x²), as
/// `quantize_row_q6_K_ref` calls it: the scale of the group and its quants `L` (offset by
/// `nmax`).
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (amax, max) = {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            let ax = v.abs();
            if ax > amax {
                amax = ax;
                max = v;
            }
        }
        (amax, max)
    };
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let mut iscale = -nmax as f32 / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &xi) in x.iter().enumerate() {
        let l = clamp(nearest_int(iscale * xi));
        l_out[i] = (l + nmax) as i8;
        let w = xi * xi;
        sumlx += w * xi * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let l = clamp(nearest_int(iscale * xi));
            let w = xi * xi;
            sumlx += w * xi * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &xi) in x.iter().enumerate() {
                l_out[i] = (nmax + clamp(nearest_int(iscale * xi))) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` with `do_rmse` (as Q3_K's reference quantizer calls it).
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let iscale = -nmax as f32 / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &xi) in x.iter().enumerate() {
        let l = clamp(nearest_int(iscale * xi));
        l_out[i] = l as i8;
        let w = xi * xi;
        sumlx += w * xi * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (i, &xi) in x.iter().enumerate() {
            let w = xi * xi;
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * xi * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = clamp(nearest_int(xi * sl2 / slx));
                if new_l != l_out[i] as i32 {
                    slx += w * xi * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for l in l_out.iter_mut() {
        *l += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// ggml's `make_qkx2_quants`: a scale and a min (returned as `(scale, -min)`) for an
/// asymmetric group, searched over `nstep + 1` candidate scales; quants in `l_out`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let err = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = l.clamp(0, nmax) as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; QK];
    let laux = &mut laux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l_out.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Four 2-bit quants per byte: byte l of each 32-byte group of `qs` holds elements
/// l, l + 32, l + 64, l + 96 of its 128 (Q2_K and Q3_K).
#[inline(always)]
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for k in 0..32 {
            qs[j / 4 + k] =
                l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6);
        }
    }
}

fn q2_k(x: &[f32], y: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut l = [0u8; QK_K];
    let mut mins = [0f32; 16];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let mut weights = [0f32; 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut l[16 * j..16 * j + 16],
            -0.5,
            0.1,
            15,
            true,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let mut sc = [0u8; 16];
    let d = if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(y, Q2_K_D, max_scale / Q4SCALE)
    } else {
        put_f16(y, Q2_K_D, 0.0)
    };
    let dmin = if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        put_f16(y, Q2_K_DMIN, max_min / Q4SCALE)
    } else {
        put_f16(y, Q2_K_DMIN, 0.0)
    };
    for j in 0..16 {
        let dj = d * (sc[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / dj);
            l[16 * j + ii] = q.clamp(0, 3) as u8;
        }
    }
    y[..16].copy_from_slice(&sc);
    pack_2bit(&l, &mut y[Q2_K_QS..Q2_K_QS + 64]);
}

fn q3_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        let scale = scales[j].abs();
        if scale > amax {
            amax = scale;
            max_scale = scales[j];
        }
    }
    let mut sc = [0u8; 12];
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            // int8_t l = nearest_int(..); l = MAX(-32, MIN(31, l)) + 32;
            let v = (nearest_int(iscale * scales[j]) as i8 as i32).clamp(-32, 31) + 32;
            if j < 8 {
                sc[j] = (v & 0xF) as u8;
            } else {
                sc[j - 8] |= ((v & 0xF) << 4) as u8;
            }
            sc[j % 4 + 8] |= ((v >> 4) << (2 * (j / 4))) as u8;
        }
        put_f16(y, Q3_K_D, 1.0 / iscale)
    } else {
        put_f16(y, Q3_K_D, 0.0)
    };
    for j in 0..16 {
        let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
        let s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 as i32 - 32;
        let dj = d * s as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    // The high bit of element j goes to bit j / 32 of hmask[j % 32].
    let hmask = &mut y[..32];
    hmask.fill(0);
    let mut lu = [0u8; QK_K];
    for j in 0..QK_K {
        let mut v = l[j];
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        lu[j] = v as u8;
    }
    pack_2bit(&lu, &mut y[Q3_K_QS..Q3_K_QS + 64]);
    y[Q3_K_SCALES..Q3_K_SCALES + 12].copy_from_slice(&sc);
}

/// The 6-bit scales and mins of Q4_K/Q5_K's 8 sub-blocks packed into 12 bytes, in ggml's
/// order of writes (sub-blocks 4..8 OR their high bits into bytes written before).
fn pack_k4_scales(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// The shared body of Q4_K and Q5_K's reference quantizers: quants (0..=nmax) in `l`, the
/// header (d, dmin, scales) written into `y`.
fn qk_k_asym(x: &[f32], y: &mut [u8], l: &mut [u8; QK_K], nmax: i32, rmin: f32, nstep: i32) {
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        // uint8_t ls = nearest_int(..); ls = MIN(63, ls);
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_k4_scales(&ls, &lm);
    y[QK_SCALES..QK_SCALES + 12].copy_from_slice(&packed);
    let d = put_f16(y, 0, max_scale / 63.0);
    let dmin = put_f16(y, 2, max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / dj);
            l[32 * j + ii] = q.clamp(0, nmax) as u8;
        }
    }
}

fn q4_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    qk_k_asym(x, y, &mut l, 15, -1.0, 20);
    for (c, j) in (0..QK_K).step_by(64).enumerate() {
        for k in 0..32 {
            y[Q4_K_QS + 32 * c + k] = l[j + k] | (l[j + k + 32] << 4);
        }
    }
}

fn q5_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    qk_k_asym(x, y, &mut l, 31, -0.5, 15);
    let mut qh = [0u8; 32];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (c, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            y[Q5_K_QS + 32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    y[Q5_K_QH..Q5_K_QH + 32].copy_from_slice(&qh);
}

fn q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        put_f16(y, Q6_K_D, 0.0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = put_f16(y, Q6_K_D, 1.0 / iscale);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let dj = d * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        for k in 0..32 {
            let q = |o: usize| l[j + k + o] as u8;
            y[64 * h + k] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
            y[64 * h + k + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
            y[Q6_K_QH + 32 * h + k] =
                (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
        }
    }
    for ib in 0..16 {
        y[Q6_K_SCALES + ib] = sc[ib] as u8;
    }
}

// ---------------------------------------------------------------------------------------------
// IQ4_NL / IQ4_XS: quantize_row_iq4_nl_impl with ntry 7 and no importance matrix.

/// ggml's `best_index_int8` over [`KVALUES_IQ4NL`]: the nearest level (the upper one on ties).
///
/// ggml bisects to the pair of levels around `x` (`val[mu - 1] <= x < val[mu]`) and picks one by
/// `x - val[mu - 1] < val[mu] - x`. Here `mu` is counted instead (the levels at or below `x`),
/// without the bisection's unpredictable branches — the same pair, the same comparison, so the
/// same index; NaN, which no comparison holds for, ends at 15 as the bisection does.
#[inline(always)]
fn best_index_iq4(x: f32) -> usize {
    const VAL: [f32; 16] = {
        let mut v = [0f32; 16];
        let mut i = 0;
        while i < 16 {
            v[i] = KVALUES_IQ4NL[i] as f32;
            i += 1;
        }
        v
    };
    if x <= VAL[0] {
        return 0;
    }
    if x >= VAL[15] || x.is_nan() {
        return 15;
    }
    let mu = 1 + VAL[1..15].iter().map(|&v| (v <= x) as usize).sum::<usize>();
    if x - VAL[mu - 1] < VAL[mu] - x {
        mu - 1
    } else {
        mu
    }
}

/// The scale of one 32-element group and its level indices in `lb` (what the first loop of
/// `quantize_row_iq4_nl_impl` computes for a group); 0 for an all-zero group (`lb` untouched).
fn iq4_group(xb: &[f32], lb: &mut [u8]) -> f32 {
    const NTRY: i32 = 7;
    let v0 = KVALUES_IQ4NL[0];
    let mut weight = [0f32; QK];
    for (w, &v) in weight.iter_mut().zip(xb) {
        *w = v * v;
    }
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in xb {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let mut d = -max / v0 as f32;
    let mut id = 1.0 / d;
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for j in 0..QK {
        let l = best_index_iq4(id * xb[j]);
        lb[j] = l as u8;
        let q = KVALUES_IQ4NL[l] as f32;
        let w = weight[j];
        sumqx += w * q * xb[j];
        sumq2 += w * q * q;
    }
    d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        id = (itry + v0 as i32) as f32 / max;
        sumqx = 0.0;
        sumq2 = 0.0;
        for j in 0..QK {
            let q = KVALUES_IQ4NL[best_index_iq4(id * xb[j])] as f32;
            let w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Low nibbles of L[32i..32i+16], high nibbles of L[32i+16..32i+32] per 32-element group.
#[inline(always)]
fn pack_iq4(l: &[u8], q4: &mut [u8]) {
    for i in 0..l.len() / 32 {
        for j in 0..16 {
            q4[16 * i + j] = l[32 * i + j] | (l[32 * i + 16 + j] << 4);
        }
    }
}

fn iq4_nl(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK];
    let scale = iq4_group(x, &mut l);
    put_f16(y, 0, scale);
    let id = inv_or_zero(scale);
    for j in 0..QK {
        l[j] = best_index_iq4(id * x[j]) as u8;
    }
    pack_iq4(&l, &mut y[Q4_0_QS..Q4_0_QS + 16]);
}

fn iq4_xs(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut amax_scale) = (0f32, 0f32);
    for ib in 0..8 {
        let d = iq4_group(&x[32 * ib..32 * ib + 32], &mut l[32 * ib..32 * ib + 32]);
        scales[ib] = d;
        let abs_d = d.abs();
        if abs_d > amax_scale {
            amax_scale = abs_d;
            max_scale = d;
        }
    }
    let d = -max_scale / 32.0;
    put_f16(y, 0, d);
    let id = inv_or_zero(d);
    let mut scales_h = 0u16;
    let mut scales_l = [0u8; 4];
    for ib in 0..8 {
        let mut ls = nearest_int(id * scales[ib]).clamp(-32, 31);
        let dl = d * ls as f32;
        let idl = inv_or_zero(dl);
        for j in 0..32 {
            l[32 * ib + j] = best_index_iq4(idl * x[32 * ib + j]) as u8;
        }
        ls += 32;
        let (l_l, l_h) = ((ls & 0xf) as u8, (ls >> 4) as u16);
        if ib % 2 == 0 {
            scales_l[ib / 2] = l_l;
        } else {
            scales_l[ib / 2] |= l_l << 4;
        }
        scales_h |= l_h << (2 * (ib % 8));
    }
    y[IQ4_XS_SCALES_H..IQ4_XS_SCALES_H + 2].copy_from_slice(&scales_h.to_le_bytes());
    y[IQ4_XS_SCALES_L..IQ4_XS_SCALES_L + 4].copy_from_slice(&scales_l);
    pack_iq4(&l, &mut y[IQ4_XS_QS..IQ4_XS_QS + 128]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test matrix of `tools/quantize-ref/ggml_quant_ref.c`, built with the same f32
    /// operations in the same order: 64 rows of 512, row r of kind r % 16 (zeros, uniform,
    /// tiny, one-signed, constant, spikes, sums, 1e-30, half-zero, zero sub-blocks, large,
    /// cubed, alternating scale, multiples of 1/8 (rounding ties), offset).
    fn test_matrix() -> Vec<f32> {
        let mut state = 42u64;
        let mut splitmix = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut unif = || (splitmix() >> 40) as f32 * (1.0 / 8_388_608.0) - 1.0;
        let mut x = Vec::with_capacity(NROWS * NCOLS);
        for r in 0..NROWS {
            for i in 0..NCOLS {
                x.push(match r % 16 {
                    0 => 0.0,
                    1 => unif(),
                    2 => unif() * 0.001,
                    3 => unif().abs(),
                    4 => -unif().abs(),
                    5 => 0.5,
                    6 => {
                        let u = unif();
                        if i % 32 == 7 { 3.0 * u } else { u * 0.01 }
                    }
                    7 => {
                        let (a, b, c, d) = (unif(), unif(), unif(), unif());
                        (((a + b) + c) + d) * 0.5
                    }
                    8 => unif() * 1e-30,
                    9 => {
                        let u = unif();
                        if i < 256 { 0.0 } else { u }
                    }
                    10 => {
                        let u = unif();
                        if (i / 16) % 2 == 0 { 0.0 } else { u }
                    }
                    11 => unif() * 10000.0,
                    12 => {
                        let u = unif();
                        u * u * u * 8.0
                    }
                    13 => {
                        let u = unif();
                        if i % 2 == 1 { u } else { 0.25 * u }
                    }
                    14 => (unif() * 8.0) as i32 as f32 * 0.125,
                    _ => unif() + 0.3,
                });
            }
        }
        x
    }
    const NROWS: usize = 64;
    const NCOLS: usize = 512;

    fn fnv1a(b: &[u8]) -> u64 {
        b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &v| {
            (h ^ v as u64).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// FNV-1a 64 of ggml's encoding of [`test_matrix`], as `ggml_quant_ref` printed them
    /// (llama.cpp 0c1e570, libggml-base of build-server; see tools/quantize-ref/README.md).
    const GGML_HASHES: [(GgmlType, u64); 14] = [
        (GgmlType::F16, 0x3f21c15a903c2772),
        (GgmlType::BF16, 0x8886266c1e23b948),
        (GgmlType::Q4_0, 0xd7b3ad8718b3d650),
        (GgmlType::Q4_1, 0x2b63e3932404fdf3),
        (GgmlType::Q5_0, 0x146c902579b2d6b4),
        (GgmlType::Q5_1, 0x7f4f2dcc0434aab5),
        (GgmlType::Q8_0, 0xd466efc7f08f7d40),
        (GgmlType::Q2_K, 0xb532b52894c043c0),
        (GgmlType::Q3_K, 0x545b23169a78868f),
        (GgmlType::Q4_K, 0x301bd9b27e6942c2),
        (GgmlType::Q5_K, 0xbc8e914737efddb7),
        (GgmlType::Q6_K, 0x39d18c4a9102f4b3),
        (GgmlType::IQ4_NL, 0x4dbd586c29109071),
        (GgmlType::IQ4_XS, 0x79772d4b50cf07d3),
    ];

    #[test]
    fn the_test_matrix_is_the_reference_tools() {
        let x = test_matrix();
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(fnv1a(&bytes), 0xd5be425a15573f96);
    }

    #[test]
    fn every_type_encodes_as_ggml_bit_for_bit() {
        let x = test_matrix();
        // EMBER_GGML_REF=dir (ggml_quant_ref's TYPE.bin files) names the first differing block.
        let ref_dir = std::env::var_os("EMBER_GGML_REF");
        let mut bad = vec![];
        for (ty, want) in GGML_HASHES {
            let got = quantize(ty, &x).unwrap();
            if fnv1a(&got) == want {
                continue;
            }
            let mut msg = format!("{ty}: hash {:016x}, ggml {want:016x}", fnv1a(&got));
            if let Some(dir) = &ref_dir {
                let theirs = std::fs::read(std::path::Path::new(dir).join(format!("{ty}.bin")));
                if let Ok(theirs) = theirs {
                    let bb = ty.block_bytes();
                    if let Some(b) = (0..got.len() / bb)
                        .find(|&b| got[b * bb..(b + 1) * bb] != theirs[b * bb..(b + 1) * bb])
                    {
                        let bl = ty.block_len();
                        msg += &format!(
                            "; first differing block {b} (row {}, kind {}):\n ours  {:?}\n ggml  {:?}",
                            b * bl / NCOLS,
                            (b * bl / NCOLS) % 16,
                            &got[b * bb..(b + 1) * bb],
                            &theirs[b * bb..(b + 1) * bb]
                        );
                    }
                }
            }
            bad.push(msg);
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn f32_is_copied_and_every_listed_type_round_trips_close() {
        let x = test_matrix();
        assert_eq!(
            quantize(GgmlType::F32, &x).unwrap(),
            x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()
        );
        // Row 1 (uniform in [-1, 1)) comes back within a budget per type: the bytes above are
        // ggml's, this only says the layouts are read as they were written.
        let row = &x[NCOLS..2 * NCOLS];
        for (ty, budget) in [
            (GgmlType::Q4_0, 0.13),
            (GgmlType::Q4_1, 0.07),
            (GgmlType::Q5_0, 0.07),
            (GgmlType::Q5_1, 0.035),
            (GgmlType::Q8_0, 0.005),
            (GgmlType::Q4_K, 0.1),
            (GgmlType::Q5_K, 0.06),
            (GgmlType::Q6_K, 0.03),
            (GgmlType::F16, 0.001),
            (GgmlType::BF16, 0.005),
        ] {
            let q = quantize(ty, row).unwrap();
            let mut back = vec![0f32; NCOLS];
            crate::quant::dequantize(ty, &q, &mut back).unwrap();
            let err = row
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= budget, "{ty}: max |error| {err} > {budget}");
        }
    }

    #[test]
    fn fp16_and_bf16_round_to_nearest_even_as_ggml() {
        // Finite values: the same as IEEE round-to-nearest-even (the half crate's conversion).
        let mut state = 7u64;
        for _ in 0..200_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let f = f32::from_bits((state >> 32) as u32);
            if f.is_nan() {
                assert_eq!(fp32_to_fp16(f) & 0x7fff, 0x7E00, "{f}");
                assert_eq!(fp32_to_bf16(f) & 0x0040, 0x0040);
                continue;
            }
            assert_eq!(fp32_to_fp16(f), half::f16::from_f32(f).to_bits(), "{f:e}");
            assert_eq!(fp32_to_bf16(f), half::bf16::from_f32(f).to_bits(), "{f:e}");
        }
        // Ties go to even; 65520 overflows to infinity.
        assert_eq!(fp32_to_fp16(1.0 + 1.0 / 2048.0), 0x3C00);
        assert_eq!(fp32_to_fp16(1.0 + 3.0 / 2048.0), 0x3C02);
        assert_eq!(fp32_to_fp16(65520.0), 0x7C00);
        assert_eq!(fp32_to_fp16(-0.0), 0x8000);
    }

    #[test]
    fn nearest_int_rounds_ties_to_even_and_cvtt_is_x86s() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(3.4999998), 3);
        assert_eq!(cvtt(f32::NAN), i32::MIN);
        assert_eq!(cvtt(f32::INFINITY), i32::MIN);
        assert_eq!(cvtt(3e9), i32::MIN);
        assert_eq!(cvtt(-7.9), -7);
    }

    /// ggml's `best_index_int8`, transcribed: the bisection [`best_index_iq4`] replaces.
    fn best_index_bisect(x: f32) -> usize {
        let val = KVALUES_IQ4NL.map(|v| v as f32);
        if x <= val[0] {
            return 0;
        }
        if x >= val[15] {
            return 15;
        }
        let (mut ml, mut mu) = (0, 15);
        while mu - ml > 1 {
            let mav = (ml + mu) / 2;
            if x < val[mav] {
                mu = mav;
            } else {
                ml = mav;
            }
        }
        if x - val[mu - 1] < val[mu] - x {
            mu - 1
        } else {
            mu
        }
    }

    #[test]
    fn the_level_search_picks_what_ggmls_bisection_picks() {
        let mut xs = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0];
        // Every level, every midpoint, and their neighbours one ulp away.
        for w in KVALUES_IQ4NL.windows(2) {
            for v in [w[0] as f32, (w[0] as f32 + w[1] as f32) / 2.0] {
                xs.extend([
                    v,
                    f32::from_bits(v.to_bits() + 1),
                    f32::from_bits(v.to_bits() - 1),
                ]);
            }
        }
        let mut state = 1u64;
        for _ in 0..100_000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            xs.push(((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 290.0);
        }
        for x in xs {
            assert_eq!(best_index_iq4(x), best_index_bisect(x), "x = {x:e}");
        }
    }

    #[test]
    fn wrong_lengths_and_types_are_errors() {
        assert!(matches!(
            quantize(GgmlType::Q4_K, &[0.0; 255]),
            Err(QuantError::NotBlockMultiple { .. })
        ));
        assert!(matches!(
            quantize(GgmlType::IQ2_XXS, &[0.0; 256]),
            Err(QuantError::Unsupported(GgmlType::IQ2_XXS))
        ));
        let mut short = [0u8; 17];
        assert!(matches!(
            quantize_into(GgmlType::Q4_0, &[0.0; 32], &mut short),
            Err(QuantError::BadSrcLen { .. })
        ));
        for ty in TYPES {
            assert!(can_quantize(ty));
        }
    }
}
