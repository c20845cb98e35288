//! `parity.*`: the quantized matmul of every type on every ISA against the portable kernel,
//! against exact math on what the kernels multiply, and against f64 on the float activations.

use ember_runtime::kv::f16;
use ember_runtime::opcheck::{f64s, matmul_f64, nmse, randn};
use ember_runtime::quant::{self, GgmlType, Isa, QMatRef};
use ember_runtime::sample::Rng;

use super::fault::{Fault, FaultMode, bf16_round, is_float, perturb_scale};
use super::report::Check;
use super::{FAULT_ENV, PARITY_EXACT_NMSE, PARITY_ISA_NMSE, PARITY_REF_NMSE, pool};

/// What the quantized kernels multiply a weight of `ty` by: the activations `x` (m × cols)
/// quantized as ggml does (Q8_0/Q8_1 per 32, Q8_K per 256), dequantized; for float weights,
/// `x` rounded to the weight's precision. Also, for Q8_1 (Q4_1/Q5_1 weights), each block's
/// `s = f16(d·Σq)` minus the exact `d·Σq`: the kernel adds `m·s` for the weight block's min m.
pub(super) fn kernel_activations(ty: GgmlType, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut a = vec![0f64; x.len()];
    let mut s_err = vec![];
    match ty {
        GgmlType::F32 => a.iter_mut().zip(x).for_each(|(o, &v)| *o = v as f64),
        GgmlType::F16 => a
            .iter_mut()
            .zip(x)
            .for_each(|(o, &v)| *o = f16::from_f32(v).to_f32() as f64),
        GgmlType::BF16 => a
            .iter_mut()
            .zip(x)
            .for_each(|(o, &v)| *o = bf16_round(v) as f64),
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::IQ4_XS => {
            // quantize_row_q8_K_ref: the signed value of largest magnitude maps to -127.
            for (xb, ab) in x.chunks_exact(256).zip(a.chunks_exact_mut(256)) {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in xb {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    continue;
                }
                let iscale = -127.0 / max;
                let d = 1.0 / iscale;
                for (o, &v) in ab.iter_mut().zip(xb) {
                    let q = (iscale * v).round_ties_even().min(127.0);
                    *o = d as f64 * q as f64;
                }
            }
        }
        _ => {
            // quantize_row_q8_0_ref / q8_1_ref: d = amax/127 stored as f16, q = roundf(x/d).
            let q8_1 = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
            for (xb, ab) in x.chunks_exact(32).zip(a.chunks_exact_mut(32)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let dh = f16::from_f32(d).to_f32() as f64;
                let mut sum = 0i32;
                for (o, &v) in ab.iter_mut().zip(xb) {
                    let q = (v * id).round();
                    sum += q as i32;
                    *o = dh * q as f64;
                }
                if q8_1 {
                    let s = f16::from_f32(d * sum as f32).to_f32() as f64;
                    s_err.push(s - dh * sum as f64);
                }
            }
        }
    }
    (a, s_err)
}

/// Exact (f64) `y = x · Wᵀ` on what the kernels multiply ([`kernel_activations`]), for the
/// dequantized weights `wd` (`rows × cols`, from the clean bytes `q`).
fn exact_matmul(
    ty: GgmlType,
    q: &[u8],
    wd: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
) -> Vec<f64> {
    let (a, s_err) = kernel_activations(ty, x);
    let rb = ty.row_bytes(cols).expect("block-aligned");
    let mut y = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            let mut acc: f64 = (0..cols)
                .map(|k| wd[r * cols + k] as f64 * a[i * cols + k])
                .sum();
            if !s_err.is_empty() {
                // Q4_1/Q5_1: each block holds d then m (f16); the kernel's m·s term.
                let bb = ty.block_bytes();
                for b in 0..cols / 32 {
                    let o = r * rb + b * bb + 2;
                    let mw = f16::from_le_bytes([q[o], q[o + 1]]).to_f32() as f64;
                    acc += mw * s_err[i * cols / 32 + b];
                }
            }
            y[i * rows + r] = acc;
        }
    }
    y
}

/// One activation case of a parity weight: `m` rows of activations `x`, f64 math on them
/// (`float_ref`), and exact math on what the kernels multiply (`exact`).
struct ActCase {
    m: usize,
    x: Vec<f32>,
    float_ref: Vec<f64>,
    exact: Vec<f64>,
}

/// One type's parity weight (`rows × cols`), clean and with the injected scale fault, and its
/// activation cases: m = 1 (decode) and m = 17 (tiles, and the gemm path of float weights).
struct ParityWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    q: Vec<u8>,
    perturbed: Vec<u8>,
    cases: Vec<ActCase>,
}

impl ParityWeight {
    /// The `ti`-th type's weight and activations, drawn from its own seed.
    fn new(ti: usize, ty: GgmlType, rows: usize, cols: usize) -> ParityWeight {
        let mut rng = Rng::new(0xA11CE + ti as u64);
        let mut w = randn(&mut rng, rows * cols, 0.05);
        for (r, row) in w.chunks_mut(cols).enumerate() {
            if r % 3 == 1 {
                row.iter_mut().for_each(|v| *v += 0.03);
            }
        }
        let q = quant::quantize(ty, &w).expect("block-aligned");
        let mut wd = vec![0f32; rows * cols];
        quant::dequantize(ty, &q, &mut wd).expect("dequantize");
        let cases = [1usize, 17]
            .into_iter()
            .map(|m| {
                let mut x = randn(&mut rng, m * cols, 1.0);
                if m > 1 {
                    x[cols..2 * cols].iter_mut().for_each(|v| *v += 2.0);
                }
                let float_ref = matmul_f64(&wd, rows, cols, &x, m);
                let exact = exact_matmul(ty, &q, &wd, rows, cols, &x, m);
                ActCase {
                    m,
                    x,
                    float_ref,
                    exact,
                }
            })
            .collect();
        let perturbed = perturb_scale(ty, &q, cols);
        ParityWeight {
            ty,
            rows,
            cols,
            q,
            perturbed,
            cases,
        }
    }

