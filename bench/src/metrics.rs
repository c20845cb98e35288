//! Every figure of `docs/METRICS.md`, as pure functions over
//! [`RequestRecord`]s. No clocks are read here.
//!
//! Units: latencies in milliseconds (from integer nanoseconds, so whole-ms
//! inputs give exact outputs), rates per second.
//!
//! Which requests count:
//! - warm-up requests never count;
//! - latency distributions (ttft, queue, ttft_engine, itl, tpot, e2e,
//!   prefill/decode tps) are over the measured requests that did not fail;
//! - `error_rate` = failed / measured, `slo_attainment` = attaining / measured
//!   (failed requests never attain);
//! - the window runs from the first arrival to the last finish of the measured
//!   requests, failed ones included.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::{MemorySample, Ns, RequestRecord, SloVerdict, SpecUse};
use crate::slo::{Slo, SloMetric, SloStat};

const NS_PER_MS: f64 = 1e6;
const NS_PER_S: f64 = 1e9;

fn ms(ns: Ns) -> f64 {
    ns as f64 / NS_PER_MS
}

/// The reported quantiles, as per-mille: p50, p90, p95, p99, p99.9.
pub const QUANTILES_PERMILLE: [(u64, &str); 5] = [
    (500, "p50"),
    (900, "p90"),
    (950, "p95"),
    (990, "p99"),
    (999, "p99.9"),
];

/// Nearest rank: the sample at rank ⌈q·n⌉ (1-based) of the sorted samples,
/// with q = permille/1000 in exact integer arithmetic. `None` when empty.
pub fn nearest_rank(sorted: &[f64], permille: u64) -> Option<f64> {
    let n = sorted.len() as u64;
    if n == 0 {
        return None;
    }
    let rank = (permille * n).div_ceil(1000).clamp(1, n);
    Some(sorted[(rank - 1) as usize])
}

/// `np.percentile(samples, q)` with numpy's default method (`"linear"`), q in percent, over
/// sorted samples: the value at the virtual index (n − 1)·q/100, interpolated between its two
/// neighbours with the same float operations as numpy's `_lerp`, so the result has the same
/// bits. This is what vLLM's benchmark reports as P99 etc.; ember's own figures use nearest rank.
pub fn numpy_percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let virtual_index = (n - 1) as f64 * (q / 100.0);
    if virtual_index >= (n - 1) as f64 {
        return Some(sorted[n - 1]);
    }
    if virtual_index < 0.0 {
        return Some(sorted[0]);
    }
    let below = virtual_index.floor();
    let gamma = virtual_index - below;
    let (a, b) = (sorted[below as usize], sorted[below as usize + 1]);
    let diff = b - a;
    // numpy interpolates from the nearer end.
    Some(if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    })
}

/// `np.mean(samples)` with numpy's summation (pairwise, in blocks of 8 up to 128 values), in
/// the samples' own order, so the result has numpy's bits. `None` when empty.
pub fn numpy_mean(samples: &[f64]) -> Option<f64> {
    fn pairwise(a: &[f64]) -> f64 {
        let n = a.len();
        if n < 8 {
            a.iter().fold(0.0, |s, x| s + x)
        } else if n <= 128 {
            let mut r = [0.0; 8];
            r.copy_from_slice(&a[..8]);
            let whole = n - n % 8;
            for c in a[8..whole].chunks_exact(8) {
                for (r, x) in r.iter_mut().zip(c) {
                    *r += x;
                }
            }
            let res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            a[whole..].iter().fold(res, |s, x| s + x)
        } else {
            let half = n / 2;
            let half = half - half % 8;
            pairwise(&a[..half]) + pairwise(&a[half..])
        }
    }
    (!samples.is_empty()).then(|| (0.0 + pairwise(samples)) / samples.len() as f64)
}

