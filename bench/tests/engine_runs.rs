//! The harness on real engines: per-token recording on and off (embedded model), and queueing
//! on SmolLM2 (fails when the model was not fetched). Correctness only: the harness's cost as a
//! ratio is measured by `cargo run --release -p ember-bench --example harness_overhead`.

use ember_bench::harness::{self, HarnessOptions, Hooks, SystemClock};
use ember_bench::load::{Limits, LoadSpec};
use ember_bench::metrics;
use ember_bench::workload::{CORPUS, Corpus, LengthDist, SyntheticSpec};
use ember_runtime::engine::{Engine, EngineConfig};
use ember_runtime::sample::SamplerConfig;
use ember_runtime::serve::SequentialServer;

fn engine(path: &std::path::Path) -> Engine {
    ember_models::open(path, |train| EngineConfig {
        threads: 2,
        n_ctx: train.min(2048),
        prefill_chunk: 512,
    })
    .unwrap()
}

fn embedded() -> Engine {
    let dir = std::env::temp_dir().join(format!("ember-bench-test-{}", std::process::id()));
    let (path, _) = ember_runtime::embedded::ensure_in(&dir).unwrap();
    engine(&path)
}

/// A decode run on the embedded model with and without per-token recording: the same tokens
/// are timed either way, the text is kept only when recording, and the harness accounts for
/// every step and token it saw.
#[test]
fn harness_records_every_token_with_and_without_text() {
    let e = embedded();
    let spec = SyntheticSpec {
        name: "decode".into(),
        input: LengthDist::Fixed { n: 16 },
        output: LengthDist::Fixed { n: 64 },
        shared_prefix: 0,
    };
    let w = spec.build(
        &Corpus::new(&e.tokenizer, CORPUS),
        e.cfg.n_ctx,
        6,
        1,
        1,
        SamplerConfig::greedy(),
    );
    let mut texts = vec![];
    for record in [true, false] {
        let mut server = SequentialServer::new(&e);
        let o = HarnessOptions {
            load: LoadSpec::Sync,
            record_tokens: record,
            ..Default::default()
        };
        let out = harness::run(&mut server, &SystemClock, &w, &o, Hooks::default());
        let s = metrics::summarize(&out.records, &out.memory, None);
        assert_eq!((s.n_warmup, s.n_completed, s.n_failed), (1, 6, 0));
        assert_eq!(s.output_tokens, 6 * 64);
        for r in &out.records {
            // The warm-up request is a short one.
            let want = if r.warmup {
                r.token_ns.len().max(1)
            } else {
                64
            };
            assert_eq!(r.token_ns.len(), want, "request {}", r.request_id);
            let n = r.token_ns.len();
            let sched = r.schedule_ns.expect("scheduled");
            assert!(
                sched <= r.token_ns[0]
                    && r.token_ns.windows(2).all(|t| t[0] <= t[1])
                    && r.token_ns[n - 1] <= r.finish_ns,
                "request {}: token times out of order",
                r.request_id
            );
            assert_eq!(r.output_text.is_some(), record);
        }
        // Every step and every token (warm-up included) went through the harness's accounting.
        let ov = out.overhead;
        let all_tokens: usize = out.records.iter().map(|r| r.token_ns.len()).sum();
        assert_eq!(ov.tokens, all_tokens as u64);
        assert!(ov.steps >= all_tokens as u64, "{ov:?}");
        assert!(ov.step_ns > 0 && ov.harness_ns > 0, "{ov:?}");
        assert!(ov.fraction().is_finite() && ov.fraction() > 0.0, "{ov:?}");
        assert!(!out.memory.is_empty());
        println!(
            "record_tokens={record}: harness {:.3}% of step time (a figure, not checked here)",
            ov.fraction() * 100.0
        );
        texts.push(
            out.records
                .iter()
                .map(|r| r.output_text.clone())
                .collect::<Vec<_>>(),
        );
    }
    // Recording keeps the generated text: non-empty for every request.
    assert!(
        texts[0]
            .iter()
            .all(|t| t.as_deref().is_some_and(|t| !t.is_empty()))
    );
}

/// SmolLM2, chat preset, 4 requests at concurrency 1 and at 4: with a
/// sequential server, queueing makes ttft grow with concurrency.
#[test]
fn smollm2_ttft_grows_with_concurrency() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run models/fetch.sh first",
        path.display()
    );
    let e = engine(&path);
    let mut spec = SyntheticSpec::preset("chat").unwrap();
    spec.input = LengthDist::Fixed { n: 48 };
    spec.output = LengthDist::Fixed { n: 8 };
    let w = spec.build(
        &Corpus::new(&e.tokenizer, CORPUS),
        e.cfg.n_ctx,
        4,
        1,
        0,
        SamplerConfig::greedy(),
    );
    let mut figures = vec![];
    for users in [1, 4] {
        let mut server = SequentialServer::new(&e);
        let o = HarnessOptions {
            load: LoadSpec::Concurrency { users, think_ms: 0 },
            limits: Limits {
                max_requests: Some(4),
                max_duration_ms: None,
            },
            ..Default::default()
        };
        let out = harness::run(&mut server, &SystemClock, &w, &o, Hooks::default());
        let s = metrics::summarize(&out.records, &out.memory, None);
        assert_eq!((s.n_completed, s.output_tokens), (4, 32));
        println!(
            "concurrency {users}: ttft p50 {:.1} ms, max {:.1} ms, queue mean {:.1} ms, e2e mean {:.1} ms",
            s.ttft_ms.p50, s.ttft_ms.max, s.queue_ms.mean, s.e2e_ms.mean
        );
        figures.push((s.ttft_ms.p50, s.ttft_ms.max));
        // A sequential server serves one request at a time: each starts after the one before it
        // finished. With 4 users all 4 arrive at once, so the k-th one's ttft holds the whole
        // service time of the k − 1 before it, whatever the machine's speed.
        let mut rs: Vec<_> = out.records.iter().filter(|r| !r.warmup).collect();
        rs.sort_by_key(|r| r.schedule_ns);
        for w in rs.windows(2) {
            assert!(
                w[1].schedule_ns.unwrap() >= w[0].finish_ns,
                "request {} started before request {} finished",
                w[1].request_id,
                w[0].request_id
            );
        }
        if users == 4 {
            let last = rs.last().unwrap();
            let served_before: u64 = rs[..rs.len() - 1]
                .iter()
                .map(|r| r.finish_ns - r.schedule_ns.unwrap())
                .sum();
            let ttft_last = last.token_ns[0] - last.arrival_ns;
            assert!(
                ttft_last >= served_before,
                "the last request's ttft {ttft_last} ns does not hold the {served_before} ns spent on the others"
            );
        }
    }
    println!("ttft (p50, max) ms at 1 and 4 users: {figures:?}");
}
