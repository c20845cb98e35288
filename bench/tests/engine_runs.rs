//! The harness on real engines: overhead with and without per-token
//! recording (embedded model), and queueing on SmolLM2 (fails when the model was not fetched).

use ember_bench::harness::{self, HarnessOptions, SystemClock};
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

/// Decode-heavy run on the embedded model (its steps are ~0.2 ms, the worst
/// case for relative overhead), with and without per-token recording.
#[test]
fn harness_overhead_below_one_percent_of_decode() {
    let e = embedded();
    let spec = SyntheticSpec {
        name: "decode".into(),
        input: LengthDist::Fixed { n: 16 },
        output: LengthDist::Fixed { n: 256 },
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
    let mut figures = vec![];
    for record in [true, false] {
        let mut server = SequentialServer::new(&e);
        let o = HarnessOptions {
            load: LoadSpec::Sync,
            record_tokens: record,
            ..Default::default()
        };
        let out = harness::run(&mut server, &SystemClock, &w, &o, &mut |_| {});
        let s = metrics::summarize(&out.records, &out.memory, None);
        assert_eq!(s.n_completed, 6);
        assert_eq!(s.output_tokens, 6 * 256);
        assert_eq!(out.records.iter().any(|r| r.output_text.is_some()), record);
        let f = out.overhead.fraction();
        println!(
            "record_tokens={record}: decode {:.0} tok/s, harness {:.1} µs over {} steps = {:.3}% of step time, {} memory samples",
            s.decode_tps_total,
            out.overhead.harness_ns as f64 / 1e3,
            out.overhead.steps,
            f * 100.0,
            out.memory.len()
        );
        figures.push((f, s.decode_tps_total));
    }
    for (f, _) in &figures {
        assert!(
            *f < 0.01,
            "harness overhead {:.3}% ≥ 1% of step time",
            f * 100.0
        );
    }
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
    let mut p50 = vec![];
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
        let out = harness::run(&mut server, &SystemClock, &w, &o, &mut |_| {});
        let s = metrics::summarize(&out.records, &out.memory, None);
        assert_eq!((s.n_completed, s.output_tokens), (4, 32));
        println!(
            "concurrency {users}: ttft p50 {:.1} ms, max {:.1} ms, queue mean {:.1} ms, e2e mean {:.1} ms",
            s.ttft_ms.p50, s.ttft_ms.max, s.queue_ms.mean, s.e2e_ms.mean
        );
        p50.push((s.ttft_ms.p50, s.ttft_ms.max, s.e2e_ms.mean));
    }
    // With 4 users on one sequential server, the k-th request waits for k−1
    // others: the max ttft is at least ~3 service times.
    assert!(p50[1].0 > p50[0].0 * 1.5, "{p50:?}");
    assert!(p50[1].1 > 2.0 * p50[0].2, "{p50:?}");
}
