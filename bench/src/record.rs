//! What a benchmark run records, in the terms of `docs/METRICS.md`. These
//! types are shared by the harness (which fills them), the metrics (which read
//! them) and the SQLite store (which persists them).
//!
//! Every timestamp is nanoseconds since the run's start on one monotonic clock.

use serde::{Deserialize, Serialize};

pub use ember_runtime::serve::{CacheUse, FinishKind, SpecUse};

/// Nanoseconds since the start of the run.
pub type Ns = u64;

/// One request's life, as stamped by the engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Index in the workload (stable across runs of the same workload).
    pub request_id: u64,
    /// Warm-up requests are stored but excluded from every figure.
    pub warmup: bool,
    pub tags: Vec<String>,
    pub prompt_tokens: usize,
    /// Intended arrival (the schedule's time, not when the harness got to it).
    pub arrival_ns: Ns,
    pub enqueue_ns: Ns,
    pub schedule_ns: Option<Ns>,
    pub prefill_start_ns: Option<Ns>,
    pub prefill_end_ns: Option<Ns>,
    /// token[i] for i = 1..N, one per output token (not per text chunk) in-process; over HTTP
    /// one per received chunk that carried output (see [`Counted`]).
    pub token_ns: Vec<Ns>,
    pub finish_ns: Ns,
    pub finish_reason: FinishKind,
    pub error: Option<String>,
    pub cache: CacheUse,
    /// Generated text (may be dropped by the store to save space).
    pub output_text: Option<String>,
    /// Counts from outside the engine (a remote server's `usage`, a local tokenizer); all
    /// None in-process.
    #[serde(default)]
    pub counted: Counted,
    /// `--score`: whether the answer was right (None: not scored, or the request failed).
    #[serde(default)]
    pub correct: Option<bool>,
    /// Whether it met the run's SLO (None: judged by no SLO).
    #[serde(default)]
    pub slo_attained: Option<bool>,
    /// Speculative decoding's totals for this request (`--lookup`, `--draft`), from the
    /// server's `Speculation` event. None: the server did not speculate (a plain run, HTTP).
    #[serde(default)]
    pub spec: Option<SpecUse>,
}

/// Token counts of a request measured over HTTP (`ember bench --url`), where `token_ns` holds
/// one stamp per received chunk rather than per token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted {
    /// The server's `usage.prompt_tokens` (its chat template included).
    pub prompt_tokens: Option<usize>,
    /// The server's `usage.completion_tokens`.
    pub output_tokens: Option<usize>,
    /// The output text tokenized by the client (`--tokenizer` / `-m`).
    pub local_output_tokens: Option<usize>,
}

impl RequestRecord {
    /// Output tokens: the server's count, else the client's, else one per stamp (in-process,
    /// where every stamp is a token).
    pub fn output_tokens(&self) -> usize {
        self.counted
            .output_tokens
            .or(self.counted.local_output_tokens)
            .unwrap_or(self.token_ns.len())
    }
    /// Stamps in `token_ns`: tokens in-process, received chunks over HTTP.
    pub fn chunks(&self) -> usize {
        self.token_ns.len()
    }
    /// Some chunk carried more than one token (ITL is then per chunk).
    pub fn chunked(&self) -> bool {
        self.output_tokens() != self.token_ns.len()
    }
    pub fn failed(&self) -> bool {
        matches!(
            self.finish_reason,
            FinishKind::Error | FinishKind::Cancelled
        )
    }
}

/// A point of the memory timeline (METRICS.md, Memory).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    pub t_ns: Ns,
    pub rss_bytes: u64,
    pub device_bytes: u64,
    pub kv_bytes_used: u64,
    pub kv_bytes_reserved: u64,
    /// Watts from the power sensor (mean since its previous reading), on timer samples when
    /// one was found ([`crate::power`]); None otherwise.
    #[serde(default)]
    pub power_w: Option<f64>,
}

