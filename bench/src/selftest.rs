//! `ember selftest`: is this device healthy, and what can it do?
//!
//! Every row has a name, a kind, a figure, a unit and a message, in this order. *Checks* pass or
//! fail; *measurements* report a figure that nothing here can judge (no expected value to hold it
//! against) and never fail: the table shows them as `meas`, the JSON as `"kind": "measurement"`
//! with `"pass": null`, the store with `kind = 'measurement'` and `pass = 1`.
//!
//! * `backends` (check): the CPU ISAs this CPU runs, and the GPU side: the wgpu adapters found
//!   (or why there are none, e.g. a build without the `wgpu` feature);
//! * `roundtrip.<TYPE>` (check): quantize → dequantize every block format, NMSE within a budget;
//! * `parity.<TYPE>.<isa>` (check): the quantized matmul of each quantized type on every
//!   available ISA against the portable kernel, against exact (f64) math on the values the
//!   kernels multiply (the dequantized weights and the activations as ggml quantizes them: a
//!   tight bound, so one block scale off by 2⁻⁸ fails it), and against f64 math on the float
//!   activations (the end-to-end error of 8-bit activations); `parity.F32|F16|BF16` (check):
//!   float weights run one f32 code path whatever the ISA, so one row each, same references;
//! * `op.rmsnorm`, `op.rope`, `op.softmax`, `op.attention` (check): the dense ops against naive
//!   f64 code;
//! * `golden.*` (check): the embedded default model's exact greedy decode, and its logits at every
//!   position against a golden fingerprint (`ember_runtime::embedded::GOLDEN`), which breaks if
//!   RoPE, attention or the FFN is wrong;
//! * `mmap` (check): the weights stay file-backed pages of the mapping, not a second copy;
//! * `memory.bandwidth`, `matmul.f32`, `matmul.q4_k`, `bench.pp`, `bench.tg`: what the machine
//!   does. A check when the device profile (`--target`) states what a healthy device measures
//!   (`[expect]` in `targets/NAME.toml`; `bench.*` only for the embedded model): below half of it
//!   fails, naming the likely causes (throttling, governor, load, threads) with what this machine
//!   shows of them. Otherwise a measurement. `matmul.<TYPE>.m32` (the model's own weight type)
//!   is always a measurement;
//! * `roofline.decode`, `roofline.prefill` (measurements): the limits the bandwidth and FLOP/s
//!   put on the model, next to the achieved tokens/s and the fraction reached;
//! * `profile.memory` (check, with a profile): the model's weights fit its memory budget.
//!
//! Test-only fault injection (`EMBER_SELFTEST_FAULT`, see [`parse_fault`]) breaks one type's
//! matmul inside the parity check, so that check must fail; nothing outside the self-test is
//! affected. The default breaks the *input* of a kernel (one block scale of the weight bytes
//! that ISA's kernel reads is off by 2⁻⁸ ≈ 0.4%, a subtle kernel bug); `:output` negates every
//! third output instead.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use ember_runtime::embedded::{self, Golden};
use ember_runtime::engine::{Engine, EngineConfig, GenerateRequest};
use ember_runtime::kv::f16;
use ember_runtime::ops::{self, AttnShape, Rope, RopeStyle};
use ember_runtime::quant::{self, GgmlType, Isa, QMatRef};
use ember_runtime::sample::{Rng, SamplerConfig};

use crate::llamabench::{Test, run_test};
use crate::profile::DeviceProfile;
use crate::record::{Provenance, RunResult, WorkloadInfo};
use crate::store::{RunId, SelfTestRow, Store, StoreError};

/// The environment variable of the test-only fault injection.
pub const FAULT_ENV: &str = "EMBER_SELFTEST_FAULT";

/// The golden decodes of the embedded model (exact tokens, logits within a tolerance).
pub const GOLDEN: [Golden; 2] = embedded::GOLDEN;

/// A measured figure below this fraction of the profile's expected one fails its row.
pub const FLOOR_FRACTION: f64 = 0.5;

