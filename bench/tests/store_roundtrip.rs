//! The store's schema, migrations and round trip.

use ember_bench::store::testdata::{SynthSpec, synth_run};
use ember_bench::store::{SCHEMA_VERSION, SelfTestRow, Store, StoreError};

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-store-rt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("nested").join("t.db")
}

#[test]
fn store_round_trips_a_run_and_reports_its_schema() {
    let db = tmp("rt");
    let r = synth_run(&SynthSpec {
        seed: 5,
        n_requests: 20,
        ..Default::default()
    });
    let id = {
        let mut s = Store::open(&db).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let id = s.save_run(&r).unwrap();
        s.set_cost_per_hour(id, 1.25).unwrap();
        s.add_selftest(
            id,
            &[SelfTestRow {
                check_name: "kernels".into(),
                pass: true,
                measurement: false,
                figure: Some(1e-3),
                unit: Some("max_abs_err".into()),
                message: String::new(),
            }],
        )
        .unwrap();
        id
    };
    // reopen: no migration runs twice, data intact
    let s = Store::open_existing(&db).unwrap();
    let mode: String = s
        .conn()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = s
        .conn()
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fk, 1);
    let back = s.load_run(id).unwrap();
    assert_eq!(back.records, r.records);
    assert_eq!(back.memory, r.memory);
    assert_eq!(back.provenance, r.provenance);
    assert_eq!(back.workload, r.workload);
    assert_eq!(back.slo_verdicts, r.slo_verdicts);
    assert_eq!(back.cache_evictions, r.cache_evictions);
    let runs = s.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, "finished");
    assert_eq!(runs[0].cost_per_hour, Some(1.25));
    let n: i64 = s
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM selftest_results WHERE pass = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    for v in [
        "v_run_summary",
        "v_request_latency",
        "v_itl",
        "v_latency_samples",
        "v_latency_percentiles",
    ] {
        let _: i64 = s
            .conn()
            .query_row(&format!("SELECT COUNT(*) FROM {v}"), [], |r| r.get(0))
            .unwrap();
    }
    assert_eq!(s.integrity_check().unwrap(), "ok");
}

#[test]
fn a_newer_schema_is_refused_and_a_missing_file_is_not_created() {
    let db = tmp("new");
    {
        let s = Store::open(&db).unwrap();
        s.conn()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    assert!(matches!(Store::open(&db), Err(StoreError::TooNew { .. })));
    let missing = db.with_file_name("missing.db");
    assert!(matches!(
        Store::open_existing(&missing),
        Err(StoreError::Missing { .. })
    ));
    assert!(!missing.exists());
}

#[test]
fn default_path_honours_ember_db() {
    // SAFETY: this test binary's other tests do not read EMBER_DB.
    unsafe { std::env::set_var("EMBER_DB", "/tmp/x/ember-test.db") };
    assert_eq!(
        ember_bench::store::default_db_path(),
        std::path::PathBuf::from("/tmp/x/ember-test.db")
    );
    unsafe { std::env::remove_var("EMBER_DB") };
    assert!(
        ember_bench::store::default_db_path().ends_with("ember/ember.db")
            || ember_bench::store::default_db_path().ends_with("ember.db")
    );
}

#[test]
fn a_version_1_file_is_migrated_in_place_and_keeps_its_rows() {
    let db = tmp("v1");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    {
        // A store as ember wrote it before schema v2: v1's tables, one run with a self-test row.
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(include_str!("../src/store/schema_v1.sql"))
            .unwrap();
        c.execute_batch(
            "INSERT INTO models(sha256, arch, quant_mix, weights_bytes) VALUES ('ab', 'llama', '{}', 1);
             INSERT INTO workloads(hash, name, seed, params, n_requests, n_warmup)
                 VALUES ('h', 'chat', 0, '{}', 0, 0);
             INSERT INTO runs(run_uid, status, started_at, ember_version, git_commit, backend, adapter,
                 driver, cpu_model, cpu_cores, threads, os, device_fingerprint, model_id, model_path,
                 workload_id, load, slo_name, slo, token_cap)
                 VALUES ('u1', 'finished', '2026-01-01T00:00:00Z', '0.1.0', 'abc', 'cpu', '', '', 'cpu',
                         2, 2, 'linux', 'fp', 1, '/m.gguf', 1, '{\"mode\":\"sync\"}', 'none', '{}', 4096);
             INSERT INTO selftest_results(run_id, check_name, pass, figure, unit, message)
                 VALUES (1, 'backends', 1, NULL, NULL, 'ok');
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let s = Store::open(&db).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    let runs = s.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].run_uid, "u1");
    assert_eq!(
        runs[0].provenance.weights_load, "",
        "unknown for an old run"
    );
    assert!(s.llama_bench(runs[0].run).unwrap().is_empty());
    let kind: String = s
        .conn()
        .query_row("SELECT kind FROM selftest_results", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kind, "check");
    let _: i64 = s
        .conn()
        .query_row("SELECT COUNT(*) FROM v_llama_bench", [], |r| r.get(0))
        .unwrap();
    assert_eq!(s.integrity_check().unwrap(), "ok");
}
