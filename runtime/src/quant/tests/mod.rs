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

fn make_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
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