/// NMSE budget, portable vs SIMD kernel: identical integer block dots on identical quantized
/// activations, only the f32 accumulation order differs (relative error ~1e-6, so NMSE ~1e-12).
pub const PARITY_ISA_NMSE: f64 = 1e-10;
/// NMSE budget against f64 math on the dequantized weights: the activation row is quantized to
/// 8 bits per block (relative error ≈ 0.6% of |y|), budget (2%)² as in the runtime's kernel tests.
pub const PARITY_REF_NMSE: f64 = 4e-4;
/// NMSE budget against exact math on what the kernels multiply: the dequantized weights times
/// the activations quantized as ggml does (Q8_0/Q8_1/Q8_K, or rounded to f16/bf16 for float
/// weights). Only f32 rounding of the scale products and sums separates a correct kernel from
/// it: ≤ 9.2e-14 on every type and ISA of an AVX-512 machine (`cargo test -p ember-bench
/// exact_reference -- --nocapture`); one block scale off by 2⁻⁸ (the injected fault) gives
/// 3.4e-9 (Q8_0) to 2.6e-6 (Q4_K), invisible to [`PARITY_REF_NMSE`].
pub const PARITY_EXACT_NMSE: f64 = 1e-10;

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

/// Whether a row can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Passes or fails.
    Check,
    /// A figure with nothing to hold it against: reported, never failed.
    Measurement,
}

/// One row's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub name: String,
    pub kind: Kind,
    /// Always `true` for a measurement.
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
            kind: Kind::Check,
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

    /// A measurement: reported, never failed.
    fn measure(
        name: impl Into<String>,
        figure: Option<f64>,
        unit: &str,
        message: impl Into<String>,
    ) -> Check {
        Check {
            kind: Kind::Measurement,
            ..Check::new(name, true, figure, unit, message)
        }
    }

    /// Whether this row fails the self-test.
    pub fn failed(&self) -> bool {
        self.kind == Kind::Check && !self.pass
    }

    /// `ok`, `FAIL` or `meas`, as the table shows it.
    pub fn status(&self) -> &'static str {
        match (self.kind, self.pass) {
            (Kind::Measurement, _) => "meas",
            (Kind::Check, true) => "ok",
            (Kind::Check, false) => "FAIL",
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "kind": self.kind,
            "status": match self.status() { "meas" => "measured", "ok" => "ok", _ => "fail" },
            "pass": if self.kind == Kind::Check { Some(self.pass) } else { None },
            "figure": self.figure,
            "unit": self.unit,
            "message": self.message,
        })
    }

    /// The store row: a measurement has `kind = 'measurement'` and `pass = 1` (it cannot fail).
    pub fn to_row(&self) -> SelfTestRow {
        SelfTestRow {
            check_name: self.name.clone(),
            pass: self.pass,
            measurement: self.kind == Kind::Measurement,
            figure: self.figure,
            unit: self.unit.clone(),
            message: self.message.clone(),
        }
    }
}

impl Serialize for Check {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
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
    /// Every check passed (measurements cannot fail).
    pub fn passed(&self) -> bool {
        self.checks.iter().any(|c| c.kind == Kind::Check) && !self.checks.iter().any(Check::failed)
    }
    /// The failed checks.
    pub fn failed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| c.failed()).collect()
    }
    /// The measurements.
    pub fn measurements(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.kind == Kind::Measurement)
            .collect()
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
                c.status(),
                c.unit.as_deref().unwrap_or(""),
                c.message
            );
        }
        let nfail = self.failed().len();
        let nmeas = self.measurements().len();
        s += &format!(
            "{} checks, {} failed; {nmeas} measurements (meas: no expected figure to judge them by); {:.1} s ({} threads{})\n",
            self.checks.len() - nmeas,
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
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
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
            summary_json: serde_json::json!({"selftest": {"pass": self.passed(), "checks": self.checks.len() - self.measurements().len(), "measurements": self.measurements().len(), "failed": n_fail, "elapsed_s": self.elapsed_s}})
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

/// How the injected fault breaks a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Inside the kernel: the weight bytes that ISA's kernel reads have one block scale off by
    /// 2⁻⁸ (row 4's first block; for float weights, its first 32 values), as a kernel that
    /// decodes a scale slightly wrong would. Only the tight references catch it.
    Scale,
    /// After the kernel: every third output negated (a grossly wrong kernel).
    Output,
}

