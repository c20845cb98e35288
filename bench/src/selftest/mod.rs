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
//! * `op.<op>` (check): one row per op of the runtime's op registry
//!   ([`ember_runtime::opcheck`]: `op.rmsnorm`, `op.rope`, `op.softmax`, `op.attention`,
//!   `op.silu_mul`, `op.round_f16`, `op.qmatmul`), every case of the op on the host kernels
//!   against its f64 reference, the worst one reported;
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

//! Where things live: [`report`] (rows, the table, JSON, the store), [`fault`] (fault
//! injection), [`kernels`] (`backends`, `roundtrip.*`, `op.*`), [`parity`] (`parity.*`),
//! [`model`] (`mmap`, `golden.*`), [`measure`] (machine and model figures, rooflines) and
//! [`floors`] (judging figures against a profile). This file holds the order they run in.

mod fault;
mod floors;
mod kernels;
mod measure;
mod model;
mod parity;
mod report;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Instant;

use ember_runtime::embedded::{self, Golden};
use ember_runtime::engine::{Engine, EngineConfig};

pub use ember_runtime::opcheck::nmse;
pub use fault::{Fault, FaultMode, parse_fault};
pub use kernels::roundtrip_budget;
pub use report::{Check, Kind, Report};

use crate::profile::DeviceProfile;
use floors::Judge;

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

#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("cannot write the embedded model under {dir}: {source}")]
    Embedded { dir: String, source: std::io::Error },
    #[error("{0}")]
    Open(String),
    #[error("--threads must be at least 1")]
    Threads,
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

/// What the model-independent checks see.
struct KernelCtx<'a> {
    threads: usize,
    profile: Option<&'a DeviceProfile>,
    fault: Option<Fault>,
}

/// A model-independent check: appends its rows.
type KernelCheck = fn(&KernelCtx<'_>, &mut Vec<Check>);

/// The model-independent checks, in the order they run and report, each with the name (or the
/// prefix before a `.`) of the rows it appends.
const KERNEL_CHECKS: [(&str, KernelCheck); 4] = [
    ("backends", |k, out| {
        out.push(kernels::check_backends(k.profile))
    }),
    ("roundtrip", |_, out| kernels::check_roundtrips(out)),
    ("parity", |k, out| {
        parity::check_parity(k.threads, k.fault, out)
    }),
    ("op", |k, out| kernels::check_ops(k.threads, out)),
];

/// The model-independent checks (fast): backends, round-trips, kernel parity and ops.
pub fn kernel_checks(
    threads: usize,
    profile: Option<&DeviceProfile>,
    fault: Option<Fault>,
) -> Vec<Check> {
    let k = KernelCtx {
        threads,
        profile,
        fault,
    };
    let mut out = vec![];
    for (_, check) in KERNEL_CHECKS {
        check(&k, &mut out);
    }
    out
}

/// The rows so far, each shown to `progress` as it lands.
struct Rows<F: FnMut(&Check)> {
    checks: Vec<Check>,
    progress: F,
}

impl<F: FnMut(&Check)> Rows<F> {
    fn emit(&mut self, new: Vec<Check>) {
        for c in new {
            (self.progress)(&c);
            self.checks.push(c);
        }
    }
}

/// The fault to inject from [`Options::fault`]; a spec that does not parse is a failing row.
fn fault_of(opts: &Options, rows: &mut Rows<impl FnMut(&Check)>) -> Option<Fault> {
    let spec = opts.fault.as_deref().filter(|s| !s.is_empty())?;
    match parse_fault(spec) {
        Ok(f) => Some(f),
        Err(e) => {
            rows.emit(vec![Check::new("fault-injection", false, None, "", e)]);
            None
        }
    }
}

/// `golden.*`: on the model in use when it is the embedded one, else on the embedded model.
fn golden_rows(
    opts: &Options,
    engine: &Engine,
    embedded_path: &std::path::Path,
    threads: usize,
) -> Result<Vec<Check>, SelftestError> {
    let mut c = vec![];
    if opts.model.is_none() {
        model::check_golden(engine, &mut c);
    } else {
        let emb = ember_models::open(embedded_path, |_| EngineConfig {
            threads,
            n_ctx: 64,
            prefill_chunk: 64,
        })
        .map_err(|e| SelftestError::Open(format!("{}: {e}", embedded_path.display())))?;
        model::check_golden(&emb, &mut c);
    }
    Ok(c)
}

/// Run every check. `progress` sees each check as it completes.
pub fn run(opts: &Options, progress: impl FnMut(&Check)) -> Result<Report, SelftestError> {
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
    let mut rows = Rows {
        checks: vec![],
        progress,
    };
    let fault = fault_of(opts, &mut rows);
    rows.emit(kernel_checks(threads, profile, fault));

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
    let engine = model::open_and_check_mmap(&model_path, threads, &mut c)?;
    rows.emit(c);
    rows.emit(golden_rows(opts, &engine, &embedded_path, threads)?);

    // Machine figures: checks against the profile's [expect] figures, else measurements.
    let judge = Judge {
        profile,
        threads,
        embedded_model: opts.model.is_none(),
    };
    let bw_bytes = opts.bandwidth_bytes.unwrap_or(256 << 20);
    let (c, figures) = measure::machine_rows(&judge, &engine, bw_bytes);
    rows.emit(c);
    // A short benchmark of the model in use, its rooflines, and the profile's memory budget.
    rows.emit(measure::model_rows(&judge, &engine, &figures));

    let provenance = crate::provenance::for_engine(&engine, profile.map(|p| p.name.clone()));
    Ok(Report {
        checks: rows.checks,
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