/// `np.median(samples)` over sorted samples: the middle one, or the mean of the two middle ones
/// (numpy averages them; it does not interpolate as `np.percentile(.., 50)` does).
pub fn numpy_median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// n is too small for the q-quantile to mean anything: n < 1/(1−q).
pub fn too_few(n: usize, permille: u64) -> bool {
    (n as u64) * (1000 - permille) < 1000
}

/// A distribution's summary. Percentiles listed in `small_sample` are shown
/// with a marker (n < 1/(1−q)). With n = 0 every figure is 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    pub n: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Sample standard deviation (n − 1); 0 for n ≤ 1.
    pub sd: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub small_sample: Vec<String>,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let p = |k| nearest_rank(&v, k).unwrap();
        Dist {
            n,
            mean,
            min: v[0],
            max: v[n - 1],
            sd,
            p50: p(500),
            p90: p(900),
            p95: p(950),
            p99: p(990),
            p999: p(999),
            small_sample: QUANTILES_PERMILLE
                .iter()
                .filter(|(k, _)| too_few(n, *k))
                .map(|(_, s)| s.to_string())
                .collect(),
        }
    }

    pub fn stat(&self, s: SloStat) -> f64 {
        match s {
            SloStat::P50 => self.p50,
            SloStat::P90 => self.p90,
            SloStat::P95 => self.p95,
            SloStat::P99 => self.p99,
            SloStat::P999 => self.p999,
            SloStat::Mean => self.mean,
            SloStat::Max => self.max,
        }
    }

    /// Whether `stat` is a percentile shown with the small-sample marker.
    pub fn is_small(&self, s: SloStat) -> bool {
        self.small_sample.iter().any(|x| x == s.name())
    }
}

// ---- per-request figures (ns unless noted) ----

pub fn ttft_ns(r: &RequestRecord) -> Option<Ns> {
    r.token_ns.first().map(|t| t.saturating_sub(r.arrival_ns))
}
pub fn queue_ns(r: &RequestRecord) -> Option<Ns> {
    r.schedule_ns.map(|s| s.saturating_sub(r.arrival_ns))
}
pub fn ttft_engine_ns(r: &RequestRecord) -> Option<Ns> {
    Some(r.token_ns.first()?.saturating_sub(r.schedule_ns?))
}
pub fn e2e_ns(r: &RequestRecord) -> Ns {
    r.finish_ns.saturating_sub(r.arrival_ns)
}
/// Gaps token[i+1] − token[i].
pub fn gaps_ns(r: &RequestRecord) -> impl Iterator<Item = Ns> + '_ {
    r.token_ns.windows(2).map(|w| w[1].saturating_sub(w[0]))
}
/// (token[N] − token[1]) / (N − 1) in ms, N ≥ 2 output tokens. Over HTTP, the first and last
/// stamps are chunks' (at least two needed) and N is the counted output tokens.
pub fn tpot_ms(r: &RequestRecord) -> Option<f64> {
    let (n, s) = (r.output_tokens(), r.token_ns.len());
    (n >= 2 && s >= 2).then(|| ms(r.token_ns[s - 1] - r.token_ns[0]) / (n - 1) as f64)
}
/// Computed prompt tokens / prefill time, tokens/s.
pub fn prefill_tps(r: &RequestRecord) -> Option<f64> {
    let d = r.prefill_end_ns?.checked_sub(r.prefill_start_ns?)?;
    let n = r.cache.computed_prompt_tokens;
    (d > 0 && n > 0).then(|| n as f64 * NS_PER_S / d as f64)
}
/// (N − 1) / (token[N] − token[1]), tokens/s.
pub fn decode_tps(r: &RequestRecord) -> Option<f64> {
    let (n, s) = (r.output_tokens(), r.token_ns.len());
    if n < 2 || s < 2 {
        return None;
    }
    let d = r.token_ns[s - 1] - r.token_ns[0];
    (d > 0).then(|| (n - 1) as f64 * NS_PER_S / d as f64)
}

