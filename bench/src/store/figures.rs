//! Figures recomputed from stored rows, in the terms of `docs/METRICS.md`:
//! nearest-rank percentiles (rank ⌈q·n⌉, in integer arithmetic so that
//! 0.9·10 is 9 and not 10), latency distributions over measured (not warm-up),
//! non-failed requests, ITL pooled over every stored gap. Several runs are
//! combined by pooling their samples, never by averaging percentiles.

use crate::metrics::SpecSummary;
use crate::record::{MemorySample, SpecUse};

/// One request as the store holds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReqSample {
    pub request_id: u64,
    pub warmup: bool,
    pub failed: bool,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub computed_prompt_tokens: u64,
    pub arrival_ns: u64,
    pub schedule_ns: Option<u64>,
    pub prefill_start_ns: Option<u64>,
    pub prefill_end_ns: Option<u64>,
    pub first_token_ns: Option<u64>,
    pub last_token_ns: Option<u64>,
    pub finish_ns: u64,
    pub max_itl_ns: Option<u64>,
    /// `--score`: the answer was right (None: not scored).
    pub correct: Option<bool>,
    /// It met the run's SLO (None: judged by none).
    pub slo_attained: Option<bool>,
    /// Speculative decoding's totals (None: it did not speculate).
    pub spec: Option<SpecUse>,
    /// Stored token timestamps (at most the run's token cap).
    pub token_ns: Vec<u64>,
}

impl ReqSample {
    pub fn ttft(&self) -> Option<f64> {
        Some(self.first_token_ns?.checked_sub(self.arrival_ns)? as f64)
    }
    pub fn tpot(&self) -> Option<f64> {
        if self.output_tokens < 2 {
            return None;
        }
        Some(
            (self.last_token_ns? as f64 - self.first_token_ns? as f64)
                / (self.output_tokens - 1) as f64,
        )
    }
    pub fn e2e(&self) -> f64 {
        self.finish_ns.saturating_sub(self.arrival_ns) as f64
    }
}

/// The reported statistics of one distribution.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub sd: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
}

/// The quantiles reported, in per mille, with their names (the metrics module's set).
pub use crate::metrics::QUANTILES_PERMILLE as QUANTILES;

/// Nearest rank: the sample at rank ⌈q·n⌉ (1-based) of the sorted samples,
/// q = permille/1000 (`metrics::nearest_rank`); NaN when there are none.
pub fn nearest_rank(sorted: &[f64], permille: u64) -> f64 {
    crate::metrics::nearest_rank(sorted, permille).unwrap_or(f64::NAN)
}

/// Whether a percentile is too thin to mean anything: n < 1/(1−q).
pub use crate::metrics::too_few as thin;

impl Stats {
    /// The same statistics the harness reports (`metrics::Dist`); `None` for no samples.
    pub fn of(v: Vec<f64>) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        let d = crate::metrics::Dist::of(v);
        Some(Stats {
            n: d.n,
            mean: d.mean,
            min: d.min,
            max: d.max,
            sd: d.sd,
            p50: d.p50,
            p90: d.p90,
            p95: d.p95,
            p99: d.p99,
            p999: d.p999,
        })
    }

    /// By the stat's name as stored in `run_metrics`.
    pub fn get(&self, stat: &str) -> Option<f64> {
        Some(match stat {
            "n" => self.n as f64,
            "mean" => self.mean,
            "min" => self.min,
            "max" => self.max,
            "sd" => self.sd,
            "p50" => self.p50,
            "p90" => self.p90,
            "p95" => self.p95,
            "p99" => self.p99,
            "p99.9" => self.p999,
            _ => return None,
        })
    }
}

/// The latency metrics with a distribution (values in ns; tps in tokens/s).
pub const DIST_METRICS: [&str; 8] = [
    "ttft",
    "queue",
    "ttft_engine",
    "itl",
    "tpot",
    "e2e",
    "prefill_tps",
    "decode_tps",
];

/// A run's (or several pooled runs') figures.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    pub measured: usize,
    pub failed: usize,
    pub warmup: usize,
    pub window_ns: u64,
    pub rps: f64,
    pub output_tps: f64,
    pub input_tps: f64,
    pub error_rate: f64,
    pub prefix_hit_rate: Option<f64>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub prefill_tps_total: Option<f64>,
    pub decode_tps_total: Option<f64>,
    pub rss_peak_bytes: Option<u64>,
    pub device_bytes_peak: Option<u64>,
    pub kv_bytes_peak: Option<u64>,
    /// `--score`: accuracy over the measured requests that were scored.
    pub accuracy: Option<crate::score::Accuracy>,
    /// Measured energy of the measured windows (every run's, or none), joules.
    pub energy_j: Option<f64>,
    /// Output tokens of the requests that met their run's SLO, per second of the windows
    /// (None when some measured request was judged by no SLO).
    pub goodput_output_tps: Option<f64>,
    /// Speculative decoding's totals over the measured requests that speculated (None for a
    /// plain run, and then absent from the JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<SpecSummary>,
    /// metric name -> distribution
    pub dists: std::collections::BTreeMap<String, Stats>,
}

