//! `ember bench` and the results store: every mode writes what it measured (llama-bench mode
//! too), `--no-db` writes nothing, a run that could not store a request exits non-zero and
//! says how many were lost, and llama-bench runs appear in `ember compare`.

mod common;

use std::path::{Path, PathBuf};

use common::ember;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn count(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn llama_bench(db: &Path) -> std::process::Output {
    ember()
        .args(["bench", "--pp", "8", "--tg", "4", "-r", "2", "--db"])
        .arg(db)
        .output()
        .unwrap()
}

#[test]
fn llama_bench_mode_writes_its_tests_to_the_store_and_compare_shows_them() {
    let dir = tmpdir("llama-bench");
    let (a, b) = (dir.join("a.db"), dir.join("b.db"));
    for db in [&a, &b] {
        let out = llama_bench(db);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("run saved to"), "{err}");
    }
    // One run, one row per test with its two repetitions, as llama-bench's -o sql has them.
    assert_eq!(
        count(&a, "SELECT count(*) FROM runs WHERE status = 'finished'"),
        1
    );
    let c = rusqlite::Connection::open(&a).unwrap();
    let mut st = c
        .prepare("SELECT test, n_prompt, n_gen, reps, avg_ts, samples_ts FROM v_llama_bench ORDER BY test")
        .unwrap();
    let rows: Vec<(String, i64, i64, i64, f64, String)> = st
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1, rows[0].2), ("pp8", 8, 0));
    assert_eq!((rows[1].0.as_str(), rows[1].1, rows[1].2), ("tg4", 0, 4));
    for (test, _, _, reps, avg_ts, samples) in &rows {
        assert_eq!(*reps, 2, "{test}");
        let s: Vec<f64> = serde_json::from_str(samples).unwrap();
        assert_eq!(s.len(), 2, "{test}");
        assert!(
            (avg_ts - (s[0] + s[1]) / 2.0).abs() < 1e-6 * avg_ts,
            "{test}"
        );
    }
    // The workload matches across files, so compare puts them side by side, test by test.
    let out = ember().arg("compare").arg(&a).arg(&b).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("llama-bench pp8,tg4"), "{text}");
    assert!(
        text.contains("pp8 tokens/s") && text.contains("tg4 tokens/s"),
        "{text}"
    );
    assert!(!text.contains("NOT COMPARED"), "{text}");
    // ... and the regression gate checks those figures.
    let out = ember()
        .args(["compare", "--baseline"])
        .arg(&a)
        .arg(&b)
        .args(["--max-regression", "1000%", "--json"])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gated: Vec<&str> = j["gate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["figure"].as_str().unwrap())
        .collect();
    assert!(
        gated.contains(&"pp8 tokens/s") && gated.contains(&"tg4 tokens/s"),
        "{gated:?}"
    );
}

#[test]
fn no_db_writes_nothing_in_either_mode() {
    let dir = tmpdir("no-db");
    let db = dir.join("default.db");
    for args in [
        &["bench", "--pp", "8", "--tg", "2", "-r", "1", "--no-db"][..],
        &["bench", "-n", "2", "--no-db"][..],
    ] {
        let out = ember().args(args).env("EMBER_DB", &db).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!db.exists(), "--no-db created {}", db.display());
}

#[test]
fn a_request_that_cannot_be_stored_fails_the_run_and_is_counted() {
    let dir = tmpdir("lost");
    let db = dir.join("lost.db");
    // A store with ember's schema, and a trigger that refuses one request's row.
    let out = ember()
        .args(["bench", "-n", "1", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER lose_one BEFORE INSERT ON requests WHEN NEW.request_id = 2
             BEGIN SELECT RAISE(ABORT, 'injected: disk full'); END;",
        )
        .unwrap();
    let out = ember()
        .args(["bench", "-n", "4", "--warmup", "0", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("1 of 4 finished requests could not be written"),
        "{err}"
    );
    assert!(err.contains("injected: disk full"), "{err}");
    assert!(!err.contains("run saved"), "{err}");
    // The figures were still printed, and everything else was stored.
    assert!(String::from_utf8_lossy(&out.stdout).contains("ttft ms"));
    assert_eq!(
        count(&db, "SELECT count(*) FROM requests WHERE run_id = 2"),
        3
    );
}

#[test]
fn an_unusable_store_path_is_one_clear_error() {
    let dir = tmpdir("unusable");
    // A directory where the database file should be.
    let out = ember()
        .args(["bench", "-n", "1", "--db"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("unable to open database file").count(),
        1,
        "the cause once: {err}"
    );
    assert!(
        err.contains("results store") && err.contains(dir.to_str().unwrap()),
        "{err}"
    );
}