/// Whether one request attains every constraint of the SLO with its own values.
pub fn attains(r: &RequestRecord, slo: &Slo) -> bool {
    if r.failed() {
        return false;
    }
    slo.constraints.iter().all(|c| {
        let v = match c.metric {
            SloMetric::Ttft => ttft_ns(r).map(ms),
            SloMetric::Queue => queue_ns(r).map(ms),
            SloMetric::TtftEngine => ttft_engine_ns(r).map(ms),
            SloMetric::E2e => Some(ms(e2e_ns(r))),
            SloMetric::Tpot => tpot_ms(r),
            SloMetric::Itl => gaps_ns(r).max().map(ms),
        };
        // A figure the request does not have (tpot with one token) cannot fail it.
        v.is_none_or(|v| v <= c.limit_ms)
    })
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SloReport {
    pub name: String,
    pub target: f64,
    pub verdicts: Vec<SloVerdict>,
    /// Constraints whose run-level statistic carries the small-sample marker.
    pub small_sample: Vec<String>,
    pub attaining: usize,
    pub slo_attainment: f64,
    /// Attaining requests per second of the window.
    pub goodput_rps: f64,
    /// Output tokens of the attaining requests per second of the window (what $/Mtok at the
    /// SLO divides by).
    #[serde(default)]
    pub goodput_output_tps: f64,
    /// Every constraint passes and attainment ≥ target.
    pub pass: bool,
}

/// Views of our numbers in other tools' definitions, labelled as such: each field computes what
/// the tool it is named after computes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Compat {
    /// GuideLLM "ITL" mean: per request (last − first)/(N − 1), averaged with weight N − 1 (its
    /// `inter_token_latency_ms` summary weights each request by `output_tokens - 1`). ms.
    pub guidellm_itl_ms: f64,
    /// vLLM "TPOT": per request (token[N] − token[1])/(N − 1) (= ember's tpot), over requests
    /// with N ≥ 2 as vLLM's benchmark summarises it: `np.mean`, `np.median`,
    /// `np.percentile(.., 99)` (linear interpolation, not nearest rank). ms.
    pub vllm_tpot_mean_ms: f64,
    pub vllm_tpot_median_ms: f64,
    pub vllm_tpot_p99_ms: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySummary {
    pub samples: usize,
    pub rss_peak_bytes: u64,
    pub device_bytes_peak: u64,
    pub kv_bytes_used_peak: u64,
    pub kv_bytes_reserved_peak: u64,
}

pub fn memory_summary(samples: &[MemorySample]) -> MemorySummary {
    MemorySummary {
        samples: samples.len(),
        rss_peak_bytes: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        device_bytes_peak: samples.iter().map(|s| s.device_bytes).max().unwrap_or(0),
        kv_bytes_used_peak: samples.iter().map(|s| s.kv_bytes_used).max().unwrap_or(0),
        kv_bytes_reserved_peak: samples
            .iter()
            .map(|s| s.kv_bytes_reserved)
            .max()
            .unwrap_or(0),
    }
}

/// Speculative decoding over a run's measured requests that speculated (failed ones included:
/// their drafts were work done), token-weighted (METRICS.md, Speculative decoding).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpecSummary {
    /// Requests that reported speculation totals.
    pub requests: usize,
    pub drafted: u64,
    pub accepted: u64,
    /// drafted − accepted.
    pub rejected: u64,
    pub verify_steps: u64,
    /// Σ accepted / Σ drafted (None: nothing drafted).
    pub acceptance_rate: Option<f64>,
    /// Σ accepted / Σ verify passes (None: no verify pass).
    pub mean_accepted_run: Option<f64>,
    /// Σ of the requests' draft and verify times, ms. A pass shared by several requests counts
    /// in full for each, so under batching these exceed the wall time.
    pub draft_ms: f64,
    pub verify_ms: f64,
}

