//! The regression gate: each gated figure of a candidate column against the baseline column
//! of the same workload, allowed to be worse by the threshold plus the baseline's own
//! run-to-run spread.

use serde::Serialize;

use super::figures::{Better, FigureDef, group_defs};
use super::{Column, Group, short};

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

/// Gates every candidate column of `g` against its baseline with threshold `max`.
pub(super) fn gate_group(g: &Group, max: f64, out: &mut Vec<GateCheck>, notes: &mut Vec<String>) {
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
            let noise = noise(base, d);
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

/// The baseline's run-to-run spread of figure `d`: (max − min) / median over its runs; None
/// when it holds one run.
fn noise(base: &Column, d: &FigureDef) -> Option<f64> {
    (base.per_run.len() >= 2).then(|| {
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
    })
}
