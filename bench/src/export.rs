//! `ember export`: the runs of store files as CSV, JSON or a llama-bench-style
//! markdown table; or every request's latencies as CSV/JSON.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::compare::{csv, load_label, render_table};
use crate::store::{Figures, RunRow, Store, StoreError, file_label, load_runs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
    Markdown,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use Format::*;
        let names = [
            ("csv", Csv),
            ("json", Json),
            ("md", Markdown),
            ("markdown", Markdown),
        ];
        pick(s, &names, "format", "csv, json, md")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// One row per run.
    Runs,
    /// One row per request (v_request_latency).
    Requests,
}

impl std::str::FromStr for What {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let names = [("runs", What::Runs), ("requests", What::Requests)];
        pick(s, &names, "table", "runs, requests")
    }
}

/// The value named `s`, or an error that lists the names (`hint`).
fn pick<T: Copy>(s: &str, names: &[(&str, T)], what: &str, hint: &str) -> Result<T, String> {
    names
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("unknown {what} '{s}' ({hint})"))
}

struct Loaded {
    file: String,
    row: RunRow,
    figures: Figures,
}

fn load(files: &[PathBuf]) -> Result<Vec<Loaded>, StoreError> {
    Ok(load_runs(files, |_, _| true)?
        .into_iter()
        .map(|r| Loaded {
            file: file_label(&files[r.file_index]),
            figures: r.figures(),
            row: r.row,
        })
        .collect())
}

const RUN_COLUMNS: &[&str] = &[
    "file",
    "run_id",
    "run_uid",
    "status",
    "started_at",
    "device",
    "device_profile",
    "device_fingerprint",
    "backend",
    "cpu_model",
    "threads",
    "ember_version",
    "git_commit",
    "model_arch",
    "model_sha256",
    "workload",
    "workload_hash",
    "load",
    "measured",
    "failed",
    "window_s",
    "rps",
    "output_tps",
    "input_tps",
    "error_rate",
    "prefix_hit_rate",
    "slo_attainment",
    "goodput_rps",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p90_ms",
    "itl_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "prefill_tps",
    "decode_tps",
    "rss_peak_mib",
    "device_peak_mib",
    "cache_evictions",
    // Speculative decoding (empty for a run that did not speculate); at the end, so the
    // columns before keep their places.
    "spec_requests",
    "drafted_tokens",
    "accepted_tokens",
    "rejected_tokens",
    "acceptance_rate",
    "mean_accepted_run",
    "verify_steps",
    "draft_ms",
    "verify_ms",
];

fn run_values(l: &Loaded) -> Vec<serde_json::Value> {
    use serde_json::json;
    let f = &l.figures;
    let r = &l.row;
    let p = &r.provenance;
    let ms = |m: &str, q: &str| {
        f.dist(m)
            .and_then(|s| s.get(q))
            .map(|v| json!(v / 1e6))
            .unwrap_or(json!(null))
    };
    let opt = |v: Option<f64>| v.map(|x| json!(x)).unwrap_or(json!(null));
    let mut v = vec![
        json!(l.file),
        json!(r.run.0),
        json!(r.run_uid),
        json!(r.status),
        json!(r.started_at),
        json!(r.device_label()),
        json!(p.device_profile),
        json!(r.device_fingerprint),
        json!(p.backend),
        json!(p.cpu_model),
        json!(p.threads),
        json!(p.ember_version),
        json!(p.git_commit),
        json!(p.model_arch),
        json!(p.model_sha256),
        json!(r.workload.name),
        json!(r.workload.hash),
        json!(r.workload.load),
        json!(f.measured),
        json!(f.failed),
        json!(f.window_ns as f64 / 1e9),
        json!(f.rps),
        json!(f.output_tps),
        json!(f.input_tps),
        json!(f.error_rate),
        opt(f.prefix_hit_rate),
        opt(r.slo_attainment),
        opt(r.goodput_rps),
        ms("ttft", "p50"),
        ms("ttft", "p90"),
        ms("ttft", "p99"),
        ms("itl", "p50"),
        ms("itl", "p90"),
        ms("itl", "p99"),
        ms("tpot", "p50"),
        ms("tpot", "p99"),
        ms("e2e", "p50"),
        ms("e2e", "p99"),
        opt(f.prefill_tps_total),
        opt(f.decode_tps_total),
        opt(f.rss_peak_bytes.map(|b| b as f64 / 1048576.0)),
        opt(f.device_bytes_peak.map(|b| b as f64 / 1048576.0)),
        r.cache_evictions.map(|x| json!(x)).unwrap_or(json!(null)),
    ];
    let t = f.spec.as_ref();
    v.extend([
        json!(t.map(|t| t.requests)),
        json!(t.map(|t| t.drafted)),
        json!(t.map(|t| t.accepted)),
        json!(t.map(|t| t.rejected)),
        json!(t.and_then(|t| t.acceptance_rate)),
        json!(t.and_then(|t| t.mean_accepted_run)),
        json!(t.map(|t| t.verify_steps)),
        json!(t.map(|t| t.draft_ms)),
        json!(t.map(|t| t.verify_ms)),
    ]);
    v
}

