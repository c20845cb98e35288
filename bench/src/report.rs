//! `ember report`: one self-contained HTML file (inline CSS, inline SVG, no
//! scripts, nothing loaded from the network) with the plots people want:
//! latency CDFs per run, ITL over time, tokens/s and attainment against load
//! for sweeps, the memory timeline, and the device comparison.
//!
//! What lives where: the page is the minijinja template `report/report.html.j2` (autoescaped
//! HTML); this file loads the runs and turns them into the template's values (numbers
//! formatted, plots drawn); `svg` draws the plots.

mod svg;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::compare::{
    ColumnFigures, CompareOptions, Comparison, Group, compare, group_defs, load_label, load_x,
};
use crate::record::MemorySample;
use crate::store::{Figures, ReqSample, RunData, RunRow, StoreError, file_label, load_runs};

pub use svg::{ParetoPoint, Series, bar_chart, esc, line_chart, pareto_chart, pareto_front};

const TEMPLATE: &str = include_str!("report/report.html.j2");

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The built-in template failed to render (a bug in ember, not in the data).
    #[error("the report template: {0:#}")]
    Template(#[from] minijinja::Error),
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

/// A run of requests with its figures.
struct LoadedRun {
    file: String,
    figures: Figures,
    data: RunData,
}

impl LoadedRun {
    fn row(&self) -> &RunRow {
        &self.data.row
    }

    fn name(&self) -> String {
        let load = load_label(&self.row().workload.load);
        format!(
            "{}#{} {} · {}{}",
            self.file,
            self.row().run.0,
            self.row().device_label(),
            self.row().workload.name,
            if load.is_empty() {
                String::new()
            } else {
                format!(" · {load}")
            }
        )
    }
}

/// The template's values. Text is plain (the template escapes it); plots are safe markup.
#[derive(Serialize)]
struct Page {
    title: String,
    n_runs: usize,
    files: Vec<String>,
    runs: Vec<RunCells>,
    /// The runs that speculated, with their speculation figures (empty: none did).
    spec_runs: Vec<SpecCells>,
    cdf_plots: Vec<Value>,
    itl_plots: Vec<Value>,
    /// Runs past `max_runs_detailed`, which get no per-run plots.
    not_plotted: usize,
    sweep_plots: Vec<Value>,
    memory_plots: Vec<Value>,
    llama_bench: Vec<LlamaBenchCells>,
    groups: Vec<GroupView>,
    mismatched: Vec<String>,
    /// Quality against cost and latency (Pareto plots), and why there are none.
    triangle_plots: Vec<Value>,
    triangle_note: String,
}

/// One row of the runs table.
#[derive(Serialize)]
struct RunCells {
    file: String,
    run: i64,
    status: String,
    device: String,
    model: String,
    workload: String,
    load: String,
    /// n, failed, then the figures, formatted.
    figures: Vec<String>,
}

/// One row of the speculative decoding table: the run, then its figures formatted (requests,
/// drafted, accepted, rejected, acceptance, mean accepted run, verify passes, draft ms,
/// verify ms, TPOT p50 and p99, ITL p50 and p99).
#[derive(Serialize)]
struct SpecCells {
    file: String,
    run: i64,
    figures: Vec<String>,
}

/// One row of the llama-bench table.
#[derive(Serialize)]
struct LlamaBenchCells {
    file: String,
    run: i64,
    device: String,
    model: String,
    threads: usize,
    test: String,
    reps: usize,
    tps: String,
}

/// One workload of the device comparison.
#[derive(Serialize)]
struct GroupView {
    name: String,
    hash: String,
    plots: Vec<Value>,
    table: String,
}

/// A plot for the template. Safe to mark as markup: `svg` escapes every text it puts in.
fn plot(svg: String) -> Value {
    Value::from_safe_string(svg)
}

/// "arch sha256[..8]", the model cell.
fn model_cell(row: &RunRow) -> String {
    let sha: String = row.provenance.model_sha256.chars().take(8).collect();
    format!("{} {sha}", row.provenance.model_arch)
}

/// Renders the report of every run in `files` as one HTML document.
pub fn render(files: &[PathBuf], opts: &ReportOptions) -> Result<String, ReportError> {
    // llama-bench runs (`ember bench --pp/--tg`) are tests, not requests: their own table.
    let (lb_runs, req_runs): (Vec<RunData>, Vec<RunData>) = load_runs(files, |_, _| true)?
        .into_iter()
        .partition(|r| !r.llama_bench.is_empty());
    let runs: Vec<LoadedRun> = req_runs
        .into_iter()
        .map(|data| LoadedRun {
            file: file_label(&files[data.file_index]),
            figures: data.figures(),
            data,
        })
        .collect();
    let cmp = compare(
        files,
        &CompareOptions {
            include_unfinished: true,
            ..Default::default()
        },
    )?;
    let detailed = &runs[..runs.len().min(opts.max_runs_detailed)];
    let (triangle_svgs, triangle_note) = triangle_plots(&cmp);
    let page = Page {
        title: opts.title.clone(),
        n_runs: runs.len() + lb_runs.len(),
        files: files.iter().map(|f| f.display().to_string()).collect(),
        runs: runs.iter().map(run_cells).collect(),
        spec_runs: runs.iter().filter_map(spec_cells).collect(),
        cdf_plots: cdf_plots(&runs),
        itl_plots: detailed.iter().enumerate().map(itl_plot).collect(),
        not_plotted: runs.len() - detailed.len(),
        sweep_plots: sweep_plots(&runs),
        memory_plots: detailed.iter().enumerate().map(memory_plot).collect(),
        llama_bench: lb_runs
            .iter()
            .flat_map(|r| llama_bench_cells(&file_label(&files[r.file_index]), r))
            .collect(),
        groups: cmp.groups.iter().enumerate().map(group_view).collect(),
        mismatched: cmp
            .mismatched
            .iter()
            .map(|m| format!("{} {} '{}'", m.file, m.device, m.workload_name))
            .collect(),
        triangle_plots: triangle_svgs.into_iter().map(plot).collect(),
        triangle_note,
    };
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    env.add_template("report.html.j2", TEMPLATE)?;
    Ok(env.get_template("report.html.j2")?.render(&page)?)
}

fn run_cells(r: &LoadedRun) -> RunCells {
    let f = &r.figures;
    let row = r.row();
    let ms = |m: &str, q: &str| {
        f.dist(m)
            .and_then(|s| s.get(q))
            .map(|v| format!("{:.2}", v / 1e6))
            .unwrap_or_else(|| "–".into())
    };
    let opt = |v: Option<String>| v.unwrap_or_else(|| "–".into());
    RunCells {
        file: r.file.clone(),
        run: row.run.0,
        status: row.status.clone(),
        device: row.device_label(),
        model: model_cell(row),
        workload: format!(
            "{} ({})",
            row.workload.name,
            row.workload.hash.chars().take(10).collect::<String>()
        ),
        load: load_label(&row.workload.load),
        figures: vec![
            f.measured.to_string(),
            f.failed.to_string(),
            ms("ttft", "p50"),
            ms("ttft", "p99"),
            ms("itl", "p50"),
            ms("itl", "p99"),
            ms("tpot", "p50"),
            format!("{:.1}", f.output_tps),
            opt(row.slo_attainment.map(|a| format!("{:.1}%", a * 100.0))),
            opt(row.goodput_rps.map(|g| format!("{g:.2}"))),
            opt(f
                .rss_peak_bytes
                .map(|b| format!("{:.1}", b as f64 / 1048576.0))),
            opt(f.prefix_hit_rate.map(|x| format!("{:.1}%", x * 100.0))),
        ],
    }
}

/// A run's speculation figures beside its TPOT and ITL (None: it did not speculate).
fn spec_cells(r: &LoadedRun) -> Option<SpecCells> {
    let f = &r.figures;
    let t = f.spec.as_ref()?;
    let ms = |m: &str, q: &str| {
        f.dist(m)
            .and_then(|s| s.get(q))
            .map(|v| format!("{:.2}", v / 1e6))
            .unwrap_or_else(|| "–".into())
    };
    Some(SpecCells {
        file: r.file.clone(),
        run: r.row().run.0,
        figures: vec![
            t.requests.to_string(),
            t.drafted.to_string(),
            t.accepted.to_string(),
            t.rejected.to_string(),
            t.acceptance_rate
                .map_or("–".into(), |a| format!("{:.1}%", a * 100.0)),
            t.mean_accepted_run
                .map_or("–".into(), |m| format!("{m:.2}")),
            t.verify_steps.to_string(),
            format!("{:.1}", t.draft_ms),
            format!("{:.1}", t.verify_ms),
            ms("tpot", "p50"),
            ms("tpot", "p99"),
            ms("itl", "p50"),
            ms("itl", "p99"),
        ],
    })
}

/// One CDF per latency metric, a line per run.
fn cdf_plots(runs: &[LoadedRun]) -> Vec<Value> {
    [
        ("ttft", "TTFT"),
        ("itl", "ITL"),
        ("tpot", "TPOT"),
        ("e2e", "end-to-end latency"),
    ]
    .into_iter()
    .map(|(metric, label)| {
        let series: Vec<Series> = runs
            .iter()
            .map(|r| Series {
                name: r.name(),
                points: svg::cdf(
                    metric_values(&r.data.samples, metric)
                        .into_iter()
                        .map(|x| x / 1e6)
                        .collect(),
                    400,
                ),
                dots: false,
            })
            .collect();
        plot(line_chart(
            &format!("cdf-{metric}"),
            &format!("{label} CDF per run"),
            &format!("{label} (ms)"),
            "fraction of samples ≤ x",
            &series,
            true,
        ))
    })
    .collect()
}

/// Every stored gap of a run's measured requests against the time of the later token
/// (thinned to about 4000 dots).
fn itl_plot((ri, r): (usize, &LoadedRun)) -> Value {
    let mut pts: Vec<(f64, f64)> = measured(&r.data.samples)
        .flat_map(|s| {
            s.token_ns
                .windows(2)
                .map(|w| (w[1] as f64 / 1e9, (w[1] - w[0]) as f64 / 1e6))
        })
        .collect();
    let step = (pts.len() / 4000).max(1);
    if step > 1 {
        pts = pts.into_iter().step_by(step).collect();
    }
    plot(line_chart(
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
    ))
}

/// Output tokens/s and SLO attainment against load, a line per sweep (runs of one workload
/// on one device and model, in one file, at two or more rates or concurrencies).
fn sweep_plots(runs: &[LoadedRun]) -> Vec<Value> {
    // (file, device fingerprint, model sha256, workload name, axis) -> the points of one sweep
    type SweepKey = (String, String, String, String, String);
    let mut sweeps: BTreeMap<SweepKey, Vec<(f64, &LoadedRun)>> = BTreeMap::new();
    for r in runs {
        if let Some((axis, x)) = load_x(&r.row().workload.load) {
            let key = (
                r.file.clone(),
                r.row().device_fingerprint.clone(),
                r.row().provenance.model_sha256.clone(),
                r.row().workload.name.clone(),
                axis,
            );
            sweeps.entry(key).or_default().push((x, r));
        }
    }
    sweeps.retain(|_, v| {
        v.iter()
            .map(|(x, _)| x.to_bits())
            .collect::<BTreeSet<_>>()
            .len()
            >= 2
    });
    let Some(axis) = sweeps.keys().next().map(|k| k.4.clone()) else {
        return vec![];
    };
    let (mut tps, mut att) = (vec![], vec![]);
    for ((file, _, _, wl, _), mut v) in sweeps {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        let name = format!("{file} {} · {wl}", v[0].1.row().device_label());
        tps.push(Series {
            name: name.clone(),
            points: v.iter().map(|(x, r)| (*x, r.figures.output_tps)).collect(),
            dots: false,
        });
        att.push(Series {
            name,
            points: v
                .iter()
                .filter_map(|(x, r)| r.row().slo_attainment.map(|a| (*x, a * 100.0)))
                .collect(),
            dots: false,
        });
    }
    vec![
        plot(line_chart(
            "sweep-tps",
            &format!("output tokens/s vs {axis}"),
            &axis,
            "output tokens/s",
            &tps,
            true,
        )),
        plot(line_chart(
            "sweep-attainment",
            &format!("SLO attainment vs {axis}"),
            &axis,
            "attainment (%)",
            &att,
            true,
        )),
    ]
}

/// A run's memory timeline: RSS, device memory (where any), KV used and reserved.
fn memory_plot((ri, r): (usize, &LoadedRun)) -> Value {
    let memory = &r.data.memory;
    let mib = |name: &str, f: fn(&MemorySample) -> u64| Series {
        name: name.into(),
        points: memory
            .iter()
            .map(|m| (m.t_ns as f64 / 1e9, f(m) as f64 / 1048576.0))
            .collect(),
        dots: false,
    };
    let mut series = vec![mib("RSS", |m| m.rss_bytes)];
    if memory.iter().any(|m| m.device_bytes > 0) {
        series.push(mib("device", |m| m.device_bytes));
    }
    series.push(mib("KV used", |m| m.kv_bytes_used));
    series.push(mib("KV reserved", |m| m.kv_bytes_reserved));
    plot(line_chart(
        &format!("memory-{ri}"),
        &format!("memory: {}", r.name()),
        "time since run start (s)",
        "MiB",
        &series,
        true,
    ))
}

/// The rows of a llama-bench run, one per test.
fn llama_bench_cells(file: &str, r: &RunData) -> Vec<LlamaBenchCells> {
    r.llama_bench
        .iter()
        .map(|t| LlamaBenchCells {
            file: file.to_string(),
            run: r.row.run.0,
            device: r.row.device_label(),
            model: model_cell(&r.row),
            threads: r.row.provenance.threads,
            test: t.test.clone(),
            reps: t.samples_ns.len(),
            tps: format!("{:.2} ± {:.2}", t.mean_tps, t.sd_tps),
        })
        .collect()
}

/// Quality against $/Mtok and against TTFT p99, one dot per comparison column: accuracy
/// (`--score`) where any column has it, else perplexity (`ember eval ppl` of the column's
/// model). The note says what is missing when a plot cannot be drawn.
fn triangle_plots(cmp: &Comparison) -> (Vec<String>, String) {
    let rows = cmp.triangle();
    let acc = |r: &serde_json::Value| r["accuracy"]["accuracy"].as_f64().map(|a| 100.0 * a);
    type Quality = Box<dyn Fn(&serde_json::Value) -> Option<f64>>;
    let (quality, ylabel, higher): (Quality, &str, bool) = if rows.iter().any(|r| acc(r).is_some())
    {
        (Box::new(acc), "accuracy % (higher is better)", true)
    } else if rows.iter().any(|r| r["ppl"].is_number()) {
        (
            Box::new(|r: &serde_json::Value| r["ppl"].as_f64()),
            "perplexity (lower is better)",
            false,
        )
    } else {
        return (
                vec![],
                "No column has a quality figure: score a dataset (ember bench --dataset … --score) or evaluate its model (ember eval ppl).".into(),
            );
    };
    let points = |x: &str| -> Vec<ParetoPoint> {
        rows.iter()
            .filter_map(|r| {
                Some(ParetoPoint {
                    x: r[x].as_f64()?,
                    y: quality(r)?,
                    slo_pass: r["slo_pass"].as_bool(),
                    label: r["model"].as_str().unwrap_or("").to_string(),
                })
            })
            .collect()
    };
    let mut plots = vec![];
    let mut missing = vec![];
    for (id, x, title, xlabel) in [
        (
            "pareto-cost",
            "usd_per_mtok",
            "quality vs cost",
            "$ per million output tokens",
        ),
        (
            "pareto-ttft",
            "ttft_p99_ms",
            "quality vs TTFT p99",
            "TTFT p99 (ms)",
        ),
    ] {
        let pts = points(x);
        if pts.is_empty() {
            missing.push(xlabel);
            continue;
        }
        plots.push(pareto_chart(id, title, xlabel, ylabel, &pts, higher));
    }
    let note = if missing.is_empty() {
        String::new()
    } else {
        format!(
            "No plot against {}: no column with a quality figure has it (give a price: ember bench --cost-per-hour, or ember compare --cost).",
            missing.join(", ")
        )
    };
    (plots, note)
}

/// One workload of the device comparison: bars per column, then the comparison's table.
fn group_view((gi, g): (usize, &Group)) -> GroupView {
    let plots = if g.columns.iter().any(|c| !c.pooled.llama_bench.is_empty()) {
        // llama-bench tests: one chart per test's tokens/s.
        group_defs(g)
            .iter()
            .filter(|d| d.key.ends_with("_tps"))
            .enumerate()
            .map(|(di, d)| {
                bar_chart(
                    &format!("devices-{gi}-{di}"),
                    &d.label,
                    d.unit,
                    &column_bars(g, |c| (d.get)(c).map(|x| x.0)),
                )
            })
            .collect()
    } else {
        request_bars(gi, g)
    };
    GroupView {
        name: g.workload_name.clone(),
        hash: g.workload_hash.chars().take(12).collect(),
        plots: plots.into_iter().map(plot).collect(),
        table: Comparison {
            groups: vec![g.clone()],
            mismatched: vec![],
            gate: vec![],
            notes: vec![],
            files: vec![],
            quality: vec![],
            single: vec![],
        }
        .to_text(),
    }
}

/// One bar per column of `g`: its figure `f` (NaN where it has none).
fn column_bars(g: &Group, f: impl Fn(&ColumnFigures) -> Option<f64>) -> Vec<(String, f64)> {
    g.columns
        .iter()
        .map(|c| (c.label(), f(&c.pooled).unwrap_or(f64::NAN)))
        .collect()
}

/// The device-comparison bars of a group of request runs: output tokens/s, TTFT and ITL p50.
fn request_bars(gi: usize, g: &Group) -> Vec<String> {
    vec![
        bar_chart(
            &format!("devices-{gi}-tps"),
            "output tokens/s",
            "tok/s",
            &column_bars(g, |c| Some(c.figures.output_tps)),
        ),
        bar_chart(
            &format!("devices-{gi}-ttft"),
            "TTFT p50 (ms)",
            "ms",
            &column_bars(g, |c| c.figures.dist("ttft").map(|s| s.p50 / 1e6)),
        ),
        bar_chart(
            &format!("devices-{gi}-itl"),
            "ITL p50 (ms)",
            "ms",
            &column_bars(g, |c| c.figures.dist("itl").map(|s| s.p50 / 1e6)),
        ),
    ]
}

/// The measured (not warm-up), non-failed requests.
fn measured(samples: &[ReqSample]) -> impl Iterator<Item = &ReqSample> {
    samples.iter().filter(|s| !s.warmup && !s.failed)
}

/// The per-sample values of a latency metric in ns (as in `store::figures`).
fn metric_values(samples: &[ReqSample], metric: &str) -> Vec<f64> {
    let ok = measured(samples);
    match metric {
        "ttft" => ok.filter_map(|s| s.ttft()).collect(),
        "tpot" => ok.filter_map(|s| s.tpot()).collect(),
        "e2e" => ok.map(|s| s.e2e()).collect(),
        "itl" => ok
            .flat_map(|s| s.token_ns.windows(2).map(|w| (w[1] - w[0]) as f64))
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::testdata::{SynthSpec, synth_run};

    /// Names from the store (file, device, workload, hash) and the title reach the page as
    /// text, never as markup, in the tables, the headings, the comparison's `<pre>` and the
    /// plots' legends; the plots themselves stay markup.
    #[test]
    fn report_escapes_what_users_wrote_and_keeps_its_plots() {
        let dir = std::env::temp_dir().join(format!("ember-report-escape-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a<b>&.db");
        let mut store = Store::open(&path).unwrap();
        // Two devices (the fingerprint follows the backend), one workload: compared.
        for (seed, backend, profile) in [(1, "cpu", "<img id=x>"), (2, "wgpu", "gpu \"two\" & <u>")]
        {
            store
                .save_run(&synth_run(&SynthSpec {
                    seed,
                    backend: backend.into(),
                    device_profile: Some(profile.into()),
                    workload_name: "<script>alert(1)</script>".into(),
                    workload_hash: "h<i>".into(),
                    ..Default::default()
                }))
                .unwrap();
        }
        let opts = ReportOptions {
            title: "T </title><script>".into(),
            ..Default::default()
        };
        let html = render(std::slice::from_ref(&path), &opts).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        for bad in ["<script", "<img", "<i>", "<b>", "<u>", "T </title>"] {
            assert!(!html.contains(bad), "{bad:?} reached the page as markup");
        }
        for text in [
            "&lt;script&gt;alert(1)",
            "&lt;img id=x&gt;",
            "&lt;b&gt;&amp;.db",
            "h&lt;i&gt;",
        ] {
            assert!(html.contains(text), "{text:?} missing from the page");
        }
        // 4 CDFs, ITL over time and memory for each of the 2 runs, 3 device bars.
        assert_eq!(html.matches("<svg class=\"plot\"").count(), 11);
        assert_eq!(html.matches("</svg>").count(), 11);
        assert!(html.contains("<h2>Device comparison</h2>") && html.ends_with("</body></html>\n"));
    }
}
