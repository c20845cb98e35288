//! Load: how requests arrive.
//!
//! - `Sync`: one request at a time (a closed loop of one user).
//! - `Concurrency`: N simulated users; each sends, waits for the whole answer,
//!   thinks for `think_ms`, sends again. A user's next *arrival* is its previous
//!   finish plus the think time.
//! - `Rate`: open loop, `rps` requests per second, constant or Poisson gaps.
//!   Arrivals are the *intended* times of a seeded schedule, and requests are
//!   submitted when due, so time spent queueing shows in ttft (no coordinated
//!   omission).

use serde::{Deserialize, Serialize};

use ember_runtime::sample::Rng;

use crate::record::Ns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    Constant,
    Poisson,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum LoadSpec {
    Sync,
    Concurrency {
        users: usize,
        think_ms: u64,
    },
    Rate {
        rps: f64,
        arrivals: Arrivals,
        seed: u64,
    },
}

impl LoadSpec {
    pub fn describe(&self) -> String {
        match self {
            LoadSpec::Sync => "sync".into(),
            LoadSpec::Concurrency { users, think_ms: 0 } => format!("concurrency {users}"),
            LoadSpec::Concurrency { users, think_ms } => {
                format!("concurrency {users}, think {think_ms} ms")
            }
            LoadSpec::Rate { rps, arrivals, .. } => {
                format!("rate {rps} req/s ({arrivals:?})").to_lowercase()
            }
        }
    }
}

/// When to stop sending measured requests (whichever comes first). In-flight
/// requests are always finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_requests: Option<usize>,
    pub max_duration_ms: Option<u64>,
}

/// Intended arrival offsets (ns from the start of the measured phase) of `n`
/// requests at `rps`. Constant: i/rps. Poisson: cumulative exponential gaps
/// with mean 1/rps drawn from a seeded generator (same seed, same schedule).
/// The first request arrives at 0 in both cases.
pub fn schedule(rps: f64, arrivals: Arrivals, n: usize, seed: u64) -> Vec<Ns> {
    assert!(rps > 0.0 && rps.is_finite(), "rate must be positive");
    let mut out = Vec::with_capacity(n);
    match arrivals {
        Arrivals::Constant => out.extend((0..n).map(|i| (i as f64 * 1e9 / rps).round() as Ns)),
        Arrivals::Poisson => {
            let mut rng = Rng::new(seed ^ 0xA771_7A15);
            let mut t = 0.0f64;
            for i in 0..n {
                if i > 0 {
                    // Inverse CDF of Exp(rps); 1 − u ∈ (0, 1].
                    let u = rng.next_f64();
                    t += -(1.0 - u).ln() / rps;
                }
                out.push((t * 1e9).round() as Ns);
            }
        }
    }
    out
}

/// Kolmogorov–Smirnov statistic D of `samples` against the CDF `cdf`.
pub fn ks_statistic(samples: &[f64], cdf: impl Fn(f64) -> f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len() as f64;
    let mut d = 0.0f64;
    for (i, &x) in v.iter().enumerate() {
        let f = cdf(x);
        d = d.max((i as f64 + 1.0) / n - f).max(f - i as f64 / n);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_schedule() {
        assert_eq!(
            schedule(4.0, Arrivals::Constant, 4, 0),
            vec![0, 250_000_000, 500_000_000, 750_000_000]
        );
    }
}
