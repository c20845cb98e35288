//! One registry of op checks, in the spirit of llama.cpp's `test-backend-ops`: every op the
//! decoder runs, as a table of cases ([`cases`]). A case names the op and its shape, draws its
//! inputs from its own seeded [`Rng`], and computes the op three ways:
//!
//! * the **reference**: naive f64 code written from the op's definition (for exact ops such as
//!   f16 rounding, the one right answer);
//! * the **host** kernels ([`crate::ops`], [`crate::quant`]), which the CPU path runs;
//! * a burn **device** ([`crate::tensor_ops`], [`crate::backend`]): burn-flex on the CPU, or wgpu.
//!
//! Each case carries its [`Tolerance`]: how far any backend may be from the reference, and how far
//! a device may be from the host kernels on the same inputs. The runners are [`OpCase::check_host`]
//! and [`OpCase::check_device`]; the runtime's unit tests run every case on the host and on
//! burn-flex, `tests/gpu_parity.rs` on wgpu, and `ember selftest` on the host of the machine it
//! tests. Adding an op to the table adds it to all three.
//!
//! The one random source is [`crate::sample::Rng`] (SplitMix64) with [`randn`]; the one error
//! measure is [`nmse`].

mod cases;

use crate::sample::Rng;

pub use cases::cases;

/// Normalised mean squared error `Σ(got−want)² / Σwant²`: 0 when both are zero, infinite when
/// `got` holds a NaN or an infinity (or is non-zero against an all-zero `want`).
pub fn nmse(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "nmse: lengths differ");
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

/// [`nmse`] of two f32 vectors.
pub fn nmse_f32(got: &[f32], want: &[f32]) -> f64 {
    nmse(&f64s(got), &f64s(want))
}

/// Widen to f64.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// One standard normal sample (Box–Muller).
pub fn normal(rng: &mut Rng) -> f32 {
    let u1 = rng.next_f64().max(1e-12);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// `n` normal samples with standard deviation `std`.
pub fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| normal(rng) * std).collect()
}

/// `y = x · Wᵀ` in f64, summed in order: `w` is `rows × cols`, `x` is `m × cols`, `y` is
/// `m × rows`.
pub fn matmul_f64(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            y[i * rows + r] = (0..cols)
                .map(|k| w[r * cols + k] as f64 * x[i * cols + k] as f64)
                .sum();
        }
    }
    y
}

/// How far one result may be from another.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// [`nmse`] at most this.
    Nmse(f64),
    /// Every element bit for bit (signed zeros included).
    Exact,
}

impl Budget {
    /// The error of `got` against `want` in this budget's measure: the NMSE, or the number of
    /// elements whose bits differ.
    pub fn error(self, got: &[f32], want: &[f64]) -> f64 {
        match self {
            Budget::Nmse(_) => nmse(&f64s(got), want),
            Budget::Exact => {
                if got.len() != want.len() {
                    return f64::INFINITY;
                }
                got.iter()
                    .zip(want)
                    .filter(|&(&g, &w)| g.to_bits() != (w as f32).to_bits())
                    .count() as f64
            }
        }
    }

    /// Whether an error from [`Budget::error`] is within the budget.
    pub fn holds(self, error: f64) -> bool {
        match self {
            Budget::Nmse(b) => error <= b,
            Budget::Exact => error == 0.0,
        }
    }

    /// The measure's unit: `nmse`, or `elements` (that differ).
    pub fn unit(self) -> &'static str {
        match self {
            Budget::Nmse(_) => "nmse",
            Budget::Exact => "elements",
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Nmse(b) => write!(f, "NMSE {b:.0e}"),
            Budget::Exact => f.write_str("bit-exact"),
        }
    }
}

/// A case's budgets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Any backend (host kernels or a device) against the reference.
    pub vs_reference: Budget,
    /// A device against the host kernels on the same inputs.
    pub vs_host: Budget,
}