    /// Every case's output of `isa`'s kernel, with the fault `injected` where one is.
    fn run(
        &self,
        pool: &rayon::ThreadPool,
        isa: Isa,
        injected: Option<FaultMode>,
    ) -> Vec<Vec<f64>> {
        let data: &[u8] = if injected == Some(FaultMode::Scale) {
            &self.perturbed
        } else {
            &self.q
        };
        let wm = QMatRef {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data,
        };
        self.cases
            .iter()
            .map(|c| {
                let mut y = vec![f32::NAN; c.m * self.rows];
                pool.install(|| quant::matmul_with(isa, wm, &c.x, c.m, &mut y));
                if injected == Some(FaultMode::Output) {
                    // A kernel that gets every third output wrong.
                    y.iter_mut().step_by(3).for_each(|v| *v = -*v + 0.25);
                }
                f64s(&y)
            })
            .collect()
    }
}

/// The worst NMSE over the cases.
fn worst<W: AsRef<[f64]>>(got: &[Vec<f64>], want: impl IntoIterator<Item = W>) -> f64 {
    got.iter()
        .zip(want)
        .map(|(y, w)| nmse(y, w.as_ref()))
        .fold(0f64, f64::max)
}

pub(super) fn check_parity(threads: usize, fault: Option<Fault>, out: &mut Vec<Check>) {
    let pool = pool(threads);
    let (rows, cols) = (64usize, 512usize);
    let isas = quant::available_isas();
    for (ti, ty) in GgmlType::SUPPORTED.into_iter().enumerate() {
        let pw = ParityWeight::new(ti, ty, rows, cols);
        // Float weights: one f32 code path (dots, gemm for m > 16) whatever the ISA, so one
        // row, run on the best ISA; quantized weights: one row per ISA, and the clean
        // portable kernel is the baseline the others must match.
        let rows_isas: Vec<Option<Isa>> = if is_float(ty) {
            vec![None]
        } else {
            isas.iter().copied().map(Some).collect()
        };
        let portable = (!is_float(ty)).then(|| pw.run(&pool, Isa::Portable, None));
        for isa in rows_isas {
            let injected = fault.filter(|f| f.ty == ty && f.isa == isa).map(|f| f.mode);
            let got = match (isa, &portable) {
                (Some(Isa::Portable), Some(p)) if injected.is_none() => p.clone(),
                _ => pw.run(&pool, isa.unwrap_or_else(quant::best_isa), injected),
            };
            let vs_port = match (isa, &portable) {
                (Some(i), Some(p)) if i != Isa::Portable => Some(worst(&got, p)),
                _ => None,
            };
            out.push(parity_row(&pw, isa, injected, &got, vs_port));
        }
    }
}

/// The `parity.<TYPE>[.<isa>]` row of one kernel's outputs `got`, `vs_port` its NMSE against
/// the portable kernel.
fn parity_row(
    pw: &ParityWeight,
    isa: Option<Isa>,
    injected: Option<FaultMode>,
    got: &[Vec<f64>],
    vs_port: Option<f64>,
) -> Check {
    let (ty, rows, cols) = (pw.ty, pw.rows, pw.cols);
    let vs_exact = worst(got, pw.cases.iter().map(|c| &c.exact));
    let vs_ref = worst(got, pw.cases.iter().map(|c| &c.float_ref));
    let mut pass = vs_exact <= PARITY_EXACT_NMSE && vs_ref <= PARITY_REF_NMSE;
    let mut msg = String::new();
    if let Some(p) = vs_port {
        pass &= p <= PARITY_ISA_NMSE;
        msg += &format!("NMSE vs portable {p:.2e} (budget {PARITY_ISA_NMSE:.0e}), ");
    }
    msg += &format!(
        "vs exact math on the kernel's inputs {vs_exact:.2e} (budget {PARITY_EXACT_NMSE:.0e}), vs f64 on float activations {vs_ref:.2e} (budget {PARITY_REF_NMSE:.0e}); {rows}x{cols}, m=1 and 17"
    );
    let isa_name = match isa {
        Some(i) => i.name().to_string(),
        None => format!("every ISA (run on {})", quant::best_isa().name()),
    };
    if is_float(ty) {
        msg += &format!("; {isa_name}: float weights have no per-ISA kernels");
    }
    if !pass {
        msg = format!(
            "{} matmul on {isa_name} disagrees with the reference: {msg}",
            ty.name()
        );
    }
    if let Some(mode) = injected {
        msg += &format!(
            " [fault injected on purpose by {FAULT_ENV}: {}]",
            match mode {
                FaultMode::Scale =>
                    "one block scale of the weights this kernel reads is off by 2^-8",
                FaultMode::Output => "every third output negated",
            }
        );
    }
    let name = match isa {
        Some(i) => format!("parity.{}.{}", ty.name(), i.name()),
        None => format!("parity.{}", ty.name()),
    };
    Check::new(name, pass, Some(vs_port.unwrap_or(vs_exact)), "nmse", msg)
}
