//! llama-bench-compatible throughput: `pp<n>` (prefill n tokens into an empty
//! context) and `tg<n>` (decode n tokens one at a time from an empty context),
//! each repeated, reported as tokens/s mean ± sd over repetitions — the same
//! definitions llama-bench uses, so the two can sit side by side.

use std::time::Instant;

use ember_runtime::engine::Engine;
use ember_runtime::model::{LogitsWanted, ModelError};
use ember_runtime::sample::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::record::{Provenance, RunResult, WorkloadInfo};

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
    /// Wall time of each repetition, ns.
    pub samples_ns: Vec<u64>,
    /// Tokens/s of each repetition.
    pub samples_tps: Vec<f64>,
    pub mean_tps: f64,
    pub sd_tps: f64,
    /// Kernel launches per token on a GPU backend (`backend::count_launches`, counted on the
    /// untimed warm-up run so the timed ones pay nothing); absent on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launches_per_token: Option<f64>,
}

impl BenchResult {
    /// The result of `n`-token repetitions that took `samples_ns` each: tokens/s per
    /// repetition, then their mean and sample standard deviation (llama-bench's avg_ts and
    /// stddev_ts).
    pub fn from_samples(kind: Test, n: usize, samples_ns: Vec<u64>) -> BenchResult {
        let samples_tps: Vec<f64> = samples_ns
            .iter()
            .map(|&ns| n as f64 / (ns.max(1) as f64 / 1e9))
            .collect();
        let (mean_tps, sd_tps) = mean_sd(&samples_tps);
        BenchResult {
            test: test_name(kind, n),
            kind,
            n_tokens: n,
            samples_ns,
            samples_tps,
            mean_tps,
            sd_tps,
            launches_per_token: None,
        }
    }

    /// Mean and sample standard deviation of the repetitions' wall time, ns (llama-bench's
    /// avg_ns and stddev_ns).
    pub fn mean_sd_ns(&self) -> (f64, f64) {
        mean_sd(
            &self
                .samples_ns
                .iter()
                .map(|&x| x as f64)
                .collect::<Vec<_>>(),
        )
    }
}

/// "pp512" or "tg128".
pub fn test_name(kind: Test, n: usize) -> String {
    match kind {
        Test::Pp => format!("pp{n}"),
        Test::Tg => format!("tg{n}"),
    }
}

/// The workload hash of a llama-bench run: its tests, in order, and the prompt batch size.
/// The model, threads and repetitions are not in it, so the same tests on two devices or two
/// models compare side by side (`ember compare` keeps models and devices in separate columns).
pub fn workload_hash(tests: &[(Test, usize)], n_batch: usize) -> String {
    let names: Vec<String> = tests.iter().map(|&(k, n)| test_name(k, n)).collect();
    let mut h = Sha256::new();
    h.update(
        format!(
            "ember-llama-bench-v1;tests={};n_batch={n_batch}",
            names.join(",")
        )
        .as_bytes(),
    );
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The workload name of a llama-bench run, e.g. "llama-bench pp512,tg128".
pub fn workload_name(tests: &[(Test, usize)]) -> String {
    let names: Vec<String> = tests.iter().map(|&(k, n)| test_name(k, n)).collect();
    format!("{WORKLOAD_PREFIX}{}", names.join(","))
}

/// Every llama-bench run's workload name starts with this.
pub const WORKLOAD_PREFIX: &str = "llama-bench ";

/// The seed of the random prompt tokens (llama-bench also times random tokens).
const TOKEN_SEED: u64 = 0x11A3A;

/// The stored run of a llama-bench invocation (see [`crate::store::Store::save_llama_bench`]):
/// its workload is the test list and the batch size, its load the repetitions.
pub fn run_head(
    provenance: Provenance,
    started_at: String,
    tests: &[(Test, usize)],
    n_batch: usize,
    reps: usize,
) -> RunResult {
    let names: Vec<String> = tests.iter().map(|&(k, n)| test_name(k, n)).collect();
    RunResult {
        started_at,
        provenance,
        workload: WorkloadInfo {
            name: workload_name(tests),
            seed: TOKEN_SEED,
            hash: workload_hash(tests, n_batch),
            load: serde_json::json!({"mode": "llama-bench", "reps": reps}).to_string(),
            params:
                serde_json::json!({"tests": names, "n_batch": n_batch, "token_seed": TOKEN_SEED})
                    .to_string(),
            n_requests: 0,
            n_warmup: 0,
        },
        slo_name: "none".into(),
        slo: "{}".into(),
        ..Default::default()
    }
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
    let tokens = random_tokens(n, n_vocab, TOKEN_SEED);
    let mut logits = Vec::new();
    let mut once = || -> Result<u64, ModelError> {
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
        Ok(t.elapsed().as_nanos() as u64)
    };
    let gpu = engine.model.backend() != "cpu";
    let (warm, launches) = ember_runtime::backend::count_launches(&mut once);
    warm?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        samples.push(once()?);
        progress();
    }
    let mut r = BenchResult::from_samples(kind, n, samples);
    if gpu {
        r.launches_per_token = Some(launches.total() as f64 / n.max(1) as f64);
    }
    Ok(r)
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

    #[test]
    fn results_from_wall_times() {
        // 128 tokens in 0.5 s and in 0.25 s: 256 and 512 tokens/s.
        let r = BenchResult::from_samples(Test::Tg, 128, vec![500_000_000, 250_000_000]);
        assert_eq!(r.test, "tg128");
        assert_eq!(r.samples_tps, vec![256.0, 512.0]);
        assert_eq!(r.mean_tps, 384.0);
        assert!((r.sd_tps - 181.019336).abs() < 1e-5, "{}", r.sd_tps);
        assert_eq!(r.mean_sd_ns().0, 375_000_000.0);
    }

    #[test]
    fn the_workload_hash_names_the_tests_and_the_batch_only() {
        let t = [(Test::Pp, 512), (Test::Tg, 128)];
        assert_eq!(workload_hash(&t, 512), workload_hash(&t, 512));
        assert_ne!(workload_hash(&t, 512), workload_hash(&t, 256));
        assert_ne!(workload_hash(&t, 512), workload_hash(&t[..1], 512));
        assert_eq!(workload_name(&t), "llama-bench pp512,tg128");
    }
}
