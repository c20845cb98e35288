//! Speculative decoding on the bench side: a fake speculating server on synthetic time
//! releases tokens in bursts (each with its own stamp) and reports its totals in a
//! `Speculation` event; the harness records them, the summary, the table, SQLite (rows,
//! views, run_metrics), the report and the exports show them, and a plain run shows none.
//!
//! The fake server is sequential. For each request: prefill 10 ms, the first token 1 ms later;
//! then each step drafts 3 tokens (2 ms) and verifies them (6 ms), accepting 2, 0, 3, 2, 0, 3 …
//! of them, and releases the accepted tokens plus its own, 10 µs apart. Without speculation a
//! step is one 6 ms pass and one token.

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ember_bench::export::{Format, What, export};
use ember_bench::harness::{self, Clock, HarnessOptions, Hooks, RunOutput};
use ember_bench::metrics::{self, SpecSummary};
use ember_bench::record::{FinishKind, RunResult, SpecUse};
use ember_bench::report::{ReportOptions, render};
use ember_bench::store::testdata::{SynthSpec, synth_run};
use ember_bench::store::{RunId, SCHEMA_VERSION, Store};
use ember_bench::workload::{WorkItem, Workload};
use ember_runtime::sample::SamplerConfig;
use ember_runtime::serve::{CacheUse, ServeEvent, ServeRequest, Server, ServerStats};

const MS: u64 = 1_000_000;
const US: u64 = 1_000;
/// Draft tokens proposed per verify pass, and how many each successive pass accepts.
const K: usize = 3;
const ACCEPTS: [usize; 3] = [2, 0, 3];
const DRAFT_NS: u64 = 2 * MS;
const VERIFY_NS: u64 = 6 * MS;

#[derive(Clone)]
struct FakeClock(Rc<Cell<Instant>>);

