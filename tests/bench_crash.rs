//! `kill -9` in the middle of a real `ember bench` run: the store opens cleanly,
//! passes `PRAGMA integrity_check`, and holds every request that had finished.
//! The same for a sweep, which stores each of its steps as a run of its own.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

/// Starts `ember bench ARGS --db DB`, waits until `at_least` requests are committed, notes
/// how many, and kills it with SIGKILL. Returns the count seen before the kill.
fn kill_9_after(args: &[&str], db: &Path, at_least: i64) -> i64 {
    let _ = std::fs::remove_file(db);
    let mut child = common::ember()
        .args(["bench"])
        .args(args)
        .arg("--db")
        .arg(db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut seen = 0i64;
    while seen < at_least {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("bench ended ({status}) after committing {seen} requests: {err}");
        }
        // A guard against a hang, not a speed claim.
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "bench committed only {seen} requests in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(c) =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        {
            seen = c
                .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
                .unwrap_or(0);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    seen
}

/// The store after the kill: sound, holding at least `seen` whole requests, views answering.
fn check_after_kill(db: &Path, seen: i64) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let n: i64 = c
        .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
        .unwrap();
    assert!(
        n >= seen,
        "{n} requests after the kill, {seen} were committed before it"
    );
    // Every stored request is whole: its token rows match its output count.
    let torn: i64 = c
        .query_row(
            "SELECT count(*) FROM requests q WHERE q.output_tokens != (SELECT count(*) FROM tokens t WHERE t.req_pk = q.req_pk)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(torn, 0);
    // The views still answer.
    let _: i64 = c
        .query_row("SELECT count(*) FROM v_request_latency", [], |r| r.get(0))
        .unwrap();
    c
}

fn tmp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn kill_9_mid_bench_loses_nothing_that_finished() {
    let db = tmp_db("bench.db");
    let args = ["-n", "100000", "--input-len", "32", "--output-len", "16"];
    let seen = kill_9_after(&args, &db, 20);
    let c = check_after_kill(&db, seen);
    let status: String = c
        .query_row("SELECT status FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, "running", "the run never finished");
}

#[test]
fn kill_9_mid_sweep_loses_nothing_that_finished() {
    let db = tmp_db("sweep.db");
    // Calibration (4 sync requests), then steps of 12 requests at the rates the sweep tries,
    // each stored as a run as it goes: kill it inside the second rate step.
    let args = [
        "--sweep",
        "-n",
        "12",
        "--sweep-points",
        "50",
        "--sweep-budget",
        "3600",
        "--input-len",
        "16",
        "--output-len",
        "8",
    ];
    let seen = kill_9_after(&args, &db, 20);
    let c = check_after_kill(&db, seen);
    let (finished, running): (i64, i64) = c
        .query_row(
            "SELECT sum(status = 'finished'), sum(status = 'running') FROM runs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        finished >= 2,
        "the calibration and at least one rate were stored as finished runs ({finished})"
    );
    assert!(
        running <= 1,
        "only the step that was killed is unfinished ({running})"
    );
    // Each stored step is a run of its own load: the calibration's sync, then rates.
    let loads: Vec<String> = c
        .prepare("SELECT load FROM runs ORDER BY run_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(loads[0].contains("sync"), "{loads:?}");
    assert!(loads[1..].iter().all(|l| l.contains("rate")), "{loads:?}");
}