/// Why a case could not run.
#[derive(Debug, thiserror::Error)]
pub enum OpCheckError {
    #[error("quantizing the weights: {0}")]
    Quant(#[from] crate::quant::QuantError),
    #[error("the test weight file: {0}")]
    Gguf(#[from] crate::gguf::GgufError),
    #[cfg(feature = "burn")]
    #[error("the weight handle: {0}")]
    Handle(#[from] crate::backend::HandleError),
    #[error("reading the device result back: {0}")]
    ReadBack(String),
}

/// One op at one shape: what it draws from its RNG and how it computes the op each way.
pub(crate) trait OpSpec: Send + Sync {
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError>;
}

/// A case's drawn inputs, ready to run.
pub(crate) trait OpInputs {
    /// The reference result in f64.
    fn reference(&self) -> Vec<f64>;
    /// The host kernels' result (on the current rayon pool).
    fn host(&self) -> Vec<f32>;
    /// The result on a burn device.
    #[cfg(feature = "burn")]
    fn device(&self, device: &crate::backend::Device) -> Result<Vec<f32>, OpCheckError>;
}

/// One row of the table.
pub struct OpCase {
    /// The op, e.g. `rmsnorm`: the self-test reports one row per op.
    pub op: &'static str,
    /// Its shape in words, e.g. `4 rows of 256`.
    pub shape: String,
    pub tol: Tolerance,
    spec: Box<dyn OpSpec>,
}

/// A case's inputs, drawn once, with the reference and host results, so that every backend
/// runs on the same values.
pub struct Built<'a> {
    pub case: &'a OpCase,
    /// Kept for the device runs.
    #[cfg_attr(not(feature = "burn"), allow(dead_code))]
    inputs: Box<dyn OpInputs>,
    /// The reference result.
    pub reference: Vec<f64>,
    /// The host kernels' result.
    pub host: Vec<f32>,
}

/// One backend's result on one case.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The error against the reference ([`Budget::error`]).
    pub vs_reference: f64,
    /// A device's error against the host kernels (`None` for the host itself).
    pub vs_host: Option<f64>,
    /// Both within the case's [`Tolerance`].
    pub pass: bool,
}

impl OpCase {
    pub(crate) fn new(
        op: &'static str,
        shape: impl Into<String>,
        tol: Tolerance,
        spec: impl OpSpec + 'static,
    ) -> OpCase {
        OpCase {
            op,
            shape: shape.into(),
            tol,
            spec: Box::new(spec),
        }
    }

    /// `op: shape`, unique in the table.
    pub fn name(&self) -> String {
        format!("{}: {}", self.op, self.shape)
    }

    /// The seed of this case's [`Rng`]: FNV-1a of its name, so a case draws the same inputs
    /// whichever other cases run.
    pub fn seed(&self) -> u64 {
        self.name().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// Draws the inputs, computes the reference and runs the host kernels (on the current
    /// rayon pool).
    pub fn build(&self) -> Result<Built<'_>, OpCheckError> {
        let inputs = self.spec.build(&mut Rng::new(self.seed()))?;
        let reference = inputs.reference();
        let host = inputs.host();
        Ok(Built {
            case: self,
            inputs,
            reference,
            host,
        })
    }

    /// Runs the host kernels (on the current rayon pool) against the reference.
    pub fn check_host(&self) -> Result<Outcome, OpCheckError> {
        Ok(self.build()?.check_host())
    }

    /// Runs the case on `device` against the reference and against the host kernels.
    #[cfg(feature = "burn")]
    pub fn check_device(&self, device: &crate::backend::Device) -> Result<Outcome, OpCheckError> {
        self.build()?.check_device(device)
    }
}

impl Built<'_> {
    /// The host kernels against the reference.
    pub fn check_host(&self) -> Outcome {
        let tol = self.case.tol;
        let e = tol.vs_reference.error(&self.host, &self.reference);
        Outcome {
            vs_reference: e,
            vs_host: None,
            pass: tol.vs_reference.holds(e),
        }
    }

    /// The device's result.
    #[cfg(feature = "burn")]
    pub fn device(&self, device: &crate::backend::Device) -> Result<Vec<f32>, OpCheckError> {
        self.inputs.device(device)
    }

    /// The device against the reference and against the host kernels.
    #[cfg(feature = "burn")]
    pub fn check_device(&self, device: &crate::backend::Device) -> Result<Outcome, OpCheckError> {
        let tol = self.case.tol;
        let got = self.device(device)?;
        let vs_ref = tol.vs_reference.error(&got, &self.reference);
        let host = f64s(&self.host);
        let vs_host = tol.vs_host.error(&got, &host);
        Ok(Outcome {
            vs_reference: vs_ref,
            vs_host: Some(vs_host),
            pass: tol.vs_reference.holds(vs_ref) && tol.vs_host.holds(vs_host),
        })
    }
}

#[cfg(test)]
mod tests;