impl FakeClock {
    fn advance(&self, ns: u64) {
        self.0.set(self.0.get() + Duration::from_nanos(ns));
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
    spec: SpecUse,
}

struct SpecServer {
    clock: FakeClock,
    speculate: bool,
    waiting: VecDeque<ServeRequest>,
    active: Option<Active>,
}

impl SpecServer {
    fn token(&self, a: &mut Active, out: &mut Vec<ServeEvent>) {
        out.push(ServeEvent::Token {
            id: a.req.id,
            at: self.clock.now(),
            index: a.n_out,
            token: 7,
            text: "x".into(),
        });
        a.n_out += 1;
    }
}

impl Server for SpecServer {
    fn submit(&mut self, req: ServeRequest, out: &mut Vec<ServeEvent>) {
        out.push(ServeEvent::Enqueued {
            id: req.id,
            at: self.clock.now(),
        });
        self.waiting.push_back(req);
    }
    fn step(&mut self, out: &mut Vec<ServeEvent>) -> bool {
        let c = self.clock.clone();
        let mut a = match self.active.take() {
            Some(a) => a,
            None => {
                let Some(req) = self.waiting.pop_front() else {
                    return false;
                };
                let id = req.id;
                out.push(ServeEvent::Scheduled { id, at: c.now() });
                out.push(ServeEvent::PrefillStart { id, at: c.now() });
                c.advance(10 * MS);
                out.push(ServeEvent::PrefillEnd {
                    id,
                    at: c.now(),
                    cache: CacheUse {
                        computed_prompt_tokens: req.prompt_tokens.len(),
                        ..Default::default()
                    },
                });
                c.advance(MS);
                let mut a = Active {
                    req,
                    n_out: 0,
                    spec: SpecUse::default(),
                };
                self.token(&mut a, out);
                self.finish_if_done(a, out);
                return true;
            }
        };
        if self.speculate {
            let accepted = ACCEPTS[a.spec.verify_steps % ACCEPTS.len()];
            c.advance(DRAFT_NS + VERIFY_NS);
            a.spec.drafted += K;
            a.spec.accepted += accepted;
            a.spec.verify_steps += 1;
            a.spec.draft_ns += DRAFT_NS;
            a.spec.verify_ns += VERIFY_NS;
            // The accepted drafts and the target's own token, each stamped as released.
            for j in 0..=accepted {
                if j > 0 {
                    c.advance(10 * US);
                }
                self.token(&mut a, out);
            }
        } else {
            c.advance(VERIFY_NS);
            self.token(&mut a, out);
        }
        self.finish_if_done(a, out);
        true
    }
    fn has_work(&self) -> bool {
        self.active.is_some() || !self.waiting.is_empty()
    }
    fn stats(&self) -> ServerStats {
        ServerStats::default()
    }
}

impl SpecServer {
    fn finish_if_done(&mut self, a: Active, out: &mut Vec<ServeEvent>) {
        if a.n_out < a.req.max_tokens {
            self.active = Some(a);
            return;
        }
        let (id, at) = (a.req.id, self.clock.now());
        if self.speculate {
            out.push(ServeEvent::Speculation {
                id,
                at,
                spec: a.spec,
            });
        }
        out.push(ServeEvent::Finished {
            id,
            at,
            reason: FinishKind::Length,
            error: None,
        });
    }
}

fn item(max_tokens: usize) -> WorkItem {
    WorkItem {
        prompt_tokens: vec![1; 8],
        max_tokens,
        stop: vec![],
        tags: vec![],
        expected: None,
        score: None,
    }
}

/// A warm-up of 5 tokens, then requests of 9 and 5 tokens, one at a time: with speculation
/// the 9 take passes accepting 2, 0, 3 (bursts of 3, 1, 4 after the first token) and the 5
/// take 2, 0.
fn run(speculate: bool) -> RunOutput {
    let clock = FakeClock(Rc::new(Cell::new(Instant::now())));
    let mut server = SpecServer {
        clock: clock.clone(),
        speculate,
        waiting: VecDeque::new(),
        active: None,
    };
    let w = Workload {
        name: "spec".into(),
        seed: 0,
        items: vec![item(9), item(5)],
        warmup: vec![item(5)],
        sampler: SamplerConfig::greedy(),
        ignore_eos: true,
        notes: vec![],
        params: serde_json::Value::Null,
    };
    let o = HarnessOptions {
        rss_probe: Some(|| 1000),
        ..Default::default()
    };
    harness::run(&mut server, &clock, &w, &o, Hooks::default())
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-spec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.db"))
}

/// `out` as a stored run (provenance and workload from the synthetic run).
fn run_result(out: &RunOutput, hash: &str) -> RunResult {
    let mut r = synth_run(&SynthSpec {
        workload_hash: hash.into(),
        ..Default::default()
    });
    r.records = out.records.clone();
    r.memory = out.memory.clone();
    r
}

/// The totals the fake server reports for a request that took `passes` verify passes.
fn expected_spec(passes: usize) -> SpecUse {
    let accepted: usize = (0..passes).map(|i| ACCEPTS[i % ACCEPTS.len()]).sum();
    SpecUse {
        drafted: K * passes,
        accepted,
        verify_steps: passes,
        draft_ns: DRAFT_NS * passes as u64,
        verify_ns: VERIFY_NS * passes as u64,
    }
}

#[test]
fn burst_tokens_keep_their_own_stamps_and_the_totals_reach_the_record_and_summary() {
    let out = run(true);
    let r = &out.records;
    assert_eq!(r.len(), 3);
    assert!(r[0].warmup);
    // Every token its own stamp: 10 µs apart within a burst, a full step (8 ms) between.
    let a = &r[1];
    let rel: Vec<u64> = a.token_ns.iter().map(|t| t - a.arrival_ns).collect();
    assert_eq!(
        rel,
        [
            11 * MS,
            19 * MS,
            19 * MS + 10 * US,
            19 * MS + 20 * US,
            27 * MS + 20 * US,
            35 * MS + 20 * US,
            35 * MS + 30 * US,
            35 * MS + 40 * US,
            35 * MS + 50 * US,
        ]
    );
    assert_eq!(a.finish_ns, *a.token_ns.last().unwrap());
    assert_eq!(r[0].spec, Some(expected_spec(2)));
    assert_eq!(a.spec, Some(expected_spec(3)));
    assert_eq!(r[2].spec, Some(expected_spec(2)));
    assert_eq!(r[2].token_ns.len(), 5);

    // The summary counts the measured requests only (the warm-up's drafts are left out).
    let s = metrics::summarize(&out.records, &out.memory, None);
    let t = s.spec.clone().expect("the run speculated");
    assert_eq!(
        (
            t.requests,
            t.drafted,
            t.accepted,
            t.rejected,
            t.verify_steps
        ),
        (2, 15, 7, 8, 5)
    );
    assert_eq!(t.acceptance_rate, Some(7.0 / 15.0));
    assert_eq!(t.mean_accepted_run, Some(7.0 / 5.0));
    assert_eq!((t.draft_ms, t.verify_ms), (10.0, 30.0));
    // ITL is bimodal: 5 + 2 gaps of 10 µs inside bursts, 3 + 2 full steps of 8 ms.
    assert_eq!(s.itl_ms.n, 12);
    assert_eq!(
        (s.itl_ms.min, s.itl_ms.p50, s.itl_ms.max),
        (0.01, 0.01, 8.0)
    );
    assert_eq!(s.itl_ms.p90, 8.0);
    // TPOT spreads the decode over every token: (35.05 − 11) / 8 and (27.02 − 11) / 4 ms.
    assert_eq!(s.tpot_ms.n, 2);
    assert_eq!(s.tpot_ms.min, 24.05 / 8.0);
    assert_eq!(s.tpot_ms.max, 16.02 / 4.0);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["spec"]["accepted"], 7);

