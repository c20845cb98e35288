//! Lossless repack of ggml blocks into the one layout ember's GPU kernels read.
//!
//! GGUF interleaves scales and quants per block, with a different bit layout per type. A GPU
//! kernel per type would be eleven kernels; instead every type is rewritten at load, once, into
//! a **flat, affine, group-wise** form that one kernel reads:
//!
//! * `codes`: element `e` of the row-major matrix (`e = row·cols + col`) is an unsigned code in
//!   word `e / per_word` of a `u32` array, at bits `(e % per_word)·bits ..`, where `bits` is 4, 8,
//!   16 or 32 and `per_word = 32 / bits`;
//! * `params`: for quantized types, group `g = e / group` has `(scale, offset)` at
//!   `params[2g], params[2g + 1]`, and the value is `scale · code + offset`;
//! * 16-bit codes are raw F16 or BF16 bits, 32-bit codes raw F32 bits (no params).
//!
//! Per type:
//!
//! | type | bits | group | scale | offset | bits/weight (GGUF → device) |
//! |---|---|---|---|---|---|
//! | Q4_0 | 4 | 32 | d | −8d | 4.5 → 6 |
//! | Q4_1 | 4 | 32 | d | m | 5 → 6 |
//! | Q4_K | 4 | 32 | d·sc | −dmin·m | 4.5 → 6 |
//! | Q5_0 | 8 | 32 | d | −16d | 5.5 → 10 |
//! | Q5_1 | 8 | 32 | d | m | 6 → 10 |
//! | Q5_K | 8 | 32 | d·sc | −dmin·m | 5.5 → 10 |
//! | Q6_K | 8 | 16 | d·sc | −32·d·sc | 6.56 → 12 |
//! | Q8_0 | 8 | 32 | d | −128d | 8.5 → 10 |
//! | Q2_K | 4 | 16 | d·(sc & 15) | −dmin·(sc >> 4) | 2.63 → 8 |
//! | Q3_K | 4 | 16 | d·(sc − 32) | −4·d·(sc − 32) | 3.44 → 8 |
//! | IQ4_NL | 8 | 32 | d | −128d | 4.5 → 10 |
//! | IQ4_XS | 8 | 32 | d·(ls − 32) | −128·d·(ls − 32) | 4.25 → 10 |
//! | F16, BF16 | 16 | – | – | – | 16 → 16 |
//! | F32 | 32 | – | – | – | 32 → 32 |
//!
//! Q3_K's code is its 3-bit quant q (value q − 4). The IQ4 formats are not affine in their
//! 4-bit index, but their table's levels are int8: the code is the level + 128 (1..241), exact.
//!
//! **Lossless:** every scale and offset is a product of an f16 value and a small integer, so it is
//! exact in f32, and `scale · code + offset` equals the reference dequantizer's value bit for bit
//! up to the sign of zero (the tests check every type). Nothing is widened to f32 on the device: F16/BF16 stay 16-bit and
//! are decoded in the kernel. The price is the 3-, 5- and 6-bit types, and the IQ4 levels,
//! stored in bytes, and the 2- and 3-bit types' 16-element groups.

use half::{bf16, f16};

use super::blocks::BlockFormat;
use super::reference::{
    iq4_xs_scale, q2_k_quant, q3_k_quant, q3_k_scales, q6_k_half, q6_k_quad, rd_f16, scale_min_k4,
};
use super::{GgmlType, QMatRef, QuantError};

/// How codes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodeKind {
    /// Unsigned 4-bit codes, affine per group.
    U4,
    /// Unsigned 8-bit codes, affine per group.
    U8,
    /// Raw IEEE half bits.
    F16,
    /// Raw bfloat16 bits.
    Bf16,
    /// Raw f32 bits.
    F32,
}

impl CodeKind {
    pub fn bits(self) -> u32 {
        match self {
            CodeKind::U4 => 4,
            CodeKind::U8 => 8,
            CodeKind::F16 | CodeKind::Bf16 => 16,
            CodeKind::F32 => 32,
        }
    }
    pub fn per_word(self) -> usize {
        (32 / self.bits()) as usize
    }
    pub fn is_affine(self) -> bool {
        matches!(self, CodeKind::U4 | CodeKind::U8)
    }
}

/// The device layout a ggml type is repacked into: `(codes, group)`; group is 0 for raw floats.
pub fn device_layout(ty: GgmlType) -> Option<(CodeKind, usize)> {
    Some(match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => (CodeKind::U4, 32),
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K | GgmlType::Q8_0 => (CodeKind::U8, 32),
        GgmlType::Q6_K => (CodeKind::U8, 16),
        GgmlType::Q2_K | GgmlType::Q3_K => (CodeKind::U4, 16),
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => (CodeKind::U8, 32),
        GgmlType::F16 => (CodeKind::F16, 0),
        GgmlType::BF16 => (CodeKind::Bf16, 0),
        GgmlType::F32 => (CodeKind::F32, 0),
        _ => return None,
    })
}