fn csv_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => csv(s),
        other => csv(&other.to_string()),
    }
}

/// Renders the export.
pub fn export(files: &[PathBuf], what: What, format: Format) -> Result<String, StoreError> {
    match (what, format) {
        (What::Runs, Format::Markdown) => Ok(llama_bench_markdown(&load(files)?)),
        (What::Runs, _) => {
            let runs = load(files)?;
            let rows: Vec<Vec<serde_json::Value>> = runs.iter().map(run_values).collect();
            Ok(tabular(
                RUN_COLUMNS.iter().map(|s| s.to_string()).collect(),
                rows,
                format,
            ))
        }
        (What::Requests, Format::Markdown) => Err(StoreError::Invalid(
            "requests export: use --format csv or json".into(),
        )),
        (What::Requests, _) => {
            let mut cols: Vec<String> = vec![];
            let mut rows = vec![];
            for f in files {
                let store = Store::open_existing(f)?;
                request_rows(&store, &file_label(f), &mut cols, &mut rows)?;
            }
            Ok(tabular(cols, rows, format))
        }
    }
}

/// Appends the rows of `v_request_latency` in `store` (and, the first time, its columns).
fn request_rows(
    store: &Store,
    file: &str,
    cols: &mut Vec<String>,
    rows: &mut Vec<Vec<serde_json::Value>>,
) -> Result<(), StoreError> {
    use rusqlite::types::ValueRef;
    let e = StoreError::sqlite(store.path());
    let mut st = store
        .conn()
        .prepare("SELECT * FROM v_request_latency ORDER BY run_id, req_pk")
        .map_err(e)?;
    if cols.is_empty() {
        cols.push("file".into());
        cols.extend(st.column_names().map(|s| s.to_string()));
    }
    let n = st.column_count();
    let mut q = st.query([]).map_err(e)?;
    while let Some(r) = q.next().map_err(e)? {
        let mut row = vec![serde_json::json!(file)];
        for i in 0..n {
            row.push(match r.get_ref(i).map_err(e)? {
                ValueRef::Null => serde_json::Value::Null,
                ValueRef::Integer(x) => serde_json::json!(x),
                ValueRef::Real(x) => serde_json::json!(x),
                ValueRef::Text(t) => serde_json::json!(String::from_utf8_lossy(t)),
                ValueRef::Blob(_) => serde_json::Value::Null,
            });
        }
        rows.push(row);
    }
    Ok(())
}

fn tabular(cols: Vec<String>, rows: Vec<Vec<serde_json::Value>>, format: Format) -> String {
    match format {
        Format::Json => {
            let arr: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|r| serde_json::Value::Object(cols.iter().cloned().zip(r).collect()))
                .collect();
            serde_json::to_string_pretty(&arr).unwrap_or_default() + "\n"
        }
        _ => {
            let mut s = cols.join(",") + "\n";
            for r in rows {
                let _ = writeln!(
                    s,
                    "{}",
                    r.iter().map(csv_cell).collect::<Vec<_>>().join(",")
                );
            }
            s
        }
    }
}

/// llama-bench's table (`| model | size | backend | threads | test | t/s |`),
/// with ember's tests: per run, `pp` = prefill tokens/s and `tg` = decode
/// tokens/s, each as mean ± sd over the run's measured requests (llama-bench
/// takes mean ± sd over repetitions; here a request is a repetition).
fn llama_bench_markdown(runs: &[Loaded]) -> String {
    let mut rows = vec![vec![
        "model".to_string(),
        "size".into(),
        "backend".into(),
        "threads".into(),
        "test".into(),
        "t/s".into(),
    ]];
    for l in runs {
        let p = &l.row.provenance;
        let size = format!("{:.2} MiB", p.weights_bytes as f64 / 1048576.0);
        let backend = if p.device_profile.as_deref().is_some_and(|d| !d.is_empty()) {
            format!(
                "{} ({})",
                p.backend,
                p.device_profile.clone().unwrap_or_default()
            )
        } else {
            p.backend.clone()
        };
        let model = format!(
            "{} {}",
            p.model_arch,
            p.model_sha256.chars().take(8).collect::<String>()
        );
        let wl = format!("{}{}", l.row.workload.name, {
            let ll = load_label(&l.row.workload.load);
            if ll.is_empty() {
                String::new()
            } else {
                format!(" @ {ll}")
            }
        });
        for (test, metric) in [("pp", "prefill_tps"), ("tg", "decode_tps")] {
            if let Some(s) = l.figures.dist(metric) {
                rows.push(vec![
                    model.clone(),
                    size.clone(),
                    backend.clone(),
                    p.threads.to_string(),
                    format!("{test} ({wl}, n={})", s.n),
                    format!("{:.2} ± {:.2}", s.mean, s.sd),
                ]);
            }
        }
    }
    render_table(&rows)
}