impl SpecSummary {
    /// The totals of `specs`; None when there are none (the run did not speculate).
    pub fn of<'a>(specs: impl IntoIterator<Item = &'a SpecUse>) -> Option<SpecSummary> {
        let mut t = SpecSummary::default();
        let (mut draft_ns, mut verify_ns) = (0u64, 0u64);
        for s in specs {
            t.requests += 1;
            t.drafted += s.drafted as u64;
            t.accepted += s.accepted as u64;
            t.rejected += s.drafted.saturating_sub(s.accepted) as u64;
            t.verify_steps += s.verify_steps as u64;
            draft_ns += s.draft_ns;
            verify_ns += s.verify_ns;
        }
        if t.requests == 0 {
            return None;
        }
        t.acceptance_rate = (t.drafted > 0).then(|| t.accepted as f64 / t.drafted as f64);
        t.mean_accepted_run =
            (t.verify_steps > 0).then(|| t.accepted as f64 / t.verify_steps as f64);
        t.draft_ms = ms(draft_ns);
        t.verify_ms = ms(verify_ns);
        Some(t)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n_total: usize,
    pub n_warmup: usize,
    pub n_measured: usize,
    pub n_completed: usize,
    pub n_failed: usize,
    /// First arrival → last finish of the measured requests, seconds.
    pub window_s: f64,
    pub ttft_ms: Dist,
    pub queue_ms: Dist,
    pub ttft_engine_ms: Dist,
    /// Pooled over every gap of every request (token-weighted); per chunk when `itl_per_chunk`.
    pub itl_ms: Dist,
    /// Over HTTP some chunk carried several tokens: `itl_ms` (and ttft's end) are then per
    /// received chunk, not per token (nothing is spread over a chunk's tokens).
    #[serde(default)]
    pub itl_per_chunk: bool,
    /// Stamps taken: tokens in-process, received chunks over HTTP.
    #[serde(default)]
    pub chunks: u64,
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    pub prefill_tps: Dist,
    /// Σ computed prompt tokens / Σ prefill time.
    pub prefill_tps_total: f64,
    pub decode_tps: Dist,
    /// Σ (N − 1) / Σ (token[N] − token[1]).
    pub decode_tps_total: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub rps: f64,
    pub output_tps: f64,
    pub input_tps: f64,
    pub error_rate: f64,
    pub cached_prompt_tokens: u64,
    /// Σ cached / Σ prompt tokens over the measured requests.
    pub prefix_hit_rate: f64,
    pub slo: Option<SloReport>,
    pub compat: Compat,
    pub memory: MemorySummary,
    /// `--score`: accuracy over the measured requests that were scored.
    #[serde(default)]
    pub accuracy: Option<crate::score::Accuracy>,
    /// Energy of the measured window (a sensor's, or a labelled estimate).
    #[serde(default)]
    pub energy: Option<crate::power::Energy>,
    /// Why a power sensor was found but no energy is reported (it failed mid-run).
    #[serde(default)]
    pub energy_gap: Option<String>,
    /// Dollars per million output tokens, when a cost is known (`--cost-per-hour`, a
    /// `--target` profile, or `--cost-per-mtok` for an API).
    #[serde(default)]
    pub cost: Option<Cost>,
    /// Speculative decoding's totals (None, and absent from the JSON, for a plain run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<SpecSummary>,
}

/// What a run's output tokens cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Where the price comes from: "--cost-per-hour", "profile NAME", "--cost-per-mtok".
    pub source: String,
    /// The device's (or cloud instance's) price per hour.
    pub usd_per_hour: Option<f64>,
    /// $/Mtok at the measured output throughput (every request's tokens).
    pub usd_per_mtok: Option<f64>,
    /// $/Mtok at goodput: only the SLO-attaining requests' tokens count as delivered.
    pub usd_per_mtok_at_slo: Option<f64>,
    /// What this run cost: the window at the hourly price, or its output tokens at the API's.
    pub run_usd: Option<f64>,
}

