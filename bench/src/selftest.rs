//! `ember selftest`: is this device healthy, and what can it do?
//!
//! Every check is one row (name, pass/fail, figure, unit, message), in this order:
//!
//! * `backends`: the CPU ISAs this CPU runs and the GPU backends compiled in (none yet);
//! * `roundtrip.<TYPE>`: quantize → dequantize every block format, NMSE within a budget;
//! * `parity.<TYPE>.<isa>`: the quantized matmul of every type on every available ISA against
//!   the portable kernel and against an f64 reference on the dequantized weights;
//! * `op.rmsnorm`, `op.rope`, `op.softmax`, `op.attention`: the dense ops against naive f64 code;
//! * `golden.*`: exact-token greedy decode of the embedded default model;
//! * `mmap`: the weights stay file-backed pages of the mapping, not a second (anonymous) copy;
//! * `memory.bandwidth`, `matmul.f32`, `matmul.q4_k`: what the machine does;
//! * `bench.pp`, `bench.tg`: a short llama-bench style run of the model in use;
//! * `roofline.decode`, `roofline.prefill`: the limits the bandwidth and FLOP/s put on the model,
//!   next to the achieved tokens/s and the fraction reached.
//!
//! Test-only fault injection: `EMBER_SELFTEST_FAULT=q4_k` (or `q4_k:avx2`) corrupts the output of
//! that type's matmul on the best (or the named) ISA inside the parity check, so the check must
//! fail; nothing outside the self-test is affected.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use ember_runtime::kv::f16;
use ember_runtime::engine::{Engine, EngineConfig, GenerateRequest};
use ember_runtime::ops::{self, AttnShape, Rope, RopeStyle};
use ember_runtime::quant::{self, GgmlType, Isa, QMatRef};
use ember_runtime::sample::{Rng, SamplerConfig};

use crate::llamabench::{Test, run_test};
use crate::profile::DeviceProfile;
use crate::record::{Provenance, RunResult, WorkloadInfo};
use crate::store::{RunId, SelfTestRow, Store, StoreError};

/// The environment variable of the test-only fault injection.
pub const FAULT_ENV: &str = "EMBER_SELFTEST_FAULT";

/// Greedy decodes of the embedded model that every correct backend and ISA reproduces exactly:
/// (name, prompt, expected token ids). The model "counts": each letter or digit is followed by
/// the next one.
pub const GOLDEN: [(&str, &str, &[u32]); 2] = [
    (
        "golden.hello",
        "hello",
        &[112, 113, 114, 115, 116, 117, 118, 119, 120, 121],
    ), // "pqrstuvwxy"
    (
        "golden.digits",
        "Route 66 to 7",
        &[56, 57, 48, 49, 50, 51, 52, 53],
    ), // "89012345"
];

/// NMSE budget, portable vs SIMD kernel: identical integer block dots on identical quantized
/// activations, only the f32 accumulation order differs (relative error ~1e-6, so NMSE ~1e-12).
pub const PARITY_ISA_NMSE: f64 = 1e-10;
/// NMSE budget against f64 math on the dequantized weights: the activation row is quantized to
/// 8 bits per block (relative error ≈ 0.6% of |y|), budget (2%)² as in the runtime's kernel tests.
pub const PARITY_REF_NMSE: f64 = 4e-4;

/// Round-trip NMSE budgets (error power / signal power per 256-span), the squares of the
/// runtime's relative-RMSE budgets (`runtime/src/quant/tests.rs`: ≈1.5× what the reference
/// quantizer measures on normal data; b-bit blocks give ≈ range/(2^b−1)/√12).
pub fn roundtrip_budget(ty: GgmlType) -> f64 {
    let rel_rmse: f64 = match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 3.5e-4,
        GgmlType::BF16 => 2.5e-3,
        GgmlType::Q4_0 => 0.12,
        GgmlType::Q4_1 => 0.11,
        GgmlType::Q5_0 => 0.065,
        GgmlType::Q5_1 => 0.05,
        GgmlType::Q8_0 => 0.008,
        GgmlType::Q4_K => 0.11,
        GgmlType::Q5_K => 0.055,
        GgmlType::Q6_K => 0.027,
        _ => 0.0,
    };
    rel_rmse * rel_rmse
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub figure: Option<f64>,
    pub unit: Option<String>,
    pub message: String,
}

impl Check {
    fn new(
        name: impl Into<String>,
        pass: bool,
        figure: Option<f64>,
        unit: &str,
        message: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            pass,
            figure: figure.filter(|f| f.is_finite()),
            unit: if unit.is_empty() {
                None
            } else {
                Some(unit.to_string())
            },
            message: message.into(),
        }
    }

    pub fn to_row(&self) -> SelfTestRow {
        SelfTestRow {
            check_name: self.name.clone(),
            pass: self.pass,
            figure: self.figure,
            unit: self.unit.clone(),
            message: self.message.clone(),
        }
    }
}

/// What to run the self-test on.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// GGUF for the model-dependent checks (mmap, bench, roofline); `None`: the embedded model.
    pub model: Option<PathBuf>,
    /// Worker threads (default: the profile's, else all cores).
    pub threads: Option<usize>,
    pub profile: Option<DeviceProfile>,
    /// Fault injection, normally from [`FAULT_ENV`].
    pub fault: Option<String>,
    /// Directory for the embedded model (default: `embedded::default_dir()`).
    pub cache_dir: Option<PathBuf>,
    /// Bytes read per pass of the bandwidth check (default 256 MiB).
    pub bandwidth_bytes: Option<usize>,
}

