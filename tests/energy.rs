//! `ember bench` with a power sensor (the recorded-layout sysfs trees of
//! `tests/fixtures/sysfs/`, through `EMBER_SYSFS_ROOT`): measured energy per output token in
//! the summary and SQLite; a sensor that stops answering mid-run leaves a recorded gap, not a
//! number; no sensor gives a labelled estimate from a device profile, or says so.

mod common;

use std::path::PathBuf;

use serde_json::Value;

fn sysfs(name: &str) -> PathBuf {
    common::fixture("sysfs").join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("energy");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn bench(root: &std::path::Path, vcgencmd: &std::path::Path, extra: &[&str]) -> Value {
    let out = common::ember()
        .env("EMBER_SYSFS_ROOT", root)
        .env("EMBER_VCGENCMD", vcgencmd)
        // Deterministic on a machine with an NVIDIA driver too.
        .env("EMBER_NVML_LIB", "/nonexistent/libnvidia-ml.so.1")
        .args(["bench", "-n", "6", "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn measured_energy_per_token_is_in_the_summary_and_the_store() {
    let db = tmp("jetson.db");
    let _ = std::fs::remove_file(&db);
    let j = bench(
        &sysfs("jetson-orin"),
        &PathBuf::from("/nonexistent/vcgencmd"),
        &["--db", db.to_str().unwrap()],
    );
    let s = &j["summary"];
    let e = &s["energy"];
    assert_eq!(e["kind"], "measured", "{s}");
    assert_eq!(e["source"], "ina3221 VDD_IN");
    // A constant 5.072 V × 1.464 A over the measured window.
    let watts = 5.072 * 1.464;
    let mean = e["mean_w"].as_f64().unwrap();
    assert!((mean - watts).abs() < 1e-6 * watts, "{mean}");
    let joules = e["joules"].as_f64().unwrap();
    let window = s["window_s"].as_f64().unwrap();
    assert!(
        (joules - watts * window).abs() < 1e-6 * joules,
        "{joules} vs {window} s"
    );
    let out_tok = s["output_tokens"].as_f64().unwrap();
    let jpt = e["j_per_output_token"].as_f64().unwrap();
    assert!((jpt - joules / out_tok).abs() < 1e-9 * jpt);
    assert!(s["energy_gap"].is_null());

    // SQLite: the source, every timer sample's watts, and the energy recomputed from rows.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let source: String = conn
        .query_row("SELECT power_source FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(source, "ina3221 VDD_IN");
    let (n, w): (i64, f64) = conn
        .query_row(
            "SELECT COUNT(power_w), AVG(power_w) FROM memory_samples",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(n >= 2 && (w - watts).abs() < 1e-9, "{n} samples, {w} W");
    let stored: f64 = conn
        .query_row(
            "SELECT value FROM run_metrics WHERE metric = 'energy_j'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        (stored - joules).abs() < 1e-6 * joules,
        "{stored} vs {joules}"
    );
}

#[test]
fn a_sensor_that_stops_answering_mid_run_is_a_recorded_gap() {
    // A vcgencmd that answers three times (discovery, the meter's first read, the run's first
    // sample), then fails.
    let dir = tmp("flaky");
    std::fs::create_dir_all(&dir).unwrap();
    let count = dir.join("calls");
    let _ = std::fs::remove_file(&count);
    let script = dir.join("vcgencmd");
    let reply = sysfs("pi5").join("pmic_read_adc.txt");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nn=$(cat '{c}' 2>/dev/null || echo 0); n=$((n+1)); echo $n > '{c}'\n\
             [ $n -le 3 ] && cat '{r}' && exit 0\necho 'VCHI initialization failed' >&2; exit 1\n",
            c = count.display(),
            r = reply.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let empty = tmp("empty-sysfs");
    std::fs::create_dir_all(&empty).unwrap();
    let db = tmp("flaky.db");
    let _ = std::fs::remove_file(&db);
    let j = bench(&empty, &script, &["--db", db.to_str().unwrap()]);
    let s = &j["summary"];
    assert!(s["energy"].is_null(), "{s}");
    let gap = s["energy_gap"].as_str().unwrap();
    assert!(
        gap.contains("pi5 pmic (all rails)") && gap.contains("failed mid-run"),
        "{gap}"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let err: Option<String> = conn
        .query_row("SELECT power_error FROM runs", [], |r| r.get(0))
        .unwrap();
    assert!(err.unwrap().contains("no rail readings"));
    let energy: Option<f64> = conn
        .query_row(
            "SELECT value FROM run_metrics WHERE metric = 'energy_j'",
            [],
            |r| r.get(0),
        )
        .ok();
    assert_eq!(energy, None, "no energy stored for a run with a gap");
}

#[test]
fn without_a_sensor_a_profile_gives_a_labelled_estimate() {
    let empty = tmp("none-sysfs");
    std::fs::create_dir_all(&empty).unwrap();
    let none = PathBuf::from("/nonexistent/vcgencmd");
    let j = bench(&empty, &none, &["--no-db"]);
    let s = &j["summary"];
    assert!(s["energy"].is_null());
    assert!(
        s["energy_gap"]
            .as_str()
            .unwrap()
            .starts_with("no power sensor found"),
        "{s}"
    );
    let j = bench(&empty, &none, &["--no-db", "--target", "raspberry-pi-5"]);
    let e = &j["summary"]["energy"];
    assert_eq!(e["kind"], "estimate", "{e}");
    assert!(
        e["source"]
            .as_str()
            .unwrap()
            .contains("profile raspberry-pi-5")
    );
    let window = j["summary"]["window_s"].as_f64().unwrap();
    let joules = e["joules"].as_f64().unwrap();
    assert!(
        (joules - 7.0 * window).abs() < 1e-9 * joules.max(1e-9),
        "{joules}"
    );
}

#[test]
fn cost_per_million_tokens_at_throughput_and_at_the_slo() {
    let empty = tmp("cost-sysfs");
    std::fs::create_dir_all(&empty).unwrap();
    let none = PathBuf::from("/nonexistent/vcgencmd");
    let db = tmp("cost.db");
    let _ = std::fs::remove_file(&db);
    // An SLO every request meets: goodput is the whole throughput.
    let j = bench(
        &empty,
        &none,
        &[
            "--cost-per-hour",
            "3.6",
            "--slo-max",
            "ttft_p99<=60000ms",
            "--db",
            db.to_str().unwrap(),
        ],
    );
    let s = &j["summary"];
    let c = &s["cost"];
    let tps = s["output_tps"].as_f64().unwrap();
    let per_mtok = c["usd_per_mtok"].as_f64().unwrap();
    // $3.6/h over tps tokens/s: 3.6 / (tps · 3600) · 1e6 = 1000 / tps.
    assert!((per_mtok - 1000.0 / tps).abs() < 1e-9 * per_mtok, "{c}");
    assert!((c["usd_per_mtok_at_slo"].as_f64().unwrap() - per_mtok).abs() < 1e-9 * per_mtok);
    let window = s["window_s"].as_f64().unwrap();
    assert!((c["run_usd"].as_f64().unwrap() - 3.6 * window / 3600.0).abs() < 1e-12);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let stored: f64 = conn
        .query_row("SELECT cost_per_hour FROM runs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 3.6);
    // Each request's SLO verdict is stored; their tokens per second are the goodput that
    // compare's $/Mtok at the SLO divides by (here every request met it).
    let (n, met): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), SUM(slo_attained) FROM requests WHERE warmup = 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((n, met), (6, 6));
    let good: f64 = conn
        .query_row(
            "SELECT value FROM run_metrics WHERE metric = 'goodput_output_tps'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!((good - tps).abs() < 1e-6 * tps, "{good} vs {tps}");

    // An SLO nothing meets: no token is delivered at the SLO, so no price for one.
    let j = bench(
        &empty,
        &none,
        &[
            "--cost-per-mtok",
            "2",
            "--slo-max",
            "ttft_p99<=0.001ms",
            "--no-db",
        ],
    );
    let c = &j["summary"]["cost"];
    assert_eq!(c["usd_per_mtok"].as_f64(), Some(2.0));
    assert!(c["usd_per_mtok_at_slo"].is_null(), "{c}");
    let out_tok = j["summary"]["output_tokens"].as_f64().unwrap();
    assert!((c["run_usd"].as_f64().unwrap() - 2.0 * out_tok / 1e6).abs() < 1e-15);

    let out = common::ember()
        .args([
            "bench",
            "-n",
            "2",
            "--no-db",
            "--cost-per-hour",
            "1",
            "--cost-per-mtok",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
}
