//! The harness's own cost on a real engine, as a ratio (a measurement, not a test: on a shared
//! machine its figures move with the neighbours' load):
//! `cargo run --release -p ember-bench --example harness_overhead [-- REQUESTS [TOKENS [ROUNDS]]]`
//!
//! A decode-heavy run on the embedded model (its steps are ~0.2 ms, the worst case for relative
//! overhead), with and without per-token recording, the two modes alternating for ROUNDS rounds
//! (default 3) so that a slow spell of the machine hits both. Prints, per run, the harness's
//! bookkeeping time as a percentage of engine step time; then the median of those per mode and
//! the best decode rate with recording relative to the best without it.

use ember_bench::harness::{self, HarnessOptions, Hooks, SystemClock};
use ember_bench::load::LoadSpec;
use ember_bench::metrics;
use ember_bench::workload::{CORPUS, Corpus, LengthDist, SyntheticSpec};
use ember_runtime::engine::EngineConfig;
use ember_runtime::sample::SamplerConfig;
use ember_runtime::serve::SequentialServer;

fn main() {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().map_or(6, |a| a.parse().expect("REQUESTS"));
    let tokens: usize = args.next().map_or(256, |a| a.parse().expect("TOKENS"));
    let rounds: usize = args.next().map_or(3, |a| a.parse().expect("ROUNDS"));
    let dir = std::env::temp_dir().join(format!("ember-overhead-{}", std::process::id()));
    let (path, _) = ember_runtime::embedded::ensure_in(&dir).expect("embedded model");
    let e = ember_models::open(&path, |train| EngineConfig {
        threads: 2,
        n_ctx: train.min(2048),
        prefill_chunk: 512,
    })
    .expect("open the embedded model");
    let spec = SyntheticSpec {
        name: "decode".into(),
        input: LengthDist::Fixed { n: 16 },
        output: LengthDist::Fixed { n: tokens },
        shared_prefix: 0,
    };
    let w = spec.build(
        &Corpus::new(&e.tokenizer, CORPUS),
        e.cfg.n_ctx,
        requests,
        1,
        1,
        SamplerConfig::greedy(),
    );
    // Per mode (recording, not): overhead fractions and decode rates of every round.
    let mut fractions = [vec![], vec![]];
    let mut tps = [vec![], vec![]];
    for _ in 0..rounds.max(1) {
        for (m, record) in [true, false].into_iter().enumerate() {
            let mut server = SequentialServer::new(&e);
            let o = HarnessOptions {
                load: LoadSpec::Sync,
                record_tokens: record,
                ..Default::default()
            };
            let out = harness::run(&mut server, &SystemClock, &w, &o, Hooks::default());
            let s = metrics::summarize(&out.records, &out.memory, None);
            println!(
                "record_tokens={record}: harness {:.1} µs over {} steps = {:.3}% of step time; decode {:.0} tok/s; {} memory samples",
                out.overhead.harness_ns as f64 / 1e3,
                out.overhead.steps,
                out.overhead.fraction() * 100.0,
                s.decode_tps_total,
                out.memory.len()
            );
            fractions[m].push(out.overhead.fraction());
            tps[m].push(s.decode_tps_total);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "median harness share of step time: {:.3}% recording, {:.3}% not; best decode tok/s recording / not: {:.3}",
        median(&mut fractions[0]) * 100.0,
        median(&mut fractions[1]) * 100.0,
        best(&tps[0]) / best(&tps[1])
    );
    let _ = std::fs::remove_dir_all(&dir);
}