/// The parsed fault: a type, the ISA whose kernel gets it (`None` for float weights, whose one
/// code path serves every ISA), and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    pub ty: GgmlType,
    pub isa: Option<Isa>,
    pub mode: FaultMode,
}

fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `TYPE[:ISA][:MODE]`, case-insensitive: `q4_k`, `q4_k:avx2`, `q4_k:neon:output`, `f16`.
/// The ISA defaults to the best one available; float types take none. MODE is `scale` (the
/// default, see [`FaultMode::Scale`]) or `output`.
pub fn parse_fault(spec: &str) -> Result<Fault, String> {
    let mut parts = spec.split(':').map(str::trim);
    let t = parts.next().unwrap_or("");
    let ty = GgmlType::SUPPORTED
        .iter()
        .copied()
        .find(|ty| ty.name().eq_ignore_ascii_case(t))
        .ok_or_else(|| format!("{FAULT_ENV}='{spec}': '{t}' is not a supported block type"))?;
    let (mut isa, mut mode) = (None, None);
    for p in parts {
        if p.eq_ignore_ascii_case("scale") && mode.is_none() {
            mode = Some(FaultMode::Scale);
        } else if p.eq_ignore_ascii_case("output") && mode.is_none() {
            mode = Some(FaultMode::Output);
        } else if isa.is_none() && mode.is_none() {
            if is_float(ty) {
                return Err(format!(
                    "{FAULT_ENV}='{spec}': {} weights run one code path on every ISA (one parity row); name no ISA",
                    ty.name()
                ));
            }
            isa = Some(
                quant::available_isas()
                    .into_iter()
                    .find(|i| i.name().eq_ignore_ascii_case(p))
                    .ok_or_else(|| {
                        format!("{FAULT_ENV}='{spec}': ISA '{p}' is not available on this CPU")
                    })?,
            );
        } else {
            return Err(format!(
                "{FAULT_ENV}='{spec}': '{p}' is not an ISA or a mode (scale, output) in its place"
            ));
        }
    }
    if isa.is_none() && !is_float(ty) {
        isa = Some(quant::best_isa());
    }
    Ok(Fault {
        ty,
        isa,
        mode: mode.unwrap_or(FaultMode::Scale),
    })
}

