//! `ember selftest` and `--target`: the self-test passes on this machine and
//! writes its rows to the store; a deliberately broken kernel makes it fail
//! clearly; `ember bench --target raspberry-pi-5` applies the profile.

mod common;

use std::path::PathBuf;

use common::ember;
use ember_bench::store::Store;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-selftest-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The profile whose target matches the machine the tests run on.
fn native_profile() -> (&'static str, u64) {
    if cfg!(target_arch = "aarch64") {
        ("raspberry-pi-5", 4)
    } else {
        ("x86-64-avx2", 4)
    }
}

#[test]
fn selftest_passes_and_writes_its_rows() {
    let dir = tmpdir("pass");
    let db = dir.join("st.db");
    let out = ember()
        .args(["selftest", "--json", "--threads", "2", "--db"])
        .arg(&db)
        .env_remove("EMBER_SELFTEST_FAULT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "selftest failed: {err}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let j = json_of(&out);
    assert_eq!(j["pass"], true);
    assert_eq!(j["threads"], 2);
    let checks = j["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "backends",
        "op.rmsnorm",
        "op.rope",
        "op.softmax",
        "op.attention",
        "mmap",
        "golden.hello",
        "golden.digits",
        "memory.bandwidth",
        "matmul.f32",
        "bench.pp",
        "bench.tg",
        "roofline.decode",
        "roofline.prefill",
    ] {
        assert!(names.contains(&want), "missing check {want}: {names:?}");
    }
    // Every block format round-trips, and every one is checked on every ISA, portable included.
    assert_eq!(
        names.iter().filter(|n| n.starts_with("roundtrip.")).count(),
        11
    );
    let parity: Vec<_> = names.iter().filter(|n| n.starts_with("parity.")).collect();
    assert_eq!(
        parity.iter().filter(|n| n.ends_with(".portable")).count(),
        11
    );
    assert_eq!(parity.len() % 11, 0);
    assert!(parity.contains(&&"parity.Q4_K.portable"));
    // The row lists the wgpu adapters (lavapipe in CI), or says why there are none.
    let backends = checks.iter().find(|c| c["name"] == "backends").unwrap();
    let bm = backends["message"].as_str().unwrap();
    if cfg!(feature = "wgpu") {
        assert!(bm.contains("wgpu adapters: ") || bm.contains("wgpu found no adapter"), "{backends}");
    } else {
        assert!(bm.contains("no GPU backend is compiled"), "{backends}");
    }
    // Golden decode: the embedded model counts.
    let golden = checks.iter().find(|c| c["name"] == "golden.hello").unwrap();
    assert!(
        golden["message"]
            .as_str()
            .unwrap()
            .contains("\"pqrstuvwxy\""),
        "{golden}"
    );
    // The roofline row relates achieved decode to bandwidth / bytes per token.
    let roof = checks
        .iter()
        .find(|c| c["name"] == "roofline.decode")
        .unwrap();
    assert!(
        roof["figure"].as_f64().unwrap() > 0.0 && roof["unit"] == "fraction",
        "{roof}"
    );
    let bw = checks
        .iter()
        .find(|c| c["name"] == "memory.bandwidth")
        .unwrap();
    assert!(
        bw["figure"].as_f64().unwrap() > 0.0 && bw["unit"] == "GB/s",
        "{bw}"
    );

    // The rows are in the store, one per check, under a finished `selftest` run.
    let store = Store::open_existing(&db).unwrap();
    let (n, n_pass): (i64, i64) = store
        .conn()
        .query_row(
            "SELECT COUNT(*), SUM(pass) FROM selftest_results",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(n as usize, checks.len());
    assert_eq!(n_pass, n);
    let (status, wname): (String, String) = store
        .conn()
        .query_row(
            "SELECT r.status, w.name FROM runs r JOIN workloads w USING (workload_id)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((status.as_str(), wname.as_str()), ("finished", "selftest"));
    let (fig, unit, msg): (f64, String, String) = store
        .conn()
        .query_row(
            "SELECT figure, unit, message FROM selftest_results WHERE check_name = 'golden.hello'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((fig, unit.as_str()), (10.0, "tokens"));
    assert!(msg.contains("pqrstuvwxy"));
}

#[test]
fn a_broken_kernel_fails_clearly_with_a_nonzero_exit() {
    let dir = tmpdir("fault");
    let db = dir.join("st.db");
    let out = ember()
        .args(["selftest", "--threads", "2", "--db"])
        .arg(&db)
        .env("EMBER_SELFTEST_FAULT", "q4_k")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("fault injection is on"), "{err}");
    assert!(err.contains("FAILED parity.Q4_K."), "{err}");
    assert!(
        err.contains("Q4_K matmul on") && err.contains("disagrees with the reference"),
        "{err}"
    );
    assert!(err.contains("self-test checks failed"), "{err}");
    // Exactly one row fails, and the table says which.
    let fails: Vec<&str> = table.lines().filter(|l| l.contains(" FAIL ")).collect();
    assert_eq!(fails.len(), 1, "{table}");
    assert!(fails[0].starts_with("parity.Q4_K."), "{table}");
    // The failing run is recorded too.
    let store = Store::open_existing(&db).unwrap();
    let failed: Vec<String> = store
        .conn()
        .prepare("SELECT check_name FROM selftest_results WHERE pass = 0")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].starts_with("parity.Q4_K."));

    // An unknown fault name is itself a failing row, not a silent pass.
    let out = ember()
        .args(["selftest", "--no-db", "--json"])
        .env("EMBER_SELFTEST_FAULT", "q9_z")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let j = json_of(&out);
    let row = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "fault-injection")
        .cloned()
        .unwrap();
    assert!(
        row["message"]
            .as_str()
            .unwrap()
            .contains("not a supported block type"),
        "{row}"
    );
}