impl Cost {
    /// From an hourly price: the device is paid for the whole window whatever it delivers.
    pub fn per_hour(source: &str, usd_per_hour: f64, s: &Summary) -> Cost {
        let per_mtok = |tps: f64| (tps > 0.0).then(|| usd_per_hour / (tps * 3600.0) * 1e6);
        Cost {
            source: source.into(),
            usd_per_hour: Some(usd_per_hour),
            usd_per_mtok: per_mtok(s.output_tps),
            usd_per_mtok_at_slo: s.slo.as_ref().and_then(|r| per_mtok(r.goodput_output_tps)),
            run_usd: Some(usd_per_hour * s.window_s / 3600.0),
        }
    }

    /// From an API's price per million output tokens: delivered-at-SLO tokens cost more per
    /// useful token when some requests miss the SLO.
    pub fn per_mtok(usd_per_mtok: f64, s: &Summary) -> Cost {
        let at_slo = s.slo.as_ref().and_then(|r| {
            (r.goodput_output_tps > 0.0).then(|| usd_per_mtok * s.output_tps / r.goodput_output_tps)
        });
        Cost {
            source: "--cost-per-mtok".into(),
            usd_per_hour: None,
            usd_per_mtok: Some(usd_per_mtok),
            usd_per_mtok_at_slo: at_slo,
            run_usd: Some(usd_per_mtok * s.output_tokens as f64 / 1e6),
        }
    }

    pub fn text(&self) -> String {
        let money = |v: Option<f64>| {
            v.map_or("–".to_string(), |x| match x {
                x if x == 0.0 || x >= 1.0 => format!("${x:.2}"),
                x if x >= 0.01 => format!("${x:.4}"),
                x => format!("${x:.3e}"),
            })
        };
        let mut t = match self.usd_per_hour {
            Some(h) => format!("${h}/h ({})", self.source),
            None => format!("{} ({})", money(self.usd_per_mtok), self.source),
        };
        t.push_str(&format!(
            " · {}/Mtok output · {}/Mtok at the SLO (goodput) · this run {}",
            money(self.usd_per_mtok),
            money(self.usd_per_mtok_at_slo),
            money(self.run_usd)
        ));
        t
    }
}