impl Figures {
    /// Figures of one run.
    pub fn compute(samples: &[ReqSample], memory: &[MemorySample]) -> Figures {
        Figures::pooled(&[(samples, memory)])
    }

    /// Figures over several runs pooled: distributions pool the samples; the
    /// window is the sum of the runs' windows (runs do not overlap in time).
    pub fn pooled(runs: &[(&[ReqSample], &[MemorySample])]) -> Figures {
        let mut f = Figures::default();
        let mut d: std::collections::BTreeMap<&str, Vec<f64>> =
            DIST_METRICS.iter().map(|m| (*m, vec![])).collect();
        let (mut cached, mut pf_tok, mut pf_ns, mut dec_tok, mut dec_ns) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut completed = 0usize;
        let (mut scored, mut correct) = (0usize, 0usize);
        let mut energy = Some(0.0);
        let mut good_tokens = Some(0u64);
        let mut specs: Vec<&SpecUse> = vec![];
        for (samples, memory) in runs {
            let measured: Vec<&ReqSample> = samples.iter().filter(|s| !s.warmup).collect();
            f.warmup += samples.len() - measured.len();
            if let (Some(a), Some(b)) = (
                measured.iter().map(|s| s.arrival_ns).min(),
                measured.iter().map(|s| s.finish_ns).max(),
            ) {
                f.window_ns += b.saturating_sub(a);
                energy = energy
                    .zip(crate::power::measured_energy(memory, a, b))
                    .map(|(x, y)| x + y);
            } else {
                energy = None;
            }
            for s in &measured {
                f.measured += 1;
                f.prompt_tokens += s.prompt_tokens;
                f.output_tokens += s.output_tokens;
                cached += s.cached_prompt_tokens;
                good_tokens = match (good_tokens, s.slo_attained) {
                    (Some(g), Some(true)) => Some(g + s.output_tokens),
                    (Some(g), Some(false)) => Some(g),
                    _ => None,
                };
                if let Some(c) = s.correct {
                    scored += 1;
                    correct += c as usize;
                }
                specs.extend(&s.spec);
                if s.failed {
                    f.failed += 1;
                    continue;
                }
                completed += 1;
                if let Some(t) = s.ttft() {
                    d.get_mut("ttft").unwrap().push(t);
                }
                if let Some(q) = s.schedule_ns {
                    d.get_mut("queue")
                        .unwrap()
                        .push(q.saturating_sub(s.arrival_ns) as f64);
                    if let Some(t1) = s.first_token_ns {
                        d.get_mut("ttft_engine")
                            .unwrap()
                            .push(t1.saturating_sub(q) as f64);
                    }
                }
                if let Some(t) = s.tpot() {
                    d.get_mut("tpot").unwrap().push(t);
                }
                d.get_mut("e2e").unwrap().push(s.e2e());
                let itl = d.get_mut("itl").unwrap();
                for w in s.token_ns.windows(2) {
                    itl.push(w[1].saturating_sub(w[0]) as f64);
                }
                if let (Some(a), Some(b)) = (s.prefill_start_ns, s.prefill_end_ns)
                    && b > a
                {
                    d.get_mut("prefill_tps")
                        .unwrap()
                        .push(s.computed_prompt_tokens as f64 * 1e9 / (b - a) as f64);
                    pf_tok += s.computed_prompt_tokens;
                    pf_ns += b - a;
                }
                if let (Some(a), Some(b)) = (s.first_token_ns, s.last_token_ns)
                    && s.output_tokens >= 2
                    && b > a
                {
                    d.get_mut("decode_tps")
                        .unwrap()
                        .push((s.output_tokens - 1) as f64 * 1e9 / (b - a) as f64);
                    dec_tok += s.output_tokens - 1;
                    dec_ns += b - a;
                }
            }
            for m in memory.iter() {
                f.rss_peak_bytes = Some(f.rss_peak_bytes.unwrap_or(0).max(m.rss_bytes));
                f.device_bytes_peak = Some(f.device_bytes_peak.unwrap_or(0).max(m.device_bytes));
                f.kv_bytes_peak = Some(f.kv_bytes_peak.unwrap_or(0).max(m.kv_bytes_used));
            }
        }
        let secs = f.window_ns as f64 / 1e9;
        if secs > 0.0 {
            f.rps = completed as f64 / secs;
            f.output_tps = f.output_tokens as f64 / secs;
            f.input_tps = f.prompt_tokens as f64 / secs;
        }
        f.error_rate = if f.measured > 0 {
            f.failed as f64 / f.measured as f64
        } else {
            0.0
        };
        f.prefix_hit_rate = (f.prompt_tokens > 0).then(|| cached as f64 / f.prompt_tokens as f64);
        f.prefill_tps_total = (pf_ns > 0).then(|| pf_tok as f64 * 1e9 / pf_ns as f64);
        f.decode_tps_total = (dec_ns > 0).then(|| dec_tok as f64 * 1e9 / dec_ns as f64);
        f.accuracy = crate::score::Accuracy::of(correct, scored);
        f.energy_j = energy.filter(|_| !runs.is_empty());
        f.spec = SpecSummary::of(specs);
        f.goodput_output_tps = good_tokens
            .filter(|_| f.measured > 0 && secs > 0.0)
            .map(|g| g as f64 / secs);
        for (k, v) in d {
            if let Some(s) = Stats::of(v) {
                f.dists.insert(k.to_string(), s);
            }
        }
        f
    }

