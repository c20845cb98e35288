//! Poisson arrivals: Kolmogorov–Smirnov on the inter-arrival gaps against the
//! exponential distribution, and reproducibility of schedule and workload hash.

use ember_bench::harness::arrival_schedule;
use ember_bench::load::{Arrivals, Limits, LoadSpec, ks_statistic, schedule};
use ember_bench::workload::{Corpus, SyntheticSpec, workload_hash};
use ember_runtime::sample::SamplerConfig;

#[test]
fn poisson_gaps_pass_ks_against_exponential() {
    let rate = 5.0;
    for seed in [1u64, 2, 3] {
        let s = schedule(rate, Arrivals::Poisson, 4001, seed);
        assert_eq!(s[0], 0);
        let gaps: Vec<f64> = s.windows(2).map(|w| (w[1] - w[0]) as f64 / 1e9).collect();
        let n = gaps.len() as f64;
        let d = ks_statistic(&gaps, |x| 1.0 - (-rate * x).exp());
        // Critical value at α = 0.01: 1.628 / √n.
        let crit = 1.628 / n.sqrt();
        assert!(d < crit, "seed {seed}: D = {d:.4} ≥ {crit:.4}");
        let mean = gaps.iter().sum::<f64>() / n;
        assert!((mean * rate - 1.0).abs() < 0.05, "mean gap {mean}");
        // …and a wrong rate is rejected, so the test has teeth.
        let d_wrong = ks_statistic(&gaps, |x| 1.0 - (-rate * 1.2 * x).exp());
        assert!(d_wrong > crit, "KS does not reject rate×1.2: {d_wrong}");
    }
}

#[test]
fn same_seed_same_schedule_and_hash() {
    assert_eq!(
        schedule(3.0, Arrivals::Poisson, 100, 42),
        schedule(3.0, Arrivals::Poisson, 100, 42)
    );
    assert_ne!(
        schedule(3.0, Arrivals::Poisson, 100, 42),
        schedule(3.0, Arrivals::Poisson, 100, 43)
    );

    let corpus = Corpus {
        tokens: (0..5000u32).map(|i| i * 7 % 1000).collect(),
        bos: Some(1),
    };
    let spec = SyntheticSpec::preset("chat").unwrap();
    let build = |seed| spec.build(&corpus, 2048, 16, 1, seed, SamplerConfig::greedy());
    let load = |seed| LoadSpec::Rate {
        rps: 2.0,
        arrivals: Arrivals::Poisson,
        seed,
    };
    let lim = Limits {
        max_requests: Some(16),
        max_duration_ms: None,
    };
    let hash = |wseed, lseed| {
        let w = build(wseed);
        let l = load(lseed);
        workload_hash(&w, &l, &arrival_schedule(&l, &lim, w.items.len()))
    };
    assert_eq!(hash(7, 7), hash(7, 7));
    assert_ne!(hash(7, 7), hash(8, 7), "prompts differ");
    assert_ne!(hash(7, 7), hash(7, 8), "schedule differs");
    let w = build(7);
    assert_eq!(w.items, build(7).items);
    // Exact token lengths within the preset's bounds, BOS first.
    assert!(
        w.items
            .iter()
            .all(|i| (16..=256).contains(&i.prompt_tokens.len())
                && i.prompt_tokens[0] == 1
                && (32..=96).contains(&i.max_tokens))
    );
    let l = load(7);
    let sched = arrival_schedule(&l, &lim, 16);
    let mut w2 = build(7);
    w2.sampler.temperature = 0.5;
    assert_ne!(
        workload_hash(&w, &l, &sched),
        workload_hash(&w2, &l, &sched),
        "sampling params differ"
    );
}

#[test]
fn presets_clamp_to_small_contexts() {
    let corpus = Corpus {
        tokens: (0..3000u32).collect(),
        bos: None,
    };
    let rag = SyntheticSpec::preset("rag").unwrap();
    let w = rag.build(&corpus, 1024, 4, 1, 0, SamplerConfig::greedy());
    assert!(
        w.items
            .iter()
            .all(|i| i.prompt_tokens.len() + i.max_tokens < 1024)
    );
    assert!(
        w.notes
            .iter()
            .any(|n| n.contains("do not fit this model's context of 1024")),
        "{:?}",
        w.notes
    );
    let w = rag.build(&corpus, 8192, 4, 1, 0, SamplerConfig::greedy());
    assert!(w.notes.is_empty());
    assert!(
        w.items
            .iter()
            .all(|i| (1792..=2304).contains(&i.prompt_tokens.len()))
    );
    let sp = SyntheticSpec::preset("shared-prefix").unwrap().build(
        &corpus,
        4096,
        5,
        0,
        0,
        SamplerConfig::greedy(),
    );
    assert!(
        sp.items
            .windows(2)
            .all(|p| p[0].prompt_tokens[..512] == p[1].prompt_tokens[..512])
    );
}
