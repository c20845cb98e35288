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
    // Every block format round-trips; every quantized one is checked on every ISA, portable
    // included, and each float type once (one code path whatever the ISA).
    assert_eq!(
        names.iter().filter(|n| n.starts_with("roundtrip.")).count(),
        15
    );
    let parity: Vec<_> = names.iter().filter(|n| n.starts_with("parity.")).collect();
    assert_eq!(
        parity.iter().filter(|n| n.ends_with(".portable")).count(),
        12
    );
    assert_eq!((parity.len() - 3) % 12, 0);
    assert!(parity.contains(&&"parity.Q4_K.portable"));
    for t in ["parity.F32", "parity.F16", "parity.BF16"] {
        assert!(parity.contains(&&t), "{parity:?}");
    }
    // Without a profile the machine figures are measurements: shown as such, never failed.
    for c in checks {
        let n = c["name"].as_str().unwrap();
        let measured = n.starts_with("memory.")
            || n.starts_with("matmul.")
            || n.starts_with("bench.")
            || n.starts_with("roofline.");
        let (kind, status) = if measured {
            ("measurement", "measured")
        } else {
            ("check", "ok")
        };
        assert_eq!(
            (c["kind"].as_str(), c["status"].as_str()),
            (Some(kind), Some(status)),
            "{c}"
        );
        assert_eq!(c["pass"].is_null(), measured, "{c}");
    }
    // The row lists the wgpu adapters (lavapipe in CI), or says why there are none.
    let backends = checks.iter().find(|c| c["name"] == "backends").unwrap();
    let bm = backends["message"].as_str().unwrap();
    if cfg!(feature = "wgpu") {
        assert!(
            bm.contains("wgpu adapters: ") || bm.contains("wgpu found no adapter"),
            "{backends}"
        );
    } else {
        assert!(bm.contains("no GPU backend is compiled"), "{backends}");
    }
    // Golden decode: the embedded model counts, and its logits match the golden fingerprint.
    let golden = checks.iter().find(|c| c["name"] == "golden.hello").unwrap();
    let tol = ember_runtime::embedded::GOLDEN_TOL;
    let gm = golden["message"].as_str().unwrap();
    assert!(
        gm.contains("\"pqrstuvwxy\" (exact greedy tokens)")
            && gm.contains(&format!(
                "logits at 15 positions within {tol} of the golden ones"
            )),
        "{golden}"
    );
    assert_eq!(golden["unit"], "logit");
    assert!(golden["figure"].as_f64().unwrap() <= tol as f64, "{golden}");
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
    // Measurements are stored with pass = 1 (they cannot fail) and kind = 'measurement'.
    let n_meas: i64 = store
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM selftest_results WHERE kind = 'measurement'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        n_meas as usize,
        checks.iter().filter(|c| c["kind"] == "measurement").count()
    );
    assert!(n_meas >= 7, "{n_meas}");
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
    assert!(fig <= tol as f64 && unit == "logit", "{fig} {unit}");
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
    // The default fault is inside the kernel: one block scale of the weights it reads.
    assert!(
        err.contains("Q4_K matmul on")
            && err.contains("disagrees with the reference")
            && err.contains("one block scale of the weights this kernel reads is off"),
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
    // A figure is a check where the profile states what a healthy device measures.
    let p = ember_bench::profile::DeviceProfile::resolve(name).unwrap();
    let stated = p
        .expect
        .as_ref()
        .and_then(|e| e.memory_bandwidth_gbs)
        .is_some();
    assert_eq!(
        bw["kind"],
        if stated { "check" } else { "measurement" },
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

/// The logits rows `ember run --json --top-logprobs 259 --echo` printed, in position order, and
/// the tokens at those positions (prompt, then generated).
fn cli_rows(out: &std::process::Output) -> (Vec<u32>, Vec<f32>, String) {
    use ember_runtime::embedded::N_VOCAB;
    let j = json_of(out);
    let mut tokens: Vec<u32> = vec![];
    for k in ["prompt_tokens", "generated_tokens"] {
        tokens.extend(
            j[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32),
        );
    }
    let mut rows = vec![];
    for (i, p) in j["positions"].as_array().unwrap().iter().enumerate() {
        assert_eq!(p["consumed"].as_u64(), Some(i as u64 + 1), "{p}");
        let mut row = vec![f32::NAN; N_VOCAB];
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), N_VOCAB);
        for t in top {
            row[t["id"].as_u64().unwrap() as usize] = t["logit"].as_f64().unwrap() as f32;
        }
        rows.extend(row);
    }
    let n = rows.len() / N_VOCAB;
    tokens.truncate(n);
    (tokens, rows, j["text"].as_str().unwrap().to_string())
}