    pub fn dist(&self, metric: &str) -> Option<&Stats> {
        self.dists.get(metric)
    }

    /// The rows written to `run_metrics`: (metric, stat, value).
    pub fn rows(&self) -> Vec<(String, String, Option<f64>)> {
        let mut out = vec![];
        let mut sys = |m: &str, v: Option<f64>| out.push((m.to_string(), "value".to_string(), v));
        sys("measured", Some(self.measured as f64));
        sys("failed", Some(self.failed as f64));
        sys("warmup", Some(self.warmup as f64));
        sys("window_ns", Some(self.window_ns as f64));
        sys("rps", Some(self.rps));
        sys("output_tps", Some(self.output_tps));
        sys("input_tps", Some(self.input_tps));
        sys("error_rate", Some(self.error_rate));
        sys("prefix_hit_rate", self.prefix_hit_rate);
        sys("prompt_tokens", Some(self.prompt_tokens as f64));
        sys("output_tokens", Some(self.output_tokens as f64));
        sys("prefill_tps_total", self.prefill_tps_total);
        sys("decode_tps_total", self.decode_tps_total);
        sys("rss_peak_bytes", self.rss_peak_bytes.map(|x| x as f64));
        sys(
            "device_bytes_peak",
            self.device_bytes_peak.map(|x| x as f64),
        );
        sys("kv_bytes_peak", self.kv_bytes_peak.map(|x| x as f64));
        if let Some(j) = self.energy_j {
            sys("energy_j", Some(j));
            sys(
                "j_per_output_token",
                (self.output_tokens > 0).then(|| j / self.output_tokens as f64),
            );
        }
        if let Some(g) = self.goodput_output_tps {
            sys("goodput_output_tps", Some(g));
        }
        if let Some(t) = &self.spec {
            // Durations in ns, as every latency in run_metrics.
            sys("spec_requests", Some(t.requests as f64));
            sys("drafted_tokens", Some(t.drafted as f64));
            sys("accepted_tokens", Some(t.accepted as f64));
            sys("rejected_tokens", Some(t.rejected as f64));
            sys("verify_steps", Some(t.verify_steps as f64));
            sys("acceptance_rate", t.acceptance_rate);
            sys("mean_accepted_run", t.mean_accepted_run);
            sys("draft_ns", Some((t.draft_ms * 1e6).round()));
            sys("verify_ns", Some((t.verify_ms * 1e6).round()));
        }
        if let Some(a) = &self.accuracy {
            sys("scored", Some(a.n as f64));
            sys("accuracy", Some(a.accuracy));
            sys("accuracy_ci95_low", Some(a.ci95_low));
            sys("accuracy_ci95_high", Some(a.ci95_high));
        }
        for (m, s) in &self.dists {
            for stat in [
                "n", "mean", "min", "max", "sd", "p50", "p90", "p95", "p99", "p99.9",
            ] {
                out.push((m.clone(), stat.to_string(), s.get(stat)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_uses_exact_ceiling() {
        let v: Vec<f64> = (1..=10).map(|x| x as f64).collect();
        assert_eq!(nearest_rank(&v, 900), 9.0); // 0.9*10 = 9 exactly, not 10
        assert_eq!(nearest_rank(&v, 500), 5.0);
        assert_eq!(nearest_rank(&v, 990), 10.0);
        assert_eq!(nearest_rank(&[7.0], 999), 7.0);
        assert!(thin(99, 990) && !thin(100, 990));
    }
}