/// A matrix in the device layout (still in host memory).
#[derive(Clone, Debug, PartialEq)]
pub struct Repacked {
    pub kind: CodeKind,
    /// Elements per `(scale, offset)` pair; 0 for raw floats.
    pub group: usize,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u32>,
    pub params: Vec<f32>,
}

impl Repacked {
    /// Device bytes of codes and params.
    pub fn bytes(&self) -> usize {
        4 * (self.codes.len() + self.params.len())
    }

    /// Element `e` (row-major), computed exactly as the GPU kernel computes it.
    pub fn value(&self, e: usize) -> f32 {
        let pw = self.kind.per_word();
        let bits = self.kind.bits();
        let word = self.codes[e / pw];
        let code = if bits == 32 {
            word
        } else {
            (word >> ((e % pw) as u32 * bits)) & ((1u32 << bits) - 1)
        };
        match self.kind {
            CodeKind::U4 | CodeKind::U8 => {
                let g = e / self.group;
                self.params[2 * g] * code as f32 + self.params[2 * g + 1]
            }
            CodeKind::F16 => f16::from_bits(code as u16).to_f32(),
            CodeKind::Bf16 => bf16::from_bits(code as u16).to_f32(),
            CodeKind::F32 => f32::from_bits(code),
        }
    }
}

struct Packer {
    bits: u32,
    codes: Vec<u32>,
    n: usize,
}

impl Packer {
    fn push(&mut self, code: u32) {
        let pw = (32 / self.bits) as usize;
        if self.n.is_multiple_of(pw) {
            self.codes.push(0);
        }
        *self.codes.last_mut().unwrap() |= code << ((self.n % pw) as u32 * self.bits);
        self.n += 1;
    }
}