/// The outcome of a whole self-test.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub provenance: Provenance,
    pub model_path: String,
    pub threads: usize,
    pub device_profile: Option<String>,
    pub started_at: String,
    pub elapsed_s: f64,
    pub fault_injected: Option<String>,
    /// The profile's cost per hour, stored with the run.
    #[serde(skip)]
    pub profile_cost: Option<f64>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }
    pub fn failed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.pass).collect()
    }

    /// Fixed-width text table.
    pub fn to_table(&self) -> String {
        let w = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!(
            "{:<w$}  {:<4}  {:>12}  {:<8}  message\n",
            "check", "", "figure", "unit"
        );
        for c in &self.checks {
            let fig = match c.figure {
                Some(f) if f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e6) => format!("{f:.3e}"),
                Some(f) => format!("{f:.4}"),
                None => "-".into(),
            };
            s += &format!(
                "{:<w$}  {:<4}  {fig:>12}  {:<8}  {}\n",
                c.name,
                if c.pass { "ok" } else { "FAIL" },
                c.unit.as_deref().unwrap_or(""),
                c.message
            );
        }
        let nfail = self.failed().len();
        s += &format!(
            "{} checks, {} failed, {:.1} s ({} threads{})\n",
            self.checks.len(),
            nfail,
            self.elapsed_s,
            self.threads,
            self.device_profile
                .as_ref()
                .map(|p| format!(", profile {p}"))
                .unwrap_or_default()
        );
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pass": self.passed(),
            "checks": self.checks,
            "threads": self.threads,
            "device_profile": self.device_profile,
            "model_path": self.model_path,
            "provenance": self.provenance,
            "started_at": self.started_at,
            "elapsed_s": self.elapsed_s,
            "fault_injected": self.fault_injected,
        })
    }

    /// Writes the self-test to a store as a run (workload `selftest`) with one
    /// `selftest_results` row per check.
    pub fn save(&self, store: &mut Store) -> Result<RunId, StoreError> {
        let n_fail = self.failed().len();
        let result = RunResult {
            started_at: self.started_at.clone(),
            provenance: self.provenance.clone(),
            workload: WorkloadInfo {
                name: "selftest".into(),
                seed: 0,
                hash: "selftest-v1".into(),
                load: r#"{"mode":"selftest"}"#.into(),
                params: serde_json::json!({"checks": self.checks.len()}).to_string(),
                n_requests: 0,
                n_warmup: 0,
            },
            slo_name: "none".into(),
            slo: "{}".into(),
            summary_json: serde_json::json!({"selftest": {"pass": self.passed(), "checks": self.checks.len(), "failed": n_fail, "elapsed_s": self.elapsed_s}})
                .to_string(),
            ..Default::default()
        };
        let run = store.begin_run(&result)?;
        let rows: Vec<SelfTestRow> = self.checks.iter().map(Check::to_row).collect();
        store.add_selftest(run, &rows)?;
        if let Some(c) = self.profile_cost {
            store.set_cost_per_hour(run, c)?;
        }
        store.finish_run(run, &result)?;
        Ok(run)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("cannot write the embedded model under {dir}: {source}")]
    Embedded { dir: String, source: std::io::Error },
    #[error("{0}")]
    Open(String),
    #[error("--threads must be at least 1")]
    Threads,
}

/// The parsed fault: a type, and the ISA whose kernel gets corrupted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    pub ty: GgmlType,
    pub isa: Isa,
}

/// `q4_k` or `q4_k:avx2` (case-insensitive). The ISA defaults to the best one available.
pub fn parse_fault(spec: &str) -> Result<Fault, String> {
    let (t, i) = match spec.split_once(':') {
        Some((t, i)) => (t, Some(i)),
        None => (spec, None),
    };
    let ty = GgmlType::SUPPORTED
        .iter()
        .copied()
        .find(|ty| ty.name().eq_ignore_ascii_case(t.trim()))
        .ok_or_else(|| format!("{FAULT_ENV}='{spec}': '{t}' is not a supported block type"))?;
    let isa = match i {
        None => quant::best_isa(),
        Some(i) => quant::available_isas()
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(i.trim()))
            .ok_or_else(|| {
                format!("{FAULT_ENV}='{spec}': ISA '{i}' is not available on this CPU")
            })?,
    };
    Ok(Fault { ty, isa })
}

fn normal(rng: &mut Rng) -> f32 {
    let u1 = rng.next_f64().max(1e-12);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| normal(rng) * std).collect()
}