/// Summarise the measured requests (warm-ups dropped here).
pub fn summarize(records: &[RequestRecord], memory: &[MemorySample], slo: Option<&Slo>) -> Summary {
    let measured: Vec<&RequestRecord> = records.iter().filter(|r| !r.warmup).collect();
    let ok: Vec<&RequestRecord> = measured.iter().copied().filter(|r| !r.failed()).collect();
    let n_failed = measured.len() - ok.len();
    let window_ns = match (
        measured.iter().map(|r| r.arrival_ns).min(),
        measured.iter().map(|r| r.finish_ns).max(),
    ) {
        (Some(a), Some(f)) => f.saturating_sub(a),
        _ => 0,
    };
    let window_s = window_ns as f64 / NS_PER_S;
    let per_s = |x: f64| {
        if window_ns > 0 {
            x * NS_PER_S / window_ns as f64
        } else {
            0.0
        }
    };

    let prompt_tokens: u64 = measured.iter().map(|r| r.prompt_tokens as u64).sum();
    let output_tokens: u64 = measured.iter().map(|r| r.output_tokens() as u64).sum();
    let cached: u64 = measured
        .iter()
        .map(|r| r.cache.cached_prompt_tokens as u64)
        .sum();

    let (prefill_tps_total, decode_tps_total) = phase_totals(&ok);
    let tpots: Vec<f64> = ok.iter().filter_map(|r| tpot_ms(r)).collect();
    let compat = compat_figures(&ok, &tpots);
    let tpot = Dist::of(tpots);
    let itl = Dist::of(ok.iter().flat_map(|r| gaps_ns(r)).map(ms).collect());

    let mut s = Summary {
        n_total: records.len(),
        n_warmup: records.len() - measured.len(),
        n_measured: measured.len(),
        n_completed: ok.len(),
        n_failed,
        window_s,
        ttft_ms: Dist::of(ok.iter().filter_map(|r| ttft_ns(r)).map(ms).collect()),
        queue_ms: Dist::of(ok.iter().filter_map(|r| queue_ns(r)).map(ms).collect()),
        ttft_engine_ms: Dist::of(
            ok.iter()
                .filter_map(|r| ttft_engine_ns(r))
                .map(ms)
                .collect(),
        ),
        itl_ms: itl,
        itl_per_chunk: measured.iter().any(|r| r.chunked()),
        chunks: measured.iter().map(|r| r.chunks() as u64).sum(),
        tpot_ms: tpot,
        e2e_ms: Dist::of(ok.iter().map(|r| ms(e2e_ns(r))).collect()),
        prefill_tps: Dist::of(ok.iter().filter_map(|r| prefill_tps(r)).collect()),
        prefill_tps_total,
        decode_tps: Dist::of(ok.iter().filter_map(|r| decode_tps(r)).collect()),
        decode_tps_total,
        prompt_tokens,
        output_tokens,
        rps: per_s(ok.len() as f64),
        output_tps: per_s(output_tokens as f64),
        input_tps: per_s(prompt_tokens as f64),
        error_rate: if measured.is_empty() {
            0.0
        } else {
            n_failed as f64 / measured.len() as f64
        },
        cached_prompt_tokens: cached,
        prefix_hit_rate: if prompt_tokens > 0 {
            cached as f64 / prompt_tokens as f64
        } else {
            0.0
        },
        slo: None,
        accuracy: crate::score::Accuracy::over(measured.iter().map(|r| &r.correct)),
        energy: None,
        energy_gap: None,
        cost: None,
        spec: SpecSummary::of(measured.iter().filter_map(|r| r.spec.as_ref())),
        compat,
        memory: memory_summary(memory),
    };
    if let Some(slo) = slo {
        let attaining: Vec<&&RequestRecord> = measured.iter().filter(|r| attains(r, slo)).collect();
        let good_tokens: u64 = attaining.iter().map(|r| r.output_tokens() as u64).sum();
        let mut rep = slo_report(
            &s,
            slo,
            attaining.len(),
            measured.len(),
            per_s(attaining.len() as f64),
        );
        rep.goodput_output_tps = per_s(good_tokens as f64);
        s.slo = Some(rep);
    }
    s
}

/// The SLO's verdicts on a summary's distributions, and its goodput.
fn slo_report(
    s: &Summary,
    slo: &Slo,
    attaining: usize,
    n_measured: usize,
    goodput_rps: f64,
) -> SloReport {
    let attainment = if n_measured == 0 {
        0.0
    } else {
        attaining as f64 / n_measured as f64
    };
    let mut small = vec![];
    let verdicts: Vec<SloVerdict> = slo
        .constraints
        .iter()
        .map(|c| {
            let d = match c.metric {
                SloMetric::Ttft => &s.ttft_ms,
                SloMetric::Itl => &s.itl_ms,
                SloMetric::Tpot => &s.tpot_ms,
                SloMetric::E2e => &s.e2e_ms,
                SloMetric::Queue => &s.queue_ms,
                SloMetric::TtftEngine => &s.ttft_engine_ms,
            };
            if d.is_small(c.stat) {
                small.push(c.to_string());
            }
            let measured = d.stat(c.stat);
            // An empty distribution (e.g. no request with 2 tokens for itl) cannot pass.
            SloVerdict {
                constraint: c.to_string(),
                measured,
                limit: c.limit_ms,
                pass: d.n > 0 && measured <= c.limit_ms,
            }
        })
        .collect();
    let pass = verdicts.iter().all(|v| v.pass) && attainment >= slo.target;
    SloReport {
        name: slo.name.clone(),
        target: slo.target,
        verdicts,
        small_sample: small,
        attaining,
        slo_attainment: attainment,
        goodput_rps,
        goodput_output_tps: 0.0,
        pass,
    }
}

