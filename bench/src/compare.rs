//! `ember compare`: runs from several store files, matched by workload hash,
//! side by side; and a regression gate against a baseline file.
//!
//! A *column* is one (file, device, model, load) with one workload hash; its
//! figures pool the samples of every run in it (percentiles are never
//! averaged). A *group* is every column of one workload hash. Columns whose
//! hash appears nowhere else are not compared: they are listed as mismatched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::llamabench::BenchResult;
use crate::load::LoadSpec;
use crate::record::MemorySample;
use crate::store::figures::{QUANTILES, thin};
use crate::store::{Figures, ReqSample, RunRow, Store, StoreError};

/// Lower is better, or higher is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One row of the side-by-side table.
pub struct FigureDef {
    pub key: String,
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
    /// Whether the regression gate checks it.
    pub gated: bool,
    /// The figure of a column, and whether it rests on too few samples.
    pub get: FigureFn,
}

/// How a [`FigureDef`] reads its figure from a column: the value, and whether it rests on too
/// few samples.
pub type FigureFn = Box<dyn Fn(&ColumnFigures) -> Option<(f64, bool)>>;

impl FigureDef {
    fn new(
        key: &str,
        label: &str,
        unit: &'static str,
        better: Better,
        gated: bool,
        get: impl Fn(&ColumnFigures) -> Option<(f64, bool)> + 'static,
    ) -> FigureDef {
        FigureDef {
            key: key.to_string(),
            label: label.to_string(),
            unit,
            better,
            gated,
            get: Box::new(get),
        }
    }
}

fn pct(f: &ColumnFigures, metric: &str, stat: &str, scale: f64) -> Option<(f64, bool)> {
    let s = f.figures.dist(metric)?;
    let permille = QUANTILES.iter().find(|(_, n)| *n == stat).map(|(p, _)| *p);
    Some((s.get(stat)? / scale, permille.is_some_and(|p| thin(s.n, p))))
}

macro_rules! p {
    ($key:literal, $label:literal, $metric:literal, $stat:literal, $gated:expr) => {
        FigureDef::new($key, $label, "ms", Better::Lower, $gated, |f| {
            pct(f, $metric, $stat, 1e6)
        })
    };
}

/// The figures `ember compare` shows, in order.
pub fn figure_defs() -> Vec<FigureDef> {
    vec![
        FigureDef::new(
            "measured",
            "requests measured",
            "",
            Better::Higher,
            false,
            |f| Some((f.figures.measured as f64, false)),
        ),
        FigureDef::new("error_rate", "error rate", "%", Better::Lower, false, |f| {
            Some((f.figures.error_rate * 100.0, false))
        }),
        p!("ttft_p50", "TTFT p50", "ttft", "p50", true),
        p!("ttft_p90", "TTFT p90", "ttft", "p90", false),
        p!("ttft_p99", "TTFT p99", "ttft", "p99", true),
        p!("itl_p50", "ITL p50", "itl", "p50", true),
        p!("itl_p90", "ITL p90", "itl", "p90", false),
        p!("itl_p99", "ITL p99", "itl", "p99", true),
        p!("tpot_p50", "TPOT p50", "tpot", "p50", true),
        p!("tpot_p90", "TPOT p90", "tpot", "p90", false),
        p!("tpot_p99", "TPOT p99", "tpot", "p99", true),
        p!("e2e_p50", "e2e p50", "e2e", "p50", true),
        p!("e2e_p99", "e2e p99", "e2e", "p99", true),
        p!("queue_p99", "queue p99", "queue", "p99", false),
        FigureDef::new(
            "output_tps",
            "output tokens/s",
            "tok/s",
            Better::Higher,
            true,
            |f| Some((f.figures.output_tps, false)),
        ),
        FigureDef::new(
            "input_tps",
            "input tokens/s",
            "tok/s",
            Better::Higher,
            false,
            |f| Some((f.figures.input_tps, false)),
        ),
        FigureDef::new(
            "decode_tps",
            "decode tokens/s (total)",
            "tok/s",
            Better::Higher,
            true,
            |f| f.figures.decode_tps_total.map(|x| (x, false)),
        ),
        FigureDef::new(
            "prefill_tps",
            "prefill tokens/s (total)",
            "tok/s",
            Better::Higher,
            true,
            |f| f.figures.prefill_tps_total.map(|x| (x, false)),
        ),
        FigureDef::new("rps", "requests/s", "req/s", Better::Higher, false, |f| {
            Some((f.figures.rps, false))
        }),
        FigureDef::new("goodput", "goodput", "req/s", Better::Higher, true, |f| {
            f.goodput_rps.map(|x| (x, false))
        }),
        FigureDef::new(
            "attainment",
            "SLO attainment",
            "%",
            Better::Higher,
            true,
            |f| f.slo_attainment.map(|x| (x * 100.0, false)),
        ),
        FigureDef::new("rss_peak", "peak RSS", "MiB", Better::Lower, true, |f| {
            f.figures
                .rss_peak_bytes
                .map(|x| (x as f64 / 1048576.0, false))
        }),
        FigureDef::new(
            "device_peak",
            "peak device memory",
            "MiB",
            Better::Lower,
            false,
            |f| {
                f.figures
                    .device_bytes_peak
                    .filter(|&x| x > 0)
                    .map(|x| (x as f64 / 1048576.0, false))
            },
        ),
        FigureDef::new(
            "prefix_hit_rate",
            "prefix hit rate",
            "%",
            Better::Higher,
            false,
            |f| f.figures.prefix_hit_rate.map(|x| (x * 100.0, false)),
        ),
        FigureDef::new(
            "usd_per_mtok",
            "$/Mtok (output)",
            "$",
            Better::Lower,
            false,
            |f| f.usd_per_mtok().map(|x| (x, false)),
        ),
    ]
}