    let table = ember_bench::table::render(&run_result(&out, "h"), &s, None, &[], None);
    let line = table
        .lines()
        .find(|l| l.starts_with("speculation "))
        .expect("a speculation line");
    assert_eq!(
        line,
        "speculation drafted 15 · accepted 7 · rejected 8 · acceptance 46.7% · mean accepted run 1.40 per verify pass (5 passes) · draft 10.00 ms · verify 30.00 ms (2 requests)"
    );
    assert!(table.contains("compare tpot (per token) with a plain run"));
    assert!(table.contains("| tpot ms") && table.contains("| itl ms (per gap)"));
}

#[test]
fn a_plain_run_shows_no_speculation_anywhere() {
    let out = run(false);
    assert!(out.records.iter().all(|r| r.spec.is_none()));
    let s = metrics::summarize(&out.records, &out.memory, None);
    assert_eq!(s.spec, None);
    // Its JSON summary is as before: no `spec` key at all.
    assert!(serde_json::to_value(&s).unwrap().get("spec").is_none());
    let table = ember_bench::table::render(&run_result(&out, "h"), &s, None, &[], None);
    assert!(!table.contains("speculation"), "{table}");
    // Without speculation each step is one 6 ms token: ITL is one mode.
    assert_eq!((s.itl_ms.min, s.itl_ms.max), (6.0, 6.0));

    let db = tmp("plain");
    let mut store = Store::open(&db).unwrap();
    let id = store.save_run(&run_result(&out, "h")).unwrap();
    let spec_rows: i64 = store
        .conn()
        .query_row(
            "SELECT (SELECT COUNT(*) FROM v_run_speculation)
                  + (SELECT COUNT(*) FROM run_metrics WHERE metric IN ('spec_requests', 'drafted_tokens',
                        'accepted_tokens', 'rejected_tokens', 'verify_steps', 'acceptance_rate',
                        'mean_accepted_run', 'draft_ns', 'verify_ns'))
                  + (SELECT COUNT(*) FROM requests WHERE drafted_tokens IS NOT NULL)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(spec_rows, 0);
    assert!(store.samples(id).unwrap().iter().all(|s| s.spec.is_none()));
    let html = render(std::slice::from_ref(&db), &ReportOptions::default()).unwrap();
    assert!(!html.contains("Speculative decoding"));
    let j: serde_json::Value =
        serde_json::from_str(&export(std::slice::from_ref(&db), What::Runs, Format::Json).unwrap())
            .unwrap();
    assert!(j[0]["drafted_tokens"].is_null() && j[0]["acceptance_rate"].is_null());
    assert!(j[0]["tpot_p50_ms"].is_number());
}

/// Reads `metric`'s stored value from run_metrics.
fn run_metric(store: &Store, run: RunId, metric: &str) -> Option<f64> {
    store.run_metrics(run).unwrap()[&(metric.to_string(), "value".to_string())]
}

#[test]
fn sqlite_holds_the_totals_per_request_and_per_run() {
    let out = run(true);
    let db = tmp("spec");
    let mut store = Store::open(&db).unwrap();
    let id = store.save_run(&run_result(&out, "h")).unwrap();

    // Per request, raw columns: the 9-token request's three passes.
    let row: (i64, i64, i64, i64, i64, i64, i64) = store
        .conn()
        .query_row(
            "SELECT drafted_tokens, accepted_tokens, rejected_tokens, verify_steps, draft_ns, verify_ns,
                    (SELECT COUNT(*) FROM tokens t WHERE t.req_pk = r.req_pk)
             FROM requests r WHERE run_id = ?1 AND output_tokens = 9",
            [id.0],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(row, (9, 5, 4, 3, 6 * MS as i64, 18 * MS as i64, 9));
    // Derived in the view, beside TPOT.
    let v: (f64, f64, f64, f64, f64) = store
        .conn()
        .query_row(
            "SELECT acceptance_rate, mean_accepted_run, draft_ms, verify_ms, tpot_ms
             FROM v_request_latency WHERE run_id = ?1 AND output_tokens = 9",
            [id.0],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(v, (5.0 / 9.0, 5.0 / 3.0, 6.0, 18.0, 24.05 / 8.0));

    // Per run: the view (measured requests only), with TPOT and ITL beside it.
    let s: (i64, i64, i64, i64, i64, f64, f64, f64, f64) = store
        .conn()
        .query_row(
            "SELECT requests, drafted_tokens, accepted_tokens, rejected_tokens, verify_steps,
                    acceptance_rate, mean_accepted_run, draft_ms, verify_ms
             FROM v_run_speculation WHERE run_id = ?1",
            [id.0],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(s, (2, 15, 7, 8, 5, 7.0 / 15.0, 7.0 / 5.0, 10.0, 30.0));
    let lat: (f64, f64, f64) = store
        .conn()
        .query_row(
            "SELECT tpot_p99_ms, itl_p50_ms, itl_p99_ms FROM v_run_speculation WHERE run_id = ?1",
            [id.0],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(lat, (16.02 / 4.0, 0.01, 8.0));

    // run_metrics, written when the run finished, agree with the view.
    assert_eq!(run_metric(&store, id, "spec_requests"), Some(2.0));
    assert_eq!(run_metric(&store, id, "drafted_tokens"), Some(15.0));
    assert_eq!(run_metric(&store, id, "accepted_tokens"), Some(7.0));
    assert_eq!(run_metric(&store, id, "rejected_tokens"), Some(8.0));
    assert_eq!(run_metric(&store, id, "verify_steps"), Some(5.0));
    assert_eq!(run_metric(&store, id, "acceptance_rate"), Some(7.0 / 15.0));
    assert_eq!(run_metric(&store, id, "mean_accepted_run"), Some(1.4));
    assert_eq!(run_metric(&store, id, "draft_ns"), Some(10.0 * MS as f64));
    assert_eq!(run_metric(&store, id, "verify_ns"), Some(30.0 * MS as f64));

    // Read back: the records and the recomputed figures.
    let back = store.load_run(id).unwrap();
    assert_eq!(back.records, out.records);
    let figs = ember_bench::store::Figures::compute(&store.samples(id).unwrap(), &[]);
    let want: Option<SpecSummary> = metrics::summarize(&out.records, &out.memory, None).spec;
    assert_eq!(figs.spec, want);

    // The report's table and the exports.
    let html = render(std::slice::from_ref(&db), &ReportOptions::default()).unwrap();
    assert!(html.contains("<h2>Speculative decoding</h2>"));
    let cells = format!(
        "<td>2</td><td>15</td><td>7</td><td>8</td><td>46.7%</td><td>1.40</td><td>5</td><td>10.0</td><td>30.0</td><td>3.01</td><td>{:.2}</td><td>0.01</td><td>8.00</td>",
        16.02 / 4.0
    );
    assert!(html.contains(&cells), "{html}");
    let j: serde_json::Value =
        serde_json::from_str(&export(std::slice::from_ref(&db), What::Runs, Format::Json).unwrap())
            .unwrap();
    assert_eq!(j[0]["drafted_tokens"], 15);
    assert_eq!(j[0]["accepted_tokens"], 7);
    assert_eq!(j[0]["rejected_tokens"], 8);
    assert_eq!(j[0]["acceptance_rate"], 7.0 / 15.0);
    assert_eq!(j[0]["mean_accepted_run"], 1.4);
    assert_eq!(j[0]["draft_ms"], 10.0);
    assert_eq!(j[0]["verify_ms"], 30.0);
    let csv = export(std::slice::from_ref(&db), What::Runs, Format::Csv).unwrap();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = head.iter().position(|c| *c == "accepted_tokens").unwrap();
    assert!(head.contains(&"tpot_p50_ms") && head.contains(&"itl_p99_ms"));
    // Cells before the speculation columns may hold quoted commas (the load's JSON): count
    // from the end of the row.
    let cells: Vec<&str> = lines
        .next()
        .unwrap()
        .rsplitn(head.len() - at + 1, ',')
        .collect();
    assert_eq!(cells[head.len() - at - 1], "7");
    let req = export(std::slice::from_ref(&db), What::Requests, Format::Json).unwrap();
    let req: serde_json::Value = serde_json::from_str(&req).unwrap();
    let nine = req
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["output_tokens"] == 9)
        .unwrap();
    assert_eq!(nine["drafted_tokens"], 9);
    assert_eq!(nine["acceptance_rate"], 5.0 / 9.0);
}

#[test]
fn a_version_4_file_migrates_and_gets_the_speculation_columns() {
    let db = tmp("v4");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        for sql in [
            include_str!("../src/store/schema_v1.sql"),
            include_str!("../src/store/schema_v2.sql"),
            include_str!("../src/store/schema_v3.sql"),
            include_str!("../src/store/schema_v4.sql"),
        ] {
            c.execute_batch(sql).unwrap();
        }
        // A run with one request, as ember wrote it at v4.
        c.execute_batch(
            "INSERT INTO models(sha256, arch, quant_mix, weights_bytes) VALUES ('ab', 'llama', '{}', 1);
             INSERT INTO workloads(hash, name, seed, params, n_requests, n_warmup)
                 VALUES ('h', 'chat', 0, '{}', 1, 0);
             INSERT INTO runs(run_uid, status, started_at, ember_version, git_commit, backend, adapter,
                 driver, cpu_model, cpu_cores, threads, os, device_fingerprint, model_id, model_path,
                 workload_id, load, slo_name, slo, token_cap)
                 VALUES ('u1', 'finished', '2026-01-01T00:00:00Z', '0.1.0', 'abc', 'cpu', '', '', 'cpu',
                         2, 2, 'linux', 'fp', 1, '/m.gguf', 1, '{\"mode\":\"sync\"}', 'none', '{}', 4096);
             INSERT INTO requests(run_id, request_id, warmup, tags, prompt_tokens, output_tokens, arrival_ns,
                 enqueue_ns, first_token_ns, last_token_ns, finish_ns, finish_reason, cached_prompt_tokens,
                 computed_prompt_tokens, cache_lookups, cache_hit_blocks, tokens_stored, chunks, slo_attained)
                 VALUES (1, 0, 0, '[]', 8, 3, 0, 0, 5000000, 9000000, 9000000, 'length', 0, 8, 0, 0, 0, 3, 1);
             PRAGMA user_version = 4;",
        )
        .unwrap();
    }
    let mut s = Store::open(&db).unwrap();
    assert_eq!(SCHEMA_VERSION, 5);
    assert_eq!(s.schema_version().unwrap(), 5);
    let old = s.runs().unwrap()[0].run;
    // The old request reads as one that did not speculate, everywhere.
    assert_eq!(s.samples(old).unwrap()[0].spec, None);
    assert_eq!(s.load_run(old).unwrap().records[0].spec, None);
    let (drafted, rate, tpot): (Option<i64>, Option<f64>, f64) = s
        .conn()
        .query_row(
            "SELECT drafted_tokens, acceptance_rate, tpot_ms FROM v_request_latency",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((drafted, rate, tpot), (None, None, 2.0));
    let n: i64 = s
        .conn()
        .query_row("SELECT COUNT(*) FROM v_run_speculation", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    // The migrated file takes a speculating run like a new one.
    let id = s.save_run(&run_result(&run(true), "h2")).unwrap();
    let drafted: i64 = s
        .conn()
        .query_row(
            "SELECT drafted_tokens FROM v_run_speculation WHERE run_id = ?1",
            [id.0],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(drafted, 15);
    assert_eq!(s.integrity_check().unwrap(), "ok");
}
