//! Quantize → dequantize within RMSE budgets; the fast row dequantizer matches the reference.

use super::*;

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
    // The round-to-nearest reference quantizers (the others' are ggml's searches).
    for ty in GgmlType::SUPPORTED
        .into_iter()
        .filter(|t| !NO_RTN.contains(t))
    {
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
    let (rows, cols) = (5, 512);
    for ty in GgmlType::SUPPORTED {
        let (q, full) = make_matrix(ty, rows, cols, 3);
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