#[test]
fn selftest_applies_a_target_profile() {
    let (name, threads) = native_profile();
    let out = ember()
        .args(["selftest", "--no-db", "--json", "--target", name])
        .env_remove("EMBER_SELFTEST_FAULT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["threads"], threads);
    assert_eq!(j["device_profile"], name);
    assert_eq!(j["provenance"]["device_profile"], name);
    let checks = j["checks"].as_array().unwrap();
    let mem = checks
        .iter()
        .find(|c| c["name"] == "profile.memory")
        .unwrap();
    assert!(
        mem["message"].as_str().unwrap().contains("KV budget"),
        "{mem}"
    );
    let bw = checks
        .iter()
        .find(|c| c["name"] == "memory.bandwidth")
        .unwrap();
    assert!(
        bw["message"]
            .as_str()
            .unwrap()
            .contains("of the profile's nominal"),
        "{bw}"
    );

    // A profile for another architecture says so and fails the backends row.
    let other = if cfg!(target_arch = "aarch64") {
        "x86-64-avx2"
    } else {
        "jetson-orin-nano"
    };
    let out = ember()
        .args(["selftest", "--no-db", "--json", "--target", other])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let j = json_of(&out);
    let b = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "backends")
        .cloned()
        .unwrap();
    assert_eq!(b["pass"], false);
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("but the profile's target is"),
        "{b}"
    );
}

