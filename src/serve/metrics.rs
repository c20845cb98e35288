//! `/metrics`: Prometheus text exposition (format 0.0.4) of what the server measured.
//!
//! The engine thread updates these as events happen (histograms and counters) and after every
//! step (the gauges), so a scrape never waits for the engine. Latencies are in seconds, as
//! Prometheus' base units want; TTFT counts from the moment the HTTP request arrived, so time
//! spent queueing shows (docs/METRICS.md).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5,
];
const E2E_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0,
];

/// Finish reasons, as `ember_requests_total{finish_reason}` labels them.
pub const FINISH_REASONS: [&str; 4] = ["stop", "length", "error", "cancelled"];

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }
    fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug)]
struct Histograms {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

#[derive(Debug)]
pub struct Metrics {
    model: String,
    hist: Mutex<Histograms>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    /// Speculative decoding: draft tokens verified, and those the target kept.
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
    /// Per [`FINISH_REASONS`].
    pub finished: [AtomicU64; 4],
    pub rejected_queue_full: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_bytes_used: AtomicU64,
}

impl Metrics {
    pub fn new(model: &str) -> Self {
        Metrics {
            model: model.replace(['\\', '"', '\n'], "_"),
            hist: Mutex::new(Histograms {
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                e2e: Histogram::new(E2E_BUCKETS),
            }),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            spec_drafted: AtomicU64::new(0),
            spec_accepted: AtomicU64::new(0),
            finished: Default::default(),
            rejected_queue_full: AtomicU64::new(0),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            kv_blocks_used: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            kv_bytes_used: AtomicU64::new(0),
        }
    }

    fn hist(&self) -> std::sync::MutexGuard<'_, Histograms> {
        // A panic elsewhere cannot leave a histogram half-updated in a way that matters.
        self.hist.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn observe_ttft(&self, s: f64) {
        self.hist().ttft.observe(s);
    }
    pub fn observe_itl(&self, s: f64) {
        self.hist().itl.observe(s);
    }
    pub fn observe_e2e(&self, s: f64) {
        self.hist().e2e.observe(s);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(g: &AtomicU64, v: u64) {
        g.store(v, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(8 << 10);
        let l = format!("model_name=\"{}\"", self.model);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {v}"
            );
        };
        one(
            "ember_requests_running",
            "gauge",
            "Requests in the running batch.",
            get(&self.running),
        );
        one(
            "ember_requests_waiting",
            "gauge",
            "Requests waiting for admission.",
            get(&self.waiting),
        );
        one(
            "ember_kv_blocks_used",
            "gauge",
            "KV cache blocks referenced by a sequence.",
            get(&self.kv_blocks_used),
        );
        one(
            "ember_kv_blocks",
            "gauge",
            "KV cache blocks in the budget.",
            get(&self.kv_blocks_total),
        );
        one(
            "ember_kv_used_bytes",
            "gauge",
            "Bytes of the KV blocks referenced by a sequence.",
            get(&self.kv_bytes_used),
        );
        one(
            "ember_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            get(&self.prompt_tokens),
        );
        one(
            "ember_generation_tokens_total",
            "counter",
            "Generated tokens.",
            get(&self.generation_tokens),
        );
        one(
            "ember_prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            get(&self.prefix_cache_queries),
        );
        one(
            "ember_prefix_cache_hits_total",
            "counter",
            "Prompt tokens served from the prefix cache (not computed).",
            get(&self.prefix_cache_hits),
        );
        one(
            "ember_spec_draft_tokens_total",
            "counter",
            "Draft tokens proposed by speculative decoding (--lookup, --draft) and verified.",
            get(&self.spec_drafted),
        );
        one(
            "ember_spec_accepted_tokens_total",
            "counter",
            "Draft tokens the target kept (each an output token without a pass of its own).",
            get(&self.spec_accepted),
        );
        one(
            "ember_requests_rejected_total",
            "counter",
            "Requests refused with 429 because the queue was full.",
            get(&self.rejected_queue_full),
        );
        let _ = writeln!(
            o,
            "# HELP ember_requests_total Finished requests by finish reason.\n# TYPE ember_requests_total counter"
        );
        for (r, c) in FINISH_REASONS.iter().zip(&self.finished) {
            let _ = writeln!(
                o,
                "ember_requests_total{{{l},finish_reason=\"{r}\"}} {}",
                get(c)
            );
        }
        let h = self.hist();
        h.ttft.render(
            &mut o,
            "ember_time_to_first_token_seconds",
            "Time from the request's arrival to its first token.",
        );
        h.itl.render(
            &mut o,
            "ember_inter_token_latency_seconds",
            "Time between consecutive output tokens of a request.",
        );
        h.e2e.render(
            &mut o,
            "ember_e2e_request_latency_seconds",
            "Time from the request's arrival to its end.",
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let mut h = Histogram::new(&[0.125, 1.0]);
        for v in [0.0625, 0.125, 0.5, 3.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x_seconds", "x");
        assert!(s.contains("x_seconds_bucket{le=\"0.125\"} 2\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"1\"} 3\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_seconds_sum 3.6875\n"), "{s}");
    }
}
