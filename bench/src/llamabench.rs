//! llama-bench-compatible throughput: `pp<n>` (prefill n tokens into an empty
//! context) and `tg<n>` (decode n tokens one at a time from an empty context),
//! each repeated, reported as tokens/s mean ± sd over repetitions — the same
//! definitions llama-bench uses, so the two can sit side by side.

use std::time::Instant;

use ember_runtime::engine::Engine;
use ember_runtime::model::{LogitsWanted, ModelError};
use ember_runtime::sample::Rng;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Test {
    Pp,
    Tg,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// "pp512", "tg128"
    pub test: String,
    pub kind: Test,
    pub n_tokens: usize,
    /// Tokens/s of each repetition.
    pub samples_tps: Vec<f64>,
    pub mean_tps: f64,
    pub sd_tps: f64,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn random_tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % n_vocab as u64) as u32)
        .collect()
}

/// Time one test `reps` times after one untimed warm-up run.
pub fn run_test(
    engine: &Engine,
    kind: Test,
    n: usize,
    reps: usize,
    mut progress: impl FnMut(),
) -> Result<BenchResult, ModelError> {
    let n_vocab = engine.model.config().n_vocab;
    let tokens = random_tokens(n, n_vocab, 0x11A3A);
    let mut logits = Vec::new();
    let mut once = || -> Result<f64, ModelError> {
        let mut kv = engine.new_cache();
        let t = Instant::now();
        match kind {
            Test::Pp => {
                for c in tokens.chunks(engine.cfg.prefill_chunk.max(1)) {
                    engine.forward(c, &mut kv, LogitsWanted::Last, &mut logits)?;
                }
            }
            Test::Tg => {
                for &tok in &tokens {
                    engine.forward(&[tok], &mut kv, LogitsWanted::Last, &mut logits)?;
                }
            }
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    once()?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        samples.push(once()?);
        progress();
    }
    let (mean_tps, sd_tps) = mean_sd(&samples);
    let prefix = match kind {
        Test::Pp => "pp",
        Test::Tg => "tg",
    };
    Ok(BenchResult {
        test: format!("{prefix}{n}"),
        kind,
        n_tokens: n,
        samples_tps: samples,
        mean_tps,
        sd_tps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn mean_and_sample_sd() {
        let (m, s) = mean_sd(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - 2.138089935).abs() < 1e-6);
        assert_eq!(mean_sd(&[3.0]), (3.0, 0.0));
    }
}