/// Rewrite `w` into the device layout. `w` must be valid ([`QMatRef::validate`]).
pub fn repack(w: QMatRef<'_>) -> Result<Repacked, QuantError> {
    w.validate()?;
    let (kind, group) = device_layout(w.ty).ok_or(QuantError::Unsupported(w.ty))?;
    let n = w.rows * w.cols;
    let mut p = Packer {
        bits: kind.bits(),
        codes: Vec::with_capacity(n.div_ceil(kind.per_word())),
        n: 0,
    };
    let mut params = Vec::with_capacity((2 * n).checked_div(group).unwrap_or(0));
    let bb = w.ty.block_bytes();
    let mut sp = |s: f32, o: f32| params.extend_from_slice(&[s, o]);
    for b in w.data.chunks_exact(bb) {
        match w.ty {
            GgmlType::F32 => p.push(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 | GgmlType::BF16 => p.push(u16::from_le_bytes([b[0], b[1]]) as u32),
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let f = BlockFormat::expect(w.ty);
                let d = rd_f16(b, f.d);
                let off = f.m.map_or(-f.zero as f32 * d, |o| rd_f16(b, o));
                let qs = &b[f.qs..f.qs + 16];
                sp(d, off);
                qs.iter().for_each(|&q| p.push((q & 0x0F) as u32));
                qs.iter().for_each(|&q| p.push((q >> 4) as u32));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let f = BlockFormat::expect(w.ty);
                let d = rd_f16(b, f.d);
                let off = f.m.map_or(-f.zero as f32 * d, |o| rd_f16(b, o));
                let h = f.qh_off();
                let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                let qs = &b[f.qs..f.qs + 16];
                sp(d, off);
                for (j, &q) in qs.iter().enumerate() {
                    p.push((q & 0x0F) as u32 | (((qh >> j) & 1) << 4));
                }
                for (j, &q) in qs.iter().enumerate() {
                    p.push((q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4));
                }
            }
            GgmlType::Q8_0 => {
                let f = BlockFormat::Q8_0;
                let d = rd_f16(b, f.d);
                sp(d, -128.0 * d);
                b[f.qs..f.qs + 32]
                    .iter()
                    .for_each(|&q| p.push((q as i8 as i32 + 128) as u32));
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let f = BlockFormat::expect(w.ty);
                let d = rd_f16(b, f.d);
                let dmin = rd_f16(b, f.m_off());
                let scales = &b[f.scales_off()..f.scales_off() + 12];
                let qh = f.qh.map(|o| &b[o..o + 32]);
                let qs = &b[f.qs..f.qs + 128];
                for c in 0..4 {
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + half, scales);
                        sp(d * sc as f32, -(dmin * m as f32));
                        for l in 0..32 {
                            let q = qs[32 * c + l];
                            let lo = if half == 0 { q & 0x0F } else { q >> 4 } as u32;
                            let hi = qh.map_or(0, |qh| ((qh[l] >> (2 * c + half)) & 1) as u32);
                            p.push(lo | (hi << 4));
                        }
                    }
                }
            }
            GgmlType::Q6_K => {
                let d = rd_f16(b, BlockFormat::Q6_K.d);
                // Element order within a 128-half: l, l+32, l+64, l+96 come from one (ql, qh)
                // pair, so decode the half into 128 codes first, then emit in order.
                for h in 0..2 {
                    let (ql, qh, sc) = q6_k_half(b, h);
                    let mut q = [0u32; 128];
                    for l in 0..32 {
                        for (k, c) in q6_k_quad(ql, qh, l).into_iter().enumerate() {
                            q[l + 32 * k] = c as u32;
                        }
                    }
                    for g in 0..8 {
                        let s = d * (sc[g] as i8) as f32;
                        sp(s, -32.0 * s);
                        q[16 * g..16 * g + 16].iter().for_each(|&c| p.push(c));
                    }
                }
            }
            GgmlType::Q2_K => {
                let f = BlockFormat::Q2_K;
                let d = rd_f16(b, f.d);
                let dmin = rd_f16(b, f.m_off());
                for s in 0..16 {
                    let sc = b[f.scales_off() + s];
                    sp(d * (sc & 0x0F) as f32, -(dmin * (sc >> 4) as f32));
                    (16 * s..16 * s + 16).for_each(|e| p.push(q2_k_quant(b, e) as u32));
                }
            }
            GgmlType::Q3_K => {
                let f = BlockFormat::Q3_K;
                let d = rd_f16(b, f.d);
                for (s, &sc) in q3_k_scales(b).iter().enumerate() {
                    let scale = d * sc as f32;
                    sp(scale, -f.zero as f32 * scale);
                    (16 * s..16 * s + 16).for_each(|e| p.push((q3_k_quant(b, e) + f.zero) as u32));
                }
            }
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
                let f = BlockFormat::expect(w.ty);
                let table = f.table.expect("a table format");
                let d = rd_f16(b, f.d);
                for s in 0..f.len / 32 {
                    let scale = if w.ty == GgmlType::IQ4_XS {
                        d * iq4_xs_scale(b, s) as f32
                    } else {
                        d
                    };
                    sp(scale, -128.0 * scale);
                    let qs = &b[f.qs + 16 * s..f.qs + 16 * s + 16];
                    let level = |q: u8| (table[q as usize] as i32 + 128) as u32;
                    qs.iter().for_each(|&q| p.push(level(q & 0x0F)));
                    qs.iter().for_each(|&q| p.push(level(q >> 4)));
                }
            }
            _ => return Err(QuantError::Unsupported(w.ty)),
        }
    }
    debug_assert_eq!(p.n, n);
    Ok(Repacked {
        kind,
        group,
        rows: w.rows,
        cols: w.cols,
        codes: p.codes,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};

    #[test]
    fn every_type_repacks_bit_exactly() {
        let (rows, cols) = (6, 512);
        let mut seed = 99u64;
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                // A few large values so that scales and mins vary a lot between groups.
                if i % 97 == 0 { r * 40.0 } else { r }
            })
            .collect();
        for ty in GgmlType::SUPPORTED {
            // The formats without a round-to-nearest quantizer: random blocks, every code.
            let q = if crate::quant::tests::NO_RTN.contains(&ty) {
                crate::quant::tests::random_blocks(ty, rows * cols / ty.block_len(), 5)
            } else {
                quantize(ty, &x).unwrap()
            };
            let mut want = vec![0f32; rows * cols];
            dequantize(ty, &q, &mut want).unwrap();
            let r = repack(QMatRef {
                ty,
                rows,
                cols,
                data: &q,
            })
            .unwrap();
            let (kind, group) = device_layout(ty).unwrap();
            assert_eq!((r.kind, r.group), (kind, group), "{ty}");
            assert_eq!(
                r.codes.len(),
                (rows * cols).div_ceil(kind.per_word()),
                "{ty}"
            );
            for e in 0..rows * cols {
                let (got, want) = (r.value(e), want[e]);
                // Bit for bit, except the sign of zero: d·(q − 8) with d < 0 and q = 8 is −0,
                // scale·q + offset is +0.
                let same = got.to_bits() == want.to_bits() || (got == 0.0 && want == 0.0);
                assert!(same, "{ty} element {e}: {got:e} vs {want:e}");
            }
        }
    }

    #[test]
    fn unsupported_type_is_an_error() {
        let data = vec![0u8; 66];
        let w = QMatRef {
            ty: GgmlType::IQ2_XXS,
            rows: 1,
            cols: 256,
            data: &data,
        };
        assert!(matches!(
            repack(w),
            Err(QuantError::Unsupported(GgmlType::IQ2_XXS))
        ));
    }
}
