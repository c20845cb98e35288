//! `ember compare`: runs from several store files, matched by workload hash,
//! side by side; and a regression gate against a baseline file.
//!
//! A *column* is one (file, device, model, load) with one workload hash; its
//! figures pool the samples of every run in it (percentiles are never
//! averaged). A *group* is every column of one workload hash. Columns whose
//! hash appears nowhere else are not compared: they are listed as mismatched.
//!
//! What lives where: this file loads the runs and builds the groups; `figures` says which
//! figures a group shows and pools a column's; `gate` is the regression gate; `render` writes
//! a comparison as text, CSV and JSON.

mod figures;
mod gate;
mod render;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::load::LoadSpec;
use crate::store::{QualityRun, RunData, RunRow, Store, StoreError, file_label, load_runs};

pub use figures::{Better, ColumnFigures, FigureDef, FigureFn, figure_defs, group_defs};
pub use gate::GateCheck;
pub(crate) use render::{csv, render_table};

/// One side-by-side column.
#[derive(Clone, Debug, Serialize)]
pub struct Column {
    pub file: String,
    pub device: String,
    pub device_fingerprint: String,
    pub backend: String,
    pub model_sha256: String,
    pub model_arch: String,
    /// The model's file name (of the column's first run).
    pub model: String,
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

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub files: Vec<String>,
    pub groups: Vec<Group>,
    pub mismatched: Vec<Mismatched>,
    pub gate: Vec<GateCheck>,
    pub notes: Vec<String>,
    /// Quality evaluations (`ember eval`) of every file, oldest first; joined to the latency
    /// columns by the model's sha256.
    pub quality: Vec<QualityEntry>,
    /// Columns whose workload hash no other column shares (listed in `mismatched`): not side
    /// by side, but each still a point of the quality · latency · cost view (two models never
    /// share a hash: their tokenizers give other prompt ids).
    #[serde(skip)]
    pub single: Vec<Group>,
}

/// One stored quality evaluation and the file it came from.
#[derive(Clone, Debug, Serialize)]
pub struct QualityEntry {
    pub file: String,
    #[serde(flatten)]
    pub run: QualityRun,
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

/// The files' labels: the file name, or the whole path where two files share a name.
fn file_labels(files: &[PathBuf]) -> Vec<String> {
    let mut labels: Vec<String> = files.iter().map(|p| file_label(p)).collect();
    for i in 0..labels.len() {
        if labels.iter().filter(|l| **l == labels[i]).count() > 1 {
            labels[i] = files[i].display().to_string();
        }
    }
    labels
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
    let labels = file_labels(&all_files);
    let mut notes = vec![];
    let runs = load_runs(&all_files, |fi, row| {
        let keep = row.status == "finished" || opts.include_unfinished;
        if !keep {
            notes.push(format!(
                "{}: run {} did not finish (status {}); skipped (use --include-unfinished)",
                labels[fi], row.run.0, row.status
            ));
        }
        keep
    })?;
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for r in &runs {
        names
            .entry(r.row.workload.hash.clone())
            .or_insert_with(|| r.row.workload.name.clone());
    }
    let (groups, mismatched, single) = group_columns(columns(runs, &labels, opts), &names);
    let mut gate = vec![];
    if let Some(max) = opts.max_regression {
        if opts.baseline.is_none() {
            notes.push("--max-regression needs --baseline FILE; no gate applied".into());
        } else {
            for g in &groups {
                gate::gate_group(g, max, &mut gate, &mut notes);
            }
            if gate.is_empty() {
                notes.push("the gate compared nothing: no workload hash of the baseline appears in the other files".into());
            }
        }
    }
    let mut quality = vec![];
    for (path, label) in all_files.iter().zip(&labels) {
        for run in Store::open_existing(path)?.quality_runs()? {
            quality.push(QualityEntry {
                file: label.clone(),
                run,
            });
        }
    }
    Ok(Comparison {
        files: labels,
        groups,
        mismatched,
        gate,
        notes,
        quality,
        single,
    })
}

/// The columns by workload hash: the runs of one (hash, file, device, model, load) pooled.
fn columns(
    runs: Vec<RunData>,
    labels: &[String],
    opts: &CompareOptions,
) -> BTreeMap<String, Vec<Column>> {
    // key: (hash, file idx, fingerprint, model sha, load)
    type Key = (String, usize, String, String, String);
    let mut cols: BTreeMap<Key, Vec<RunData>> = BTreeMap::new();
    for r in runs {
        let key = (
            r.row.workload.hash.clone(),
            r.file_index,
            r.row.device_fingerprint.clone(),
            r.row.provenance.model_sha256.clone(),
            r.row.workload.load.clone(),
        );
        cols.entry(key).or_default().push(r);
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
    for ((hash, fi, fp, sha, load), runs) in cols {
        let first = &runs[0].row;
        let cost = cost_for(&labels[fi], first);
        let refs: Vec<&RunData> = runs.iter().collect();
        let pooled = ColumnFigures::build(&refs, cost);
        let per_run = refs
            .iter()
            .map(|x| ColumnFigures::build(std::slice::from_ref(x), cost))
            .collect();
        by_hash.entry(hash).or_default().push(Column {
            file: labels[fi].clone(),
            device: first.device_label(),
            device_fingerprint: fp,
            backend: first.provenance.backend.clone(),
            model_sha256: sha,
            model_arch: first.provenance.model_arch.clone(),
            model: std::path::Path::new(&first.provenance.model_path)
                .file_name()
                .map_or_else(
                    || first.provenance.model_path.clone(),
                    |n| n.to_string_lossy().into_owned(),
                ),
            load,
            run_uids: runs.iter().map(|r| r.row.run_uid.clone()).collect(),
            status: runs.iter().map(|r| r.row.status.clone()).collect(),
            baseline: opts.baseline.is_some() && fi == 0,
            pooled,
            per_run,
        });
    }
    by_hash
}

/// Groups (a hash in two or more columns) and the columns left alone.
fn group_columns(
    by_hash: BTreeMap<String, Vec<Column>>,
    names: &BTreeMap<String, String>,
) -> (Vec<Group>, Vec<Mismatched>, Vec<Group>) {
    let mut groups = vec![];
    let mut mismatched = vec![];
    let mut single = vec![];
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
                    file: c.file.clone(),
                    device: c.device.clone(),
                    workload_name: name.clone(),
                    workload_hash: hash.clone(),
                    runs: c.run_uids.len(),
                });
                single.push(Group {
                    workload_hash: hash.clone(),
                    workload_name: name.clone(),
                    columns: vec![c],
                });
            }
        }
    }
    (groups, mismatched, single)
}

impl Comparison {
    /// Whether the gate found a regression.
    pub fn regressed(&self) -> bool {
        self.gate.iter().any(|g| g.regressed)
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
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
