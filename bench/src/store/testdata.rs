//! Synthetic `RunResult`s with realistic timestamps, for the store's tests,
//! the report's rendering test and demos (`ember export --demo` is not a
//! thing; tests call [`synth_run`] directly). Deterministic from the seed.

use crate::record::*;

/// What to synthesize.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub seed: u64,
    pub n_requests: usize,
    pub n_warmup: usize,
    /// Simultaneous slots in the simulated server.
    pub concurrency: usize,
    /// Mean arrival rate (requests/s, Poisson); 0 = all arrive at once (closed loop-like).
    pub rate: f64,
    /// Mean decode gap between tokens, ms.
    pub itl_ms: f64,
    /// Prefill time per prompt token, ms.
    pub prefill_ms_per_token: f64,
    pub prompt_tokens: (usize, usize),
    pub output_tokens: (usize, usize),
    pub backend: String,
    pub device_profile: Option<String>,
    pub workload_name: String,
    /// Defaults to a hash of name, seed and n_requests when empty.
    pub workload_hash: String,
    /// Fraction of requests that fail with an error.
    pub error_fraction: f64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            seed: 1,
            n_requests: 40,
            n_warmup: 1,
            concurrency: 4,
            rate: 8.0,
            itl_ms: 20.0,
            prefill_ms_per_token: 0.5,
            prompt_tokens: (16, 200),
            output_tokens: (8, 64),
            backend: "cpu".into(),
            device_profile: None,
            workload_name: "chat".into(),
            workload_hash: String::new(),
            error_fraction: 0.0,
        }
    }
}

/// xorshift64*: small, deterministic.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn f(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as usize
    }
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f()).ln()
    }
}

/// A synthetic run: a `concurrency`-slot server fed by Poisson arrivals.
pub fn synth_run(spec: &SynthSpec) -> RunResult {
    let mut rng = Rng::new(spec.seed);
    let records = synth_records(spec, &mut rng);
    let memory = synth_memory(spec, &records, &mut rng);
    let measured: Vec<&RequestRecord> = records.iter().filter(|r| !r.warmup).collect();
    let attaining = measured
        .iter()
        .filter(|r| {
            !r.failed()
                && r.token_ns
                    .first()
                    .is_some_and(|&t| t - r.arrival_ns <= 500_000_000)
        })
        .count();
    let win = measured.iter().map(|r| r.finish_ns).max().unwrap_or(0)
        - measured.iter().map(|r| r.arrival_ns).min().unwrap_or(0);
    RunResult {
        started_at: "2025-06-01T12:00:00Z".into(),
        provenance: synth_provenance(spec),
        workload: synth_workload(spec),
        slo_name: "chat-interactive".into(),
        slo: r#"{"ttft_p99_ms":500}"#.into(),
        slo_verdicts: vec![SloVerdict {
            constraint: "ttft_p99 <= 500ms".into(),
            measured: 0.0,
            limit: 500.0,
            pass: true,
        }],
        slo_attainment: attaining as f64 / measured.len().max(1) as f64,
        goodput_rps: attaining as f64 / (win.max(1) as f64 / 1e9),
        records,
        memory,
        cache_evictions: 3,
        power_source: None,
        power_error: None,
        price: None,
        summary_json: "{}".into(),
    }
}

