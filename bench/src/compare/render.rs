//! A comparison as text (markdown-compatible tables), CSV and JSON.

use std::fmt::Write as _;

use super::figures::group_defs;
use super::gate::GateCheck;
use super::{Comparison, Group, load_label, short};

impl Comparison {
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
            group_text(&mut s, g);
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
        self.triangle_text(&mut s);
        self.quality_text(&mut s);
        if !self.gate.is_empty() {
            gate_text(&mut s, &self.gate);
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
                            "quality": self.quality_of(&c.model_sha256),
                        })
                    })
                    .collect();
                serde_json::json!({"workload_hash": g.workload_hash, "workload": g.workload_name, "columns": cols})
            })
            .collect();
        serde_json::json!({
            "files": self.files, "groups": groups, "mismatched": self.mismatched,
            "gate": self.gate, "regressed": self.regressed(), "notes": self.notes,
            "quality": self.quality,
            "triangle": self.triangle(),
        })
    }

    /// Quality, latency and cost of every column, one row each (issue 18's triangle): the
    /// accuracy of its own runs (`--score`), the newest perplexity and KLD of its model file
    /// (`ember eval`), TTFT and ITL p99 and SLO attainment, $/Mtok and measured J/token.
    pub fn triangle(&self) -> Vec<serde_json::Value> {
        let mut rows = vec![];
        for g in self.groups.iter().chain(&self.single) {
            for c in &g.columns {
                let f = &c.pooled;
                let newest = |kind: &str| {
                    self.quality
                        .iter()
                        .rev()
                        .find(|q| q.run.model_sha256 == c.model_sha256 && q.run.kind == kind)
                        .map(|q| &q.run)
                };
                let p99 = |m: &str| f.figures.dist(m).map(|d| d.p99 / 1e6);
                let ppl = newest("ppl");
                let kld = newest("kld");
                rows.push(serde_json::json!({
                    "workload": g.workload_name, "file": c.file, "device": c.device,
                    "model": c.model, "model_sha256": c.model_sha256, "load": load_label(&c.load),
                    "accuracy": f.figures.accuracy,
                    "ppl": ppl.map(|q| q.ppl), "ppl_text": ppl.map(|q| &q.text_name), "ppl_ctx": ppl.map(|q| q.ctx),
                    "kld_mean": kld.and_then(|q| q.kld_mean), "kld_base_sha256": kld.and_then(|q| q.base_sha256.clone()),
                    "ttft_p99_ms": p99("ttft"), "itl_p99_ms": p99("itl"), "slo_attainment": f.slo_attainment,
                    "slo_pass": f.slo_pass,
                    "usd_per_mtok": f.usd_per_mtok(),
                    "usd_per_mtok_at_slo": f.usd_per_mtok_at_slo(),
                    "j_per_token": f.figures.energy_j.filter(|_| f.figures.output_tokens > 0)
                        .map(|j| j / f.figures.output_tokens as f64),
                }));
            }
        }
        rows
    }

    /// [`Comparison::triangle`] as a table, when any column has a quality figure.
    fn triangle_text(&self, s: &mut String) {
        let rows = self.triangle();
        let has = |r: &serde_json::Value| {
            !r["accuracy"].is_null() || !r["ppl"].is_null() || !r["kld_mean"].is_null()
        };
        if !rows.iter().any(has) {
            return;
        }
        let _ = writeln!(s, "\n## quality · latency · cost\n");
        let _ = writeln!(
            s,
            "| column | accuracy (95% CI) | PPL | mean KLD | TTFT p99 ms | ITL p99 ms | SLO attainment | $/Mtok | J/token |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        let num =
            |v: &serde_json::Value, f: &dyn Fn(f64) -> String| v.as_f64().map_or("–".into(), f);
        for r in &rows {
            let acc = match r["accuracy"].as_object() {
                Some(a) => format!(
                    "{:.1}% ({:.1}–{:.1}%)",
                    100.0 * a["accuracy"].as_f64().unwrap_or(0.0),
                    100.0 * a["ci95_low"].as_f64().unwrap_or(0.0),
                    100.0 * a["ci95_high"].as_f64().unwrap_or(0.0)
                ),
                None => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {}: {} · {} [{}] | {} | {} | {} | {} | {} | {} | {} | {} |",
                r["file"].as_str().unwrap_or(""),
                r["model"].as_str().unwrap_or(""),
                r["device"].as_str().unwrap_or(""),
                r["workload"].as_str().unwrap_or(""),
                acc,
                num(&r["ppl"], &|v| format!("{v:.3}")),
                num(&r["kld_mean"], &|v| format!("{v:.5}")),
                num(&r["ttft_p99_ms"], &|v| format!("{v:.1}")),
                num(&r["itl_p99_ms"], &|v| format!("{v:.2}")),
                num(&r["slo_attainment"], &|v| format!("{:.1}%", 100.0 * v)),
                num(&r["usd_per_mtok"], &|v| format!("{v:.4}")),
                num(&r["j_per_token"], &|v| format!("{v:.4}")),
            );
        }
    }

    /// The headline quality figures of every evaluation of the model with this sha256, for
    /// a latency column (the whole rows are under "quality" at the top level).
    fn quality_of(&self, model_sha256: &str) -> Vec<serde_json::Value> {
        self.quality
            .iter()
            .filter(|q| q.run.model_sha256 == model_sha256)
            .map(|q| {
                let r = &q.run;
                serde_json::json!({
                    "run_uid": r.run_uid, "kind": r.kind, "text": r.text_name, "text_sha256": r.text_sha256,
                    "ctx": r.ctx, "ppl": r.ppl, "ppl_stderr": r.ppl_stderr, "kld_mean": r.kld_mean,
                    "same_top": r.same_top, "base_sha256": r.base_sha256,
                })
            })
            .collect()
    }

    /// The quality evaluations as a table.
    fn quality_text(&self, s: &mut String) {
        if self.quality.is_empty() {
            return;
        }
        let _ = writeln!(s, "\n## quality (ember eval)\n");
        let _ = writeln!(
            s,
            "| file | model | eval | text | ctx | tokens | PPL | mean KLD | same top p | base |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for q in &self.quality {
            let r = &q.run;
            let model = std::path::Path::new(&r.model_path)
                .file_name()
                .map_or(r.model_path.clone(), |n| n.to_string_lossy().into());
            let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".into(), f);
            let _ = writeln!(
                s,
                "| {} | {} ({}) | {} | {} | {} | {} | {:.4} ± {:.4} | {} | {} | {} |",
                q.file,
                model,
                short(&r.model_sha256),
                r.kind,
                r.text_name,
                r.ctx,
                r.tokens_scored,
                r.ppl,
                r.ppl_stderr,
                opt(r.kld_mean, &|v| format!("{v:.6}")),
                opt(r.same_top, &|v| format!("{:.2}%", 100.0 * v)),
                r.base_path.as_deref().unwrap_or("–"),
            );
        }
    }
}

/// One group's side-by-side table, then what differs across its columns.
fn group_text(s: &mut String, g: &Group) {
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
        let vals: Vec<Option<(f64, bool)>> = g.columns.iter().map(|c| (d.get)(&c.pooled)).collect();
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

/// The regression gate's table and verdict.
fn gate_text(s: &mut String, gate: &[GateCheck]) {
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
    for g in gate {
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
    let n = gate.iter().filter(|g| g.regressed).count();
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