/// Whole-run prefill and decode throughput (tokens/s): Σ tokens over Σ phase time of the
/// completed requests.
fn phase_totals(ok: &[&RequestRecord]) -> (f64, f64) {
    let (mut pf_tok, mut pf_ns) = (0u64, 0u64);
    let (mut dc_tok, mut dc_ns) = (0u64, 0u64);
    for r in ok {
        if let (Some(s), Some(e)) = (r.prefill_start_ns, r.prefill_end_ns) {
            pf_tok += r.cache.computed_prompt_tokens as u64;
            pf_ns += e.saturating_sub(s);
        }
        let (n, s) = (r.output_tokens(), r.token_ns.len());
        if n >= 2 && s >= 2 {
            dc_tok += (n - 1) as u64;
            dc_ns += r.token_ns[s - 1] - r.token_ns[0];
        }
    }
    let rate = |tok: u64, ns: u64| {
        if ns > 0 {
            tok as f64 * NS_PER_S / ns as f64
        } else {
            0.0
        }
    };
    (rate(pf_tok, pf_ns), rate(dc_tok, dc_ns))
}

/// Other harnesses' figures computed their way: GuideLLM's gap-weighted ITL, vLLM's numpy TPOT
/// statistics (`tpots` in request order: numpy sums in the order it is given).
fn compat_figures(ok: &[&RequestRecord], tpots: &[f64]) -> Compat {
    let mut tpots_sorted = tpots.to_vec();
    tpots_sorted.sort_by(|a, b| a.total_cmp(b));
    let (gw_num, gw_den) = ok
        .iter()
        .filter_map(|r| {
            let gaps = r.output_tokens().saturating_sub(1) as f64;
            tpot_ms(r).map(|t| (t * gaps, gaps))
        })
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    Compat {
        guidellm_itl_ms: if gw_den > 0.0 { gw_num / gw_den } else { 0.0 },
        vllm_tpot_mean_ms: numpy_mean(tpots).unwrap_or(0.0),
        vllm_tpot_median_ms: numpy_median(&tpots_sorted).unwrap_or(0.0),
        vllm_tpot_p99_ms: numpy_percentile(&tpots_sorted, 99.0).unwrap_or(0.0),
    }
}

/// A few figures per tag (requests carry tags; a request with several tags counts in each).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TagRow {
    pub tag: String,
    pub n: usize,
    pub n_failed: usize,
    pub ttft_p50_ms: f64,
    pub e2e_p50_ms: f64,
    pub output_tokens: u64,
    /// `--score`: accuracy of this tag's scored requests.
    pub accuracy: Option<crate::score::Accuracy>,
}

