//! matmul on every ISA this CPU runs against an f64 reference, SIMD/portable agreement,
//! threading determinism and ISA coverage.

use super::*;

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
/// The same for zero-mean weights against Q8_K ([`NO_RTN`]'s random blocks of Q3_K and
/// IQ4_XS; the quantized matrices above carry a +0.03 offset on every third row, which adds a
/// large mean term to |y_ref| for the +2.0-offset activation row). There the spike row
/// dominates: its 256-block has step 40/127, error RMS 0.09 per element over 256 elements, a
/// dot error ≈ 1.5·w_rms against |y| ≈ w_rms·√(cols·5) (36·w_rms at cols = 256): ≈ 4% for
/// that row and ≈ 3.7% in aggregate over m = 2 at one block (2.7% at cols = 512); 6%.
const MATMUL_REL_BUDGET_ZERO_MEAN_Q8K: f64 = 6e-2;
/// Portable vs SIMD: both run identical integer block dots on identical quantized activations;
/// only f32 accumulation order differs (≈ cols/32 terms ⇒ ~1e-6 relative).
const AGREE_BUDGET: f64 = 1e-5;

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
    let elem_budget = if ty.block_len() == 256 {
        MATMUL_ELEM_BUDGET_Q8K
    } else {
        MATMUL_ELEM_BUDGET
    };
    // The budgets above hold from a few hundred columns on. For short rows, and for the spike
    // row whose one coarse block is the whole row, the activation rounding itself sets the
    // scale: element j is rounded with its block's step amax/127, an error uniform over ±step/2,
    // so the dot's error RMS is ≈ ‖w‖·√(Σ_j step_j²/12 / cols) (random w); relative to
    // ‖w‖·‖x‖, 5σ of that (e.g. 4e-3 for a 32-column normal row, 1.1e-2 for the 32-column
    // spike row).
    let row_budget: Vec<f64> = (0..m)
        .map(|i| {
            if ty.block_len() == 1 {
                return elem_budget;
            }
            let ab = if ty.block_len() == 256 { 256 } else { 32 };
            let xi = &x[i * cols..(i + 1) * cols];
            let var: f64 = xi
                .chunks(ab)
                .map(|b| {
                    let step = b.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                    step * step / 12.0 * b.len() as f64
                })
                .sum();
            elem_budget.max(5.0 * (var / cols as f64).sqrt() / xn[i])
        })
        .collect();
    let (mut worst, mut worst_budget, mut se, mut sr) = (0f64, elem_budget, 0f64, 0f64);
    for i in 0..m {
        for r in 0..rows {
            let e = (y[i * rows + r] as f64 - yr[i * rows + r]).abs();
            let rel_e = e / (wn[r] * xn[i]).max(1e-30);
            if rel_e / row_budget[i] > worst / worst_budget {
                (worst, worst_budget) = (rel_e, row_budget[i]);
            }
            se += e * e;
            sr += yr[i * rows + r].powi(2);
        }
    }
    let rel = (se / sr).sqrt();
    let rel_budget = if NO_RTN.contains(&ty) && ty.block_len() == 256 {
        MATMUL_REL_BUDGET_ZERO_MEAN_Q8K
    } else {
        MATMUL_REL_BUDGET
    };
    assert!(
        worst <= worst_budget && rel <= rel_budget,
        "{isa:?} {ty} {rows}x{cols} m={m}: elem {worst:.2e} (budget {worst_budget:.2e}), \
         rel {rel:.2e} (budget {rel_budget})"
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
fn isa_names_parse_back() {
    for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon] {
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
        assert_eq!(Isa::from_name(&isa.name().to_uppercase()), Some(isa));
    }
    assert_eq!(Isa::from_name("sse2"), None);
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
