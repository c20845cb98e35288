//! `ember report`: one self-contained HTML file (inline CSS, inline SVG, no
//! scripts, nothing loaded from the network) with the plots people want:
//! latency CDFs per run, ITL over time, tokens/s and attainment against load
//! for sweeps, the memory timeline, and the device comparison.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::compare::{CompareOptions, compare, group_defs, load_label, load_x};
use crate::llamabench::BenchResult;
use crate::record::MemorySample;
use crate::store::{Figures, ReqSample, RunRow, Store, StoreError};

const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

/// Escapes text for HTML/SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A data series for a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw dots instead of a line.
    pub dots: bool,
}

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![lo];
    }
    let raw = (hi - lo) / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    let mut v = vec![];
    let mut t = start;
    while t <= hi + step * 1e-9 && v.len() < 50 {
        v.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    v
}

fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e5 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A line/dot chart as an inline SVG element. `id` becomes `data-plot`.
pub fn line_chart(
    id: &str,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    y_from_zero: bool,
) -> String {
    let (w, h) = (640.0, 340.0);
    let (ml, mr, mt, mb) = (64.0, 16.0, 30.0, 44.0);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="plot" data-plot="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><title>{}</title><rect x="0" y="0" width="{w}" height="{h}" fill="white"/><text x="{}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        esc(id),
        esc(title),
        w / 2.0,
        esc(title)
    );
    if !x0.is_finite() {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" fill="gray">no data</text></svg>"#,
            w / 2.0,
            h / 2.0
        );
        return s;
    }
    if y_from_zero {
        y0 = y0.min(0.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    // grid and ticks
    for t in ticks(x0, x1, 6) {
        let x = sx(t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
            mt + ph,
            mt + ph + 15.0,
            tick_label(t)
        );
    }
    for t in ticks(y0, y1, 5) {
        let y = sy(t);
        let _ = write!(
            s,
            r##"<line x1="{ml}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            ml + pw,
            ml - 6.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text><text transform="translate(14,{:.1}) rotate(-90)" text-anchor="middle" font-size="12">{}</text>"##,
        ml + pw / 2.0,
        h - 8.0,
        esc(xlabel),
        mt + ph / 2.0,
        esc(ylabel)
    );
    for (i, se) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let good: Vec<&(f64, f64)> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        if se.dots {
            let _ = write!(s, r#"<g class="series" fill="{c}" fill-opacity="0.55">"#);
            for p in &good {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="1.8"/>"#,
                    sx(p.0),
                    sy(p.1)
                );
            }
            s.push_str("</g>");
        } else {
            let d: Vec<String> = good
                .iter()
                .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline class="series" fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                d.join(" ")
            );
            if good.len() <= 12 {
                for p in &good {
                    let _ = write!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"/>"#,
                        sx(p.0),
                        sy(p.1)
                    );
                }
            }
        }
    }
    // legend
    for (i, se) in series.iter().enumerate().take(10) {
        let c = PALETTE[i % PALETTE.len()];
        let y = mt + 10.0 + i as f64 * 15.0;
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{c}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            ml + 10.0,
            y - 8.0,
            ml + 24.0,
            y + 1.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Horizontal bars: one bar per (label, value).
pub fn bar_chart(id: &str, title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let w = 640.0;
    let row = 24.0;
    let (ml, mt) = (250.0, 30.0);
    let h = mt + row * bars.len() as f64 + 30.0;
    let max = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let pw = w - ml - 80.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="plot" data-plot="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><title>{}</title><rect width="{w}" height="{h}" fill="white"/><text x="{}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        esc(id),
        esc(title),
        w / 2.0,
        esc(title)
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = mt + i as f64 * row;
        let bw = if v.is_finite() { v / max * pw } else { 0.0 };
        let short: String = label.chars().take(40).collect();
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text><rect x="{ml}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{} {}</text>"#,
            ml - 6.0,
            y + 15.0,
            esc(&short),
            y + 4.0,
            row - 6.0,
            PALETTE[i % PALETTE.len()],
            ml + bw + 4.0,
            y + 15.0,
            tick_label(*v),
            esc(unit)
        );
    }
    s.push_str("</svg>");
    s
}

