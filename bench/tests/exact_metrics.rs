//! The harness driven by a fake server on synthetic time: every event carries
//! an `Instant` of base + a known offset, so every figure is known exactly.
//!
//! The fake server is sequential (FIFO). For a prompt of L tokens it spends
//! 2·L ms in prefill, samples the first token 1 ms later, then one token every
//! L ms; it finishes at its last token. An empty prompt fails 1 ms after it is
//! scheduled. The clock only moves when the server works or the harness sleeps.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ember_bench::harness::{self, Clock, HarnessOptions, Hooks};
use ember_bench::load::{Arrivals, Limits, LoadSpec};
use ember_bench::metrics;
use ember_bench::record::FinishKind;
use ember_bench::slo::{Constraint, Slo};
use ember_bench::workload::{WorkItem, Workload};
use ember_runtime::sample::SamplerConfig;
use ember_runtime::serve::{CacheUse, ServeEvent, ServeRequest, Server, ServerStats};

#[derive(Clone)]
struct FakeClock(Rc<Cell<Instant>>);

impl FakeClock {
    fn advance_ms(&self, ms: u64) {
        self.0.set(self.0.get() + Duration::from_millis(ms));
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.0.get()
    }
    fn sleep_until(&self, t: Instant) {
        if t > self.0.get() {
            self.0.set(t);
        }
    }
}

struct Active {
    req: ServeRequest,
    n_out: usize,
}

struct FakeServer {
    clock: FakeClock,
    waiting: VecDeque<ServeRequest>,
    active: Option<Active>,
}

impl Server for FakeServer {
    fn submit(&mut self, req: ServeRequest, out: &mut Vec<ServeEvent>) {
        out.push(ServeEvent::Enqueued {
            id: req.id,
            at: self.clock.now(),
        });
        self.waiting.push_back(req);
    }
    fn step(&mut self, out: &mut Vec<ServeEvent>) -> bool {
        let c = &self.clock;
        if self.active.is_none() {
            let Some(req) = self.waiting.pop_front() else {
                return false;
            };
            let id = req.id;
            out.push(ServeEvent::Scheduled { id, at: c.now() });
            let l = req.prompt_tokens.len() as u64;
            if l == 0 {
                c.advance_ms(1);
                out.push(ServeEvent::Finished {
                    id,
                    at: c.now(),
                    reason: FinishKind::Error,
                    error: Some("empty prompt".into()),
                });
                return true;
            }
            out.push(ServeEvent::PrefillStart { id, at: c.now() });
            c.advance_ms(2 * l);
            out.push(ServeEvent::PrefillEnd {
                id,
                at: c.now(),
                cache: CacheUse {
                    computed_prompt_tokens: l as usize,
                    ..Default::default()
                },
            });
            c.advance_ms(1);
            self.active = Some(Active { req, n_out: 0 });
        } else if let Some(a) = &self.active {
            c.advance_ms(a.req.prompt_tokens.len() as u64);
        }
        let a = self.active.as_mut().unwrap();
        out.push(ServeEvent::Token {
            id: a.req.id,
            at: c.now(),
            index: a.n_out,
            token: 7,
            text: "x".into(),
        });
        a.n_out += 1;
        if a.n_out >= a.req.max_tokens {
            out.push(ServeEvent::Finished {
                id: a.req.id,
                at: c.now(),
                reason: FinishKind::Length,
                error: None,
            });
            self.active = None;
        }
        true
    }
    fn has_work(&self) -> bool {
        self.active.is_some() || !self.waiting.is_empty()
    }
    fn stats(&self) -> ServerStats {
        let (used, reserved) = match &self.active {
            Some(a) => (10 * (a.req.prompt_tokens.len() + a.n_out) as u64, 1000),
            None => (0, 0),
        };
        ServerStats {
            kv_bytes_used: used,
            kv_bytes_reserved: reserved,
            ..Default::default()
        }
    }
}

fn item(prompt_len: usize, max_tokens: usize) -> WorkItem {
    WorkItem {
        prompt_tokens: vec![1; prompt_len],
        max_tokens,
        stop: vec![],
        tags: vec![format!("L{prompt_len}")],
        expected: None,
        score: None,
    }
}