/// The figures of a llama-bench group: one row per test (tokens/s, mean over the pooled
/// repetitions), then the memory rows.
fn llama_bench_defs(tests: &[String]) -> Vec<FigureDef> {
    let mut defs: Vec<FigureDef> = tests
        .iter()
        .map(|t| {
            let test = t.clone();
            FigureDef::new(
                &format!("{t}_tps"),
                &format!("{t} tokens/s"),
                "tok/s",
                Better::Higher,
                true,
                move |f| {
                    f.llama_bench
                        .iter()
                        .find(|r| r.test == test)
                        .map(|r| (r.mean_tps, false))
                },
            )
        })
        .collect();
    defs.extend(
        figure_defs()
            .into_iter()
            .filter(|d| d.key == "rss_peak" || d.key == "device_peak"),
    );
    defs
}

/// The figures shown for a group: llama-bench tests for llama-bench runs, else the request
/// figures of [`figure_defs`].
pub fn group_defs(g: &Group) -> Vec<FigureDef> {
    let mut tests: Vec<String> = vec![];
    for r in g.columns.iter().flat_map(|c| &c.pooled.llama_bench) {
        if !tests.contains(&r.test) {
            tests.push(r.test.clone());
        }
    }
    if tests.is_empty() {
        figure_defs()
    } else {
        llama_bench_defs(&tests)
    }
}

/// A run as loaded from its file.
struct LoadedRun {
    samples: Vec<ReqSample>,
    memory: Vec<MemorySample>,
    llama_bench: Vec<BenchResult>,
    row: RunRow,
}

/// Figures of one column (pooled over its runs) plus run-level SLO results.
#[derive(Clone, Debug, Serialize)]
pub struct ColumnFigures {
    pub figures: Figures,
    /// llama-bench tests (`ember bench --pp/--tg`), each pooling the repetitions of every run.
    pub llama_bench: Vec<BenchResult>,
    /// Σ attaining / Σ measured over the runs (exact pooling of per-run attainment).
    pub slo_attainment: Option<f64>,
    /// Σ attaining / Σ window.
    pub goodput_rps: Option<f64>,
    pub cost_per_hour: Option<f64>,
}

impl ColumnFigures {
    pub fn usd_per_mtok(&self) -> Option<f64> {
        let c = self.cost_per_hour?;
        (self.figures.output_tps > 0.0).then(|| c / (self.figures.output_tps * 3600.0) * 1e6)
    }