/// An empirical CDF (x sorted, y = rank/n), thinned to at most `max` points.
fn cdf(mut v: Vec<f64>, max: usize) -> Vec<(f64, f64)> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let step = (n / max.max(1)).max(1);
    let mut out: Vec<(f64, f64)> = v
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == n - 1)
        .map(|(i, x)| (*x, (i + 1) as f64 / n as f64))
        .collect();
    if let Some(first) = out.first().copied() {
        out.insert(0, (first.0, 0.0));
    }
    out
}

struct LoadedRun {
    file: String,
    row: RunRow,
    samples: Vec<ReqSample>,
    memory: Vec<MemorySample>,
    figures: Figures,
}

impl LoadedRun {
    fn name(&self) -> String {
        let load = load_label(&self.row.workload.load);
        format!(
            "{}#{} {} · {}{}",
            self.file,
            self.row.run.0,
            self.row.device_label(),
            self.row.workload.name,
            if load.is_empty() {
                String::new()
            } else {
                format!(" · {load}")
            }
        )
    }
}

/// Options for [`render`].
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// At most this many runs get their own per-run plots (ITL over time, memory).
    pub max_runs_detailed: usize,
    pub title: String,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            max_runs_detailed: 8,
            title: "ember benchmark report".into(),
        }
    }
}