pub fn by_tag(records: &[RequestRecord]) -> Vec<TagRow> {
    let mut groups: BTreeMap<&str, Vec<&RequestRecord>> = BTreeMap::new();
    for r in records.iter().filter(|r| !r.warmup) {
        for t in &r.tags {
            groups.entry(t.as_str()).or_default().push(r);
        }
    }
    groups
        .into_iter()
        .map(|(tag, rs)| {
            let ok: Vec<_> = rs.iter().filter(|r| !r.failed()).collect();
            TagRow {
                tag: tag.to_string(),
                n: rs.len(),
                n_failed: rs.len() - ok.len(),
                ttft_p50_ms: Dist::of(ok.iter().filter_map(|r| ttft_ns(r)).map(ms).collect()).p50,
                e2e_p50_ms: Dist::of(ok.iter().map(|r| ms(e2e_ns(r))).collect()).p50,
                output_tokens: rs.iter().map(|r| r.output_tokens() as u64).sum(),
                accuracy: crate::score::Accuracy::over(rs.iter().map(|r| &r.correct)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_definition() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(nearest_rank(&v, 500), Some(50.0));
        assert_eq!(nearest_rank(&v, 990), Some(99.0));
        assert_eq!(nearest_rank(&v, 999), Some(100.0)); // ⌈99.9⌉ = 100
        let v: Vec<f64> = (1..=10).map(|x| x as f64).collect();
        assert_eq!(nearest_rank(&v, 500), Some(5.0));
        assert_eq!(nearest_rank(&v, 900), Some(9.0));
        assert_eq!(nearest_rank(&v, 950), Some(10.0)); // ⌈9.5⌉
        assert_eq!(nearest_rank(&[7.0], 999), Some(7.0));
        assert_eq!(nearest_rank(&[], 500), None);
        // small-sample marker: n < 1/(1−q)
        assert!(too_few(1, 500) && !too_few(2, 500));
        assert!(too_few(99, 990) && !too_few(100, 990));
        assert!(too_few(999, 999) && !too_few(1000, 999));
        assert!(too_few(19, 950) && !too_few(20, 950));
    }

    /// Expected values printed by numpy 2.4.6 (python3 venv, `pip install numpy`) with
    /// `repr(float(np.mean(a)))`, `np.median(a)` and `np.percentile(a, q)` for
    /// `a = np.array(v, dtype=np.float64)` and the samples below; equality is exact because the
    /// same float operations are done in the same order.
    #[test]
    fn numpy_mean_median_and_percentile_match_numpy() {
        // v[i] = (i·7919 mod 1000)/7 + 0.1·i, the same float operations in Python and here;
        // n = 13 takes numpy's unrolled sum, n = 300 its recursive split.
        let sample = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| ((i * 7919) % 1000) as f64 / 7.0 + 0.1 * i as f64)
                .collect()
        };
        let (v13, v300) = (sample(13), sample(300));
        type Case<'a> = (&'a [f64], f64, f64, [f64; 5]);
        // (samples, np.mean, np.median, np.percentile at 50, 90, 95, 99, 99.9)
        let cases: [Case; 6] = [
            (
                &v13,
                63.03956043956044, // a plain left-to-right sum would give ...045
                62.55714285714286,
                [
                    62.55714285714286,
                    117.62,
                    124.50285714285712,
                    130.00914285714282,
                    131.24805714285714,
                ],
            ),
            (
                &v300,
                86.45,
                86.33571428571429,
                [
                    86.33571428571429,
                    143.63,
                    152.9507142857143,
                    164.42499999999998,
                    169.45127142857152,
                ],
            ),
            (
                &[12.5, 3.25, 7.0, 19.75, 4.5, 8.125, 30.0],
                12.160714285714286,
                8.125,
                [
                    8.125,
                    23.85,
                    26.924999999999994,
                    29.384999999999994,
                    29.93850000000001,
                ],
            ),
            (
                &[0.1, 0.7, 0.2, 0.3, 1.1, 0.45],
                0.4750000000000001,
                0.375,
                [0.375, 0.9, 1.0, 1.08, 1.0980000000000005],
            ),
            (&[4.0, 6.0], 5.0, 5.0, [5.0, 5.8, 5.9, 5.98, 5.998]),
            (&[2.5], 2.5, 2.5, [2.5; 5]),
        ];
        for (v, mean, median, pcts) in cases {
            let mut sorted = v.to_vec();
            sorted.sort_by(|a, b| a.total_cmp(b));
            assert_eq!(numpy_mean(v), Some(mean), "{v:?}");
            assert_eq!(numpy_median(&sorted), Some(median), "{v:?}");
            for (q, want) in [50.0, 90.0, 95.0, 99.0, 99.9].into_iter().zip(pcts) {
                assert_eq!(numpy_percentile(&sorted, q), Some(want), "{v:?} q={q}");
            }
        }
        assert_eq!(numpy_percentile(&[], 99.0), None);
        assert_eq!(numpy_mean(&[]), None);
        assert_eq!(numpy_median(&[]), None);
    }

    #[test]
    fn dist_exact() {
        let d = Dist::of(vec![30.0, 10.0, 20.0]);
        assert_eq!(
            (d.n, d.mean, d.min, d.max, d.sd, d.p50, d.p90, d.p99),
            (3, 20.0, 10.0, 30.0, 10.0, 20.0, 30.0, 30.0)
        );
        assert_eq!(d.small_sample, ["p90", "p95", "p99", "p99.9"]);
        assert_eq!(Dist::of(vec![]), Dist::default());
    }
}