    fn build(runs: &[&LoadedRun], cost: Option<f64>) -> ColumnFigures {
        let pooled: Vec<(&[ReqSample], &[MemorySample])> = runs
            .iter()
            .map(|r| (r.samples.as_slice(), r.memory.as_slice()))
            .collect();
        let figures = Figures::pooled(&pooled);
        let (mut att, mut meas, mut win, mut all_att) = (0.0, 0.0, 0.0, true);
        for r in runs {
            let f = Figures::compute(&r.samples, &r.memory);
            match r.row.slo_attainment {
                Some(a) => {
                    att += a * f.measured as f64;
                    meas += f.measured as f64;
                    win += f.window_ns as f64 / 1e9;
                }
                None => all_att = false,
            }
        }
        // llama-bench tests: every repetition of every run, per test.
        let mut llama_bench: Vec<BenchResult> = vec![];
        for t in runs.iter().flat_map(|r| &r.llama_bench) {
            match llama_bench.iter_mut().find(|p| p.test == t.test) {
                Some(p) => {
                    let mut ns = std::mem::take(&mut p.samples_ns);
                    ns.extend(&t.samples_ns);
                    *p = BenchResult::from_samples(t.kind, t.n_tokens, ns);
                }
                None => llama_bench.push(t.clone()),
            }
        }
        ColumnFigures {
            figures,
            llama_bench,
            slo_attainment: (all_att && meas > 0.0).then(|| att / meas),
            goodput_rps: (all_att && win > 0.0).then(|| att / win),
            cost_per_hour: cost,
        }
    }
}

/// One side-by-side column.
#[derive(Clone, Debug, Serialize)]
pub struct Column {
    pub file: String,
    pub device: String,
    pub device_fingerprint: String,
    pub backend: String,
    pub model_sha256: String,
    pub model_arch: String,
    pub load: String,
    pub run_uids: Vec<String>,
    pub status: Vec<String>,
    pub baseline: bool,
    pub pooled: ColumnFigures,
    /// Each run's own figures (for run-to-run noise).
    #[serde(skip)]
    pub per_run: Vec<ColumnFigures>,
}

impl Column {
    pub fn label(&self) -> String {
        let load = load_label(&self.load);
        format!(
            "{}: {}{}",
            self.file,
            self.device,
            if load.is_empty() {
                String::new()
            } else {
                format!(" [{load}]")
            }
        )
    }
}

/// "rate 4 req/s (poisson)" or "concurrency 8" from the load JSON.
pub fn load_label(load: &str) -> String {
    if let Ok(l) = serde_json::from_str::<LoadSpec>(load) {
        return l.describe();
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(load) else {
        return load.to_string();
    };
    let mode = v.get("mode").and_then(|m| m.as_str()).unwrap_or("");
    match mode {
        "rate" | "poisson" | "constant" => format!(
            "{mode} {}",
            v.get("rate").map(|x| x.to_string()).unwrap_or_default()
        ),
        "concurrency" => format!(
            "concurrency {}",
            v.get("concurrency")
                .or(v.get("n"))
                .map(|x| x.to_string())
                .unwrap_or_default()
        ),
        "" => String::new(),
        m => m.to_string(),
    }
}

/// The sweep coordinate of a load: its rate or concurrency.
pub fn load_x(load: &str) -> Option<(String, f64)> {
    match serde_json::from_str::<LoadSpec>(load) {
        Ok(LoadSpec::Rate { rps, .. }) => return Some(("rate".into(), rps)),
        Ok(LoadSpec::Concurrency { users, .. }) => {
            return Some(("concurrency".into(), users as f64));
        }
        Ok(LoadSpec::Sync) => return None,
        Err(_) => {}
    }
    let v: serde_json::Value = serde_json::from_str(load).ok()?;
    for k in ["rate", "concurrency", "n"] {
        if let Some(x) = v.get(k).and_then(|x| x.as_f64()) {
            return Some((
                if k == "n" {
                    "concurrency".to_string()
                } else {
                    k.to_string()
                },
                x,
            ));
        }
    }
    None
}

#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub workload_hash: String,
    pub workload_name: String,
    pub columns: Vec<Column>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Mismatched {
    pub file: String,
    pub device: String,
    pub workload_name: String,
    pub workload_hash: String,
    pub runs: usize,
}

/// One gated figure of one candidate column against the baseline.
#[derive(Clone, Debug, Serialize)]
pub struct GateCheck {
    pub workload_hash: String,
    pub column: String,
    pub figure: String,
    pub unit: String,
    pub baseline: f64,
    pub candidate: f64,
    /// How much worse (fraction, > 0 means worse).
    pub worse_by: f64,
    /// Run-to-run spread of the baseline, fraction; None when it had one run.
    pub noise: Option<f64>,
    pub allowed: f64,
    pub regressed: bool,
    pub thin: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub files: Vec<String>,
    pub groups: Vec<Group>,
    pub mismatched: Vec<Mismatched>,
    pub gate: Vec<GateCheck>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// The baseline file (its columns are marked; the gate compares against them).
    pub baseline: Option<PathBuf>,
    /// Threshold as a fraction (0.05 = 5%); enables the gate.
    pub max_regression: Option<f64>,
    /// Cost per hour by label: a device profile name, a file stem or a backend.
    pub costs: Vec<(String, f64)>,
    /// Include runs that have not finished (killed runs); default: finished only.
    pub include_unfinished: bool,
}

/// Parses "5%" or "0.05" into a fraction.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = if let Some(p) = t.strip_suffix('%') {
        p.trim().parse::<f64>().map(|x| x / 100.0)
    } else {
        t.parse::<f64>()
    }
    .map_err(|_| format!("'{s}' is not a percentage (e.g. 5% or 0.05)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("'{s}' must be a non-negative percentage"));
    }
    Ok(v)
}

