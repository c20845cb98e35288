//! Tests for the quant module: layouts (hand-built blocks), round trips, matmul vs an f64
//! reference on every ISA this CPU runs, SIMD/portable agreement, threading determinism.

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

// ---------------------------------------------------------------------------------------------
// Type table

#[test]
fn type_ids_names_and_sizes() {
    for t in GgmlType::ALL {
        assert_eq!(GgmlType::from_u32(t.id()), Some(t), "{t}");
    }
    for bad in [4u32, 5, 31, 32, 33, 36, 37, 38, 40, 1000] {
        assert_eq!(GgmlType::from_u32(bad), None, "id {bad}");
    }
    let expect: &[(GgmlType, u32, &str, usize, usize)] = &[
        (GgmlType::F32, 0, "F32", 1, 4),
        (GgmlType::F16, 1, "F16", 1, 2),
        (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
        (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
        (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
        (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
        (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
        (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
        (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
        (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
        (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
        (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
        (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
        (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
        (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
        (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
        (GgmlType::BF16, 30, "BF16", 1, 2),
        (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    ];
    for &(t, id, name, bl, bb) in expect {
        assert_eq!(
            (t.id(), t.name(), t.block_len(), t.block_bytes()),
            (id, name, bl, bb)
        );
    }
    assert_eq!(GgmlType::Q4_K.row_bytes(896), None);
    assert_eq!(GgmlType::Q4_K.row_bytes(1024), Some(4 * 144));
    assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(18 * 20));
    assert_eq!(GgmlType::F16.row_bytes(7), Some(14));
    assert_eq!(
        GgmlType::SUPPORTED
            .iter()
            .filter(|t| t.is_supported())
            .count(),
        11
    );
    assert!(!GgmlType::Q2_K.is_supported() && !GgmlType::Q8_1.is_supported());
}

#[test]
fn errors_are_reported() {
    let mut out = vec![0f32; 32];
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out),
        Err(QuantError::BadSrcLen {
            expected: 18,
            got: 17,
            ..
        })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q4_K, &[0u8; 144], &mut out),
        Err(QuantError::NotBlockMultiple { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q2_K, &[0u8; 84], &mut vec![0f32; 256]),
        Err(QuantError::Unsupported(GgmlType::Q2_K))
    ));
    assert!(matches!(
        quantize(GgmlType::Q8_0, &[0.0; 33]),
        Err(QuantError::NotBlockMultiple { .. })
    ));
    assert!(matches!(
        quantize(GgmlType::IQ2_XXS, &[0.0; 256]),
        Err(QuantError::Unsupported(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Hand-built blocks -> exact values

fn deq(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let mut y = vec![0f32; ty.block_len() * b.len() / ty.block_bytes()];
    dequantize(ty, b, &mut y).unwrap();
    y
}

#[test]
fn layout_float_types() {
    let mut b = Vec::new();
    b.extend_from_slice(&1.5f32.to_le_bytes());
    b.extend_from_slice(&(-2.25f32).to_le_bytes());
    assert_eq!(deq(GgmlType::F32, &b), vec![1.5, -2.25]);
    assert_eq!(
        deq(GgmlType::F16, &[0x00, 0x3E, 0x00, 0xC0]),
        vec![1.5, -2.0]
    );
    // bf16 is the top half of an f32: 0x3FC0 = 1.5, 0xC010 = -2.25.
    assert_eq!(
        deq(GgmlType::BF16, &[0xC0, 0x3F, 0x10, 0xC0]),
        vec![1.5, -2.25]
    );
}

#[test]
fn layout_q4_0_and_q4_1() {
    // Low nibble of qs[j] is element j, high nibble is element j + 16.
    let mut b = vec![0u8; 18];
    b[..2].copy_from_slice(&f16b(0.5));
    for j in 0..16 {
        b[2 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(y[j + 16], 0.5 * ((15 - j) as f32 - 8.0));
    }
    let mut b = vec![0u8; 20];
    b[..2].copy_from_slice(&f16b(2.0));
    b[2..4].copy_from_slice(&f16b(-1.0));
    for j in 0..16 {
        b[4 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], 2.0 * j as f32 - 1.0);
        assert_eq!(y[j + 16], 2.0 * (15 - j) as f32 - 1.0);
    }
}

#[test]
fn layout_q5_0_and_q5_1() {
    // qh is a little-endian u32 after the scale(s); bit i is bit 4 of element i.
    let qh: u32 = 0x8000_0001 | 0x0001_0000 | 0x0000_0100;
    let mut b = vec![0u8; 22];
    b[..2].copy_from_slice(&f16b(1.0));
    b[2..6].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        b[6 + j] = j as u8 | ((j as u8) << 4);
    }
    let y = deq(GgmlType::Q5_0, &b);
    let expect = |i: usize| {
        let hi = if [0, 8, 16, 31].contains(&i) {
            16.0
        } else {
            0.0
        };
        (i % 16) as f32 + hi - 16.0
    };
    for i in 0..32 {
        assert_eq!(y[i], expect(i), "Q5_0 element {i}");
    }
    let qh: u32 = 0xAAAA_AAAA;
    let mut b = vec![0u8; 24];
    b[..2].copy_from_slice(&f16b(0.5));
    b[2..4].copy_from_slice(&f16b(1.0));
    b[4..8].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        b[8 + j] = j as u8 | ((15 - j as u8) << 4);
    }
    let y = deq(GgmlType::Q5_1, &b);
    for i in 0..32 {
        let lo = if i < 16 { i } else { 15 - (i - 16) } as f32;
        let hi = if i % 2 == 1 { 16.0 } else { 0.0 };
        assert_eq!(y[i], 0.5 * (lo + hi) + 1.0, "Q5_1 element {i}");
    }
}

#[test]
fn layout_q8_0() {
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&f16b(0.25));
    for j in 0..32 {
        b[2 + j] = (j as i8 - 16) as u8;
    }
    b[2 + 31] = 0x80; // -128
    let y = deq(GgmlType::Q8_0, &b);
    for j in 0..31 {
        assert_eq!(y[j], 0.25 * (j as f32 - 16.0));
    }
    assert_eq!(y[31], -32.0);
}

const K_SC: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 63];
const K_MN: [u8; 8] = [0, 1, 2, 3, 40, 50, 60, 63];
/// `K_SC`/`K_MN` packed by hand: bytes 0..4 = sc[0..4] | (sc[4..8] >> 4) << 6,
/// bytes 4..8 = mn[0..4] | (mn[4..8] >> 4) << 6, bytes 8..12 = sc[4..8] & 15 | (mn[4..8] & 15) << 4.
const K_SCALES: [u8; 12] = [1, 2, 3, 196, 128, 193, 194, 195, 133, 38, 199, 255];

#[test]
fn layout_k_scale_packing() {
    assert_eq!(pack_scale_min_k4(&K_SC, &K_MN), K_SCALES);
    for s in 0..8 {
        assert_eq!(scale_min_k4(s, &K_SCALES), (K_SC[s], K_MN[s]));
    }
}

#[test]
fn layout_q4_k() {
    let mut b = vec![0u8; 144];
    b[..2].copy_from_slice(&f16b(1.0));
    b[2..4].copy_from_slice(&f16b(0.5));
    b[4..16].copy_from_slice(&K_SCALES);
    for i in 0..128 {
        let l = (i % 16) as u8;
        b[16 + i] = l | ((15 - l) << 4);
    }
    let y = deq(GgmlType::Q4_K, &b);
    for c in 0..4 {
        for l in 0..32 {
            let q = (l % 16) as f32;
            let (s1, s2) = (2 * c, 2 * c + 1);
            assert_eq!(y[64 * c + l], K_SC[s1] as f32 * q - 0.5 * K_MN[s1] as f32);
            assert_eq!(
                y[64 * c + 32 + l],
                K_SC[s2] as f32 * (15.0 - q) - 0.5 * K_MN[s2] as f32
            );
        }
    }
}

#[test]
fn layout_q5_k() {
    let mut b = vec![0u8; 176];
    b[..2].copy_from_slice(&f16b(1.0));
    b[2..4].copy_from_slice(&f16b(0.5));
    b[4..16].copy_from_slice(&K_SCALES);
    for l in 0..32 {
        b[16 + l] = (l as u8) | if l == 3 { 0xC0 } else { 0 }; // qh[l]: bit s = sub-block s
    }
    for i in 0..128 {
        b[48 + i] = 0x21; // low nibble 1, high nibble 2
    }
    let y = deq(GgmlType::Q5_K, &b);
    for s in 0..8 {
        for l in 0..32 {
            let lo = if s % 2 == 0 { 1.0 } else { 2.0 };
            let bit = if s < 5 {
                (l >> s) & 1
            } else if l == 3 && s >= 6 {
                1
            } else {
                0
            };
            let q = lo + 16.0 * bit as f32;
            assert_eq!(
                y[32 * s + l],
                K_SC[s] as f32 * q - 0.5 * K_MN[s] as f32,
                "el {s},{l}"
            );
        }
    }
}

#[test]
fn layout_q6_k() {
    let mut b = vec![0u8; 210];
    let sc: Vec<i8> = (0..16)
        .map(|s| (s as i8 + 1) * if s % 2 == 1 { -1 } else { 1 })
        .collect();
    for s in 0..16 {
        b[192 + s] = sc[s] as u8;
    }
    b[208..210].copy_from_slice(&f16b(0.5));
    b[0] = 0x21; // el 0 low bits 1, el 64 low bits 2
    b[32 + 5] = 0x43; // el 37 low bits 3, el 101 low bits 4
    b[128 + 5] = 0b11_10_01_00; // qh: el 5 +0, el 37 +16, el 69 +32, el 101 +48
    b[64] = 0x0F; // second half: el 128 low bits 15
    b[128 + 32] = 0x03; // el 128 +48
    let y = deq(GgmlType::Q6_K, &b);
    let mut expect: Vec<f32> = (0..256).map(|e| 0.5 * sc[e / 16] as f32 * -32.0).collect();
    for (e, q) in [
        (0, 1),
        (64, 2),
        (5, 0),
        (37, 19),
        (69, 32),
        (101, 52),
        (128, 63),
    ] {
        expect[e] = 0.5 * sc[e / 16] as f32 * (q as f32 - 32.0);
    }
    assert_eq!(y, expect);
    assert_eq!(y[101], 70.0);
    assert_eq!(y[128], 139.5);
}

// ---------------------------------------------------------------------------------------------
// Round trips

// Relative RMSE budgets (error RMS / data RMS) for round-to-nearest quantization of roughly
// normal data in blocks. A b-bit uniform quantizer over a block's range R has RMSE ≈
// R / (2^b − 1) / √12; for 32 normal samples R ≈ 4σ, so 4-bit ≈ 0.077σ, 5-bit ≈ 0.037σ,
// 6-bit ≈ 0.018σ (per-16 scales shrink R), 8-bit ≈ 0.009σ (absmax, half the levels per side).
// Absmax (symmetric) formats waste part of the range; K-quants add 6-bit scale rounding.
// Budgets are ≈1.5× what the reference quantizer measures on this data.
const F32_RMSE_BUDGET: f64 = 0.0;
const F16_RMSE_BUDGET: f64 = 3.5e-4; // 11-bit mantissa: ≤ 2^-11 relative per element
const BF16_RMSE_BUDGET: f64 = 2.5e-3; // 8-bit mantissa: ≤ 2^-8 relative per element
const Q4_0_RMSE_BUDGET: f64 = 0.12;
const Q4_1_RMSE_BUDGET: f64 = 0.11;
const Q5_0_RMSE_BUDGET: f64 = 0.065;
const Q5_1_RMSE_BUDGET: f64 = 0.05;
const Q8_0_RMSE_BUDGET: f64 = 0.008;
const Q4_K_RMSE_BUDGET: f64 = 0.11;
const Q5_K_RMSE_BUDGET: f64 = 0.055;
const Q6_K_RMSE_BUDGET: f64 = 0.027;

fn rmse_budget(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::F32 => F32_RMSE_BUDGET,
        GgmlType::F16 => F16_RMSE_BUDGET,
        GgmlType::BF16 => BF16_RMSE_BUDGET,
        GgmlType::Q4_0 => Q4_0_RMSE_BUDGET,
        GgmlType::Q4_1 => Q4_1_RMSE_BUDGET,
        GgmlType::Q5_0 => Q5_0_RMSE_BUDGET,
        GgmlType::Q5_1 => Q5_1_RMSE_BUDGET,
        GgmlType::Q8_0 => Q8_0_RMSE_BUDGET,
        GgmlType::Q4_K => Q4_K_RMSE_BUDGET,
        GgmlType::Q5_K => Q5_K_RMSE_BUDGET,
        GgmlType::Q6_K => Q6_K_RMSE_BUDGET,
        _ => unreachable!(),
    }
}

#[test]
fn round_trip_within_budget() {
    let mut rng = Rng::new(7);
    let n = 256 * 64;
    // Vary the scale per 256-element span so blocks see different magnitudes, plus some
    // exact zeros (an all-zero block must survive).
    let mut x = Vec::with_capacity(n);
    for s in 0..n / 256 {
        let scale = 0.01 * (1 + s % 7) as f32;
        x.extend(rng.vec(256, scale));
    }
    x[512..768].fill(0.0);
    for ty in GgmlType::SUPPORTED {
        let q = quantize(ty, &x).unwrap();
        assert_eq!(q.len(), ty.row_bytes(n).unwrap());
        let mut y = vec![f32::NAN; n];
        dequantize(ty, &q, &mut y).unwrap();
        assert!(
            y[512..768].iter().all(|&v| v == 0.0),
            "{ty}: zero block not preserved"
        );
        // Error relative to the local (per 256) RMS so small-scale spans count equally.
        let mut se = 0f64;
        for (xs, ys) in x.chunks(256).zip(y.chunks(256)) {
            let r = rms(xs);
            if r == 0.0 {
                continue;
            }
            let e: f64 = xs
                .iter()
                .zip(ys)
                .map(|(&a, &b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            se += e / 256.0 / (r * r);
        }
        let rel = (se / (n / 256 - 1) as f64).sqrt();
        eprintln!(
            "round trip {ty}: relative RMSE {rel:.5} (budget {})",
            rmse_budget(ty)
        );
        assert!(
            rel <= rmse_budget(ty),
            "{ty}: relative RMSE {rel} > {}",
            rmse_budget(ty)
        );
    }
}

#[test]
fn dequantize_row_matches_reference() {
    let mut rng = Rng::new(3);
    let (rows, cols) = (5, 512);
    let x = rng.vec(rows * cols, 1.0);
    for ty in GgmlType::SUPPORTED {
        let q = quantize(ty, &x).unwrap();
        let mut full = vec![0f32; rows * cols];
        dequantize(ty, &q, &mut full).unwrap();
        let w = QMatRef {
            ty,
            rows,
            cols,
            data: &q,
        };
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            dequantize_row(w, r, &mut row);
            assert_eq!(row, full[r * cols..(r + 1) * cols], "{ty} row {r}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// matmul

/// matmul error budget against exact math on the dequantized weights, relative to ‖w_r‖·‖x_i‖
/// per output element. The activation is quantized to 8 bits per block of 32 (absmax/127 step ⇒
/// per-element error ≈ 0.6% of σ_x for normal data; blocks of 256 for K-quants, ≈ 1.3× that),
/// independent across elements, so a dot's error is ≈ 0.006·‖w‖·‖x‖/√cols ≈ 3e-4 at
/// cols = 512; the max over a few thousand outputs is ≤ 4σ. F16/BF16 round the activations
/// (≤ 2^-9 relative per element) and F32 is exact f32: far below this.
const MATMUL_ELEM_BUDGET: f64 = 2e-3;
/// K-quants multiply against Q8_K: one scale per 256 activations, so a spike (the 40.0 below)
/// coarsens 8× as many elements as with 32-blocks: with the spike, step 40/127 ⇒ error RMS
/// ≈ 0.09 per element over its 256-block, ≈ 1e-3·‖w‖·‖x‖ for that row (‖x‖ ≈ 64); 4σ ⇒ 4e-3.
const MATMUL_ELEM_BUDGET_Q8K: f64 = 6e-3;
/// Aggregate budget: ‖y − y_ref‖ / ‖y_ref‖. Random rows make |y| ≈ ‖w‖‖x‖/√cols, so the 8-bit
/// activation error above is ≈ 0.6% of |y| on average; budget 2%.
const MATMUL_REL_BUDGET: f64 = 2e-2;
/// Portable vs SIMD: both run identical integer block dots on identical quantized activations;
/// only f32 accumulation order differs (≈ cols/32 terms ⇒ ~1e-6 relative).
const AGREE_BUDGET: f64 = 1e-5;

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

fn reference_matmul(wd: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            y[i * rows + r] = (0..cols)
                .map(|k| wd[r * cols + k] as f64 * x[i * cols + k] as f64)
                .sum();
        }
    }
    y
}

fn norms(v: &[f32], n: usize) -> Vec<f64> {
    v.chunks(n)
        .map(|c| c.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt())
        .collect()
}

fn check_matmul(isa: Isa, ty: GgmlType, rows: usize, cols: usize, m: usize, seed: u64) {
    let (q, wd) = make_matrix(ty, rows, cols, seed);
    let mut rng = Rng::new(seed ^ 0xABCD);
    let mut x = rng.vec(m * cols, 1.0);
    // One activation row with a large offset and one with a spike exercise the block sums.
    if m > 1 {
        x[cols..2 * cols].iter_mut().for_each(|v| *v += 2.0);
        x[cols + 7] = 40.0;
    }
    let w = QMatRef {
        ty,
        rows,
        cols,
        data: &q,
    };
    let mut y = vec![f32::NAN; m * rows];
    matmul_with(isa, w, &x, m, &mut y);
    let yr = reference_matmul(&wd, rows, cols, &x, m);
    let (wn, xn) = (norms(&wd, cols), norms(&x, cols));
    let (mut worst, mut se, mut sr) = (0f64, 0f64, 0f64);
    for i in 0..m {
        for r in 0..rows {
            let e = (y[i * rows + r] as f64 - yr[i * rows + r]).abs();
            worst = worst.max(e / (wn[r] * xn[i]).max(1e-30));
            se += e * e;
            sr += yr[i * rows + r].powi(2);
        }
    }
    let rel = (se / sr).sqrt();
    let elem_budget = if ty.block_len() == 256 {
        MATMUL_ELEM_BUDGET_Q8K
    } else {
        MATMUL_ELEM_BUDGET
    };
    assert!(
        worst <= elem_budget && rel <= MATMUL_REL_BUDGET,
        "{isa:?} {ty} {rows}x{cols} m={m}: elem {worst:.2e} (budget {elem_budget}), \
         rel {rel:.2e} (budget {MATMUL_REL_BUDGET})"
    );
}

#[test]
fn matmul_every_isa_type_and_m() {
    for isa in available_isas() {
        for ty in GgmlType::SUPPORTED {
            for m in [1, 3, 16, 17, 64, 300] {
                check_matmul(isa, ty, 37, 512, m, 11 + m as u64);
            }
        }
    }
}

#[test]
fn matmul_float_odd_cols() {
    for isa in available_isas() {
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            for m in [1, 2, 17] {
                check_matmul(isa, ty, 13, 77, m, 5);
            }
        }
    }
}

#[test]
fn matmul_single_block_and_single_row() {
    for isa in available_isas() {
        for ty in GgmlType::SUPPORTED {
            let cols = ty.block_len().max(32);
            check_matmul(isa, ty, 1, cols, 1, 99);
            check_matmul(isa, ty, 3, cols, 2, 98);
        }
    }
}

#[test]
fn simd_agrees_with_portable() {
    let (rows, cols) = (29, 1024);
    for ty in GgmlType::SUPPORTED {
        let (q, wd) = make_matrix(ty, rows, cols, 21);
        let w = QMatRef {
            ty,
            rows,
            cols,
            data: &q,
        };
        for m in [1, 4] {
            let x = Rng::new(5 + m as u64).vec(m * cols, 1.0);
            let mut yp = vec![0f32; m * rows];
            matmul_with(Isa::Portable, w, &x, m, &mut yp);
            let (wn, xn) = (norms(&wd, cols), norms(&x, cols));
            for isa in available_isas() {
                let mut ys = vec![0f32; m * rows];
                matmul_with(isa, w, &x, m, &mut ys);
                for i in 0..m {
                    for r in 0..rows {
                        let e = (ys[i * rows + r] - yp[i * rows + r]).abs() as f64;
                        let tol = AGREE_BUDGET * wn[r] * xn[i];
                        assert!(e <= tol, "{isa:?} {ty} m={m} ({i},{r}): {e:e} > {tol:e}");
                    }
                }
            }
        }
    }
}

#[test]
fn threaded_matches_single_thread() {
    // Big enough to take the parallel paths (dot and gemm); results must be bit-identical
    // because each output element is computed by exactly one task in the same order.
    let (rows, cols) = (301, 1024);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for ty in [GgmlType::Q4_1, GgmlType::Q6_K, GgmlType::F16] {
        let (q, _) = make_matrix(ty, rows, cols, 8);
        let w = QMatRef {
            ty,
            rows,
            cols,
            data: &q,
        };
        for m in [1, 5, 33] {
            let x = Rng::new(m as u64).vec(m * cols, 1.0);
            let mut y1 = vec![0f32; m * rows];
            let mut y2 = vec![0f32; m * rows];
            one.install(|| matmul(w, &x, m, &mut y1));
            two.install(|| matmul(w, &x, m, &mut y2));
            assert_eq!(y1, y2, "{ty} m={m}");
        }
    }
}

/// The kernel tests run on every ISA in `available_isas()`. This one makes sure that set is all
/// the CPU has: if detection missed an ISA that /proc/cpuinfo advertises, its kernels would
/// silently go untested on this runner. It prints the ISAs the other tests ran on
/// (`cargo test -p ember-runtime isa_coverage -- --nocapture`; CI does).
#[test]
fn isa_coverage_is_everything_the_cpu_advertises() {
    let have = available_isas();
    eprintln!(
        "kernel tests ran on these ISAs: {}",
        have.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
    );
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        eprintln!("no /proc/cpuinfo: cannot cross-check the detected ISAs");
        return;
    };
    // The first processor's flags ("flags" on x86, "Features" on ARM).
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &[&str]| f.iter().all(|x| flags.contains(x));
    #[allow(unused_mut)]
    let mut want: Vec<Isa> = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if has(&["avx2", "fma", "f16c"]) {
            want.push(Isa::Avx2);
        }
        if has(&[
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
        ]) {
            want.push(Isa::Avx512);
        }
    }
    #[cfg(target_arch = "aarch64")]
    if has(&["asimd"]) {
        want.push(Isa::Neon);
    }
    let _ = has;
    for isa in &want {
        assert!(
            have.contains(isa),
            "/proc/cpuinfo advertises {} but available_isas() is {have:?}: its kernels are not tested here",
            isa.name()
        );
    }
}

#[test]
fn best_isa_is_available() {
    assert!(best_isa().is_available());
    assert!(available_isas().contains(&Isa::Portable));
    assert!(available_isas().contains(&best_isa()));
}

#[test]
#[should_panic]
fn matmul_rejects_bad_shapes() {
    let q = quantize(GgmlType::Q8_0, &[0.0; 64]).unwrap();
    let w = QMatRef {
        ty: GgmlType::Q8_0,
        rows: 2,
        cols: 32,
        data: &q,
    };
    let mut y = vec![0f32; 2];
    matmul(w, &[0.0; 31], 1, &mut y);
}

// ---------------------------------------------------------------------------------------------
// llama.cpp numerics: activation quantizers and exact block dots

use super::kernels::{ActKind, GROUP, QAct, round_half_away};
use super::reference::rd_f16;

#[test]
fn q8_0_and_q8_1_activation_quantizer() {
    let mut x = [0f32; 64];
    // Block 0: amax 63.5 ⇒ d = 0.5, id = 2; roundf rounds halves away from zero.
    x[0] = 63.5;
    x[1] = 0.25; // 0.5 -> 1
    x[2] = -0.25; // -0.5 -> -1
    x[3] = 0.75; // 1.5 -> 2
    x[4] = 0.2; // 0.4 -> 0
    // Block 1: amax 1 ⇒ d = 1/127, not representable in f16: the stored scale is f16(d).
    x[32] = -1.0;
    x[33] = 0.5;
    for kind in [ActKind::Q8_0, ActKind::Q8_1] {
        let a = QAct::quantize(kind, &x, 64);
        assert_eq!(&a.qs[..5], &[127, 1, -1, 2, 0]);
        assert!(a.qs[5..32].iter().all(|&q| q == 0));
        assert_eq!(a.d[0], 0.5);
        assert_eq!(a.sum32[0], 129);
        let d1 = 1.0f32 / 127.0;
        assert_eq!(a.d[1], half::f16::from_f32(d1).to_f32());
        assert_ne!(a.d[1], d1);
        assert_eq!(&a.qs[32..34], &[-127, (0.5f32 * (1.0 / d1)).round() as i8]);
        assert_eq!(a.qs[33], 64); // 63.5 -> 64 (away from zero)
        if kind == ActKind::Q8_1 {
            // s = f16(d_f32 · Σq), with the f32 (not f16-rounded) d.
            assert_eq!(a.s[0], 64.5);
            assert_eq!(
                a.s[1],
                half::f16::from_f32(d1 * (-127 + 64) as f32).to_f32()
            );
        } else {
            assert!(a.s.is_empty());
        }
    }
}

#[test]
fn q8_k_activation_quantizer() {
    let mut x = vec![0f32; 3 * 256];
    // Block 0: positive max (127) ⇒ iscale = −1, d = −1; ties round to even.
    x[0] = 10.0;
    x[3] = 127.0;
    x[7] = -127.0; // same magnitude, later: not the max
    x[20] = 2.5; // -2.5 -> -2
    x[21] = 3.5; // -3.5 -> -4
    x[22] = -0.5; // 0.5 -> 0
    x[255] = 1.5; // -1.5 -> -2
    // Block 1: all zero. Block 2: negative max (−64) ⇒ iscale = 127/64, d = 64/127.
    x[512] = -64.0;
    x[513] = 32.0; // 63.5 -> 64 (even)
    x[514] = 16.0; // 31.75 -> 32
    x[530] = -0.25; // -0.496 -> 0
    let a = QAct::quantize(ActKind::Q8_K, &x, 768);
    assert_eq!(a.d[0], -1.0);
    let q0 = &a.qs[..256];
    assert_eq!(
        (q0[0], q0[3], q0[7], q0[20], q0[21], q0[22], q0[255]),
        (-10, -127, 127, -2, -4, 0, -2)
    );
    let mut bs0 = [0i16; 16];
    bs0[0] = -10;
    bs0[1] = -6;
    bs0[15] = -2;
    assert_eq!(&a.bs16[..16], &bs0);
    assert_eq!(a.sum32[0], -16);
    assert_eq!(a.d[1], 0.0);
    assert!(a.qs[256..512].iter().all(|&q| q == 0) && a.bs16[16..32].iter().all(|&b| b == 0));
    let iscale = -127.0f32 / -64.0;
    assert_eq!(a.d[2], 1.0 / iscale);
    assert!(a.d[2] > 0.0);
    let q2 = &a.qs[512..768];
    assert_eq!((q2[0], q2[1], q2[2], q2[18]), (-127, 64, 32, 0));
    assert_eq!(a.bs16[32], -127 + 64 + 32);
    assert_eq!(a.bs16[33], 0);
}

/// The exact (f64) value llama.cpp's integer block dots compute for one weight row against one
/// activation row quantized to the weight's vec_dot_type, and the sum of the magnitudes of the
/// terms (the scale of f32 summation-order error).
fn exact_q_dot(ty: GgmlType, w: &[u8], x: &[f32]) -> (f64, f64) {
    let cols = x.len();
    let a = QAct::quantize(ActKind::for_weight(ty), x, cols);
    let xr = a.row(0);
    let xq = |k: usize| xr.qs[k] as i64;
    let (mut val, mut mag) = (0f64, 0f64);
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            let bb = ty.block_bytes();
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let q: Vec<i64> = match ty {
                    GgmlType::Q8_0 => blk[2..34].iter().map(|&v| v as i8 as i64).collect(),
                    _ => {
                        let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
                        let q5 = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
                        let qh_off = if min { 4 } else { 2 };
                        let qs = &blk[qh_off + if q5 { 4 } else { 0 }..];
                        let qh = u32::from_le_bytes(blk[qh_off..qh_off + 4].try_into().unwrap());
                        let off = if min {
                            0
                        } else if q5 {
                            16
                        } else {
                            8
                        };
                        (0..32)
                            .map(|j| {
                                let nib = if j < 16 {
                                    qs[j] & 0x0F
                                } else {
                                    qs[j - 16] >> 4
                                } as i64;
                                let hb = if q5 { ((qh >> j) & 1) as i64 * 16 } else { 0 };
                                nib + hb - off
                            })
                            .collect()
                    }
                };
                let isum: i64 = (0..32).map(|j| q[j] * xq(32 * b + j)).sum();
                let iabs: i64 = (0..32).map(|j| (q[j] * xq(32 * b + j)).abs()).sum();
                let dd = rd_f16(blk, 0) as f64 * xr.d[b] as f64;
                val += dd * isum as f64;
                mag += (dd * iabs as f64).abs();
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                    let t = rd_f16(blk, 2) as f64 * xr.s[b] as f64;
                    val += t;
                    mag += t.abs();
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let q5 = ty == GgmlType::Q5_K;
            for (i, blk) in w.chunks_exact(ty.block_bytes()).enumerate() {
                let qs = &blk[if q5 { 48 } else { 16 }..];
                let (mut isum, mut iabs, mut msum, mut mabs) = (0i64, 0i64, 0i64, 0i64);
                for s in 0..8 {
                    let (sc, mn) = scale_min_k4(s, &blk[4..16]);
                    for l in 0..32 {
                        let mut q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F;
                        if q5 {
                            q |= ((blk[16 + l] >> s) & 1) << 4;
                        }
                        let p = sc as i64 * q as i64 * xq(256 * i + 32 * s + l);
                        isum += p;
                        iabs += p.abs();
                    }
                    let bs = xr.bs16[16 * i + 2 * s] as i64 + xr.bs16[16 * i + 2 * s + 1] as i64;
                    msum += mn as i64 * bs;
                    mabs += (mn as i64 * bs).abs();
                }
                let d = xr.d[i] as f64 * rd_f16(blk, 0) as f64;
                let dmin = xr.d[i] as f64 * rd_f16(blk, 2) as f64;
                val += d * isum as f64 - dmin * msum as f64;
                mag += (d * iabs as f64).abs() + (dmin * mabs as f64).abs();
            }
        }
        GgmlType::Q6_K => {
            for (i, blk) in w.chunks_exact(210).enumerate() {
                let (mut isum, mut iabs) = (0i64, 0i64);
                for e in 0..256 {
                    let sc = blk[192 + e / 16] as i8 as i64;
                    let p = sc * (super::kernels::q6_k_quant(blk, e) as i64 - 32) * xq(256 * i + e);
                    isum += p;
                    iabs += p.abs();
                }
                let d = xr.d[i] as f64 * rd_f16(blk, 208) as f64;
                val += d * isum as f64;
                mag += (d * iabs as f64).abs();
            }
        }
        _ => unreachable!(),
    }
    (val, mag)
}

/// Float weights: activations rounded to the weight's precision, exact products.
fn exact_float_dot(ty: GgmlType, w: &[u8], x: &[f32]) -> (f64, f64) {
    let mut wd = vec![0f32; x.len()];
    dequantize(ty, w, &mut wd).unwrap();
    let (mut val, mut mag) = (0f64, 0f64);
    for (&a, &b) in wd.iter().zip(x) {
        let b = match ty {
            GgmlType::F16 => half::f16::from_f32(b).to_f32(),
            GgmlType::BF16 => half::bf16::from_f32(b).to_f32(),
            _ => b,
        };
        let p = a as f64 * b as f64;
        val += p;
        mag += p.abs();
    }
    (val, mag)
}

/// Only f32 summation order may differ from the exact block-dot math: ≈ (a few dozen terms) ×
/// 2^-24 of the summed magnitudes.
const NUMERICS_BUDGET: f64 = 1e-5;

#[test]
fn matmul_reproduces_llama_cpp_numerics() {
    let rows = 37;
    for ty in GgmlType::SUPPORTED {
        // 17 blocks for the 32-block formats (exercises the non-multiple-of-8 tails).
        let cols = if ty.block_len() == 256 { 512 } else { 544 };
        let (q, _) = make_matrix(ty, rows, cols, 77);
        let w = QMatRef {
            ty,
            rows,
            cols,
            data: &q,
        };
        let rb = w.row_bytes();
        for m in [1, 3, 16, 17, 64, 300] {
            let mut rng = Rng::new(1000 + m as u64);
            let mut x = rng.vec(m * cols, 1.0);
            if m > 1 {
                x[cols..2 * cols].iter_mut().for_each(|v| *v += 2.0);
                x[cols + 7] = -40.0;
                x[cols + 300] = 0.0;
            }
            if m > 2 {
                x[2 * cols..3 * cols].fill(0.0); // all-zero activation blocks (d = 0)
            }
            let exact: Vec<(f64, f64)> = (0..m)
                .flat_map(|i| {
                    let xi = &x[i * cols..(i + 1) * cols];
                    let q = &q;
                    (0..rows).map(move |r| {
                        let wr = &q[r * rb..(r + 1) * rb];
                        if ty.block_len() == 1 {
                            exact_float_dot(ty, wr, xi)
                        } else {
                            exact_q_dot(ty, wr, xi)
                        }
                    })
                })
                .collect();
            for isa in available_isas() {
                let mut y = vec![f32::NAN; m * rows];
                matmul_with(isa, w, &x, m, &mut y);
                for i in 0..m {
                    for r in 0..rows {
                        let (v, mag) = exact[i * rows + r];
                        let e = (y[i * rows + r] as f64 - v).abs();
                        assert!(
                            e <= NUMERICS_BUDGET * mag + 1e-30,
                            "{isa:?} {ty} m={m} ({i},{r}): got {} want {v} (err {e:e}, scale {mag:e})",
                            y[i * rows + r]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn batched_rows_equal_rows_alone_bit_for_bit() {
    // Continuous batching multiplies several sequences' activations in one call; each output row
    // must be exactly what that sequence alone (m = 1) gives, whatever tile the kernels put it
    // in, or batched greedy decoding could drift from decoding alone. Odd column counts leave a
    // tail after the last whole group of 8 blocks (18, 28 and 21 blocks of 32).
    for (rows, cols) in [(37usize, 576usize), (21, 896), (11, 672), (9, 1024)] {
        for ty in GgmlType::SUPPORTED {
            if !cols.is_multiple_of(ty.block_len()) {
                continue;
            }
            let (q, _) = make_matrix(ty, rows, cols, 31);
            let w = QMatRef {
                ty,
                rows,
                cols,
                data: &q,
            };
            for isa in available_isas() {
                for m in [2, 5, 8, 9, 13] {
                    let x = Rng::new(77 + m as u64).vec(m * cols, 1.0);
                    let mut y = vec![0f32; m * rows];
                    matmul_with(isa, w, &x, m, &mut y);
                    for i in 0..m {
                        let mut yi = vec![0f32; rows];
                        matmul_with(isa, w, &x[i * cols..(i + 1) * cols], 1, &mut yi);
                        assert!(
                            yi.iter()
                                .zip(&y[i * rows..(i + 1) * rows])
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} {ty} {rows}x{cols}: row {i} of m={m} differs from m=1"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn round_half_away_matches_roundf() {
    let mut rng = Rng::new(4242);
    let mut vals: Vec<f32> = rng.vec(100_000, 130.0);
    for i in -260..=260 {
        let h = i as f32 * 0.5;
        vals.extend([
            h,
            f32::from_bits(h.to_bits() + 1),
            f32::from_bits(h.to_bits().wrapping_sub(1)),
        ]);
    }
    vals.extend([
        0.0,
        -0.0,
        0.49999997,
        -0.49999997,
        127.0,
        -127.0,
        126.5,
        -126.5,
    ]);
    for v in vals {
        assert_eq!(round_half_away(v), v.round() as i32, "{v:e}");
    }
}

#[test]
fn group_layout_is_the_dword_transpose_of_each_group_then_pairs() {
    // 2 rows of 21 blocks: groups of 8 and 8, then pair slots {16, 17}, {18, 19} and {20, 0}
    // (a lone block with zeros), group-major over the 2 rows.
    let (nb, ng) = (21, 5);
    let cols = nb * 32;
    let x = Rng::new(9).vec(2 * cols, 3.0);
    for kind in [ActKind::Q8_0, ActKind::Q8_1] {
        let a = QAct::quantize(kind, &x, cols);
        for i in 0..2 {
            let r = a.row(i);
            assert_eq!(r.gm, 2);
            assert_eq!(r.gq.len(), (ng * 2 - i) * 256);
            let s = |b: usize| if kind == ActKind::Q8_1 { r.s[b] } else { 0.0 };
            for g in 0..ng {
                let slot = &r.gq[256 * g * r.gm..256 * g * r.gm + 256];
                let lane = |j: usize| GROUP * g * r.gm + j;
                if g < 2 {
                    for j in 0..GROUP {
                        let b = GROUP * g + j;
                        for k in 0..8 {
                            for e in 0..4 {
                                let want = r.qs[32 * b + 4 * k + e];
                                assert_eq!(
                                    slot[32 * k + 4 * j + e],
                                    want,
                                    "{kind:?} row {i} block {b} k {k}"
                                );
                            }
                        }
                        let l = lane(j);
                        assert_eq!((r.gd[l], r.gs[l], r.gsum[l]), (r.d[b], s(b), r.sum32[b]));
                    }
                    continue;
                }
                // Pair slot: [A 0..16 | B 0..16], [A 16..32 | B 16..32], then zeros.
                for h in 0..2 {
                    let b = 16 + 2 * (g - 2) + h;
                    for e in 0..32 {
                        let at = 32 * (e / 16) + 16 * h + e % 16;
                        let want = if b < nb { r.qs[32 * b + e] } else { 0 };
                        assert_eq!(slot[at], want, "{kind:?} row {i} pair block {b} e {e}");
                    }
                    let (d, sv, sum) = if b < nb {
                        (r.d[b], s(b), r.sum32[b])
                    } else {
                        (0.0, 0.0, 0)
                    };
                    for j in 0..4 {
                        let l = lane(4 * h + j);
                        assert_eq!(r.gd[l], d);
                        let lead = j == 0;
                        assert_eq!(
                            (r.gs[l], r.gsum[l]),
                            if lead { (sv, sum) } else { (0.0, 0) }
                        );
                    }
                }
                assert!(slot[64..].iter().all(|&v| v == 0));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn q8_0_block_avx2_is_bit_exact() {
    if !std::arch::is_x86_feature_detected!("avx2") || !std::arch::is_x86_feature_detected!("f16c")
    {
        // isa_coverage_is_everything_the_cpu_advertises makes sure this is a real absence.
        eprintln!("skipped: this CPU has no AVX2+F16C");
        return;
    }
    let mut rng = Rng::new(99);
    for t in 0..2000 {
        let scale = [1e-6f32, 0.01, 1.0, 37.0, 1e4][t % 5];
        let mut x: [f32; 32] = rng.vec(32, scale).try_into().unwrap();
        if t % 7 == 0 {
            x = [0.0; 32]; // d = 0
        }
        if t % 11 == 0 {
            x[t % 32] = 0.5 * scale; // exact halves after scaling happen with amax = 127·k
            x[(t + 1) % 32] = 127.0 * scale;
        }
        let (mut q1, mut q2) = ([0i8; 32], [0i8; 32]);
        let a = super::kernels::quantize_block_q8_0(&x, &mut q1);
        // SAFETY: AVX2 was detected above.
        let b = unsafe { super::kernels::quantize_block_q8_0_avx2(&x, &mut q2) };
        assert_eq!(q1, q2, "case {t}");
        assert_eq!(
            (a.0.to_bits(), a.1.to_bits(), a.2),
            (b.0.to_bits(), b.1.to_bits(), b.2),
            "case {t}"
        );
    }
}