fn workload(items: Vec<WorkItem>, warmup: Vec<WorkItem>) -> Workload {
    Workload {
        name: "fake".into(),
        seed: 0,
        items,
        warmup,
        sampler: SamplerConfig::greedy(),
        ignore_eos: true,
        notes: vec![],
        params: serde_json::Value::Null,
    }
}

fn setup() -> (FakeClock, FakeServer, Instant) {
    let base = Instant::now();
    let clock = FakeClock(Rc::new(Cell::new(base)));
    let server = FakeServer {
        clock: clock.clone(),
        waiting: VecDeque::new(),
        active: None,
    };
    (clock, server, base)
}

/// Harness options whose RSS probe reads a fixed 1000 bytes.
fn opts() -> HarnessOptions {
    HarnessOptions {
        rss_probe: Some(|| 1000),
        ..Default::default()
    }
}

const MS: u64 = 1_000_000;

fn sd(v: &[f64]) -> f64 {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

#[test]
fn concurrency_two_every_metric_exact() {
    let (clock, mut server, _) = setup();
    // A: L=4, 3 tokens; B: L=6, 2 tokens; C: L=2, 1 token; D: empty (fails). Warm-up: L=2, 1 token.
    let w = workload(
        vec![item(4, 3), item(6, 2), item(2, 1), item(0, 4)],
        vec![item(2, 1)],
    );
    let o = HarnessOptions {
        load: LoadSpec::Concurrency {
            users: 2,
            think_ms: 0,
        },
        ..opts()
    };
    let out = harness::run(&mut server, &clock, &w, &o, Hooks::default());

    // Records, in ms from the run's origin (see the timeline in the module doc):
    // warm-up 0..5; measured phase starts at 5 with A and B (2 users);
    // A runs 5..22, C arrives at 22 (user 0), B runs 22..41, D arrives at 41 (user 1),
    // C runs 41..46, D fails 46..47.
    let r = &out.records;
    assert_eq!(r.len(), 5);
    assert!(r[0].warmup && r[1..].iter().all(|x| !x.warmup));
    assert_eq!(
        (r[0].arrival_ns, r[0].token_ns.clone(), r[0].finish_ns),
        (0, vec![5 * MS], 5 * MS)
    );
    let a = &r[1];
    assert_eq!(
        (
            a.arrival_ns,
            a.enqueue_ns,
            a.schedule_ns,
            a.prefill_start_ns,
            a.prefill_end_ns
        ),
        (5 * MS, 5 * MS, Some(5 * MS), Some(5 * MS), Some(13 * MS))
    );
    assert_eq!(a.token_ns, vec![14 * MS, 18 * MS, 22 * MS]);
    assert_eq!(
        (a.finish_ns, a.finish_reason, a.output_text.as_deref()),
        (22 * MS, FinishKind::Length, Some("xxx"))
    );
    let b = &r[2];
    assert_eq!(
        (
            b.arrival_ns,
            b.schedule_ns,
            b.prefill_end_ns,
            b.token_ns.clone(),
            b.finish_ns
        ),
        (
            5 * MS,
            Some(22 * MS),
            Some(34 * MS),
            vec![35 * MS, 41 * MS],
            41 * MS
        )
    );
    let c = &r[3];
    assert_eq!(
        (c.arrival_ns, c.schedule_ns, c.token_ns.clone(), c.finish_ns),
        (22 * MS, Some(41 * MS), vec![46 * MS], 46 * MS)
    );
    let d = &r[4];
    assert_eq!(
        (d.arrival_ns, d.schedule_ns, d.finish_ns, d.finish_reason),
        (41 * MS, Some(46 * MS), 47 * MS, FinishKind::Error)
    );
    assert_eq!(d.error.as_deref(), Some("empty prompt"));
    assert!(d.token_ns.is_empty());

    let slo = Slo {
        name: "tight".into(),
        constraints: vec![
            Constraint::parse("ttft_p99<=25ms").unwrap(),
            Constraint::parse("itl_p99<=5ms").unwrap(),
        ],
        target: 0.5,
    };
    let s = metrics::summarize(&out.records, &out.memory, Some(&slo));
    assert_eq!(
        (
            s.n_total,
            s.n_warmup,
            s.n_measured,
            s.n_completed,
            s.n_failed
        ),
        (5, 1, 4, 3, 1)
    );
    // Window: first arrival 5 → last finish 47.
    assert_eq!(s.window_s, 42.0 * 1e6 / 1e9);

    // ttft = token[1] − arrival: A 9, B 30, C 24
    let ttft = &s.ttft_ms;
    assert_eq!(
        (
            ttft.n, ttft.mean, ttft.min, ttft.max, ttft.p50, ttft.p90, ttft.p95, ttft.p99,
            ttft.p999
        ),
        (3, 21.0, 9.0, 30.0, 24.0, 30.0, 30.0, 30.0, 30.0)
    );
    assert_eq!(ttft.sd, sd(&[9.0, 30.0, 24.0]));
    assert_eq!(ttft.sd, 117f64.sqrt());
    assert_eq!(ttft.small_sample, ["p90", "p95", "p99", "p99.9"]);
    // queue = schedule − arrival: 0, 17, 19
    assert_eq!(
        (
            s.queue_ms.mean,
            s.queue_ms.p50,
            s.queue_ms.min,
            s.queue_ms.max
        ),
        (12.0, 17.0, 0.0, 19.0)
    );
    // ttft_engine = token[1] − schedule: 9, 13, 5
    assert_eq!(
        (
            s.ttft_engine_ms.mean,
            s.ttft_engine_ms.p50,
            s.ttft_engine_ms.sd,
            s.ttft_engine_ms.max
        ),
        (9.0, 9.0, 4.0, 13.0)
    );
    // itl pooled per gap: A 4, 4; B 6
    let itl = &s.itl_ms;
    assert_eq!(
        (itl.n, itl.mean, itl.p50, itl.p90, itl.max, itl.min),
        (3, 14.0 / 3.0, 4.0, 6.0, 6.0, 4.0)
    );
    // tpot (N ≥ 2 only): A 4, B 6
    assert_eq!(
        (s.tpot_ms.n, s.tpot_ms.mean, s.tpot_ms.p50, s.tpot_ms.p90),
        (2, 5.0, 4.0, 6.0)
    );
    // e2e = finish − arrival: 17, 36, 24
    assert_eq!(
        (s.e2e_ms.n, s.e2e_ms.mean, s.e2e_ms.p50, s.e2e_ms.max),
        (3, 77.0 / 3.0, 24.0, 36.0)
    );
    // prefill: 4/8ms, 6/12ms, 2/4ms → 500 tok/s each and in total
    assert_eq!(
        (
            s.prefill_tps.n,
            s.prefill_tps.min,
            s.prefill_tps.max,
            s.prefill_tps_total
        ),
        (3, 500.0, 500.0, 500.0)
    );
    // decode: A 2/8ms = 250, B 1/6ms; total 3/14ms
    assert_eq!(
        (s.decode_tps.n, s.decode_tps.max, s.decode_tps.min),
        (2, 250.0, 1e9 / (6.0 * 1e6))
    );
    assert_eq!(s.decode_tps_total, 3.0 * 1e9 / (14.0 * 1e6));
    // System figures over the 42 ms window.
    assert_eq!((s.prompt_tokens, s.output_tokens), (12, 6));
    assert_eq!(s.rps, 3.0 * 1e9 / (42.0 * 1e6));
    assert_eq!(s.output_tps, 6.0 * 1e9 / (42.0 * 1e6));
    assert_eq!(s.input_tps, 12.0 * 1e9 / (42.0 * 1e6));
    assert_eq!(s.error_rate, 0.25);
    // SLO: A attains (ttft 9, worst gap 4); B misses ttft (30 > 25); C attains
    // (ttft 24, no gap); D failed. The run-level p99s (30 ms, 6 ms) both fail.
    let slo_r = s.slo.as_ref().unwrap();
    assert_eq!((slo_r.attaining, slo_r.slo_attainment), (2, 0.5));
    assert_eq!(slo_r.goodput_rps, 2.0 * 1e9 / (42.0 * 1e6));
    assert_eq!(
        slo_r
            .verdicts
            .iter()
            .map(|v| (v.constraint.as_str(), v.measured, v.limit, v.pass))
            .collect::<Vec<_>>(),
        [
            ("ttft_p99 <= 25ms", 30.0, 25.0, false),
            ("itl_p99 <= 5ms", 6.0, 5.0, false)
        ]
    );
    assert_eq!(slo_r.small_sample, ["ttft_p99 <= 25ms", "itl_p99 <= 5ms"]);
    assert!(!slo_r.pass);
    // chat-interactive: all three successes attain, 3/4 = 75% < 90% → fail on attainment only.
    let s2 = metrics::summarize(
        &out.records,
        &out.memory,
        Some(&Slo::profile("chat-interactive").unwrap()),
    );
    let r2 = s2.slo.unwrap();
    assert_eq!((r2.attaining, r2.slo_attainment), (3, 0.75));
    assert!(r2.verdicts.iter().all(|v| v.pass) && !r2.pass);
    // Compatibility views. GuideLLM weights each request's (last − first)/(N − 1) by N − 1:
    // A (tpot 4, 3 tokens) and B (tpot 6, 2 tokens).
    assert_eq!(s.compat.guidellm_itl_ms, (4.0 * 2.0 + 6.0 * 1.0) / 3.0);
    // vLLM over the tpots [4, 6]: np.mean 5.0, np.median 5.0, np.percentile(.., 99) 5.98 (numpy
    // 2.4.6 prints exactly these; nearest rank would give 4 and 6).
    assert_eq!(
        (
            s.compat.vllm_tpot_mean_ms,
            s.compat.vllm_tpot_median_ms,
            s.compat.vllm_tpot_p99_ms
        ),
        (5.0, 5.0, 5.98)
    );
    // Memory: stats at every step; kv peaks at B's first token (10·(6+1)).
    assert_eq!(
        (
            s.memory.rss_peak_bytes,
            s.memory.kv_bytes_used_peak,
            s.memory.kv_bytes_reserved_peak
        ),
        (1000, 70, 1000)
    );
    assert!(out.memory.windows(2).all(|w| w[0].t_ns <= w[1].t_ns));
    assert_eq!(out.memory.last().unwrap().t_ns, 47 * MS);
    // Per tag split.
    let tags = metrics::by_tag(&out.records);
    assert_eq!(
        tags.iter()
            .map(|t| (t.tag.as_str(), t.n, t.n_failed))
            .collect::<Vec<_>>(),
        [("L0", 1, 1), ("L2", 1, 0), ("L4", 1, 0), ("L6", 1, 0)]
    );
}

#[test]
fn rate_load_stamps_intended_arrivals() {
    // 1000 req/s (arrivals 0, 1, 2 ms) of 5 ms requests: the server is busy, so
    // requests 2 and 3 are submitted late, but ttft counts from the intended time.
    let (clock, mut server, _) = setup();
    let w = workload(vec![item(2, 1); 3], vec![]);
    let o = HarnessOptions {
        load: LoadSpec::Rate {
            rps: 1000.0,
            arrivals: Arrivals::Constant,
            seed: 0,
        },
        ..opts()
    };
    let out = harness::run(&mut server, &clock, &w, &o, Hooks::default());
    assert_eq!(out.schedule, vec![0, MS, 2 * MS]);
    let s = metrics::summarize(&out.records, &out.memory, None);
    assert_eq!(
        out.records.iter().map(|r| r.arrival_ns).collect::<Vec<_>>(),
        [0, MS, 2 * MS]
    );
    assert_eq!(
        out.records.iter().map(|r| r.enqueue_ns).collect::<Vec<_>>(),
        [0, 5 * MS, 5 * MS]
    );
    assert_eq!(
        out.records
            .iter()
            .map(|r| metrics::ttft_ns(r).unwrap())
            .collect::<Vec<_>>(),
        [5 * MS, 9 * MS, 13 * MS]
    );
    assert_eq!(
        out.records
            .iter()
            .map(|r| metrics::queue_ns(r).unwrap())
            .collect::<Vec<_>>(),
        [0, 4 * MS, 8 * MS]
    );
    assert_eq!(
        (s.ttft_ms.p50, s.ttft_ms.max, s.window_s),
        (9.0, 13.0, 0.015)
    );

    // 100 req/s: the harness sleeps until each arrival; no queueing.
    let (clock, mut server, _) = setup();
    let o = HarnessOptions {
        load: LoadSpec::Rate {
            rps: 100.0,
            arrivals: Arrivals::Constant,
            seed: 0,
        },
        ..opts()
    };
    let out = harness::run(&mut server, &clock, &w, &o, Hooks::default());
    let s = metrics::summarize(&out.records, &out.memory, None);
    assert_eq!(
        out.records.iter().map(|r| r.arrival_ns).collect::<Vec<_>>(),
        [0, 10 * MS, 20 * MS]
    );
    assert_eq!(
        (s.ttft_ms.min, s.ttft_ms.max, s.queue_ms.max),
        (5.0, 5.0, 0.0)
    );
    assert_eq!(s.window_s, 0.025);
    assert_eq!(s.rps, 3.0 * 1e9 / (25.0 * 1e6));
}

#[test]
fn sync_think_time_and_limits() {
    let (clock, mut server, _) = setup();
    let w = workload(vec![item(2, 2)], vec![item(2, 1), item(2, 1)]);
    // Two warm-ups (default is at least one), then one user with 3 ms think time, 3 requests.
    let o = HarnessOptions {
        load: LoadSpec::Concurrency {
            users: 1,
            think_ms: 3,
        },
        limits: Limits {
            max_requests: Some(3),
            max_duration_ms: None,
        },
        ..opts()
    };
    let out = harness::run(&mut server, &clock, &w, &o, Hooks::default());
    let s = metrics::summarize(&out.records, &out.memory, None);
    assert_eq!((s.n_warmup, s.n_measured), (2, 3));
    // warm-ups 0..5, 5..10; each measured request takes 7 ms (5 + a 2 ms gap), then 3 ms think.
    assert_eq!(
        out.records
            .iter()
            .filter(|r| !r.warmup)
            .map(|r| r.arrival_ns)
            .collect::<Vec<_>>(),
        [10 * MS, 20 * MS, 30 * MS]
    );
    assert_eq!((s.e2e_ms.min, s.e2e_ms.max, s.itl_ms.mean), (7.0, 7.0, 2.0));
    assert_eq!(s.window_s, 0.027);

    // Duration limit: requests arriving at or after 25 ms into the measured phase are not sent.
    let (clock, mut server, _) = setup();
    let w = workload(vec![item(2, 1)], vec![]);
    let o = HarnessOptions {
        load: LoadSpec::Sync,
        limits: Limits {
            max_requests: None,
            max_duration_ms: Some(25),
        },
        ..opts()
    };
    let out = harness::run(&mut server, &clock, &w, &o, Hooks::default());
    assert_eq!(out.records.len(), 5); // arrivals 0, 5, 10, 15, 20
}

#[test]
fn hooks_get_each_record_as_it_finishes_and_the_progress() {
    // Sync: a warm-up (L=2, 1 token, 0..5 ms), then A (L=4, 3 tokens, 5..22) and B (L=6,
    // 2 tokens, 22..41). The record hook sees each request once, complete, when it finishes:
    // the clock (moved only by the fake server) reads its finish time at that moment.
    let (clock, mut server, base) = setup();
    let w = workload(vec![item(4, 3), item(6, 2)], vec![item(2, 1)]);
    let mut seen = vec![];
    let mut record = |r: &ember_bench::record::RequestRecord| {
        let now = clock.now().duration_since(base).as_nanos() as u64;
        seen.push((r.request_id, r.warmup, r.token_ns.len(), r.finish_ns, now));
    };
    let mut progress = vec![];
    let mut on_progress = |p: &harness::Progress| progress.push((p.warmup_done, p.done));
    let hooks = Hooks {
        progress: Some(&mut on_progress),
        record: Some(&mut record),
    };
    let out = harness::run(&mut server, &clock, &w, &opts(), hooks);
    assert_eq!(
        seen,
        [
            (0, true, 1, 5 * MS, 5 * MS),
            (1, false, 3, 22 * MS, 22 * MS),
            (2, false, 2, 41 * MS, 41 * MS)
        ]
    );
    let records: Vec<_> = out
        .records
        .iter()
        .map(|r| (r.request_id, r.warmup, r.token_ns.len(), r.finish_ns))
        .collect();
    assert_eq!(
        records,
        seen.iter()
            .map(|&(id, warm, n, fin, _)| (id, warm, n, fin))
            .collect::<Vec<_>>()
    );
    // Progress is told whenever a request finishes, and once more at the end.
    assert_eq!(progress.last(), Some(&(1, 2)));
    assert!(progress.contains(&(1, 1)), "{progress:?}");
}