/// Where and on what a run happened (METRICS.md, Provenance).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub ember_version: String,
    pub git_commit: String,
    pub backend: String,
    pub adapter: String,
    pub driver: String,
    pub cpu_model: String,
    pub cpu_cores: usize,
    pub threads: usize,
    pub os: String,
    pub device_profile: Option<String>,
    pub model_path: String,
    pub model_sha256: String,
    pub model_arch: String,
    /// e.g. {"Q4_K": 169, "Q6_K": 25, ...} tensors per type, as JSON text.
    pub model_quant_mix: String,
    pub weights_bytes: u64,
    /// "mmap" (the file's pages, the default) or "read" (`--no-mmap`); empty when unknown
    /// (runs stored before schema v2).
    #[serde(default)]
    pub weights_load: String,
    /// How the requests reached the engine: "in-process" or "http" (empty: stored before v3,
    /// in-process).
    #[serde(default)]
    pub transport: String,
    /// `ember bench --url`: the endpoint (no credentials), the model id it served, and what
    /// it says it is (its `Server` header and the model's `owned_by`). Empty in-process.
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub server_model: String,
    #[serde(default)]
    pub server_version: String,
}

/// The workload a run executed: enough to reproduce it and to decide whether
/// two runs are comparable (equal `hash`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// Preset or dataset name ("chat", "rag", "file:prompts.jsonl", ...).
    pub name: String,
    pub seed: u64,
    /// Hex hash over prompt token ids, the arrival schedule and sampling params.
    pub hash: String,
    /// Load mode and parameters, e.g. {"mode":"concurrency","n":4}, as JSON text.
    pub load: String,
    /// Everything else (lengths, distributions, sampling), as JSON text.
    pub params: String,
    pub n_requests: usize,
    pub n_warmup: usize,
}

/// One SLO constraint's verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SloVerdict {
    /// e.g. "ttft_p99 <= 200ms"
    pub constraint: String,
    pub measured: f64,
    pub limit: f64,
    pub pass: bool,
}

/// A whole run: what the harness returns and the store persists.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Wall-clock start, RFC 3339 (for humans; all figures use the monotonic ns).
    pub started_at: String,
    pub provenance: Provenance,
    pub workload: WorkloadInfo,
    /// SLO profile name and its constraints as JSON text.
    pub slo_name: String,
    pub slo: String,
    pub slo_verdicts: Vec<SloVerdict>,
    pub slo_attainment: f64,
    pub goodput_rps: f64,
    pub records: Vec<RequestRecord>,
    pub memory: Vec<MemorySample>,
    pub cache_evictions: u64,
    /// The power sensor read during the run, and why it stopped being read (if it did).
    #[serde(default)]
    pub power_source: Option<String>,
    #[serde(default)]
    pub power_error: Option<String>,
    /// The price the run's $/Mtok figures come from, when one was given.
    #[serde(default)]
    pub price: Option<Price>,
    /// Summary figures (percentiles etc.) as computed by `metrics`, as JSON text,
    /// so the store can keep them verbatim next to the raw timestamps.
    pub summary_json: String,
}

/// A price for the run: the device's or cloud instance's per hour, or an API's per million
/// output tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Price {
    /// "--cost-per-hour", "profile NAME" or "--cost-per-mtok".
    pub source: String,
    pub usd_per_hour: Option<f64>,
    pub usd_per_mtok: Option<f64>,
}

/// One rate tried by a sweep.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub rate_rps: f64,
    /// Measured requests at this rate.
    pub n: usize,
    pub slo_attainment: f64,
    pub goodput_rps: f64,
    /// slo_attainment >= target
    pub pass: bool,
}

/// A sweep for `max_goodput_rate` (METRICS.md, System).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    /// Service rate measured with sync requests before the sweep (requests/s).
    pub capacity_rps: f64,
    pub target: f64,
    pub points: Vec<SweepPoint>,
    /// The highest rate tried whose attainment met the target (None: none did).
    pub max_goodput_rate: Option<f64>,
}
