//! `ember report` checked as a person sees it: the HTML is rendered by
//! headless Chromium (Debian package `chromium`; `.ci/run` installs it with
//! `apt-get install -y chromium`). This test FAILS, not skips, when Chromium
//! is missing. A copy of the report with a measuring script added is laid out
//! by Chromium at the screenshot's width: nothing may stick out of the page or
//! out of its plot, every polyline must have at least two finite points inside
//! its plot, and nothing may be fetched or referenced (no URL attribute, no
//! `url()`/`@import`/`@font-face`, no resource loaded). The screenshot is left
//! at `target/tmp/report_chromium/report.png` for a human to look at.
//! Also the `compare`/`export` command-line contracts (exit statuses).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ember_bench::llamabench::{self, Test};
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
    // Scored answers (`--score`) and a price, so the quality · cost plots have their points:
    // the CPU right on 2 of 3 answers at $0.5/h, the GPU on 1 of 2 at $2.5/h.
    let scored = |mut r: ember_bench::record::RunResult, every: usize| {
        for (i, rec) in r.records.iter_mut().enumerate() {
            rec.correct = Some(i % every != 0);
        }
        r
    };
    let mut s = Store::open(&cpu).unwrap();
    for rate in [2.0, 4.0, 8.0, 16.0] {
        let hash = format!("chat-rate-{rate}");
        let run = s
            .save_run(&scored(
                synth_run(&SynthSpec {
                    rate,
                    concurrency: 4,
                    workload_hash: hash,
                    n_requests: 60,
                    ..Default::default()
                }),
                3,
            ))
            .unwrap();
        s.set_cost_per_hour(run, 0.5).unwrap();
    }
    let mut g = Store::open(&gpu).unwrap();
    let run = g
        .save_run(&scored(
            synth_run(&SynthSpec {
                rate: 8.0,
                concurrency: 4,
                n_requests: 60,
                itl_ms: 7.0,
                prefill_ms_per_token: 0.1,
                backend: "wgpu".into(),
                device_profile: Some("synthetic-gpu".into()),
                workload_hash: "chat-rate-8".into(),
                ..Default::default()
            }),
            2,
        ))
        .unwrap();
    g.set_cost_per_hour(run, 2.5).unwrap();
    (cpu, gpu)
}