#[test]
fn bench_target_raspberry_pi_5_applies_threads_budget_and_slo() {
    let out = ember()
        .args([
            "bench",
            "--target",
            "raspberry-pi-5",
            "--json",
            "-n",
            "2",
            "--warmup",
            "0",
            "--input-len",
            "8",
            "--output-len",
            "4",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("target raspberry-pi-5: backend cpu, threads 4, memory budget 6.00 GiB"),
        "{err}"
    );
    let j = json_of(&out);
    let t = &j["target"];
    // The profile lists cpu first, so the run is on the CPU.
    assert_eq!(t["backend"], "cpu");
    assert_eq!(j["provenance"]["backend"], "cpu");
    assert_eq!(t["name"], "raspberry-pi-5");
    assert_eq!(t["threads"], 4);
    assert_eq!(t["memory_budget_bytes"], 6u64 << 30);
    assert_eq!(
        t["kv_budget_bytes"],
        1u64 << 30,
        "the profile's kv_budget_gib = 1"
    );
    assert_eq!(t["slo"], "rag");
    // Applied, not just echoed: the run used them.
    assert_eq!(j["provenance"]["threads"], 4);
    assert_eq!(j["provenance"]["device_profile"], "raspberry-pi-5");
    assert_eq!(j["slo"]["name"], "rag");
    let params: serde_json::Value =
        serde_json::from_str(j["workload"]["params"].as_str().unwrap()).unwrap();
    assert_eq!(params["n_ctx"], t["ctx"]);

    // Explicit flags win over the profile.
    let out = ember()
        .args([
            "bench",
            "--target",
            "raspberry-pi-5",
            "--threads",
            "1",
            "--slo",
            "batch",
            "--json",
            "-n",
            "1",
            "--warmup",
            "0",
        ])
        .args(["--input-len", "4", "--output-len", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["provenance"]["threads"], 1);
    assert_eq!(j["slo"]["name"], "batch");

    // llama-bench mode takes the profile's threads too.
    let out = ember()
        .args([
            "bench",
            "--target",
            "raspberry-pi-5",
            "--pp",
            "8",
            "--tg",
            "4",
            "-r",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["threads"], 4);
    assert_eq!(j["target"]["name"], "raspberry-pi-5");
}

#[test]
fn bench_target_memory_budget_caps_the_context() {
    let dir = tmpdir("budget");
    // The embedded model keeps 2 layers x 2 kv heads x 64 dims x K,V x 4 bytes = 2048 bytes per
    // position: a 128 KiB KV budget holds 64 positions.
    let kv_gib = 64.0 * 2048.0 / (1u64 << 30) as f64;
    let p = dir.join("tiny-board.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"tiny-board\"\ntarget_triple = \"aarch64-unknown-linux-gnu\"\nbackends = [\"cpu\"]\nthreads = 2\n\
             memory_budget_gib = 0.5\nkv_budget_gib = {kv_gib}\ndefault_slo = \"batch\"\ncost_per_hour_usd = 0.001\ntypical_power_w = 3.0\n"
        ),
    )
    .unwrap();
    let out = ember()
        .args([
            "bench",
            "--json",
            "-n",
            "1",
            "--warmup",
            "0",
            "--input-len",
            "8",
            "--output-len",
            "2",
            "--target",
        ])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["target"]["kv_bytes_per_token"], 2048);
    assert_eq!(j["target"]["ctx"], 64);
    assert_eq!(j["target"]["ctx_capped_by_budget"], true);
    let params: serde_json::Value =
        serde_json::from_str(j["workload"]["params"].as_str().unwrap()).unwrap();
    assert_eq!(params["n_ctx"], 64);
    assert_eq!(j["slo"]["name"], "batch");

    // A budget smaller than the weights is refused, naming the profile.
    std::fs::write(
        dir.join("no-room.toml"),
        std::fs::read_to_string(&p)
            .unwrap()
            .replace("tiny-board", "no-room")
            .replace("memory_budget_gib = 0.5", "memory_budget_gib = 0.0001")
            .replace(&format!("kv_budget_gib = {kv_gib}\n"), ""),
    )
    .unwrap();
    let out = ember()
        .args(["bench", "-n", "1", "--target"])
        .arg(dir.join("no-room.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("profile no-room") && err.contains("do not fit its memory budget"),
        "{err}"
    );
}

#[test]
fn bad_target_errors_are_clear() {
    let out = ember()
        .args(["bench", "--target", "raspberry-pi-9", "-n", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("unknown device profile 'raspberry-pi-9'") && err.contains("raspberry-pi-5"),
        "{err}"
    );
    let dir = tmpdir("bad");
    let p = dir.join("typo.toml");
    std::fs::write(&p, "name = \"typo\"\nthreadz = 4\n").unwrap();
    let out = ember()
        .args(["selftest", "--no-db", "--target"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("typo.toml") && err.contains("threadz"),
        "{err}"
    );
}
