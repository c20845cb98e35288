//! llama.cpp numerics: activation quantizers, exact block dots, batch bit-identity, the group
//! layout.

use super::*;
use crate::quant::kernels::{ActKind, GROUP, QAct, round_half_away};
use crate::quant::reference::rd_f16;

// ---------------------------------------------------------------------------------------------
// llama.cpp numerics: activation quantizers and exact block dots

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
    let a = QAct::quantize(crate::quant::blocks::BlockFormat::expect(ty).act, x, cols);
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
                    let p = sc
                        * (crate::quant::kernels::q6_k_quant(blk, e) as i64 - 32)
                        * xq(256 * i + e);
                    isum += p;
                    iabs += p.abs();
                }
                let d = xr.d[i] as f64 * rd_f16(blk, 208) as f64;
                val += d * isum as f64;
                mag += (d * iabs as f64).abs();
            }
        }
        GgmlType::Q2_K => {
            // scales[16] | qs[64] | d | dmin; element 128n + 32j + l is bits 2j of
            // qs[32n + l], in sub-block e / 16.
            for (i, blk) in w.chunks_exact(84).enumerate() {
                let (mut isum, mut iabs, mut msum, mut mabs) = (0i64, 0i64, 0i64, 0i64);
                for e in 0..256 {
                    let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
                    let q = ((blk[16 + 32 * n + l] >> (2 * j)) & 3) as i64;
                    let p = (blk[e / 16] & 15) as i64 * q * xq(256 * i + e);
                    isum += p;
                    iabs += p.abs();
                }
                for sb in 0..16 {
                    let t = (blk[sb] >> 4) as i64 * xr.bs16[16 * i + sb] as i64;
                    msum += t;
                    mabs += t.abs();
                }
                let d = xr.d[i] as f64 * rd_f16(blk, 80) as f64;
                let dmin = xr.d[i] as f64 * rd_f16(blk, 82) as f64;
                val += d * isum as f64 - dmin * msum as f64;
                mag += (d * iabs as f64).abs() + (dmin * mabs as f64).abs();
            }
        }
        GgmlType::Q3_K => {
            // hmask[32] | qs[64] | scales[12] | d. The scales unpacked as ggml does, four at a
            // time in u32s.
            for (i, blk) in w.chunks_exact(110).enumerate() {
                let a =
                    |k: usize| u32::from_le_bytes(blk[96 + 4 * k..100 + 4 * k].try_into().unwrap());
                let (m2, m4) = (0x0303_0303u32, 0x0F0F_0F0Fu32);
                let words = [
                    (a(0) & m4) | ((a(2) & m2) << 4),
                    (a(1) & m4) | (((a(2) >> 2) & m2) << 4),
                    ((a(0) >> 4) & m4) | (((a(2) >> 4) & m2) << 4),
                    ((a(1) >> 4) & m4) | (((a(2) >> 6) & m2) << 4),
                ];
                let sc: Vec<i64> = words
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .map(|v| v as i64 - 32)
                    .collect();
                let (mut isum, mut iabs) = (0i64, 0i64);
                for e in 0..256 {
                    let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
                    let lo = ((blk[32 + 32 * n + l] >> (2 * j)) & 3) as i64;
                    let hi = (blk[l] >> (4 * n + j)) & 1;
                    let q = lo - if hi == 1 { 0 } else { 4 };
                    let p = sc[e / 16] * q * xq(256 * i + e);
                    isum += p;
                    iabs += p.abs();
                }
                let d = xr.d[i] as f64 * rd_f16(blk, 108) as f64;
                val += d * isum as f64;
                mag += (d * iabs as f64).abs();
            }
        }
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
            const KV: [i64; 16] = [
                -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
            ];
            // Sub-block s (32 elements) of a block: its 16 quant bytes, its integer scale,
            // the f32 factor d_w·d_x.
            let subs: Vec<(&[u8], i64, f64)> = if ty == GgmlType::IQ4_NL {
                w.chunks_exact(18)
                    .enumerate()
                    .map(|(b, blk)| (&blk[2..18], 1, rd_f16(blk, 0) as f64 * xr.d[b] as f64))
                    .collect()
            } else {
                w.chunks_exact(136)
                    .enumerate()
                    .flat_map(|(i, blk)| {
                        let h = u16::from_le_bytes([blk[2], blk[3]]) as i64;
                        let dd = rd_f16(blk, 0) as f64 * xr.d[i] as f64;
                        (0..8).map(move |s| {
                            let lo = ((blk[4 + s / 2] >> (4 * (s % 2))) & 15) as i64;
                            let ls = lo | (((h >> (2 * s)) & 3) << 4);
                            (&blk[8 + 16 * s..24 + 16 * s], ls - 32, dd)
                        })
                    })
                    .collect()
            };
            for (s, &(qs, sc, dd)) in subs.iter().enumerate() {
                let (mut isum, mut iabs) = (0i64, 0i64);
                for j in 0..32 {
                    let q = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
                    let p = sc * KV[q as usize] * xq(32 * s + j);
                    isum += p;
                    iabs += p.abs();
                }
                val += dd * isum as f64;
                mag += (dd * iabs as f64).abs();
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
        let a = crate::quant::kernels::quantize_block_q8_0(&x, &mut q1);
        // SAFETY: AVX2 was detected above.
        let b = unsafe { crate::quant::kernels::quantize_block_q8_0_avx2(&x, &mut q2) };
        assert_eq!(q1, q2, "case {t}");
        assert_eq!(
            (a.0.to_bits(), a.1.to_bits(), a.2),
            (b.0.to_bits(), b.1.to_bits(), b.2),
            "case {t}"
        );
    }
}
