//! Honest summaries: the percentiles ember stores for a run (`run_metrics`,
//! and `v_run_summary`) are recomputed from the stored per-request and
//! per-token timestamps with plain SQL, and they agree; and both agree with
//! the in-memory records the run was written from.

use ember_bench::record::RunResult;
use ember_bench::store::testdata::{SynthSpec, synth_run};
use ember_bench::store::{RunId, Store, StoreOptions};

fn tmp_db(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("ember-store-honest-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("t.db")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Nearest rank computed independently of the store's code.
fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    // exact ceil(q*n) for q given with at most 3 decimals
    let permille = (q * 1000.0).round() as usize;
    let rank = (permille * n).div_ceil(1000).max(1);
    v[rank - 1]
}

fn in_memory(run: &RunResult, metric: &str) -> Vec<f64> {
    let ok = run.records.iter().filter(|r| !r.warmup && !r.failed());
    match metric {
        "ttft" => ok
            .filter_map(|r| Some((r.token_ns.first()? - r.arrival_ns) as f64))
            .collect(),
        "e2e" => ok.map(|r| (r.finish_ns - r.arrival_ns) as f64).collect(),
        "queue" => ok
            .map(|r| (r.schedule_ns.unwrap() - r.arrival_ns) as f64)
            .collect(),
        "tpot" => ok
            .filter(|r| r.token_ns.len() >= 2)
            .map(|r| {
                (r.token_ns[r.token_ns.len() - 1] - r.token_ns[0]) as f64
                    / (r.token_ns.len() - 1) as f64
            })
            .collect(),
        "itl" => ok
            .flat_map(|r| {
                r.token_ns
                    .windows(2)
                    .map(|w| (w[1] - w[0]) as f64)
                    .collect::<Vec<_>>()
            })
            .collect(),
        _ => unreachable!(),
    }
}

fn check_run(store: &Store, run: RunId, original: &RunResult, itl_exact: bool) {
    let stored = store.run_metrics(run).unwrap();
    let conn = store.conn();
    for metric in ["ttft", "queue", "ttft_engine", "itl", "tpot", "e2e"] {
        let row: (i64, f64, f64, f64, f64, f64, f64, f64, f64) = conn
            .query_row(
                "SELECT n, min_ms, mean_ms, p50_ms, p90_ms, p95_ms, p99_ms, p999_ms, max_ms
                 FROM v_latency_percentiles WHERE run_id = ?1 AND metric = ?2",
                rusqlite::params![run.0, metric],
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
        let sql = [
            ("n", row.0 as f64),
            ("min", row.1 * 1e6),
            ("mean", row.2 * 1e6),
            ("p50", row.3 * 1e6),
            ("p90", row.4 * 1e6),
            ("p95", row.5 * 1e6),
            ("p99", row.6 * 1e6),
            ("p99.9", row.7 * 1e6),
            ("max", row.8 * 1e6),
        ];
        for (stat, v) in sql {
            let s = stored[&(metric.to_string(), stat.to_string())].unwrap();
            assert!(
                close(s, v),
                "run {} {metric} {stat}: stored {s} vs SQL {v}",
                run.0
            );
        }
        if metric != "ttft_engine" && (metric != "itl" || itl_exact) {
            let mem = in_memory(original, metric);
            assert_eq!(mem.len() as f64, sql[0].1, "{metric} n");
            for (q, stat) in [
                (0.5, "p50"),
                (0.9, "p90"),
                (0.95, "p95"),
                (0.99, "p99"),
                (0.999, "p99.9"),
            ] {
                let m = pct(mem.clone(), q);
                let s = stored[&(metric.to_string(), stat.to_string())].unwrap();
                assert!(close(s, m), "{metric} {stat}: stored {s} vs records {m}");
            }
        }
    }
}

#[test]
fn percentiles_recomputed_with_plain_sql_agree_with_the_stored_summary() {
    let db = tmp_db("a");
    let mut store = Store::open(&db).unwrap();
    let mut runs = vec![];
    for (seed, n, err) in [(1u64, 57usize, 0.0), (2, 200, 0.05), (3, 10, 0.0)] {
        let r = synth_run(&SynthSpec {
            seed,
            n_requests: n,
            error_fraction: err,
            ..Default::default()
        });
        runs.push((store.save_run(&r).unwrap(), r));
    }
    for (id, r) in &runs {
        check_run(&store, *id, r, true);
    }
    // The same check written out as one plain SQL query over the raw tables,
    // without the views: pooled ITL p99 and TTFT p90 by nearest rank.
    for (id, _) in &runs {
        let itl_p99: i64 = store
            .conn()
            .query_row(
                "WITH g AS (
                   SELECT t.t_ns - LAG(t.t_ns) OVER (PARTITION BY t.req_pk ORDER BY t.i) AS gap
                   FROM tokens t JOIN requests r ON r.req_pk = t.req_pk
                   WHERE r.run_id = ?1 AND r.warmup = 0 AND r.finish_reason NOT IN ('error','cancelled')),
                 s AS (SELECT gap, ROW_NUMBER() OVER (ORDER BY gap) AS rn, COUNT(*) OVER () AS n FROM g WHERE gap IS NOT NULL)
                 SELECT gap FROM s WHERE rn = (990 * n + 999) / 1000",
                [id.0],
                |r| r.get(0),
            )
            .unwrap();
        let ttft_p90: i64 = store
            .conn()
            .query_row(
                "WITH s AS (SELECT first_token_ns - arrival_ns AS v,
                                   ROW_NUMBER() OVER (ORDER BY first_token_ns - arrival_ns) AS rn, COUNT(*) OVER () AS n
                            FROM requests WHERE run_id = ?1 AND warmup = 0 AND finish_reason NOT IN ('error','cancelled')
                              AND first_token_ns IS NOT NULL)
                 SELECT v FROM s WHERE rn = (900 * n + 999) / 1000",
                [id.0],
                |r| r.get(0),
            )
            .unwrap();
        let m = store.run_metrics(*id).unwrap();
        assert_eq!(m[&("itl".into(), "p99".into())].unwrap(), itl_p99 as f64);
        assert_eq!(m[&("ttft".into(), "p90".into())].unwrap(), ttft_p90 as f64);
        // and the summary view shows the same (in ms)
        let (v_ttft99, v_itl99, out_tps): (f64, f64, f64) = store
            .conn()
            .query_row(
                "SELECT ttft_p99_ms, itl_p99_ms, output_tps FROM v_run_summary WHERE run_id = ?1",
                [id.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert!(close(
            v_ttft99 * 1e6,
            m[&("ttft".into(), "p99".into())].unwrap()
        ));
        assert!(close(
            v_itl99 * 1e6,
            m[&("itl".into(), "p99".into())].unwrap()
        ));
        assert!(close(
            out_tps,
            m[&("output_tps".into(), "value".into())].unwrap()
        ));
    }
}

#[test]
fn token_cap_keeps_ttft_tpot_exact_and_sql_still_agrees() {
    let db = tmp_db("cap");
    let mut store = Store::open(&db).unwrap().with_options(StoreOptions {
        token_cap: 5,
        keep_text: false,
    });
    let r = synth_run(&SynthSpec {
        seed: 9,
        n_requests: 30,
        output_tokens: (10, 40),
        ..Default::default()
    });
    let id = store.save_run(&r).unwrap();
    let max_stored: i64 = store
        .conn()
        .query_row("SELECT MAX(tokens_stored) FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(max_stored, 5);
    check_run(&store, id, &r, false);
    let texts: i64 = store
        .conn()
        .query_row("SELECT COUNT(output_text) FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(texts, 0);
}
