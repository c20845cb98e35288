//! `kill -9` in the middle of a real `ember bench` run: the store opens cleanly,
//! passes `PRAGMA integrity_check`, and holds every request that had finished.

mod common;

use std::time::{Duration, Instant};

#[test]
fn kill_9_mid_bench_loses_nothing_that_finished() {
    let dir = std::env::temp_dir().join(format!("ember-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("bench.db");
    let _ = std::fs::remove_file(&db);
    let mut child = common::ember()
        .args([
            "bench",
            "-n",
            "100000",
            "--input-len",
            "32",
            "--output-len",
            "16",
            "--db",
        ])
        .arg(&db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until some requests are committed, note how many, then kill -9.
    let t0 = Instant::now();
    let mut seen = 0i64;
    while seen < 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "bench committed only {seen} requests in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(c) =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        {
            seen = c
                .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
                .unwrap_or(0);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let c = rusqlite::Connection::open(&db).unwrap();
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
    let status: String = c
        .query_row("SELECT status FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, "running", "the run never finished");
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
}