fn run_golden_cli(
    g: &ember_runtime::embedded::Golden,
    fault: Option<&str>,
) -> ember_runtime::embedded::GoldenDiff {
    use ember_runtime::embedded::{N_VOCAB, compare};
    let n = g.continuation.len().to_string();
    let mut cmd = ember();
    cmd.args([
        "run", "-p", g.prompt, "-n", &n, "--temp", "0", "--json", "--echo",
    ])
    .args(["--top-logprobs", &N_VOCAB.to_string()]);
    match fault {
        Some(f) => cmd.env("EMBER_TEST_DECODER_FAULT", f),
        None => cmd.env_remove("EMBER_TEST_DECODER_FAULT"),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (tokens, rows, text) = cli_rows(&out);
    let d = compare(g, &tokens, &rows, N_VOCAB);
    if fault.is_none() {
        assert_eq!(
            text,
            String::from_utf8_lossy(&g.continuation.iter().map(|&t| t as u8).collect::<Vec<_>>())
        );
        // Every position but the row after the last generated token (never computed).
        assert_eq!(d.positions, g.logits.len() - 1, "{d:?}");
    }
    d
}

/// The CLI's greedy decode of the embedded model is held to the golden logits, not only to its
/// tokens: `ember run` (prefill, then one decode step per token) gives every position's logits
/// within the tolerance, and a decoder with RoPE, attention or the FFN broken (the test-only
/// `EMBER_TEST_DECODER_FAULT` hook) is caught, though it still prints "pqrstuvwxy".
#[test]
fn cli_greedy_decode_matches_the_golden_logits_and_catches_a_broken_decoder() {
    use ember_runtime::embedded::GOLDEN;
    for g in &GOLDEN {
        let d = run_golden_cli(g, None);
        assert!(d.pass(), "{}: {}", g.name, d.describe());
        eprintln!("{} ok: {}", g.name, d.describe());
    }
    for fault in ["rope", "attn", "ffn"] {
        let g = &GOLDEN[0];
        let d = run_golden_cli(g, Some(fault));
        eprintln!("{fault}: {}: {}", g.name, d.describe());
        assert!(
            !d.pass(),
            "{fault}: the golden logits did not notice: {}",
            d.describe()
        );
        assert!(
            d.worst > 4.0 * ember_runtime::embedded::GOLDEN_TOL,
            "{fault}: {}",
            d.describe()
        );
    }
}

/// Breaking RoPE, attention or the FFN (one at a time) fails the self-test's golden rows, and
/// only them: the kernels and ops rows do not go through the decoder.
#[test]
fn selftest_golden_rows_catch_a_broken_rope_attention_and_ffn() {
    for fault in ["rope", "attn", "ffn"] {
        let out = ember()
            .args(["selftest", "--no-db", "--json", "--threads", "2"])
            .env_remove("EMBER_SELFTEST_FAULT")
            .env("EMBER_TEST_DECODER_FAULT", fault)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{fault}: {err}");
        let j = json_of(&out);
        assert_eq!(j["pass"], false);
        let failed: Vec<&serde_json::Value> = j["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["pass"] == false)
            .collect();
        let names: Vec<&str> = failed.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert!(
            !names.is_empty() && names.iter().all(|n| n.starts_with("golden.")),
            "{fault}: {names:?}"
        );
        for c in &failed {
            let m = c["message"].as_str().unwrap();
            eprintln!("{fault}: {}: figure {} | {m}", c["name"], c["figure"]);
            assert!(
                m.contains("decoder disagrees with its golden output"),
                "{m}"
            );
            // The tokens still count: only the logits show the fault.
            assert!(m.contains("(exact greedy tokens)"), "{m}");
        }
        assert!(names.contains(&"golden.hello"), "{fault}: {names:?}");
    }
}

/// A profile's [expect] figures turn measurements into checks: below half of one fails and
/// names the likely causes; above it passes.
#[test]
fn selftest_figures_fail_below_half_of_the_profiles_expectation() {
    let dir = tmpdir("expect");
    let arch = std::env::consts::ARCH;
    let p = dir.join("strict-board.toml");
    // No machine reads 1 PB/s; every machine decodes the embedded model at 0.001 tok/s.
    std::fs::write(
        &p,
        format!(
            "name = \"strict-board\"\ntarget_triple = \"{arch}-unknown-linux-gnu\"\nbackends = [\"cpu\"]\nthreads = 2\n\
             memory_budget_gib = 1.0\ndefault_slo = \"batch\"\ncost_per_hour_usd = 0.0\ntypical_power_w = 5.0\n\
             [expect]\nmemory_bandwidth_gbs = 1e6\ntg_tps = 0.001\n"
        ),
    )
    .unwrap();
    let out = ember()
        .args(["selftest", "--no-db", "--json", "--target"])
        .arg(&p)
        .env_remove("EMBER_SELFTEST_FAULT")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    let checks = j["checks"].as_array().unwrap();
    let row = |n: &str| checks.iter().find(|c| c["name"] == n).unwrap().clone();
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c["pass"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["memory.bandwidth"]);
    let bw = row("memory.bandwidth");
    assert_eq!(bw["kind"], "check");
    let m = bw["message"].as_str().unwrap();
    for want in [
        "below half of the 1000000 GB/s profile strict-board expects",
        "likely causes: thermal throttling",
        "governor",
        "another process",
    ] {
        assert!(m.contains(want), "{want}: {m}");
    }
    let tg = row("bench.tg");
    assert_eq!(
        (tg["kind"].as_str(), tg["pass"].as_bool()),
        (Some("check"), Some(true)),
        "{tg}"
    );
    // Not stated: still a measurement.
    let pp = row("bench.pp");
    assert_eq!(pp["kind"], "measurement", "{pp}");
    assert!(
        pp["message"]
            .as_str()
            .unwrap()
            .contains("profile strict-board states no expect.pp_tps"),
        "{pp}"
    );
}

/// Prints the embedded model's golden fingerprints (`runtime/src/embedded.rs`, `GOLDEN_*`) as Rust
/// source, for when the model's VERSION changes:
/// `cargo test --test selftest print_embedded_golden -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_embedded_golden() {
    use ember_runtime::embedded::{self, GOLDEN};
    use ember_runtime::engine::EngineConfig;
    use ember_runtime::model::LogitsWanted;
    let dir = tmpdir("golden-gen");
    let (path, _) = embedded::ensure_in(&dir).unwrap();
    let engine = ember_models::open(&path, |_| EngineConfig {
        threads: 2,
        n_ctx: 64,
        prefill_chunk: 64,
    })
    .unwrap();
    let n_vocab = engine.model.config().n_vocab;
    for g in GOLDEN {
        let mut toks = engine.tokenizer.encode(g.prompt, false, true).unwrap();
        toks.extend_from_slice(g.continuation);
        let mut rows = vec![];
        engine
            .forward(&toks, &mut engine.new_cache(), LogitsWanted::All, &mut rows)
            .unwrap();
        println!(
            "// {} ({:?} + {} tokens)",
            g.name,
            g.prompt,
            g.continuation.len()
        );
        for (t, row) in toks.iter().zip(rows.chunks_exact(n_vocab)) {
            let f = embedded::fingerprint(*t, row);
            let vals: Vec<String> = f.iter().map(|v| format!("{v:.4}")).collect();
            println!("    [{}],", vals.join(", "));
        }
    }
}