fn stem(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Loads the runs of each file and builds the comparison.
pub fn compare(files: &[PathBuf], opts: &CompareOptions) -> Result<Comparison, StoreError> {
    let mut all_files: Vec<PathBuf> = vec![];
    if let Some(b) = &opts.baseline {
        all_files.push(b.clone());
    }
    for f in files {
        if !all_files.iter().any(|x| x == f) {
            all_files.push(f.clone());
        }
    }
    let mut notes = vec![];
    // key: (hash, file idx, fingerprint, model sha, load)
    type Key = (String, usize, String, String, String);
    let mut cols: BTreeMap<Key, (Vec<LoadedRun>, String)> = BTreeMap::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut labels: Vec<String> = all_files.iter().map(|p| stem(p)).collect();
    // disambiguate equal file names from different folders
    for i in 0..labels.len() {
        if labels.iter().filter(|l| **l == labels[i]).count() > 1 {
            labels[i] = all_files[i].display().to_string();
        }
    }
    for (fi, path) in all_files.iter().enumerate() {
        let store = Store::open_existing(path)?;
        for row in store.runs()? {
            if row.status != "finished" && !opts.include_unfinished {
                notes.push(format!(
                    "{}: run {} did not finish (status {}); skipped (use --include-unfinished)",
                    labels[fi], row.run.0, row.status
                ));
                continue;
            }
            let samples = store.samples(row.run)?;
            let memory = store.memory(row.run)?;
            let llama_bench = store.llama_bench(row.run)?;
            names
                .entry(row.workload.hash.clone())
                .or_insert_with(|| row.workload.name.clone());
            let key = (
                row.workload.hash.clone(),
                fi,
                row.device_fingerprint.clone(),
                row.provenance.model_sha256.clone(),
                row.workload.load.clone(),
            );
            let device = row.device_label();
            cols.entry(key)
                .or_insert_with(|| (vec![], device))
                .0
                .push(LoadedRun {
                    samples,
                    memory,
                    llama_bench,
                    row,
                });
        }
    }
    let cost_for = |file: &str, row: &RunRow| -> Option<f64> {
        let p = &row.provenance;
        opts.costs
            .iter()
            .find(|(label, _)| {
                Some(label.as_str()) == p.device_profile.as_deref()
                    || label == file
                    || label == file.trim_end_matches(".db")
                    || *label == p.backend
            })
            .map(|(_, c)| *c)
            .or(row.cost_per_hour)
    };
    let mut by_hash: BTreeMap<String, Vec<Column>> = BTreeMap::new();
    for ((hash, fi, fp, sha, load), (runs, device)) in cols {
        let first = &runs[0].row;
        let cost = cost_for(&labels[fi], first);
        let refs: Vec<&LoadedRun> = runs.iter().collect();
        let pooled = ColumnFigures::build(&refs, cost);
        let per_run = refs
            .iter()
            .map(|x| ColumnFigures::build(std::slice::from_ref(x), cost))
            .collect();
        by_hash.entry(hash).or_default().push(Column {
            file: labels[fi].clone(),
            device,
            device_fingerprint: fp,
            backend: first.provenance.backend.clone(),
            model_sha256: sha,
            model_arch: first.provenance.model_arch.clone(),
            load,
            run_uids: runs.iter().map(|r| r.row.run_uid.clone()).collect(),
            status: runs.iter().map(|r| r.row.status.clone()).collect(),
            baseline: opts.baseline.is_some() && fi == 0,
            pooled,
            per_run,
        });
    }
    let mut groups = vec![];
    let mut mismatched = vec![];
    for (hash, columns) in by_hash {
        let name = names.get(&hash).cloned().unwrap_or_default();
        if columns.len() >= 2 {
            groups.push(Group {
                workload_hash: hash,
                workload_name: name,
                columns,
            });
        } else {
            for c in columns {
                mismatched.push(Mismatched {
                    file: c.file,
                    device: c.device,
                    workload_name: name.clone(),
                    workload_hash: hash.clone(),
                    runs: c.run_uids.len(),
                });
            }
        }
    }
    let mut gate = vec![];
    if let Some(max) = opts.max_regression {
        if opts.baseline.is_none() {
            notes.push("--max-regression needs --baseline FILE; no gate applied".into());
        } else {
            for g in &groups {
                gate_group(g, max, &mut gate, &mut notes);
            }
            if gate.is_empty() {
                notes.push("the gate compared nothing: no workload hash of the baseline appears in the other files".into());
            }
        }
    }
    Ok(Comparison {
        files: labels,
        groups,
        mismatched,
        gate,
        notes,
    })
}

fn gate_group(g: &Group, max: f64, out: &mut Vec<GateCheck>, notes: &mut Vec<String>) {
    let defs = group_defs(g);
    for cand in g.columns.iter().filter(|c| !c.baseline) {
        // the baseline column of the same load, else the first baseline column
        let Some(base) = g
            .columns
            .iter()
            .filter(|c| c.baseline)
            .find(|c| c.load == cand.load)
            .or(g.columns.iter().find(|c| c.baseline))
        else {
            continue;
        };
        if base.per_run.len() < 2 {
            notes.push(format!(
                "workload {} ({}): the baseline holds 1 run, so run-to-run noise is unknown and taken as 0; store several runs of the same workload in the baseline to measure it",
                g.workload_name,
                short(&g.workload_hash)
            ));
        }
        for d in defs.iter().filter(|d| d.gated) {
            let (Some((b, bthin)), Some((c, cthin))) =
                ((d.get)(&base.pooled), (d.get)(&cand.pooled))
            else {
                continue;
            };
            if b == 0.0 || !b.is_finite() || !c.is_finite() {
                continue;
            }
            let worse_by = match d.better {
                Better::Lower => (c - b) / b.abs(),
                Better::Higher => (b - c) / b.abs(),
            };
            let noise = (base.per_run.len() >= 2).then(|| {
                let mut v: Vec<f64> = base
                    .per_run
                    .iter()
                    .filter_map(|r| (d.get)(r).map(|x| x.0))
                    .collect();
                v.sort_by(|a, b| a.total_cmp(b));
                if v.len() < 2 {
                    return 0.0;
                }
                let med = v[v.len() / 2].abs();
                if med > 0.0 {
                    (v[v.len() - 1] - v[0]) / med
                } else {
                    0.0
                }
            });
            let allowed = max + noise.unwrap_or(0.0);
            out.push(GateCheck {
                workload_hash: g.workload_hash.clone(),
                column: cand.label(),
                figure: d.label.to_string(),
                unit: d.unit.to_string(),
                baseline: b,
                candidate: c,
                worse_by,
                noise,
                allowed,
                regressed: worse_by > allowed,
                thin: bthin || cthin,
            });
        }
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

impl Comparison {
    /// Whether the gate found a regression.
    pub fn regressed(&self) -> bool {
        self.gate.iter().any(|g| g.regressed)
    }

    /// The side-by-side tables as text (markdown-compatible).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if self.groups.is_empty() {
            let _ = writeln!(
                s,
                "No workload appears in two columns: nothing to put side by side."
            );
        }
        for g in &self.groups {
            let _ = writeln!(
                s,
                "\n## workload '{}' (hash {})\n",
                g.workload_name,
                short(&g.workload_hash)
            );
            let mut header = vec!["figure".to_string()];
            for (i, c) in g.columns.iter().enumerate() {
                let runs = if c.run_uids.len() > 1 {
                    format!(", {} runs pooled", c.run_uids.len())
                } else {
                    String::new()
                };
                header.push(format!(
                    "{}{}{}{}",
                    c.label(),
                    runs,
                    if c.baseline { " (baseline)" } else { "" },
                    if i > 0 { " vs first" } else { "" }
                ));
            }
            let mut rows = vec![header];
            for d in &group_defs(g) {
                let vals: Vec<Option<(f64, bool)>> =
                    g.columns.iter().map(|c| (d.get)(&c.pooled)).collect();
                if vals.iter().all(|v| v.is_none()) {
                    continue;
                }
                let mut row = vec![if d.unit.is_empty() {
                    d.label.to_string()
                } else {
                    format!("{} ({})", d.label, d.unit)
                }];
                let first = vals[0];
                for (i, v) in vals.iter().enumerate() {
                    row.push(match v {
                        None => "–".into(),
                        Some((x, th)) => {
                            let mut t = fmt_num(*x);
                            if *th {
                                t.push('†');
                            }
                            if i > 0
                                && let Some((f, _)) = first
                                && f != 0.0
                            {
                                let _ = write!(t, " ({:.2}×)", x / f);
                            }
                            t
                        }
                    });
                }
                rows.push(row);
            }
            s.push_str(&render_table(&rows));
            let fps: std::collections::BTreeSet<&str> = g
                .columns
                .iter()
                .map(|c| c.device_fingerprint.as_str())
                .collect();
            let models: std::collections::BTreeSet<&str> =
                g.columns.iter().map(|c| c.model_sha256.as_str()).collect();
            if fps.len() > 1 {
                let _ = writeln!(
                    s,
                    "devices differ across columns (same workload hash: a fair device comparison)"
                );
            }
            if models.len() > 1 {
                let _ = writeln!(s, "note: the model file differs across columns (sha256)");
            }
        }
        if self.groups.iter().any(|g| {
            let defs = group_defs(g);
            g.columns
                .iter()
                .any(|c| defs.iter().any(|d| (d.get)(&c.pooled).is_some_and(|x| x.1)))
        }) {
            let _ = writeln!(
                s,
                "\n† too few samples for this percentile to mean much (n < 1/(1−q))"
            );
        }
        if !self.mismatched.is_empty() {
            let _ = writeln!(
                s,
                "\nNOT COMPARED: these workloads appear in one column only (their workload hash differs from every other run):"
            );
            for m in &self.mismatched {
                let _ = writeln!(
                    s,
                    "  {} | {} | workload '{}' hash {} | {} run(s)",
                    m.file,
                    m.device,
                    m.workload_name,
                    short(&m.workload_hash),
                    m.runs
                );
            }
        }
        if !self.gate.is_empty() {
            let _ = writeln!(s, "\n## regression gate\n");
            let mut rows = vec![vec![
                "column".to_string(),
                "figure".into(),
                "baseline".into(),
                "candidate".into(),
                "worse by".into(),
                "noise".into(),
                "allowed".into(),
                "verdict".into(),
            ]];
            for g in &self.gate {
                rows.push(vec![
                    g.column.clone(),
                    format!("{} ({})", g.figure, g.unit),
                    fmt_num(g.baseline),
                    fmt_num(g.candidate),
                    format!("{:+.1}%", g.worse_by * 100.0),
                    g.noise
                        .map(|n| format!("{:.1}%", n * 100.0))
                        .unwrap_or_else(|| "unknown".into()),
                    format!("{:.1}%", g.allowed * 100.0),
                    format!(
                        "{}{}",
                        if g.regressed { "REGRESSED" } else { "ok" },
                        if g.thin { " †" } else { "" }
                    ),
                ]);
            }
            s.push_str(&render_table(&rows));
            let n = self.gate.iter().filter(|g| g.regressed).count();
            let _ = writeln!(
                s,
                "{}",
                if n == 0 {
                    "gate: pass".to_string()
                } else {
                    format!("gate: FAIL ({n} figure(s) regressed)")
                }
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }

    /// One CSV row per (workload, column, figure).
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "workload_hash,workload,file,device,load,baseline,runs,figure,unit,value,thin\n",
        );
        for g in &self.groups {
            let defs = group_defs(g);
            for c in &g.columns {
                for d in &defs {
                    if let Some((v, th)) = (d.get)(&c.pooled) {
                        let _ = writeln!(
                            s,
                            "{},{},{},{},{},{},{},{},{},{},{}",
                            csv(&g.workload_hash),
                            csv(&g.workload_name),
                            csv(&c.file),
                            csv(&c.device),
                            csv(&load_label(&c.load)),
                            c.baseline,
                            c.run_uids.len(),
                            d.key,
                            csv(d.unit),
                            v,
                            th
                        );
                    }
                }
            }
        }
        s
    }

    /// Machine-readable: the groups with every figure by key, plus mismatches and the gate.
    pub fn to_json(&self) -> serde_json::Value {
        let groups: Vec<serde_json::Value> = self
            .groups
            .iter()
            .map(|g| {
                let defs = group_defs(g);
                let cols: Vec<serde_json::Value> = g
                    .columns
                    .iter()
                    .map(|c| {
                        let figs: serde_json::Map<String, serde_json::Value> = defs
                            .iter()
                            .filter_map(|d| {
                                (d.get)(&c.pooled)
                                    .map(|(v, th)| (d.key.clone(), serde_json::json!({"value": v, "unit": d.unit, "thin": th})))
                            })
                            .collect();
                        serde_json::json!({
                            "file": c.file, "device": c.device, "device_fingerprint": c.device_fingerprint,
                            "backend": c.backend, "model_sha256": c.model_sha256, "model_arch": c.model_arch,
                            "load": c.load, "runs": c.run_uids, "baseline": c.baseline, "figures": figs,
                        })
                    })
                    .collect();
                serde_json::json!({"workload_hash": g.workload_hash, "workload": g.workload_name, "columns": cols})
            })
            .collect();
        serde_json::json!({
            "files": self.files, "groups": groups, "mismatched": self.mismatched,
            "gate": self.gate, "regressed": self.regressed(), "notes": self.notes,
        })
    }
}

pub(crate) fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A markdown table with padded columns.
pub(crate) fn render_table(rows: &[Vec<String>]) -> String {
    let ncol = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let w: Vec<usize> = (0..ncol)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for (k, r) in rows.iter().enumerate() {
        s.push('|');
        for (i, wi) in w.iter().enumerate() {
            let c = r.get(i).map(|x| x.as_str()).unwrap_or("");
            let pad = wi - c.chars().count();
            if i == 0 {
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            } else {
                let _ = write!(s, " {}{c} |", " ".repeat(pad));
            }
        }
        s.push('\n');
        if k == 0 {
            s.push('|');
            for (i, wi) in w.iter().enumerate() {
                let _ = write!(
                    s,
                    " {}{} |",
                    "-".repeat((*wi).max(3) - if i == 0 { 0 } else { 1 }),
                    if i == 0 { "" } else { ":" }
                );
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Arrivals;

    #[test]
    fn loads_as_the_harness_stores_them_get_labels_and_coordinates() {
        let rate = serde_json::to_string(&LoadSpec::Rate {
            rps: 2.5,
            arrivals: Arrivals::Poisson,
            seed: 0,
        })
        .unwrap();
        assert_eq!(load_label(&rate), "rate 2.5 req/s (poisson)");
        assert_eq!(load_x(&rate), Some(("rate".to_string(), 2.5)));
        let conc = serde_json::to_string(&LoadSpec::Concurrency {
            users: 8,
            think_ms: 0,
        })
        .unwrap();
        assert_eq!(load_label(&conc), "concurrency 8");
        assert_eq!(load_x(&conc), Some(("concurrency".to_string(), 8.0)));
        assert_eq!(
            load_x(&serde_json::to_string(&LoadSpec::Sync).unwrap()),
            None
        );
        assert_eq!(
            load_label(r#"{"mode":"llama-bench","reps":5}"#),
            "llama-bench"
        );
    }
}
