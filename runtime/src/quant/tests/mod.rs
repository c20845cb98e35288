//! Tests for the quant module, by concern: `layout` (the type table, hand-built blocks),
//! `round_trip` (quantize → dequantize budgets), `matmul` (every ISA this CPU runs against an
//! f64 reference, SIMD/portable agreement, threading, ISA coverage) and `numerics` (llama.cpp's
//! activation quantizers and exact block dots, batch bit-identity, the group layout). Shared
//! helpers live here.

mod layout;
mod matmul;
mod numerics;
mod round_trip;

use super::reference::{pack_scale_min_k4, scale_min_k4};
use super::*;

/// Tiny xorshift64* generator (no rand crate).
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Roughly normal (sum of 4 uniforms), unit-ish variance, with a per-call scale.
    fn normalish(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * 0.866
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normalish() * scale).collect()
    }
}

fn f16b(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// The formats without a round-to-nearest reference quantizer ([`quantize`] refuses them):
/// their test matrices are random valid blocks ([`random_blocks`]).
pub(in crate::quant) const NO_RTN: [GgmlType; 4] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// `n` random blocks of `ty` (one of [`NO_RTN`]), built from bytes: every quant, scale and
/// table index uniform over its whole range, the f16 super-scales sized so that values are
/// ≈ 0.05 in magnitude, of either sign, with an all-zero scale now and then. Weights of every
/// code the format can hold, which a quantizer run on smooth data may never produce.
pub(in crate::quant) fn random_blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let bb = ty.block_bytes();
    let mut out = vec![0u8; n * bb];
    // The largest |code × sub-scale| of each format: Q2_K 3·15, Q3_K 4·32, IQ4_NL 127,
    // IQ4_XS 127·32.
    let span = match ty {
        GgmlType::Q2_K => 45.0,
        GgmlType::Q3_K => 128.0,
        GgmlType::IQ4_NL => 127.0,
        GgmlType::IQ4_XS => 4064.0,
        _ => unreachable!("{ty} has a reference quantizer"),
    };
    for (k, b) in out.chunks_exact_mut(bb).enumerate() {
        for v in b.iter_mut() {
            *v = rng.next_u64() as u8;
        }
        let mut scale = |zero_every: usize| {
            let mag = 0.1 / span * (0.25 + rng.uniform().abs()) as f64;
            let sign = if rng.next_u64().is_multiple_of(5) {
                -1.0
            } else {
                1.0
            };
            if k % zero_every == zero_every - 1 {
                0.0
            } else {
                (sign * mag) as f32
            }
        };
        let (d, m) = (scale(13), scale(11));
        let f = crate::quant::blocks::BlockFormat::expect(ty);
        b[f.d..f.d + 2].copy_from_slice(&f16b(d));
        if let Some(o) = f.m {
            b[o..o + 2].copy_from_slice(&f16b(m));
        }
    }
    out
}

fn make_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    if NO_RTN.contains(&ty) {
        let q = random_blocks(ty, rows * cols / ty.block_len(), seed);
        let mut deq = vec![0f32; rows * cols];
        dequantize(ty, &q, &mut deq).unwrap();
        return (q, deq);
    }
    let mut rng = Rng::new(seed);
    let mut w = rng.vec(rows * cols, 0.05);
    // A few rows with an offset so the min/offset terms matter.
    for (r, row) in w.chunks_mut(cols).enumerate() {
        if r % 3 == 1 {
            row.iter_mut().for_each(|v| *v += 0.03);
        }
    }
    let q = quantize(ty, &w).unwrap();
    let mut deq = vec![0f32; rows * cols];
    dequantize(ty, &q, &mut deq).unwrap();
    (q, deq)
}

/// The f64 reference matmul of the op-check table.
use crate::opcheck::matmul_f64 as reference_matmul;

fn norms(v: &[f32], n: usize) -> Vec<f64> {
    v.chunks(n)
        .map(|c| c.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt())
        .collect()
}
