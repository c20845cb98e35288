//! `ember report` checked as a person sees it: the HTML is rendered by
//! headless Chromium (Debian package `chromium`; `.ci/run` installs it with
//! `apt-get install -y chromium`). This test FAILS, not skips, when Chromium
//! is missing. The screenshot is left at
//! `target/tmp/report_chromium/report.png` for a human to look at.
//! Also the `compare`/`export` command-line contracts (exit statuses).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ember_bench::store::Store;
use ember_bench::store::testdata::{SynthSpec, synth_run};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

fn workdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// cpu.db: a rate sweep of `chat` (2, 4, 8, 16 req/s); wgpu.db: `chat` at 8
/// req/s on a faster device (same workload hash as cpu's 8 req/s run).
fn fixtures(d: &Path) -> (PathBuf, PathBuf) {
    let (cpu, gpu) = (d.join("cpu.db"), d.join("wgpu.db"));
    let mut s = Store::open(&cpu).unwrap();
    for rate in [2.0, 4.0, 8.0, 16.0] {
        let hash = format!("chat-rate-{rate}");
        s.save_run(&synth_run(&SynthSpec {
            rate,
            concurrency: 4,
            workload_hash: hash,
            n_requests: 60,
            ..Default::default()
        }))
        .unwrap();
    }
    let mut g = Store::open(&gpu).unwrap();
    g.save_run(&synth_run(&SynthSpec {
        rate: 8.0,
        concurrency: 4,
        n_requests: 60,
        itl_ms: 7.0,
        prefill_ms_per_token: 0.1,
        backend: "wgpu".into(),
        device_profile: Some("synthetic-gpu".into()),
        workload_hash: "chat-rate-8".into(),
        ..Default::default()
    }))
    .unwrap();
    (cpu, gpu)
}

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!(
        "headless Chromium is required for this test and was not found: install it with `apt-get install -y chromium`"
    );
}

fn run_chromium(bin: &str, args: &[String], profile: &Path) -> std::process::Output {
    let child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting chromium");
    // Read the pipes while it runs (a DOM dump overflows a pipe buffer).
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()).ok());
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("waiting for chromium"),
        Err(_) => {
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .ok();
            panic!("chromium did not finish in 120 s");
        }
    }
}

#[test]
fn report_renders_in_headless_chromium_with_every_plot() {
    let browser = chromium();
    let d = workdir("report_chromium");
    let (cpu, gpu) = fixtures(&d);
    let html_path = d.join("report.html");
    let out = Command::new(EMBER)
        .arg("report")
        .arg(&cpu)
        .arg(&gpu)
        .arg("-o")
        .arg(&html_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ember report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    // self-contained: nothing to fetch
    for bad in [
        "<script", "<link", "src=", "href=", "@import", "url(", "https://",
    ] {
        assert!(
            !html.contains(bad),
            "the report must load nothing: found {bad:?}"
        );
    }
    assert!(
        html.matches("http://").all(|_| true)
            && html
                .replace("http://www.w3.org/2000/svg", "")
                .find("http://")
                .is_none()
    );

    let url = format!("file://{}", html_path.display());
    let dom = run_chromium(
        &browser,
        &["--dump-dom".into(), url.clone()],
        &d.join("profile-dom"),
    );
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.contains("<h1>ember benchmark report</h1>"),
        "the DOM as Chromium parsed it has the report"
    );
    let plots = dom.matches("class=\"plot\"").count();
    for id in [
        "cdf-ttft",
        "cdf-itl",
        "cdf-tpot",
        "cdf-e2e",
        "itl-time-1",
        "sweep-tps",
        "sweep-attainment",
        "memory-1",
        "devices-0-tps",
        "devices-0-ttft",
        "devices-0-itl",
    ] {
        assert!(
            dom.contains(&format!("data-plot=\"{id}\"")),
            "plot {id} missing from the rendered DOM"
        );
    }
    // 4 CDFs + 5 ITL-over-time + 2 sweep + 5 memory + 3 device bars
    assert_eq!(plots, 19, "number of SVG plots in the rendered DOM");
    // every CDF has one line per run (5 runs)
    let cdf = &dom[dom.find("data-plot=\"cdf-ttft\"").unwrap()..];
    let cdf = &cdf[..cdf.find("</svg>").unwrap()];
    assert_eq!(cdf.matches("<polyline").count(), 5);

    let png = d.join("report.png");
    let shot = run_chromium(
        &browser,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1400,5200".into(),
            url,
        ],
        &d.join("profile-shot"),
    );
    assert!(
        shot.status.success(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let bytes = std::fs::read(&png).expect("the screenshot was written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        bytes.len() > 50_000,
        "a screenshot with plots is not tiny ({} bytes)",
        bytes.len()
    );
}

#[test]
fn compare_and_export_command_line_contracts() {
    let d = workdir("cli_compare");
    let (cpu, gpu) = fixtures(&d);
    let out = Command::new(EMBER)
        .arg("compare")
        .arg(&cpu)
        .arg(&gpu)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("chat-rate-8")
            && text.contains("cpu.db: cpu")
            && text.contains("wgpu.db: synthetic-gpu (wgpu)"),
        "{text}"
    );
    assert!(
        text.contains("NOT COMPARED"),
        "the three other sweep points are flagged: {text}"
    );
    // json and csv
    let j = Command::new(EMBER)
        .arg("compare")
        .arg("--json")
        .arg(&d)
        .output()
        .unwrap();
    assert!(j.status.success());
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(
        v["groups"].as_array().unwrap().len(),
        1,
        "a folder of .db files works too"
    );
    let c = Command::new(EMBER)
        .arg("compare")
        .arg("--csv")
        .arg(&cpu)
        .arg(&gpu)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&c.stdout).starts_with("workload_hash,"));
    // refuse when nothing matches
    let other = d.join("other.db");
    Store::open(&other)
        .unwrap()
        .save_run(&synth_run(&SynthSpec {
            workload_hash: "zzz".into(),
            ..Default::default()
        }))
        .unwrap();
    let bad = Command::new(EMBER)
        .arg("compare")
        .arg(&gpu)
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("refusing"));
    // the gate: a slower candidate against the same workload exits 3
    let slow = d.join("slow.db");
    Store::open(&slow)
        .unwrap()
        .save_run(&synth_run(&SynthSpec {
            rate: 8.0,
            concurrency: 4,
            n_requests: 60,
            itl_ms: 40.0,
            workload_hash: "chat-rate-8".into(),
            ..Default::default()
        }))
        .unwrap();
    let gate = Command::new(EMBER)
        .args(["compare", "--max-regression", "5%", "--baseline"])
        .arg(&cpu)
        .arg(&slow)
        .output()
        .unwrap();
    assert_eq!(
        gate.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&gate.stdout)
    );
    assert!(String::from_utf8_lossy(&gate.stdout).contains("REGRESSED"));
    let same = Command::new(EMBER)
        .args(["compare", "--max-regression", "5%", "--baseline"])
        .arg(&cpu)
        .arg(&cpu)
        .output()
        .unwrap();
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
    // export
    let md = Command::new(EMBER)
        .args(["export", "--format", "md"])
        .arg(&cpu)
        .output()
        .unwrap();
    assert!(md.status.success());
    assert!(String::from_utf8_lossy(&md.stdout).contains(" ± "));
}