/// Renders the report of every run in `files` as one HTML document.
pub fn render(files: &[PathBuf], opts: &ReportOptions) -> Result<String, StoreError> {
    let mut runs = vec![];
    // llama-bench runs (`ember bench --pp/--tg`): tests, not requests.
    let mut lb_runs: Vec<(String, RunRow, Vec<BenchResult>)> = vec![];
    for f in files {
        let store = Store::open_existing(f)?;
        let file = f
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for row in store.runs()? {
            let tests = store.llama_bench(row.run)?;
            if !tests.is_empty() {
                lb_runs.push((file.clone(), row, tests));
                continue;
            }
            let samples = store.samples(row.run)?;
            let memory = store.memory(row.run)?;
            let figures = Figures::compute(&samples, &memory);
            runs.push(LoadedRun {
                file: file.clone(),
                row,
                samples,
                memory,
                figures,
            });
        }
    }
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{}</title><style>
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;background:#fafafa}}
h1{{font-size:22px}}h2{{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}}
table{{border-collapse:collapse;font-size:12px;margin:8px 0}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
th{{background:#eee}}td:first-child,th:first-child{{text-align:left}}.plots{{display:flex;flex-wrap:wrap;gap:12px}}
svg.plot{{border:1px solid #ddd;background:#fff}}.note{{color:#666;font-size:12px}}.bad{{color:#b00}}
</style></head><body><h1>{}</h1><p class="note">{} run(s) from {} file(s): {}. Figures follow ember's docs/METRICS.md: nearest-rank percentiles over measured (non-warm-up), non-failed requests; ITL pooled over every stored gap.</p>"#,
        esc(&opts.title),
        esc(&opts.title),
        runs.len() + lb_runs.len(),
        files.len(),
        esc(&files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "))
    );

    // --- runs table
    h.push_str("<h2>Runs</h2><table><tr><th>run</th><th>status</th><th>device</th><th>model</th><th>workload</th><th>load</th><th>n</th><th>failed</th><th>TTFT p50 ms</th><th>TTFT p99 ms</th><th>ITL p50 ms</th><th>ITL p99 ms</th><th>TPOT p50 ms</th><th>out tok/s</th><th>attainment</th><th>goodput req/s</th><th>peak RSS MiB</th><th>prefix hit</th></tr>");
    for r in &runs {
        let f = &r.figures;
        let ms = |m: &str, q: &str| {
            f.dist(m)
                .and_then(|s| s.get(q))
                .map(|v| format!("{:.2}", v / 1e6))
                .unwrap_or_else(|| "–".into())
        };
        let _ = write!(
            h,
            "<tr><td>{}#{}</td><td{}>{}</td><td>{}</td><td>{} {}</td><td>{} ({})</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.file),
            r.row.run.0,
            if r.row.status == "finished" {
                ""
            } else {
                " class=\"bad\""
            },
            esc(&r.row.status),
            esc(&r.row.device_label()),
            esc(&r.row.provenance.model_arch),
            esc(&r
                .row
                .provenance
                .model_sha256
                .chars()
                .take(8)
                .collect::<String>()),
            esc(&r.row.workload.name),
            esc(&r.row.workload.hash.chars().take(10).collect::<String>()),
            esc(&load_label(&r.row.workload.load)),
            f.measured,
            f.failed,
            ms("ttft", "p50"),
            ms("ttft", "p99"),
            ms("itl", "p50"),
            ms("itl", "p99"),
            ms("tpot", "p50"),
            f.output_tps,
            r.row
                .slo_attainment
                .map(|a| format!("{:.1}%", a * 100.0))
                .unwrap_or_else(|| "–".into()),
            r.row
                .goodput_rps
                .map(|g| format!("{g:.2}"))
                .unwrap_or_else(|| "–".into()),
            f.rss_peak_bytes
                .map(|b| format!("{:.1}", b as f64 / 1048576.0))
                .unwrap_or_else(|| "–".into()),
            f.prefix_hit_rate
                .map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or_else(|| "–".into()),
        );
    }
    h.push_str("</table>");

    // --- latency CDFs
    h.push_str(r#"<h2>Latency CDFs</h2><div class="plots">"#);
    for (metric, label) in [
        ("ttft", "TTFT"),
        ("itl", "ITL"),
        ("tpot", "TPOT"),
        ("e2e", "end-to-end latency"),
    ] {
        let series: Vec<Series> = runs
            .iter()
            .map(|r| Series {
                name: r.name(),
                points: cdf(
                    metric_values(&r.samples, metric)
                        .into_iter()
                        .map(|x| x / 1e6)
                        .collect(),
                    400,
                ),
                dots: false,
            })
            .collect();
        h.push_str(&line_chart(
            &format!("cdf-{metric}"),
            &format!("{label} CDF per run"),
            &format!("{label} (ms)"),
            "fraction of samples ≤ x",
            &series,
            true,
        ));
    }
    h.push_str("</div>");

    // --- ITL over time
    h.push_str(r#"<h2>ITL over time</h2><p class="note">Every stored inter-token gap of the measured requests, at the time of the later token.</p><div class="plots">"#);
    for (ri, r) in runs.iter().enumerate().take(opts.max_runs_detailed) {
        let mut pts: Vec<(f64, f64)> = r
            .samples
            .iter()
            .filter(|s| !s.warmup && !s.failed)
            .flat_map(|s| {
                s.token_ns
                    .windows(2)
                    .map(|w| (w[1] as f64 / 1e9, (w[1] - w[0]) as f64 / 1e6))
                    .collect::<Vec<_>>()
            })
            .collect();
        let step = (pts.len() / 4000).max(1);
        if step > 1 {
            pts = pts.into_iter().step_by(step).collect();
        }
        h.push_str(&line_chart(
            &format!("itl-time-{ri}"),
            &format!("ITL over time: {}", r.name()),
            "time since run start (s)",
            "ITL (ms)",
            &[Series {
                name: "gap".into(),
                points: pts,
                dots: true,
            }],
            true,
        ));
    }
    if runs.len() > opts.max_runs_detailed {
        let _ = write!(
            h,
            r#"<p class="note">{} more run(s) not plotted.</p>"#,
            runs.len() - opts.max_runs_detailed
        );
    }
    h.push_str("</div>");

    // --- sweeps
    h.push_str("<h2>Sweeps: throughput and attainment against load</h2>");
    // (file, device fingerprint, model sha256, workload name, axis) -> the points of one sweep
    type SweepKey = (String, String, String, String, String);
    let mut sweeps: BTreeMap<SweepKey, Vec<(f64, &LoadedRun)>> = BTreeMap::new();
    for r in &runs {
        if let Some((axis, x)) = load_x(&r.row.workload.load) {
            let key = (
                r.file.clone(),
                r.row.device_fingerprint.clone(),
                r.row.provenance.model_sha256.clone(),
                r.row.workload.name.clone(),
                axis,
            );
            sweeps.entry(key).or_default().push((x, r));
        }
    }
    let sweeps: Vec<_> = sweeps
        .into_iter()
        .filter(|(_, v)| {
            v.iter()
                .map(|(x, _)| x.to_bits())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                >= 2
        })
        .collect();
    if sweeps.is_empty() {
        h.push_str(r#"<p class="note" data-empty="sweep">No sweep in these files: a sweep needs runs of one workload on one device at two or more rates or concurrencies.</p>"#);
    } else {
        h.push_str(r#"<div class="plots">"#);
        let axis = sweeps[0].0.4.clone();
        let mut tps = vec![];
        let mut att = vec![];
        for ((file, _, _, wl, _), mut v) in sweeps.clone() {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            let name = format!("{file} {} · {wl}", v[0].1.row.device_label());
            tps.push(Series {
                name: name.clone(),
                points: v.iter().map(|(x, r)| (*x, r.figures.output_tps)).collect(),
                dots: false,
            });
            att.push(Series {
                name,
                points: v
                    .iter()
                    .filter_map(|(x, r)| r.row.slo_attainment.map(|a| (*x, a * 100.0)))
                    .collect(),
                dots: false,
            });
        }
        h.push_str(&line_chart(
            "sweep-tps",
            &format!("output tokens/s vs {axis}"),
            &axis,
            "output tokens/s",
            &tps,
            true,
        ));
        h.push_str(&line_chart(
            "sweep-attainment",
            &format!("SLO attainment vs {axis}"),
            &axis,
            "attainment (%)",
            &att,
            true,
        ));
        h.push_str("</div>");
    }

    // --- memory timeline
    h.push_str(r#"<h2>Memory timeline</h2><div class="plots">"#);
    for (ri, r) in runs.iter().enumerate().take(opts.max_runs_detailed) {
        let mib = |f: fn(&MemorySample) -> u64| {
            r.memory
                .iter()
                .map(|m| (m.t_ns as f64 / 1e9, f(m) as f64 / 1048576.0))
                .collect::<Vec<_>>()
        };
        let mut series = vec![Series {
            name: "RSS".into(),
            points: mib(|m| m.rss_bytes),
            dots: false,
        }];
        if r.memory.iter().any(|m| m.device_bytes > 0) {
            series.push(Series {
                name: "device".into(),
                points: mib(|m| m.device_bytes),
                dots: false,
            });
        }
        series.push(Series {
            name: "KV used".into(),
            points: mib(|m| m.kv_bytes_used),
            dots: false,
        });
        series.push(Series {
            name: "KV reserved".into(),
            points: mib(|m| m.kv_bytes_reserved),
            dots: false,
        });
        h.push_str(&line_chart(
            &format!("memory-{ri}"),
            &format!("memory: {}", r.name()),
            "time since run start (s)",
            "MiB",
            &series,
            true,
        ));
    }
    h.push_str("</div>");

    // --- llama-bench runs
    if !lb_runs.is_empty() {
        h.push_str(r#"<h2>llama-bench tests</h2><p class="note">ember bench --pp/--tg: tokens/s as mean ± sample standard deviation over the repetitions, as llama-bench reports them.</p><table><tr><th>run</th><th>device</th><th>model</th><th>threads</th><th>test</th><th>reps</th><th>tokens/s</th></tr>"#);
        for (file, row, tests) in &lb_runs {
            for t in tests {
                let _ = write!(
                    h,
                    "<tr><td>{}#{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2} ± {:.2}</td></tr>",
                    esc(file),
                    row.run.0,
                    esc(&row.device_label()),
                    esc(&row.provenance.model_arch),
                    esc(&row
                        .provenance
                        .model_sha256
                        .chars()
                        .take(8)
                        .collect::<String>()),
                    row.provenance.threads,
                    esc(&t.test),
                    t.samples_ns.len(),
                    t.mean_tps,
                    t.sd_tps
                );
            }
        }
        h.push_str("</table>");
    }

    // --- device comparison
    h.push_str("<h2>Device comparison</h2>");
    let cmp = compare(
        files,
        &CompareOptions {
            include_unfinished: true,
            ..Default::default()
        },
    )?;
    if cmp.groups.is_empty() {
        h.push_str(r#"<p class="note" data-empty="devices">No workload hash appears in two columns (file/device/model/load), so there is nothing to compare side by side.</p>"#);
    }
    for (gi, g) in cmp.groups.iter().enumerate() {
        let _ = write!(
            h,
            "<h3>workload '{}' (hash {})</h3><div class=\"plots\">",
            esc(&g.workload_name),
            esc(&g.workload_hash.chars().take(12).collect::<String>())
        );
        if g.columns.iter().any(|c| !c.pooled.llama_bench.is_empty()) {
            // llama-bench tests: one chart per test's tokens/s.
            for (di, d) in group_defs(g)
                .iter()
                .filter(|d| d.key.ends_with("_tps"))
                .enumerate()
            {
                h.push_str(&bar_chart(
                    &format!("devices-{gi}-{di}"),
                    &d.label,
                    d.unit,
                    &column_bars(g, |c| (d.get)(c).map(|x| x.0)),
                ));
            }
        } else {
            request_bars(&mut h, gi, g);
        }
        h.push_str("</div><pre>");
        h.push_str(&esc(&crate::compare::Comparison {
            groups: vec![g.clone()],
            mismatched: vec![],
            gate: vec![],
            notes: vec![],
            files: vec![],
        }
        .to_text()));
        h.push_str("</pre>");
    }
    if !cmp.mismatched.is_empty() {
        h.push_str(r#"<p class="note">Not compared (workload hash in one column only): "#);
        h.push_str(&esc(&cmp
            .mismatched
            .iter()
            .map(|m| format!("{} {} '{}'", m.file, m.device, m.workload_name))
            .collect::<Vec<_>>()
            .join("; ")));
        h.push_str("</p>");
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// One bar per column of `g`: its figure `f` (NaN where it has none).
fn column_bars(
    g: &crate::compare::Group,
    f: impl Fn(&crate::compare::ColumnFigures) -> Option<f64>,
) -> Vec<(String, f64)> {
    g.columns
        .iter()
        .map(|c| (c.label(), f(&c.pooled).unwrap_or(f64::NAN)))
        .collect()
}

/// The device-comparison bars of a group of request runs: output tokens/s, TTFT and ITL p50.
fn request_bars(h: &mut String, gi: usize, g: &crate::compare::Group) {
    h.push_str(&bar_chart(
        &format!("devices-{gi}-tps"),
        "output tokens/s",
        "tok/s",
        &column_bars(g, |c| Some(c.figures.output_tps)),
    ));
    h.push_str(&bar_chart(
        &format!("devices-{gi}-ttft"),
        "TTFT p50 (ms)",
        "ms",
        &column_bars(g, |c| c.figures.dist("ttft").map(|s| s.p50 / 1e6)),
    ));
    h.push_str(&bar_chart(
        &format!("devices-{gi}-itl"),
        "ITL p50 (ms)",
        "ms",
        &column_bars(g, |c| c.figures.dist("itl").map(|s| s.p50 / 1e6)),
    ));
}

/// The per-sample values of a latency metric in ns (as in `store::figures`).
fn metric_values(samples: &[ReqSample], metric: &str) -> Vec<f64> {
    let ok = samples.iter().filter(|s| !s.warmup && !s.failed);
    match metric {
        "ttft" => ok.filter_map(|s| s.ttft()).collect(),
        "tpot" => ok.filter_map(|s| s.tpot()).collect(),
        "e2e" => ok.map(|s| s.e2e()).collect(),
        "itl" => ok
            .flat_map(|s| {
                s.token_ns
                    .windows(2)
                    .map(|w| (w[1] - w[0]) as f64)
                    .collect::<Vec<_>>()
            })
            .collect(),
        _ => vec![],
    }
}