/// The requests: arrivals, queueing for a slot, prefill, tokens with jitter and stalls.
fn synth_records(spec: &SynthSpec, rng: &mut Rng) -> Vec<RequestRecord> {
    let ms = 1_000_000.0f64;
    let total = spec.n_warmup + spec.n_requests;
    let mut slots = vec![0u64; spec.concurrency.max(1)];
    let mut t_arr = 0.0f64;
    let mut records = vec![];
    for i in 0..total {
        if spec.rate > 0.0 {
            t_arr += rng.exp(1e9 / spec.rate);
        }
        let arrival = t_arr as u64;
        let enqueue = arrival + 20_000 + (rng.f() * 30_000.0) as u64;
        let (slot, free) = slots
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(_, t)| t)
            .unwrap();
        let schedule = enqueue.max(free) + 50_000;
        let prompt = rng.range(spec.prompt_tokens.0, spec.prompt_tokens.1);
        let cached = if i % 3 == 0 {
            (prompt / 2) / 16 * 16
        } else {
            0
        };
        let computed = prompt - cached;
        let pf_start = schedule + 10_000;
        let pf_end = pf_start
            + ((computed.max(1) as f64) * spec.prefill_ms_per_token * ms * (0.9 + 0.2 * rng.f()))
                as u64;
        let n_out = rng.range(spec.output_tokens.0, spec.output_tokens.1);
        let fail = rng.f() < spec.error_fraction;
        let mut t = pf_end as f64 + 0.3 * ms;
        let mut token_ns = vec![];
        let n_emit = if fail { n_out / 3 } else { n_out };
        for k in 0..n_emit {
            if k > 0 {
                // gamma-ish jitter around the mean, with occasional stalls
                let j = 0.7 + 0.6 * rng.f();
                let stall = if rng.f() < 0.02 { 4.0 } else { 1.0 };
                t += spec.itl_ms * ms * j * stall;
            }
            token_ns.push(t as u64);
        }
        let finish = token_ns.last().copied().unwrap_or(pf_end) + 100_000;
        slots[slot] = finish;
        records.push(RequestRecord {
            request_id: i as u64,
            warmup: i < spec.n_warmup,
            tags: vec![if i % 2 == 0 {
                "everyday".into()
            } else {
                "code".into()
            }],
            prompt_tokens: prompt,
            arrival_ns: arrival,
            enqueue_ns: enqueue,
            schedule_ns: Some(schedule),
            prefill_start_ns: Some(pf_start),
            prefill_end_ns: Some(pf_end),
            token_ns,
            finish_ns: finish,
            finish_reason: if fail {
                FinishKind::Error
            } else if rng.f() < 0.5 {
                FinishKind::Stop
            } else {
                FinishKind::Length
            },
            error: fail.then(|| "synthetic failure".to_string()),
            cache: CacheUse {
                cached_prompt_tokens: cached,
                computed_prompt_tokens: computed,
                cache_lookups: 1,
                cache_hit_blocks: cached / 16,
            },
            output_text: Some(format!("output of request {i}")),
            counted: Default::default(),
            correct: None,
            slo_attained: None,
            spec: None,
        });
    }
    records
}

/// A memory sample every 50 ms or more (at most ~2000): RSS and KV following the active
/// requests.
fn synth_memory(spec: &SynthSpec, records: &[RequestRecord], rng: &mut Rng) -> Vec<MemorySample> {
    let end = records.iter().map(|r| r.finish_ns).max().unwrap_or(0);
    let mut memory = vec![];
    let mut tm = 0u64;
    // every 50 ms, at most ~2000 samples
    let step = (end / 2000).max(50_000_000);
    let base = 180u64 << 20;
    while tm <= end + 50_000_000 {
        let active = records
            .iter()
            .filter(|r| r.schedule_ns.unwrap() <= tm && r.finish_ns >= tm)
            .count() as u64;
        let kv = active * (6 << 20) + (rng.f() * (1 << 20) as f64) as u64;
        memory.push(MemorySample {
            t_ns: tm,
            rss_bytes: base + kv + (tm / 1_000_000) * 1024,
            device_bytes: if spec.backend == "cpu" {
                0
            } else {
                base / 2 + kv
            },
            kv_bytes_used: kv,
            kv_bytes_reserved: 64 << 20,
            power_w: None,
        });
        tm += step;
    }
    memory
}

fn synth_workload(spec: &SynthSpec) -> WorkloadInfo {
    let hash = if spec.workload_hash.is_empty() {
        format!("{:016x}", {
            let mut r = Rng::new(spec.seed ^ (spec.n_requests as u64) << 32);
            spec.workload_name.bytes().fold(r.next_u64(), |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            })
        })
    } else {
        spec.workload_hash.clone()
    };
    let load = if spec.rate > 0.0 {
        format!(
            r#"{{"mode":"rate","rate":{},"concurrency":{}}}"#,
            spec.rate, spec.concurrency
        )
    } else {
        format!(
            r#"{{"mode":"concurrency","concurrency":{}}}"#,
            spec.concurrency
        )
    };
    WorkloadInfo {
        name: spec.workload_name.clone(),
        seed: spec.seed,
        hash,
        load,
        params: r#"{"prompt":"uniform","output":"uniform"}"#.into(),
        n_requests: spec.n_requests,
        n_warmup: spec.n_warmup,
    }
}

fn synth_provenance(spec: &SynthSpec) -> Provenance {
    Provenance {
        ember_version: "0.1.0".into(),
        git_commit: "0000000".into(),
        backend: spec.backend.clone(),
        adapter: if spec.backend == "cpu" {
            String::new()
        } else {
            "Synthetic GPU".into()
        },
        driver: if spec.backend == "cpu" {
            String::new()
        } else {
            "synthetic 1.0".into()
        },
        cpu_model: "Synthetic CPU @ 3.0GHz".into(),
        cpu_cores: 8,
        threads: 8,
        os: "linux".into(),
        device_profile: spec.device_profile.clone(),
        model_path: "/models/tiny.gguf".into(),
        model_sha256: "ab".repeat(32),
        model_arch: "llama".into(),
        model_quant_mix: r#"{"Q4_K":30,"F32":10}"#.into(),
        weights_bytes: 90 << 20,
        weights_load: "mmap".into(),
        transport: "in-process".into(),
        ..Default::default()
    }
}