/// Adds a llama-bench run (--pp 512 --tg 128, 3 reps) to each file: the same tests on two
/// devices, so the report compares them.
fn add_llama_bench_runs(cpu: &Path, gpu: &Path) {
    let tests = [(Test::Pp, 512), (Test::Tg, 128)];
    for (db, backend, scale) in [(cpu, "cpu", 1u64), (gpu, "wgpu", 4)] {
        let mut store = Store::open(db).unwrap();
        let provenance = synth_run(&SynthSpec {
            backend: backend.into(),
            ..Default::default()
        })
        .provenance;
        let head = llamabench::run_head(provenance, "2025-06-01T12:00:00Z".into(), &tests, 512, 3);
        let results: Vec<_> = tests
            .iter()
            .map(|&(kind, n)| {
                let ms = [900u64, 1000, 1100].map(|x| x * 1_000_000 * n as u64 / 512 / scale);
                llamabench::BenchResult::from_samples(kind, n, ms.to_vec())
            })
            .collect();
        store
            .save_llama_bench(&head, 512, &results, 150 << 20, 0)
            .unwrap();
    }
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
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            // Nothing resolves: a page that tried to fetch something could not get it anyway.
            "--host-resolver-rules=MAP * ~NOTFOUND",
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

/// Window width of the screenshot (the layout is also checked at 1280 px).
const PAGE_WIDTH: u32 = 1400;

/// Added to a copy of the report (the report itself holds no script): it measures the page as
/// Chromium laid it out and appends the result as JSON in `<pre id="probe">`, which
/// `--dump-dom` prints. `<`, `>` and `&` are written as JSON escapes so the text needs no HTML
/// unescaping.
const PROBE: &str = r#"<script id="probe-script">
(() => {
  const name = (el) => el.tagName.toLowerCase()
    + (el.id ? '#' + el.id : '')
    + (el.getAttribute('class') ? '.' + el.getAttribute('class').split(/\s+/).join('.') : '')
    + (el.closest('[data-plot]') ? ' in ' + el.closest('[data-plot]').dataset.plot : '');
  const root = document.documentElement;
  const vw = root.clientWidth;
  const r = {
    viewport: vw,
    scroll_width: root.scrollWidth,
    body_scroll_width: document.body.scrollWidth,
    overflow: [],
    refs: [],
    css: [],
    fonts: document.fonts.size,
    resources: performance.getEntriesByType('resource').map((e) => e.name),
    plots: [],
  };
  const urlAttrs = ['src', 'href', 'srcset', 'poster', 'data', 'action', 'formaction',
    'background', 'cite', 'longdesc', 'usemap', 'ping', 'manifest', 'codebase', 'archive'];
  const loaders = ['LINK', 'IFRAME', 'FRAME', 'OBJECT', 'EMBED', 'IMG', 'IMAGE', 'AUDIO', 'VIDEO',
    'SOURCE', 'TRACK', 'BASE', 'SCRIPT', 'USE', 'FEIMAGE', 'FOREIGNOBJECT'];
  for (const el of document.querySelectorAll('*')) {
    if (el.id === 'probe-script') continue;
    if (loaders.includes(el.tagName.toUpperCase())) r.refs.push('element ' + name(el));
    if (el.tagName.toUpperCase() === 'META' && el.getAttribute('http-equiv')) r.refs.push('meta http-equiv');
    for (const a of el.attributes) {
      const n = a.name.toLowerCase();
      if (urlAttrs.includes(n) || n.endsWith(':href') || /url\s*\(|\/\//i.test(a.value) && n !== 'xmlns')
        r.refs.push(name(el) + ' ' + a.name + '=' + a.value);
    }
  }
  for (const sheet of document.styleSheets) {
    if (sheet.href) r.css.push('stylesheet ' + sheet.href);
    for (const rule of sheet.cssRules)
      if (/url\s*\(|@import|@font-face|image-set/i.test(rule.cssText)) r.css.push(rule.cssText);
  }
  for (const el of document.body.querySelectorAll('*')) {
    if (el.id === 'probe-script') continue;
    const b = el.getBoundingClientRect();
    if (b.width === 0 && b.height === 0) continue;
    if (b.left < -0.5 || b.right > vw + 0.5)
      r.overflow.push(name(el) + ' spans x ' + b.left.toFixed(1) + '..' + b.right.toFixed(1));
  }
  for (const svg of document.querySelectorAll('svg.plot')) {
    const vb = svg.viewBox.baseVal;
    const sb = svg.getBoundingClientRect();
    const p = { id: svg.dataset.plot, polylines: [], outside: [] };
    for (const el of svg.querySelectorAll('*')) {
      if (el.tagName.toLowerCase() === 'title') continue;
      const b = el.getBoundingClientRect();
      if (b.width === 0 && b.height === 0) continue;
      if (b.left < sb.left - 1 || b.right > sb.right + 1 || b.top < sb.top - 1 || b.bottom > sb.bottom + 1)
        p.outside.push(name(el) + ' ' + (el.textContent || '').slice(0, 40));
    }
    for (const pl of svg.querySelectorAll('polyline')) {
      const raw = (pl.getAttribute('points') || '').trim();
      const nums = raw === '' ? [] : raw.split(/[\s,]+/).map(Number);
      p.polylines.push({
        numbers: nums.length,
        parsed_points: pl.points.numberOfItems,
        finite: nums.every(Number.isFinite),
        inside: nums.every((v, i) => i % 2 === 0
          ? v >= vb.x && v <= vb.x + vb.width
          : v >= vb.y && v <= vb.y + vb.height),
      });
    }
    r.plots.push(p);
  }
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(r).replace(/[<>&]/g,
    (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
  document.body.appendChild(out);
})();
</script>"#;

/// Lay out `html` (the report with [`PROBE`] added) in a Chromium window `width` px wide and
/// return the probe's findings.
fn probe_layout(browser: &str, d: &Path, html: &str, width: u32) -> serde_json::Value {
    let at = html.rfind("</body>").expect("the report has a </body>");
    let probed = d.join("report-probe.html");
    std::fs::write(&probed, format!("{}{PROBE}{}", &html[..at], &html[at..])).unwrap();
    let out = run_chromium(
        browser,
        &[
            format!("--window-size={width},1200"),
            "--dump-dom".into(),
            format!("file://{}", probed.display()),
        ],
        &d.join(format!("profile-probe-{width}")),
    );
    assert!(
        out.status.success(),
        "chromium --dump-dom (probe) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    let start = dom.find("<pre id=\"probe\">").unwrap_or_else(|| {
        panic!(
            "the probe script did not run; DOM tail: {}",
            &dom[dom.len().saturating_sub(2000)..]
        )
    }) + "<pre id=\"probe\">".len();
    let end = start + dom[start..].find("</pre>").unwrap();
    serde_json::from_str(&dom[start..end]).expect("the probe's JSON")
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn report_renders_in_headless_chromium_with_every_plot() {
    let browser = chromium();
    let d = workdir("report_chromium");
    let (cpu, gpu) = fixtures(&d);
    add_llama_bench_runs(&cpu, &gpu);
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
    // Self-contained, in the text: nothing to fetch. The only URL allowed is the SVG namespace
    // name, as the value of an xmlns attribute (a name, never fetched).
    for bad in [
        "<script",
        "<link",
        "<img",
        "<iframe",
        "<object",
        "<embed",
        "src=",
        "href=",
        "@import",
        "@font-face",
        "url(",
        "https:",
        "//fonts.",
    ] {
        assert!(
            !html.to_ascii_lowercase().contains(bad),
            "the report must load nothing: found {bad:?}"
        );
    }
    // llama-bench runs get their own table, and their comparison one chart per test.
    assert!(
        html.contains("<h2>llama-bench tests</h2>"),
        "no llama-bench section"
    );
    for t in ["pp512 tokens/s", "tg128 tokens/s"] {
        assert!(
            html.contains(&format!("<title>{t}</title>")),
            "no chart of {t}"
        );
    }
    let svg_ns = r#"xmlns="http://www.w3.org/2000/svg""#;
    assert_eq!(
        html.matches("http://").count(),
        html.matches(svg_ns).count(),
        "every http:// in the report is the SVG namespace of an xmlns attribute"
    );
    assert!(html.matches(svg_ns).count() >= 19);

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
        "pareto-cost",
        "pareto-ttft",
    ] {
        assert!(
            dom.contains(&format!("data-plot=\"{id}\"")),
            "plot {id} missing from the rendered DOM"
        );
    }
    // 4 CDFs + 5 ITL-over-time + 2 sweep + 5 memory + 3 device bars, the llama-bench
    // comparison's 2 (one per test), and 2 quality plots (against cost and TTFT).
    assert_eq!(plots, 23, "number of SVG plots in the rendered DOM");
    // The quality plots: one dot per column (the 5 runs: each rate of the CPU sweep is a
    // column of its own), coloured by verdict.
    for id in ["pareto-cost", "pareto-ttft"] {
        let p = &dom[dom.find(&format!("data-plot=\"{id}\"")).unwrap()..];
        let p = &p[..p.find("</svg>").unwrap()];
        assert_eq!(p.matches("class=\"point ").count(), 5, "{id}: {p}");
        assert_eq!(p.matches("slo-pass").count(), 5, "{id}");
        assert!(
            p.contains("accuracy %"),
            "{id}: quality is the scored accuracy"
        );
    }
    // every CDF has one line per run (5 runs)
    let cdf = &dom[dom.find("data-plot=\"cdf-ttft\"").unwrap()..];
    let cdf = &cdf[..cdf.find("</svg>").unwrap()];
    assert_eq!(cdf.matches("<polyline").count(), 5);

    // The page as laid out, at the screenshot's width and at a common laptop width.
    for width in [PAGE_WIDTH, 1280] {
        let p = probe_layout(&browser, &d, &html, width);
        eprintln!(
            "probe at {width} px: viewport {} px, scrollWidth {} px, {} plots",
            p["viewport"],
            p["scroll_width"],
            p["plots"].as_array().map_or(0, Vec::len)
        );
        assert_eq!(
            p["viewport"], width,
            "the window width the page was laid out at"
        );
        let list = |k: &str| -> Vec<String> {
            p[k].as_array()
                .unwrap_or_else(|| panic!("probe field {k}: {p}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let px = |k: &str| {
            p[k].as_u64()
                .unwrap_or_else(|| panic!("probe field {k}: {p}"))
        };
        let overflow = list("overflow");
        assert!(
            px("scroll_width") <= px("viewport") && px("body_scroll_width") <= px("viewport"),
            "the page scrolls sideways at {width} px: scrollWidth {}, body {}; first of {} elements past the edge: {:?}",
            px("scroll_width"),
            px("body_scroll_width"),
            overflow.len(),
            &overflow[..overflow.len().min(4)]
        );
        assert_eq!(
            list("overflow"),
            Vec::<String>::new(),
            "elements wider than the page"
        );
        assert_eq!(list("refs"), Vec::<String>::new(), "references in the DOM");
        assert_eq!(
            list("css"),
            Vec::<String>::new(),
            "references in the style sheets"
        );
        assert_eq!(
            list("resources"),
            Vec::<String>::new(),
            "resources the page loaded"
        );
        assert_eq!(p["fonts"], 0, "web fonts declared");
        let plots = p["plots"].as_array().unwrap();
        assert_eq!(plots.len(), 23);
        let mut n_lines = 0;
        for plot in plots {
            let id = plot["id"].as_str().unwrap();
            let outside: Vec<&str> = plot["outside"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(
                outside.is_empty(),
                "{id}: drawn outside the plot: {outside:?}"
            );
            for (k, line) in plot["polylines"].as_array().unwrap().iter().enumerate() {
                let numbers = line["numbers"].as_u64().unwrap();
                assert!(
                    numbers >= 4 && numbers % 2 == 0,
                    "{id} polyline {k}: {numbers} coordinates, want at least two points: {line}"
                );
                assert_eq!(
                    line["parsed_points"].as_u64(),
                    Some(numbers / 2),
                    "{id} polyline {k}: Chromium parsed fewer points than written: {line}"
                );
                assert_eq!(
                    line["finite"], true,
                    "{id} polyline {k}: non-finite coordinate"
                );
                assert_eq!(
                    line["inside"], true,
                    "{id} polyline {k}: a point outside the viewBox"
                );
                n_lines += 1;
            }
        }
        // 4 CDFs × 5 runs + 2 sweep plots with a line each.
        assert!(n_lines >= 22, "{n_lines} polylines");
    }

    let png = d.join("report.png");
    let shot = run_chromium(
        &browser,
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={PAGE_WIDTH},5200"),
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
    assert_eq!(png_size(&bytes), (PAGE_WIDTH, 5200));
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
    // refuse when nothing matches (and there is no quality figure to show per column)
    let (other, other2) = (d.join("other.db"), d.join("other2.db"));
    for (f, hash) in [(&other, "zzz"), (&other2, "yyy")] {
        Store::open(f)
            .unwrap()
            .save_run(&synth_run(&SynthSpec {
                workload_hash: hash.into(),
                ..Default::default()
            }))
            .unwrap();
    }
    let bad = Command::new(EMBER)
        .arg("compare")
        .arg(&other2)
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("refusing"));
    // ...but scored runs of different workloads (two models never share one) still get the
    // quality · latency · cost rows, one per column.
    let tri = Command::new(EMBER)
        .arg("compare")
        .arg(&gpu)
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(
        tri.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&tri.stderr)
    );
    let text = String::from_utf8_lossy(&tri.stdout);
    assert!(text.contains("## quality · latency · cost"), "{text}");
    assert!(text.contains("| 50.0% ("), "{text}");
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
