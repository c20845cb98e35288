//! Crash safety: a writer killed with SIGKILL mid-run leaves a database that
//! opens, passes `PRAGMA integrity_check`, and holds every request whose
//! commit returned before the kill.
//!
//! The writer is this test binary re-executed with `EMBER_STORE_CRASH_CHILD`
//! set (it runs `crash_child_writer`, which writes through the same store API
//! `ember bench` uses: begin_run, add_request per finished request,
//! add_memory_samples), printing `committed <id>` after each commit returns.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use ember_bench::store::testdata::{SynthSpec, synth_run};
use ember_bench::store::{RunId, Store};

const CHILD_ENV: &str = "EMBER_STORE_CRASH_CHILD";

#[test]
fn crash_child_writer() {
    let Some(db) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let run = synth_run(&SynthSpec {
        n_requests: 5_000,
        n_warmup: 1,
        output_tokens: (16, 128),
        ..Default::default()
    });
    let mut store = Store::open(&db).unwrap();
    let id = store.begin_run(&run).unwrap();
    println!("\nrun {}", id.0);
    for (k, r) in run.records.iter().enumerate() {
        store.add_request(id, r).unwrap();
        println!("committed {}", r.request_id);
        if k % 4 == 0 {
            // a bigger transaction, so the kill may land inside one
            store
                .add_memory_samples(id, &run.memory[..run.memory.len().min(200)])
                .unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn kill_9_mid_run_keeps_every_committed_request() {
    let dir = std::env::temp_dir().join(format!("ember-store-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("crash.db");
    let _ = std::fs::remove_file(&db);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut committed = vec![];
    let mut run_id = None;
    let out = BufReader::new(child.stdout.take().unwrap());
    for line in out.lines() {
        let line = line.unwrap();
        let line = line.trim();
        if let Some(x) = line.strip_prefix("committed ") {
            committed.push(x.trim().parse::<i64>().unwrap());
        } else if let Some(x) = line.strip_prefix("run ") {
            run_id = Some(x.trim().parse::<i64>().unwrap());
        }
        if committed.len() >= 60 {
            child.kill().unwrap(); // SIGKILL on Unix
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the writer should have been killed, not finished"
    );
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
    }
    assert_eq!(
        committed.len(),
        60,
        "the writer reported 60 commits before the kill"
    );
    let run = RunId(run_id.expect("the writer printed its run id"));

    let store = Store::open(&db).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    let fk: i64 = store
        .conn()
        .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(fk, 0, "no dangling rows");
    let status: String = store
        .conn()
        .query_row("SELECT status FROM runs WHERE run_id = ?1", [run.0], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(status, "running", "a killed run stays marked as running");
    let stored: std::collections::BTreeSet<i64> = {
        let mut st = store
            .conn()
            .prepare("SELECT request_id FROM requests WHERE run_id = ?1")
            .unwrap();
        st.query_map([run.0], |r| r.get(0))
            .unwrap()
            .map(|x| x.unwrap())
            .collect()
    };
    for id in &committed {
        assert!(
            stored.contains(id),
            "request {id} was committed before the kill but is missing"
        );
    }
    assert!(
        stored.len() <= committed.len() + 1,
        "at most the one in flight beyond what was reported"
    );
    // Every stored request has all its token rows (the transaction is atomic).
    let bad: i64 = store
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM requests r WHERE tokens_stored <> (SELECT COUNT(*) FROM tokens t WHERE t.req_pk = r.req_pk)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(bad, 0);
    // The summary view still answers for the cut-short run.
    let measured: i64 = store
        .conn()
        .query_row(
            "SELECT measured FROM v_run_summary WHERE run_id = ?1",
            [run.0],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        measured as usize,
        stored.len() - 1,
        "all but the warm-up are measured"
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