/// The injected [`FaultMode::Scale`] fault: a copy of `q` (a `rows × cols` matrix of `ty`) with
/// the scale of row 4's first block multiplied by 1 + 2⁻⁸ (f16 scales have 10 mantissa bits,
/// so it always changes), or for float weights row 4's first 32 values.
fn perturb_scale(ty: GgmlType, q: &[u8], cols: usize) -> Vec<u8> {
    let mut q = q.to_vec();
    let rb = ty.row_bytes(cols).expect("block-aligned");
    let blk = 4 * rb;
    let k = 1.0 + 1.0 / 256.0;
    let f16_at = |q: &mut [u8], o: usize| {
        let d = f16::from_le_bytes([q[o], q[o + 1]]).to_f32() * k;
        q[o..o + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    };
    match ty {
        GgmlType::F32 => {
            for c in q[blk..blk + 4 * 32].chunks_exact_mut(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * k;
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => (0..32).for_each(|i| f16_at(&mut q, blk + 2 * i)),
        GgmlType::BF16 => {
            for c in q[blk..blk + 2 * 32].chunks_exact_mut(2) {
                let v =
                    bf16_round(f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) * k);
                c.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        // The super-block scale d sits after ql, qh and scales.
        GgmlType::Q6_K => f16_at(&mut q, blk + 208),
        // Every other block starts with its f16 scale d.
        _ => f16_at(&mut q, blk),
    }
    q
}

/// f32 → bf16 (round to nearest even) → f32, as the runtime rounds activations for BF16 weights.
fn bf16_round(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16)
}

/// What the quantized kernels multiply a weight of `ty` by: the activations `x` (m × cols)
/// quantized as ggml does (Q8_0/Q8_1 per 32, Q8_K per 256), dequantized; for float weights,
/// `x` rounded to the weight's precision. Also, for Q8_1 (Q4_1/Q5_1 weights), each block's
/// `s = f16(d·Σq)` minus the exact `d·Σq`: the kernel adds `m·s` for the weight block's min m.
fn kernel_activations(ty: GgmlType, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
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
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
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
        let has_api = |api: &str| {
            adapters
                .iter()
                .any(|a| a.api == api && a.unusable.is_none())
        };
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
        // m = 1 (decode) and m = 17 (tiles, and the gemm path of float weights): the activations,
        // f64 math on them (`yr`), and exact math on what the kernels multiply (`ye`).
        type Case = (usize, Vec<f32>, Vec<f64>, Vec<f64>);
        let cases: Vec<Case> = [1usize, 17]
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
                let ye = exact_matmul(ty, &q, &wd, rows, cols, &x, m);
                (m, x, yr, ye)
            })
            .collect();
        let perturbed = perturb_scale(ty, &q, cols);
        let run = |isa: Isa, injected: Option<FaultMode>| -> Vec<Vec<f64>> {
            let data: &[u8] = if injected == Some(FaultMode::Scale) {
                &perturbed
            } else {
                &q
            };
            let wm = QMatRef {
                ty,
                rows,
                cols,
                data,
            };
            cases
                .iter()
                .map(|(m, x, _, _)| {
                    let mut y = vec![f32::NAN; m * rows];
                    pool.install(|| quant::matmul_with(isa, wm, x, *m, &mut y));
                    if injected == Some(FaultMode::Output) {
                        // A kernel that gets every third output wrong.
                        y.iter_mut().step_by(3).for_each(|v| *v = -*v + 0.25);
                    }
                    f64s(&y)
                })
                .collect()
        };
        let worst = |got: &[Vec<f64>], want: &[&[f64]]| {
            got.iter()
                .zip(want)
                .map(|(y, w)| nmse(y, w))
                .fold(0f64, f64::max)
        };
        let exact: Vec<&[f64]> = cases.iter().map(|c| &c.3[..]).collect();
        let float_ref: Vec<&[f64]> = cases.iter().map(|c| &c.2[..]).collect();
        let injected_for =
            |isa: Option<Isa>| fault.filter(|f| f.ty == ty && f.isa == isa).map(|f| f.mode);
        // Float weights: one f32 code path (dots, gemm for m > 16) whatever the ISA, so one
        // row, run on the best ISA; quantized weights: one row per ISA, and the clean
        // portable kernel is the baseline the others must match.
        let rows_isas: Vec<Option<Isa>> = if is_float(ty) {
            vec![None]
        } else {
            isas.iter().copied().map(Some).collect()
        };
        let portable = (!is_float(ty)).then(|| run(Isa::Portable, None));
        for isa in rows_isas {
            let injected = injected_for(isa);
            let got = match (isa, &portable) {
                (Some(Isa::Portable), Some(p)) if injected.is_none() => p.clone(),
                _ => run(isa.unwrap_or_else(quant::best_isa), injected),
            };
            let vs_exact = worst(&got, &exact);
            let vs_ref = worst(&got, &float_ref);
            let vs_port = match (isa, &portable) {
                (Some(i), Some(p)) if i != Isa::Portable => {
                    Some(worst(&got, &p.iter().map(|v| &v[..]).collect::<Vec<_>>()))
                }
                _ => None,
            };
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
            out.push(Check::new(
                name,
                pass,
                Some(vs_port.unwrap_or(vs_exact)),
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
    for g in &GOLDEN {
        let want_text = engine.tokenizer.decode(g.continuation);
        let c = match embedded::run_golden(engine, g) {
            Err(e) => Check::new(
                g.name,
                false,
                None,
                "logit",
                format!("prompt {:?}: running the model failed: {e}", g.prompt),
            ),
            Ok(r) => {
                let same = r
                    .generated
                    .iter()
                    .zip(g.continuation)
                    .take_while(|(a, b)| a == b)
                    .count();
                let pass = r.pass(g);
                let tokens = if r.generated == g.continuation {
                    format!(
                        "prompt {:?} -> {:?} (exact greedy tokens)",
                        g.prompt, r.text
                    )
                } else {
                    format!(
                        "prompt {:?}: expected {want_text:?} {:?}, got {:?} {:?} (first {same} match)",
                        g.prompt, g.continuation, r.text, r.generated
                    )
                };
                let mut msg = format!(
                    "{tokens}; {} ({})",
                    r.diff.describe(),
                    quant::best_isa().name()
                );
                if !pass {
                    msg = format!(
                        "the embedded model's decoder disagrees with its golden output: {msg}"
                    );
                }
                Check::new(g.name, pass, Some(r.diff.worst as f64), "logit", msg)
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

/// Which `[expect]` figure of the profile a row is judged by.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Bandwidth,
    MatmulF32,
    MatmulQ4K,
    Pp,
    Tg,
    /// Never judged, for this reason.
    Never(&'static str),
}

/// Turns a measured figure into a row: a check against the profile's expected figure where it
/// states one, else a measurement that says why it is not judged.
struct Judge<'a> {
    profile: Option<&'a DeviceProfile>,
    threads: usize,
    /// The bench figures in a profile are for the embedded model.
    embedded_model: bool,
}

impl Judge<'_> {
    fn row(
        &self,
        name: impl Into<String>,
        value: f64,
        unit: &str,
        msg: String,
        what: Expect,
    ) -> Check {
        let name = name.into();
        if !(value.is_finite() && value > 0.0) {
            return Check::new(
                name,
                false,
                Some(value),
                unit,
                format!("the measurement is broken ({value}): {msg}"),
            );
        }
        let exp = self.profile.and_then(|p| p.expect.as_ref());
        let (field, expected) = match what {
            Expect::Never(why) => {
                return Check::measure(
                    name,
                    Some(value),
                    unit,
                    format!("{msg}; not judged: {why}"),
                );
            }
            Expect::Bandwidth => (
                "memory_bandwidth_gbs",
                exp.and_then(|e| e.memory_bandwidth_gbs),
            ),
            Expect::MatmulF32 => ("matmul_f32_gflops", exp.and_then(|e| e.matmul_f32_gflops)),
            Expect::MatmulQ4K => ("matmul_q4_k_gflops", exp.and_then(|e| e.matmul_q4_k_gflops)),
            Expect::Pp => ("pp_tps", exp.and_then(|e| e.pp_tps)),
            Expect::Tg => ("tg_tps", exp.and_then(|e| e.tg_tps)),
        };
        let bench_row = matches!(what, Expect::Pp | Expect::Tg);
        let (Some(p), Some(expected)) = (self.profile, expected) else {
            let why = match self.profile {
                None => {
                    "no device profile (--target) states what a healthy device measures".to_string()
                }
                Some(p) => format!("profile {} states no expect.{field}", p.name),
            };
            return Check::measure(name, Some(value), unit, format!("{msg}; not judged: {why}"));
        };
        if bench_row && !self.embedded_model {
            return Check::measure(
                name,
                Some(value),
                unit,
                format!(
                    "{msg}; not judged: profile {}'s expect.{field} is for the embedded model, not --model",
                    p.name
                ),
            );
        }
        let floor = FLOOR_FRACTION * expected;
        if value >= floor {
            return Check::new(
                name,
                true,
                Some(value),
                unit,
                format!(
                    "{msg}; {:.0}% of the {expected} {unit} profile {} expects (floor {floor})",
                    100.0 * value / expected,
                    p.name
                ),
            );
        }
        Check::new(
            name,
            false,
            Some(value),
            unit,
            format!(
                "{value:.3} {unit} is below half of the {expected} {unit} profile {} expects: this device is not running as it should; likely causes: {}. ({msg})",
                p.name,
                likely_causes(p, self.threads).join("; ")
            ),
        )
    }
}

/// What may slow a device down, with what this machine shows of it (Linux sysfs/procfs, read
/// where present): thermal throttling, the CPU frequency governor, other processes, threads.
fn likely_causes(p: &DeviceProfile, threads: usize) -> Vec<String> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mut causes = vec![];
    let temps: Vec<f64> = (0..16)
        .filter_map(|i| read(&format!("/sys/class/thermal/thermal_zone{i}/temp")))
        .filter_map(|t| t.parse::<f64>().ok())
        .map(|m| m / 1000.0)
        .collect();
    let hottest = temps.iter().copied().fold(f64::NAN, f64::max);
    causes.push(if hottest.is_finite() {
        format!("thermal throttling (hottest thermal zone now {hottest:.0} °C; on a Raspberry Pi `vcgencmd get_throttled` says whether it throttled)")
    } else {
        "thermal throttling (no thermal zone readable here)".to_string()
    });
    let cpu = "/sys/devices/system/cpu/cpu0/cpufreq";
    match read(&format!("{cpu}/scaling_governor")) {
        Some(g) => {
            let cur = read(&format!("{cpu}/scaling_cur_freq")).and_then(|v| v.parse::<f64>().ok());
            let max = read(&format!("{cpu}/cpuinfo_max_freq")).and_then(|v| v.parse::<f64>().ok());
            let freq = match (cur, max) {
                (Some(c), Some(m)) => format!(", cpu0 at {:.2} of {:.2} GHz", c / 1e6, m / 1e6),
                _ => String::new(),
            };
            causes.push(format!(
                "the CPU frequency governor (now '{g}'{freq}{})",
                if g == "performance" {
                    ""
                } else {
                    "; try 'performance'"
                }
            ));
        }
        None => {
            causes.push("a power-saving CPU frequency governor (not readable here)".to_string())
        }
    }
    let cores = ember_runtime::sys::available_cores();
    match read("/proc/loadavg").and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok()) {
        Some(l) => causes.push(format!(
            "another process using the CPU or memory (1-minute load average {l:.1} on {cores} cores, this self-test included)"
        )),
        None => causes.push("another process using the CPU or memory".to_string()),
    }
    if threads < p.threads {
        causes.push(format!(
            "fewer threads ({threads}) than the profile's {}",
            p.threads
        ));
    }
    if cfg!(debug_assertions) {
        causes.push("a debug build (build with --release)".to_string());
    }
    causes
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

    // Machine figures: checks against the profile's [expect] figures, else measurements.
    let judge = Judge {
        profile,
        threads,
        embedded_model: opts.model.is_none(),
    };
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
            judge.row("memory.bandwidth", bw, "GB/s", msg, Expect::Bandwidth),
            judge.row(
                "matmul.f32",
                flops / 1e9,
                "GFLOP/s",
                format!(
                    "f32 weights 512x1024, 64 rows (prefill path, gemm), {}",
                    quant::best_isa().name()
                ),
                Expect::MatmulF32,
            ),
            judge.row(
                format!("matmul.{}.m32", dominant.name()),
                pflops / 1e9,
                "GFLOP/s",
                format!(
                    "the model's main weight type, 512x1024, 32 rows (prefill path), {}",
                    quant::best_isa().name()
                ),
                Expect::Never("it depends on the model's weight type"),
            ),
            judge.row(
                "matmul.q4_k",
                qflops / 1e9,
                "GFLOP/s",
                format!(
                    "Q4_K weights 1024x1024, 1 row (decode path), {}: {:.1} GB/s of weights",
                    quant::best_isa().name(),
                    qflops / 2.0 * (GgmlType::Q4_K.block_bytes() as f64 / 256.0) / 1e9
                ),
                Expect::MatmulQ4K,
            ),
        ],
    );

    // A short benchmark of the model in use.
    let mut c = vec![];
    let bench = |kind: Test, n: usize| run_test(&engine, kind, n, 3, || {});
    let pp = bench(Test::Pp, 32);
    let tg = bench(Test::Tg, 16);
    let fig = |r: &Result<crate::llamabench::BenchResult, _>| r.as_ref().map(|b| b.mean_tps).ok();
    for (name, r, e) in [("bench.pp", &pp, Expect::Pp), ("bench.tg", &tg, Expect::Tg)] {
        c.push(match r {
            Ok(b) => judge.row(
                name,
                b.mean_tps,
                "tok/s",
                format!(
                    "{}: {:.1} ± {:.1} tok/s over 3 reps",
                    b.test, b.mean_tps, b.sd_tps
                ),
                e,
            ),
            Err(e) => Check::new(name, false, None, "tok/s", format!("failed: {e}")),
        });
    }

    // Rooflines of the model in use: ratios of two figures above, measurements only.
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
        c.push(judge.row(
            "roofline.decode",
            frac,
            "fraction",
            msg,
            Expect::Never("a ratio of two measured figures"),
        ));
    }
    if let Some(achieved) = fig(&pp) {
        // Prefill does ~2 FLOP per parameter per token.
        let plimit = pflops / (2.0 * n_params);
        let frac = achieved / plimit;
        c.push(judge.row(
            "roofline.prefill",
            frac,
            "fraction",
            format!(
                "limit {plimit:.1} tok/s = {:.2} GFLOP/s ({} m=32) / {:.2} MFLOP per token; achieved {achieved:.1} tok/s = {:.1}% of the limit{}",
                pflops / 1e9,
                dominant.name(),
                2.0 * n_params / 1e6,
                100.0 * frac,
                if frac > 1.0 { "; above it because 2 FLOP per parameter over-counts (the embedding is a lookup, the output head runs for the last token only) and small matrices stay in cache" } else { "" }
            ),
            Expect::Never("a ratio of two measured figures"),
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
        assert_eq!(f.isa, Some(quant::best_isa()));
        assert_eq!(f.mode, FaultMode::Scale);
        let f = parse_fault("Q8_0:portable:output").unwrap();
        assert_eq!((f.isa, f.mode), (Some(Isa::Portable), FaultMode::Output));
        assert_eq!(
            parse_fault("q5_1:output").unwrap().isa,
            Some(quant::best_isa())
        );
        let f = parse_fault("f16").unwrap();
        assert_eq!((f.ty, f.isa), (GgmlType::F16, None));
        assert!(
            parse_fault("q3_k")
                .unwrap_err()
                .contains("not a supported block type")
        );
        assert!(
            parse_fault("bf16:portable")
                .unwrap_err()
                .contains("one code path on every ISA")
        );
        assert!(
            parse_fault("q4_0:scale:portable")
                .unwrap_err()
                .contains("in its place")
        );
    }

    /// The exact reference is what the kernels compute, up to f32 rounding: every type on
    /// every ISA is far inside the budget (the fault tests below need the room).
    #[test]
    fn exact_reference_is_tight_on_every_type_and_isa() {
        let out = kernel_checks(2, None, None);
        for c in out.iter().filter(|c| c.name.starts_with("parity.")) {
            let exact: f64 = c
                .message
                .split("vs exact math on the kernel's inputs ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no exact figure in {}", c.message));
            eprintln!("{}: vs exact {exact:.2e}", c.name);
            assert!(exact <= PARITY_EXACT_NMSE / 100.0, "{c:#?}");
        }
    }

    #[test]
    fn kernels_pass_and_a_fault_fails_clearly() {
        let ok = kernel_checks(2, None, None);
        let bad: Vec<_> = ok.iter().filter(|c| c.failed()).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(ok.iter().all(|c| c.kind == Kind::Check));
        // Every quantized type on every ISA has a parity row, each float type one; every type
        // a round trip.
        let n_isa = quant::available_isas().len();
        let parity: Vec<&str> = ok
            .iter()
            .filter(|c| c.name.starts_with("parity."))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(parity.len(), 8 * n_isa + 3, "{parity:?}");
        for t in ["F32", "F16", "BF16"] {
            assert!(
                parity.contains(&format!("parity.{t}").as_str()),
                "{parity:?}"
            );
        }
        assert_eq!(
            ok.iter()
                .filter(|c| c.name.starts_with("roundtrip."))
                .count(),
            11
        );

        // Every fault, inside or after the kernel, on every ISA: exactly its row fails.
        let mut specs: Vec<String> = vec![];
        for isa in quant::available_isas() {
            for t in ["q4_k", "q4_1", "q6_k", "q8_0"] {
                specs.push(format!("{t}:{}", isa.name()));
            }
            specs.push(format!("q5_0:{}:output", isa.name()));
        }
        specs.extend(["f16", "bf16", "f32:output"].map(String::from));
        for spec in specs {
            let fault = parse_fault(&spec).unwrap();
            let out = kernel_checks(2, None, Some(fault));
            let failed: Vec<_> = out.iter().filter(|c| c.failed()).collect();
            assert_eq!(failed.len(), 1, "{spec}: {failed:#?}");
            let want = match fault.isa {
                Some(i) => format!("parity.{}.{}", fault.ty.name(), i.name()),
                None => format!("parity.{}", fault.ty.name()),
            };
            assert_eq!(failed[0].name, want, "{spec}");
            let m = &failed[0].message;
            eprintln!("{spec}: {m}");
            assert!(
                m.contains("disagrees") && m.contains("fault injected on purpose"),
                "{m}"
            );
            if fault.mode == FaultMode::Scale {
                // Subtle: only the tight references see it, the float-activation one does not.
                let r: f64 = m
                    .split("vs f64 on float activations ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap();
                assert!(r <= PARITY_REF_NMSE, "{spec}: {m}");
            }
        }
    }

    fn profile_with(expect: &str) -> DeviceProfile {
        let arch = std::env::consts::ARCH;
        DeviceProfile::parse(
            &format!(
                "name = \"t\"\ntarget_triple = \"{arch}-unknown-linux-gnu\"\nbackends = [\"cpu\"]\nthreads = 2\n\
                 memory_budget_gib = 1.0\ndefault_slo = \"batch\"\ncost_per_hour_usd = 0.0\ntypical_power_w = 1.0\n\
                 [expect]\n{expect}\n"
            ),
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn figures_are_checks_only_against_a_profile() {
        let msg = || "m".to_string();
        // No profile: a measurement, whatever the figure.
        let j = Judge {
            profile: None,
            threads: 2,
            embedded_model: true,
        };
        let c = j.row("memory.bandwidth", 0.001, "GB/s", msg(), Expect::Bandwidth);
        assert_eq!((c.kind, c.status()), (Kind::Measurement, "meas"));
        assert!(
            c.message.contains("not judged: no device profile"),
            "{}",
            c.message
        );
        assert!(c.to_row().measurement && c.to_row().pass);
        assert_eq!(c.to_json()["pass"], serde_json::Value::Null);
        // A broken figure fails even without a profile.
        assert!(
            j.row("bench.tg", f64::NAN, "tok/s", msg(), Expect::Tg)
                .failed()
        );

        let p = profile_with("memory_bandwidth_gbs = 10.0\ntg_tps = 100.0");
        let j = Judge {
            profile: Some(&p),
            threads: 1,
            embedded_model: true,
        };
        let ok = j.row("memory.bandwidth", 5.0, "GB/s", msg(), Expect::Bandwidth);
        assert_eq!((ok.kind, ok.pass), (Kind::Check, true), "{ok:?}");
        let bad = j.row("bench.tg", 49.9, "tok/s", msg(), Expect::Tg);
        assert!(bad.failed(), "{bad:?}");
        for cause in [
            "below half of the 100 tok/s profile t expects",
            "thermal",
            "governor",
            "another process",
            "fewer threads (1) than the profile's 2",
        ] {
            assert!(bad.message.contains(cause), "{cause}: {}", bad.message);
        }
        // Not stated in the profile, or not the embedded model: measurements.
        let c = j.row("matmul.f32", 1.0, "GFLOP/s", msg(), Expect::MatmulF32);
        assert!(
            c.kind == Kind::Measurement && c.message.contains("states no expect.matmul_f32_gflops"),
            "{c:?}"
        );
        let j = Judge {
            embedded_model: false,
            ..j
        };
        let c = j.row("bench.tg", 1.0, "tok/s", msg(), Expect::Tg);
        assert!(
            c.kind == Kind::Measurement && c.message.contains("not --model"),
            "{c:?}"
        );
        let c = j.row(
            "roofline.decode",
            0.2,
            "fraction",
            msg(),
            Expect::Never("a ratio"),
        );
        assert_eq!(c.kind, Kind::Measurement);
    }
}
