//! The rows of a self-test and its report: text table, JSON and the store's `selftest_results`.

use serde::Serialize;

use crate::record::{Provenance, RunResult, WorkloadInfo};
use crate::store::{RunId, SelfTestRow, Store, StoreError};

/// Whether a row can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Passes or fails.
    Check,
    /// A figure with nothing to hold it against: reported, never failed.
    Measurement,
}

/// One row's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub name: String,
    pub kind: Kind,
    /// Always `true` for a measurement.
    pub pass: bool,
    pub figure: Option<f64>,
    pub unit: Option<String>,
    pub message: String,
}

impl Check {
    pub(crate) fn new(
        name: impl Into<String>,
        pass: bool,
        figure: Option<f64>,
        unit: &str,
        message: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            kind: Kind::Check,
            pass,
            figure: figure.filter(|f| f.is_finite()),
            unit: if unit.is_empty() {
                None
            } else {
                Some(unit.to_string())
            },
            message: message.into(),
        }
    }

    /// A measurement: reported, never failed.
    pub(crate) fn measure(
        name: impl Into<String>,
        figure: Option<f64>,
        unit: &str,
        message: impl Into<String>,
    ) -> Check {
        Check {
            kind: Kind::Measurement,
            ..Check::new(name, true, figure, unit, message)
        }
    }

    /// Whether this row fails the self-test.
    pub fn failed(&self) -> bool {
        self.kind == Kind::Check && !self.pass
    }

    /// `ok`, `FAIL` or `meas`, as the table shows it.
    pub fn status(&self) -> &'static str {
        match (self.kind, self.pass) {
            (Kind::Measurement, _) => "meas",
            (Kind::Check, true) => "ok",
            (Kind::Check, false) => "FAIL",
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "kind": self.kind,
            "status": match self.status() { "meas" => "measured", "ok" => "ok", _ => "fail" },
            "pass": if self.kind == Kind::Check { Some(self.pass) } else { None },
            "figure": self.figure,
            "unit": self.unit,
            "message": self.message,
        })
    }

    /// The store row: a measurement has `kind = 'measurement'` and `pass = 1` (it cannot fail).
    pub fn to_row(&self) -> SelfTestRow {
        SelfTestRow {
            check_name: self.name.clone(),
            pass: self.pass,
            measurement: self.kind == Kind::Measurement,
            figure: self.figure,
            unit: self.unit.clone(),
            message: self.message.clone(),
        }
    }
}

impl Serialize for Check {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// The outcome of a whole self-test.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub provenance: Provenance,
    pub model_path: String,
    pub threads: usize,
    pub device_profile: Option<String>,
    pub started_at: String,
    pub elapsed_s: f64,
    pub fault_injected: Option<String>,
    /// The profile's cost per hour, stored with the run.
    #[serde(skip)]
    pub profile_cost: Option<f64>,
}

impl Report {
    /// Every check passed (measurements cannot fail).
    pub fn passed(&self) -> bool {
        self.checks.iter().any(|c| c.kind == Kind::Check) && !self.checks.iter().any(Check::failed)
    }
    /// The failed checks.
    pub fn failed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| c.failed()).collect()
    }
    /// The measurements.
    pub fn measurements(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.kind == Kind::Measurement)
            .collect()
    }

    /// Fixed-width text table.
    pub fn to_table(&self) -> String {
        let w = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!(
            "{:<w$}  {:<4}  {:>12}  {:<8}  message\n",
            "check", "", "figure", "unit"
        );
        for c in &self.checks {
            let fig = match c.figure {
                Some(f) if f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e6) => format!("{f:.3e}"),
                Some(f) => format!("{f:.4}"),
                None => "-".into(),
            };
            s += &format!(
                "{:<w$}  {:<4}  {fig:>12}  {:<8}  {}\n",
                c.name,
                c.status(),
                c.unit.as_deref().unwrap_or(""),
                c.message
            );
        }
        let nfail = self.failed().len();
        let nmeas = self.measurements().len();
        s += &format!(
            "{} checks, {} failed; {nmeas} measurements (meas: no expected figure to judge them by); {:.1} s ({} threads{})\n",
            self.checks.len() - nmeas,
            nfail,
            self.elapsed_s,
            self.threads,
            self.device_profile
                .as_ref()
                .map(|p| format!(", profile {p}"))
                .unwrap_or_default()
        );
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pass": self.passed(),
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
            "threads": self.threads,
            "device_profile": self.device_profile,
            "model_path": self.model_path,
            "provenance": self.provenance,
            "started_at": self.started_at,
            "elapsed_s": self.elapsed_s,
            "fault_injected": self.fault_injected,
        })
    }

    /// Writes the self-test to a store as a run (workload `selftest`) with one
    /// `selftest_results` row per check.
    pub fn save(&self, store: &mut Store) -> Result<RunId, StoreError> {
        let n_fail = self.failed().len();
        let result = RunResult {
            started_at: self.started_at.clone(),
            provenance: self.provenance.clone(),
            workload: WorkloadInfo {
                name: "selftest".into(),
                seed: 0,
                hash: "selftest-v1".into(),
                load: r#"{"mode":"selftest"}"#.into(),
                params: serde_json::json!({"checks": self.checks.len()}).to_string(),
                n_requests: 0,
                n_warmup: 0,
            },
            slo_name: "none".into(),
            slo: "{}".into(),
            summary_json: serde_json::json!({"selftest": {"pass": self.passed(), "checks": self.checks.len() - self.measurements().len(), "measurements": self.measurements().len(), "failed": n_fail, "elapsed_s": self.elapsed_s}})
                .to_string(),
            ..Default::default()
        };
        let run = store.begin_run(&result)?;
        let rows: Vec<SelfTestRow> = self.checks.iter().map(Check::to_row).collect();
        store.add_selftest(run, &rows)?;
        if let Some(c) = self.profile_cost {
            store.set_cost_per_hour(run, c)?;
        }
        store.finish_run(run, &result)?;
        Ok(run)
    }
}