/// Normalised mean squared error Σ(a−b)² / Σb² (0 when both are zero).
pub fn nmse(got: &[f64], want: &[f64]) -> f64 {
    let (mut e, mut p) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        e += (g - w) * (g - w);
        p += w * w;
    }
    if !got.iter().all(|g| g.is_finite()) {
        return f64::INFINITY;
    }
    if p == 0.0 {
        if e == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        e / p
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

// ------------------------------------------------------------------ checks

fn check_backends(profile: Option<&DeviceProfile>) -> Check {
    let isas = quant::available_isas();
    let names: Vec<&str> = isas.iter().map(|i| i.name()).collect();
    let adapters = ember_runtime::accel::adapters();
    let gpu = if !ember_runtime::accel::GPU_COMPILED {
        "no GPU backend is compiled into this binary (built without the wgpu feature)".to_string()
    } else if adapters.is_empty() {
        "wgpu found no adapter".to_string()
    } else {
        let list: Vec<String> = adapters
            .iter()
            .map(|a| match &a.unusable {
                Some(why) => format!("{a} [unusable: {why}]"),
                None => a.to_string(),
            })
            .collect();
        format!("wgpu adapters: {}", list.join("; "))
    };
    let mut msg = format!(
        "cpu ({}, {}): ISAs {} (kernels use {}); {gpu}",
        std::env::consts::ARCH,
        ember_runtime::sys::cpu_model(),
        names.join(", "),
        quant::best_isa().name()
    );
    let mut pass = isas.contains(&Isa::Portable);
    if let Some(p) = profile {
        msg += &format!("; profile {} prefers [{}]", p.name, p.backends.join(", "));
        let has_api = |api: &str| adapters.iter().any(|a| a.api == api && a.unusable.is_none());
        let first = p.backends.first().map(String::as_str).unwrap_or("cpu");
        let gpu_ok = match first {
            "wgpu-vulkan" => has_api("vulkan"),
            "wgpu-metal" => has_api("metal"),
            "wgpu-dx12" => has_api("dx12"),
            _ => false,
        };
        if first == "cpu" || gpu_ok {
            msg += &format!(": {first} is available");
        } else if !p.backends.iter().any(|b| b == "cpu") {
            msg += ": none of them is available, running on the cpu";
        } else {
            msg += &format!(": no adapter for {first}, falling back to cpu");
        }
        if !p.matches_this_arch() {
            pass = false;
            msg += &format!(
                "; this binary is {} but the profile's target is {}",
                std::env::consts::ARCH,
                p.target_triple
            );
        }
    }
    Check::new("backends", pass, Some(isas.len() as f64), "isas", msg)
}

fn check_roundtrips(out: &mut Vec<Check>) {
    let mut rng = Rng::new(0x5E1F_7E57);
    let n = 256 * 32;
    let mut x = Vec::with_capacity(n);
    for s in 0..n / 256 {
        x.extend(randn(&mut rng, 256, 0.01 * (1 + s % 7) as f32));
    }
    x[512..768].fill(0.0);
    for ty in GgmlType::SUPPORTED {
        let name = format!("roundtrip.{}", ty.name());
        let budget = roundtrip_budget(ty);
        let r = quant::quantize(ty, &x).and_then(|q| {
            let mut y = vec![f32::NAN; n];
            quant::dequantize(ty, &q, &mut y).map(|_| (q.len(), y))
        });
        let (bytes, y) = match r {
            Ok(v) => v,
            Err(e) => {
                out.push(Check::new(name, false, None, "nmse", format!("{e}")));
                continue;
            }
        };
        // Mean over 256-spans of (error power / signal power), so small-scale spans count equally.
        let (mut acc, mut k) = (0f64, 0usize);
        for (xs, ys) in x.chunks(256).zip(y.chunks(256)) {
            let e = nmse(&f64s(ys), &f64s(xs));
            if xs.iter().any(|&v| v != 0.0) {
                acc += e;
                k += 1;
            } else if e != 0.0 {
                acc = f64::INFINITY;
            }
        }
        let e = acc / k as f64;
        let zero_ok = y[512..768].iter().all(|&v| v == 0.0);
        let pass = e <= budget && zero_ok;
        let msg = format!(
            "{n} values -> {bytes} bytes ({:.2} bits/weight); NMSE {e:.2e} (budget {budget:.1e}){}",
            bytes as f64 * 8.0 / n as f64,
            if zero_ok {
                ""
            } else {
                "; an all-zero block did not come back as zeros"
            }
        );
        out.push(Check::new(name, pass, Some(e), "nmse", msg));
    }
}

fn check_parity(threads: usize, fault: Option<Fault>, out: &mut Vec<Check>) {
    let pool = pool(threads);
    let (rows, cols) = (64usize, 512usize);
    let isas = quant::available_isas();
    for (ti, ty) in GgmlType::SUPPORTED.into_iter().enumerate() {
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
        let wm = QMatRef {
            ty,
            rows,
            cols,
            data: &q,
        };
        // m = 1 (decode) and m = 17 (tiles, and the gemm path of float weights).
        let cases: Vec<(usize, Vec<f32>, Vec<f64>)> = [1usize, 17]
            .into_iter()
            .map(|m| {
                let mut x = randn(&mut rng, m * cols, 1.0);
                if m > 1 {
                    x[cols..2 * cols].iter_mut().for_each(|v| *v += 2.0);
                }
                let mut yr = vec![0f64; m * rows];
                for i in 0..m {
                    for r in 0..rows {
                        yr[i * rows + r] = (0..cols)
                            .map(|k| wd[r * cols + k] as f64 * x[i * cols + k] as f64)
                            .sum();
                    }
                }
                (m, x, yr)
            })
            .collect();
        let run = |isa: Isa, corrupt: bool| -> Vec<Vec<f64>> {
            cases
                .iter()
                .map(|(m, x, _)| {
                    let mut y = vec![f32::NAN; m * rows];
                    pool.install(|| quant::matmul_with(isa, wm, x, *m, &mut y));
                    if corrupt {
                        // The injected fault: a kernel that gets every third output wrong.
                        y.iter_mut().step_by(3).for_each(|v| *v = -*v + 0.25);
                    }
                    f64s(&y)
                })
                .collect()
        };
        let portable = run(
            Isa::Portable,
            fault
                == Some(Fault {
                    ty,
                    isa: Isa::Portable,
                }),
        );
        for &isa in &isas {
            let injected = fault == Some(Fault { ty, isa });
            let got = if isa == Isa::Portable {
                portable.clone()
            } else {
                run(isa, injected)
            };
            let vs_ref = cases
                .iter()
                .zip(&got)
                .map(|((_, _, yr), y)| nmse(y, yr))
                .fold(0f64, f64::max);
            let vs_port = if isa == Isa::Portable {
                None
            } else {
                Some(
                    got.iter()
                        .zip(&portable)
                        .map(|(y, p)| nmse(y, p))
                        .fold(0f64, f64::max),
                )
            };
            let mut pass = vs_ref <= PARITY_REF_NMSE;
            let mut msg = String::new();
            if let Some(p) = vs_port {
                pass &= p <= PARITY_ISA_NMSE;
                msg += &format!("NMSE vs portable {p:.2e} (budget {PARITY_ISA_NMSE:.0e}), ");
            }
            msg += &format!(
                "vs f64 reference {vs_ref:.2e} (budget {PARITY_REF_NMSE:.0e}); {rows}x{cols}, m=1 and 17"
            );
            if !pass {
                msg = format!(
                    "{} matmul on {} disagrees with the reference: {msg}",
                    ty.name(),
                    isa.name()
                );
            }
            if injected {
                msg += &format!(" [fault injected on purpose by {FAULT_ENV}]");
            }
            let figure = vs_port.unwrap_or(vs_ref);
            out.push(Check::new(
                format!("parity.{}.{}", ty.name(), isa.name()),
                pass,
                Some(figure),
                "nmse",
                msg,
            ));
        }
    }
}

fn check_ops(threads: usize, out: &mut Vec<Check>) {
    let pool = pool(threads);
    let mut rng = Rng::new(0x0B5);
    let mut push = |name: &str, e: f64, budget: f64, what: &str| {
        out.push(Check::new(
            name,
            e <= budget,
            Some(e),
            "nmse",
            format!("{what}: NMSE {e:.2e} vs naive f64 (budget {budget:.0e})"),
        ));
    };

    // RMSNorm.
    let (n, rows) = (256, 4);
    let x = randn(&mut rng, n * rows, 2.0);
    let g: Vec<f32> = randn(&mut rng, n, 1.0);
    let eps = 1e-5f64;
    let mut y = vec![0f32; n * rows];
    ops::rmsnorm(&x, &g, eps as f32, &mut y);
    let mut want = vec![0f64; n * rows];
    for r in 0..rows {
        let xr = &x[r * n..][..n];
        let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for j in 0..n {
            want[r * n + j] = xr[j] as f64 * inv * g[j] as f64;
        }
    }
    push("op.rmsnorm", nmse(&f64s(&y), &want), 1e-10, "4 rows of 256");

    // RoPE, both styles, head_dim 64, 4 heads, 3 tokens at positions 37..40.
    let (hd, nh, nt, pos0, base) = (64usize, 4usize, 3usize, 37usize, 10000f64);
    let x = randn(&mut rng, nt * nh * hd, 1.0);
    let mut worst = 0f64;
    for style in [RopeStyle::Normal, RopeStyle::Neox] {
        let mut y = x.clone();
        Rope::new(style, hd, hd, base as f32).apply(&mut y, nh, pos0);
        let mut want = vec![0f64; y.len()];
        let half = hd / 2;
        for t in 0..nt {
            for h in 0..nh {
                let o = (t * nh + h) * hd;
                for i in 0..half {
                    let theta = (pos0 + t) as f64 * base.powf(-2.0 * i as f64 / hd as f64);
                    let (c, s) = (theta.cos(), theta.sin());
                    let (ia, ib) = match style {
                        RopeStyle::Normal => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (a, b) = (x[o + ia] as f64, x[o + ib] as f64);
                    want[o + ia] = a * c - b * s;
                    want[o + ib] = a * s + b * c;
                }
            }
        }
        worst = worst.max(nmse(&f64s(&y), &want));
    }
    push(
        "op.rope",
        worst,
        1e-8,
        "normal and neox, head_dim 64, positions 37..40",
    );

    // Softmax.
    let x = randn(&mut rng, 1000, 8.0);
    let mut y = x.clone();
    ops::softmax(&mut y);
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    let want: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp() / z).collect();
    push(
        "op.softmax",
        nmse(&f64s(&y), &want),
        1e-10,
        "1000 logits, sd 8",
    );

    // Causal attention with GQA over a paged history (blocks of 16), 2 new queries.
    let s = AttnShape {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
    };
    let (n_past, n_q, bs) = (40usize, 2usize, 16usize);
    let kvrow = s.n_kv_heads * s.head_dim;
    let qrow = s.n_heads * s.head_dim;
    let total = n_past + n_q;
    let k: Vec<f32> = randn(&mut rng, total * kvrow, 1.0)
        .into_iter()
        .map(ops::round_f16)
        .collect();
    let v: Vec<f32> = randn(&mut rng, total * kvrow, 1.0)
        .into_iter()
        .map(ops::round_f16)
        .collect();
    let q = randn(&mut rng, n_q * qrow, 1.0);
    // The cache stores f16 (exact for these already-rounded values).
    let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let kb: Vec<&[f16]> = k16.chunks(bs * kvrow).collect();
    let vb: Vec<&[f16]> = v16.chunks(bs * kvrow).collect();
    let mut y = vec![0f32; n_q * qrow];
    pool.install(|| ops::attention(&q, &kb, &vb, bs, n_past, s, &mut y));
    let mut want = vec![0f64; n_q * qrow];
    let group = s.n_heads / s.n_kv_heads;
    for t in 0..n_q {
        for h in 0..s.n_heads {
            let kvh = h / group;
            let qh = &q[t * qrow + h * s.head_dim..][..s.head_dim];
            let n = n_past + t + 1;
            let mut sc: Vec<f64> = (0..n)
                .map(|j| {
                    (0..s.head_dim)
                        .map(|d| qh[d] as f64 * k[j * kvrow + kvh * s.head_dim + d] as f64)
                        .sum::<f64>()
                        / (s.head_dim as f64).sqrt()
                })
                .collect();
            let mx = sc.iter().copied().fold(f64::MIN, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            sc.iter_mut().for_each(|x| *x = (*x - mx).exp() / z);
            for d in 0..s.head_dim {
                want[t * qrow + h * s.head_dim + d] = (0..n)
                    .map(|j| sc[j] * v[j * kvrow + kvh * s.head_dim + d] as f64)
                    .sum();
            }
        }
    }
    // The kernel rounds q and the probabilities to f16 (as llama.cpp's f16 KV path): ~1e-7.
    push(
        "op.attention",
        nmse(&f64s(&y), &want),
        1e-5,
        "8 heads / 2 kv heads (GQA), head_dim 64, 40 past + 2 new, paged by 16",
    );
}

fn check_golden(engine: &Engine, out: &mut Vec<Check>) {
    for (name, prompt, want) in GOLDEN {
        let r = engine
            .tokenizer
            .encode(prompt, engine.tokenizer.add_bos_default(), true)
            .map_err(|e| e.to_string())
            .and_then(|toks| {
                let req = GenerateRequest {
                    prompt_tokens: toks,
                    max_tokens: want.len(),
                    sampler: SamplerConfig::greedy(),
                    stop_strings: vec![],
                    top_logprobs: 0,
                    echo: false,
                    ignore_eos: true,
                };
                engine
                    .generate(&req, &mut |_| {})
                    .map_err(|e| e.to_string())
            });
        let want_text = engine.tokenizer.decode(want);
        let c = match r {
            Err(e) => Check::new(
                name,
                false,
                None,
                "tokens",
                format!("prompt {prompt:?}: generation failed: {e}"),
            ),
            Ok(g) => {
                let same = g
                    .generated_tokens
                    .iter()
                    .zip(want.iter())
                    .take_while(|(a, b)| a == b)
                    .count();
                let pass = g.generated_tokens == want;
                let msg = if pass {
                    format!(
                        "prompt {prompt:?} -> {:?}, ids {:?} (exact, greedy, {})",
                        g.text,
                        g.generated_tokens,
                        quant::best_isa().name()
                    )
                } else {
                    format!(
                        "prompt {prompt:?}: expected {want_text:?} {want:?}, got {:?} {:?} (first {same} match)",
                        g.text, g.generated_tokens
                    )
                };
                Check::new(name, pass, Some(same as f64), "tokens", msg)
            }
        };
        out.push(c);
    }
}

/// Resident bytes of the mappings of `path` in /proc/self/smaps: (Rss, Anonymous), `None` when
/// smaps is unreadable or the file is not mapped.
fn smaps_of(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let want = std::fs::canonicalize(path).ok()?;
    let want = want.to_str()?;
    let (mut inside, mut found) = (false, false);
    let (mut rss, mut anon) = (0u64, 0u64);
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_header = first.contains('-')
            && first
                .split('-')
                .all(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
        if is_header {
            inside = line.trim_end().ends_with(want);
            found |= inside;
            continue;
        }
        if !inside {
            continue;
        }
        let kb = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        if line.starts_with("Rss:") {
            rss += kb();
        } else if line.starts_with("Anonymous:") {
            anon += kb();
        }
    }
    found.then_some((rss, anon))
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

/// Opens the model, runs it, and checks the weights are read in place from the mapping.
fn open_and_check_mmap(
    path: &Path,
    threads: usize,
    out: &mut Vec<Check>,
) -> Result<Engine, SelftestError> {
    let before = ember_runtime::sys::memory();
    let engine = ember_models::open(path, |train| EngineConfig {
        threads,
        n_ctx: train.min(256),
        prefill_chunk: 64,
    })
    .map_err(|e| SelftestError::Open(format!("{}: {e}", path.display())))?;
    // Run every weight once: a short prompt and a few decode steps.
    let n_vocab = engine.model.config().n_vocab as u32;
    let req = GenerateRequest {
        prompt_tokens: (0..8u32).map(|i| (i * 37 + 11) % n_vocab).collect(),
        max_tokens: 4,
        sampler: SamplerConfig::greedy(),
        stop_strings: vec![],
        top_logprobs: 0,
        echo: false,
        ignore_eos: true,
    };
    let ran = engine.generate(&req, &mut |_| {});
    let after = ember_runtime::sys::memory();
    let weights = engine.model.weight_bytes() as f64;
    let anon_growth = after.rss_anon_bytes as f64 - before.rss_anon_bytes as f64;
    let file_growth = after.rss_file_bytes as f64 - before.rss_file_bytes as f64;
    let smaps = smaps_of(path);
    let name = "mmap";
    let c = if let Err(e) = ran {
        Check::new(
            name,
            false,
            None,
            "MiB",
            format!("running the model failed: {e}"),
        )
    } else if after.rss_bytes == 0 {
        Check::new(
            name,
            true,
            None,
            "MiB",
            "skipped: /proc/self/status is not available on this OS",
        )
    } else {
        // The mapping's own pages: resident, and none of them anonymous (copy-on-write) copies.
        let (map_ok, map_msg) = match smaps {
            Some((rss, anon)) => (
                anon == 0 && rss > 0,
                format!(
                    "; the file's mapping: {:.2} MiB resident, {:.2} MiB anonymous",
                    mib(rss as f64),
                    mib(anon as f64)
                ),
            ),
            None => (
                true,
                "; /proc/self/smaps has no mapping of the file".to_string(),
            ),
        };
        // A second copy of the weights would grow anonymous memory by about their size; KV cache
        // and activations for 12 positions are far below half of any real model. Models under
        // 64 MiB are too small for that to tell, so the mapping's pages decide for them.
        let big = weights >= 64.0 * (1u64 << 20) as f64;
        let growth_ok = !big || anon_growth < 0.5 * weights;
        let pass = map_ok && growth_ok;
        let mut msg = format!(
            "weights {:.2} MiB; after load + run: RssFile {:+.2} MiB (now {:.1}), RssAnon {:+.2} MiB (now {:.1}){map_msg}",
            mib(weights),
            mib(file_growth),
            mib(after.rss_file_bytes as f64),
            mib(anon_growth),
            mib(after.rss_anon_bytes as f64),
        );
        if !big {
            msg += "; model < 64 MiB: judged by the mapping's pages";
        }
        if !pass {
            msg = format!("the weights look copied out of the mapping: {msg}");
        }
        Check::new(name, pass, Some(mib(anon_growth)), "MiB", msg)
    };
    out.push(c);
    Ok(engine)
}

/// Read a large buffer with all threads; best of a few passes, GB/s.
fn measure_bandwidth(threads: usize, bytes: usize) -> f64 {
    let pool = pool(threads);
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    for _ in 0..4 {
        let t = Instant::now();
        let s = pool.install(|| {
            use rayon::prelude::*;
            buf.par_chunks(1 << 16)
                .map(|c| {
                    let mut a = [0u64; 8];
                    let (ch, rest) = c.as_chunks::<8>();
                    for x in ch {
                        for i in 0..8 {
                            a[i] = a[i].wrapping_add(x[i]);
                        }
                    }
                    a.iter().chain(rest).fold(0u64, |s, &v| s.wrapping_add(v))
                })
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(s);
        let dt = t.elapsed().as_secs_f64();
        best = best.max(bytes as f64 / dt / 1e9);
    }
    best
}

/// FLOP/s of `matmul` on the best ISA for a `rows × cols` weight of `ty` and `m` activation rows.
fn measure_matmul(threads: usize, ty: GgmlType, rows: usize, cols: usize, m: usize) -> f64 {
    let pool = pool(threads);
    let mut rng = Rng::new(99);
    let w = randn(&mut rng, rows * cols, 0.05);
    let q = quant::quantize(ty, &w).expect("aligned");
    let wm = QMatRef {
        ty,
        rows,
        cols,
        data: &q,
    };
    let x = randn(&mut rng, m * cols, 1.0);
    let mut y = vec![0f32; m * rows];
    pool.install(|| quant::matmul(wm, &x, m, &mut y)); // warm-up
    let t = Instant::now();
    let mut calls = 0;
    while calls < 2 || t.elapsed().as_secs_f64() < 0.3 {
        pool.install(|| quant::matmul(wm, &x, m, &mut y));
        calls += 1;
    }
    2.0 * (m * rows * cols * calls) as f64 / t.elapsed().as_secs_f64()
}

/// The model-independent checks (fast): backends, round-trips, kernel parity and ops.
pub fn kernel_checks(
    threads: usize,
    profile: Option<&DeviceProfile>,
    fault: Option<Fault>,
) -> Vec<Check> {
    let mut out = vec![check_backends(profile)];
    check_roundtrips(&mut out);
    check_parity(threads, fault, &mut out);
    check_ops(threads, &mut out);
    out
}

/// Run every check. `progress` sees each check as it completes.
pub fn run(opts: &Options, mut progress: impl FnMut(&Check)) -> Result<Report, SelftestError> {
    let t0 = Instant::now();
    let started_at = crate::store::now_rfc3339();
    let profile = opts.profile.as_ref();
    let threads = opts
        .threads
        .or(profile.map(|p| p.threads))
        .unwrap_or_else(ember_runtime::sys::available_cores);
    if threads == 0 {
        return Err(SelftestError::Threads);
    }
    let mut checks: Vec<Check> = vec![];
    let mut emit = |checks: &mut Vec<Check>, new: Vec<Check>| {
        for c in new {
            progress(&c);
            checks.push(c);
        }
    };

    let fault = match opts.fault.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(spec) => match parse_fault(spec) {
            Ok(f) => Some(f),
            Err(e) => {
                emit(
                    &mut checks,
                    vec![Check::new("fault-injection", false, None, "", e)],
                );
                None
            }
        },
    };
    emit(&mut checks, kernel_checks(threads, profile, fault));

    // The embedded model: for the golden decode, and for everything else without --model.
    let dir = opts
        .cache_dir
        .clone()
        .unwrap_or_else(ember_runtime::embedded::default_dir);
    let (embedded_path, _) =
        ember_runtime::embedded::ensure_in(&dir).map_err(|source| SelftestError::Embedded {
            dir: dir.display().to_string(),
            source,
        })?;
    let model_path = opts.model.clone().unwrap_or_else(|| embedded_path.clone());

    let mut c = vec![];
    let engine = open_and_check_mmap(&model_path, threads, &mut c)?;
    emit(&mut checks, c);

    let mut c = vec![];
    if opts.model.is_none() {
        check_golden(&engine, &mut c);
    } else {
        let emb = ember_models::open(&embedded_path, |_| EngineConfig {
            threads,
            n_ctx: 64,
            prefill_chunk: 64,
        })
        .map_err(|e| SelftestError::Open(format!("{}: {e}", embedded_path.display())))?;
        check_golden(&emb, &mut c);
    }
    emit(&mut checks, c);

    // Machine figures.
    let bw_bytes = opts.bandwidth_bytes.unwrap_or(256 << 20);
    let bw = measure_bandwidth(threads, bw_bytes);
    let mut msg = format!(
        "{threads} threads reading {:.0} MiB, best of 4",
        mib(bw_bytes as f64)
    );
    if let Some(nom) = profile.and_then(|p| p.memory_bandwidth_gbs) {
        msg += &format!(
            "; {:.0}% of the profile's nominal {nom} GB/s",
            100.0 * bw / nom
        );
    }
    let flops = measure_matmul(threads, GgmlType::F32, 512, 1024, 64);
    let qflops = measure_matmul(threads, GgmlType::Q4_K, 1024, 1024, 1);
    // The prefill path of the model's own dominant weight type (by bytes), 32 rows.
    let mut by_type: std::collections::BTreeMap<&str, (u64, GgmlType)> = Default::default();
    for t in engine
        .file
        .tensors
        .iter()
        .filter(|t| t.ty.is_supported() && t.dims.len() == 2)
    {
        by_type.entry(t.ty.name()).or_insert((0, t.ty)).0 += t.n_bytes;
    }
    let dominant = by_type
        .values()
        .max_by_key(|(b, _)| *b)
        .map(|(_, t)| *t)
        .unwrap_or(GgmlType::Q4_K);
    let pflops = measure_matmul(threads, dominant, 512, 1024, 32);
    emit(
        &mut checks,
        vec![
            Check::new(
                "memory.bandwidth",
                bw > 0.0 && bw.is_finite(),
                Some(bw),
                "GB/s",
                msg,
            ),
            Check::new(
                "matmul.f32",
                flops > 0.0 && flops.is_finite(),
                Some(flops / 1e9),
                "GFLOP/s",
                format!(
                    "f32 weights 512x1024, 64 rows (prefill path, gemm), {}",
                    quant::best_isa().name()
                ),
            ),
            Check::new(
                format!("matmul.{}.m32", dominant.name()),
                pflops > 0.0 && pflops.is_finite(),
                Some(pflops / 1e9),
                "GFLOP/s",
                format!(
                    "the model's main weight type, 512x1024, 32 rows (prefill path), {}",
                    quant::best_isa().name()
                ),
            ),
            Check::new(
                "matmul.q4_k",
                qflops > 0.0 && qflops.is_finite(),
                Some(qflops / 1e9),
                "GFLOP/s",
                format!(
                    "Q4_K weights 1024x1024, 1 row (decode path), {}: {:.1} GB/s of weights",
                    quant::best_isa().name(),
                    qflops / 2.0 * (GgmlType::Q4_K.block_bytes() as f64 / 256.0) / 1e9
                ),
            ),
        ],
    );

    // A short benchmark of the model in use.
    let mut c = vec![];
    let bench = |kind: Test, n: usize| run_test(&engine, kind, n, 3, || {});
    let pp = bench(Test::Pp, 32);
    let tg = bench(Test::Tg, 16);
    let fig = |r: &Result<crate::llamabench::BenchResult, _>| r.as_ref().map(|b| b.mean_tps).ok();
    for (name, r) in [("bench.pp", &pp), ("bench.tg", &tg)] {
        c.push(match r {
            Ok(b) => Check::new(
                name,
                b.mean_tps > 0.0 && b.mean_tps.is_finite(),
                Some(b.mean_tps),
                "tok/s",
                format!(
                    "{}: {:.1} ± {:.1} tok/s over 3 reps",
                    b.test, b.mean_tps, b.sd_tps
                ),
            ),
            Err(e) => Check::new(name, false, None, "tok/s", format!("failed: {e}")),
        });
    }

    // Rooflines of the model in use.
    let weights = engine.model.weight_bytes() as f64;
    let n_params: f64 = engine
        .file
        .tensors
        .iter()
        .map(|t| t.n_elements() as f64)
        .sum();
    let kv_per_tok = engine.model.config().kv_bytes_per_token() as f64;
    // Decode reads every weight once per token, plus the KV cache (≤ 16 positions here).
    let bytes_per_tok = weights + kv_per_tok * 16.0;
    let limit = bw * 1e9 / bytes_per_tok;
    if let Some(achieved) = fig(&tg) {
        let frac = achieved / limit;
        let mut msg = format!(
            "limit {limit:.1} tok/s = {bw:.1} GB/s / {:.2} MiB per token (weights + KV); achieved {achieved:.1} tok/s = {:.1}% of the limit",
            mib(bytes_per_tok),
            100.0 * frac
        );
        if frac > 1.0 {
            msg += &format!(
                "; above the DRAM roofline: the weights ({:.1} MiB) are served from cache",
                mib(weights)
            );
        }
        c.push(Check::new(
            "roofline.decode",
            frac > 0.0 && frac.is_finite(),
            Some(frac),
            "fraction",
            msg,
        ));
    }
    if let Some(achieved) = fig(&pp) {
        // Prefill does ~2 FLOP per parameter per token.
        let plimit = pflops / (2.0 * n_params);
        let frac = achieved / plimit;
        c.push(Check::new(
            "roofline.prefill",
            frac > 0.0 && frac.is_finite(),
            Some(frac),
            "fraction",
            format!(
                "limit {plimit:.1} tok/s = {:.2} GFLOP/s ({} m=32) / {:.2} MFLOP per token; achieved {achieved:.1} tok/s = {:.1}% of the limit{}",
                pflops / 1e9,
                dominant.name(),
                2.0 * n_params / 1e6,
                100.0 * frac,
                if frac > 1.0 { "; above it because 2 FLOP per parameter over-counts (the embedding is a lookup, the output head runs for the last token only) and small matrices stay in cache" } else { "" }
            ),
        ));
    }
    if let Some(p) = profile {
        let (ok, msg) = match p.kv_budget_bytes(weights as u64) {
            Ok(kv) => (
                true,
                format!(
                    "weights {:.1} MiB fit the {} GiB budget; KV budget {:.1} MiB = {} positions",
                    mib(weights),
                    p.memory_budget_gib,
                    mib(kv as f64),
                    (kv as f64 / kv_per_tok.max(1.0)) as u64
                ),
            ),
            Err(e) => (false, e),
        };
        c.push(Check::new(
            "profile.memory",
            ok,
            Some(mib(weights)),
            "MiB",
            msg,
        ));
    }
    emit(&mut checks, c);

    let provenance = crate::provenance::for_engine(&engine, profile.map(|p| p.name.clone()));
    Ok(Report {
        checks,
        provenance,
        model_path: model_path.display().to_string(),
        threads,
        device_profile: profile.map(|p| p.name.clone()),
        started_at,
        elapsed_s: t0.elapsed().as_secs_f64(),
        fault_injected: opts.fault.clone().filter(|s| !s.is_empty()),
        profile_cost: profile.map(|p| p.cost_per_hour_usd),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nmse_basics() {
        assert_eq!(nmse(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((nmse(&[1.1, 2.0], &[1.0, 2.0]) - 0.01 / 5.0).abs() < 1e-12);
        assert_eq!(nmse(&[f64::NAN], &[1.0]), f64::INFINITY);
    }

    #[test]
    fn fault_spec_parses() {
        let f = parse_fault("q4_k").unwrap();
        assert_eq!(f.ty, GgmlType::Q4_K);
        assert_eq!(f.isa, quant::best_isa());
        assert_eq!(parse_fault("Q8_0:portable").unwrap().isa, Isa::Portable);
        assert!(
            parse_fault("q3_k")
                .unwrap_err()
                .contains("not a supported block type")
        );
    }

    #[test]
    fn kernels_pass_and_a_fault_fails_clearly() {
        let ok = kernel_checks(2, None, None);
        let bad: Vec<_> = ok.iter().filter(|c| !c.pass).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        // Every supported type on every ISA has a parity row; every type a round trip.
        let n_isa = quant::available_isas().len();
        assert_eq!(
            ok.iter().filter(|c| c.name.starts_with("parity.")).count(),
            11 * n_isa
        );
        assert_eq!(
            ok.iter()
                .filter(|c| c.name.starts_with("roundtrip."))
                .count(),
            11
        );

        let fault = parse_fault("q4_k").unwrap();
        let out = kernel_checks(2, None, Some(fault));
        let failed: Vec<_> = out.iter().filter(|c| !c.pass).collect();
        assert_eq!(failed.len(), 1, "{failed:#?}");
        assert_eq!(failed[0].name, format!("parity.Q4_K.{}", fault.isa.name()));
        assert!(
            failed[0].message.contains("disagrees"),
            "{}",
            failed[0].message
        );
    }
}
