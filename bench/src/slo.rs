//! Service-level objectives: named profiles, constraints parsed from flags
//! (`ttft_p99<=200ms`) or a TOML file (METRICS.md, System / SLO).
//!
//! A constraint has two readings:
//! - per request: a request *attains* the SLO when its own value (its ttft,
//!   e2e, tpot, queue, or its worst gap for `itl`) is within every limit;
//! - per run: the verdict compares the named statistic of the run's
//!   distribution (e.g. the p99 of ttft) with the limit.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SloError {
    #[error("SLO constraint '{0}': expected METRIC[_STAT] <= LIMIT, e.g. ttft_p99<=200ms")]
    Syntax(String),
    #[error(
        "SLO constraint '{text}': unknown metric '{metric}' (one of ttft, itl, tpot, e2e, queue, ttft_engine)"
    )]
    Metric { text: String, metric: String },
    #[error(
        "SLO constraint '{text}': unknown statistic '{stat}' (one of p50, p90, p95, p99, p99.9, mean, max)"
    )]
    Stat { text: String, stat: String },
    #[error(
        "SLO constraint '{text}': bad limit '{limit}' (a number with ms, s or us; a bare number is ms)"
    )]
    Limit { text: String, limit: String },
    #[error(
        "unknown SLO profile '{0}' (known: chat-interactive, rag, batch, none; or a .toml file)"
    )]
    Profile(String),
    #[error("SLO file {path}: {msg}")]
    File { path: String, msg: String },
    #[error("SLO target {0} is not in (0, 1]")]
    Target(f64),
}

/// Which per-request latency a constraint limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SloMetric {
    Ttft,
    /// Per request: the worst gap; per run: the pooled gap distribution.
    Itl,
    Tpot,
    E2e,
    Queue,
    TtftEngine,
}

impl SloMetric {
    pub fn name(self) -> &'static str {
        match self {
            SloMetric::Ttft => "ttft",
            SloMetric::Itl => "itl",
            SloMetric::Tpot => "tpot",
            SloMetric::E2e => "e2e",
            SloMetric::Queue => "queue",
            SloMetric::TtftEngine => "ttft_engine",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ttft" => SloMetric::Ttft,
            "itl" => SloMetric::Itl,
            "tpot" => SloMetric::Tpot,
            "e2e" => SloMetric::E2e,
            "queue" => SloMetric::Queue,
            "ttft_engine" => SloMetric::TtftEngine,
            _ => return None,
        })
    }
}

/// The run-level statistic a verdict reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SloStat {
    P50,
    P90,
    P95,
    P99,
    P999,
    Mean,
    Max,
}

impl SloStat {
    pub fn name(self) -> &'static str {
        match self {
            SloStat::P50 => "p50",
            SloStat::P90 => "p90",
            SloStat::P95 => "p95",
            SloStat::P99 => "p99",
            SloStat::P999 => "p99.9",
            SloStat::Mean => "mean",
            SloStat::Max => "max",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "p50" | "median" => SloStat::P50,
            "p90" => SloStat::P90,
            "p95" => SloStat::P95,
            "p99" => SloStat::P99,
            "p99.9" | "p999" => SloStat::P999,
            "mean" | "avg" => SloStat::Mean,
            "max" => SloStat::Max,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    pub metric: SloMetric,
    pub stat: SloStat,
    pub limit_ms: f64,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lim = if self.limit_ms >= 1000.0 && (self.limit_ms / 1000.0).fract() == 0.0 {
            format!("{}s", self.limit_ms / 1000.0)
        } else {
            format!("{}ms", self.limit_ms)
        };
        if self.stat == SloStat::Max {
            write!(f, "{} <= {lim}", self.metric.name())
        } else {
            write!(f, "{}_{} <= {lim}", self.metric.name(), self.stat.name())
        }
    }
}

fn parse_limit_ms(text: &str, s: &str) -> Result<f64, SloError> {
    let s = s.trim();
    let bad = || SloError::Limit {
        text: text.to_string(),
        limit: s.to_string(),
    };
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    Ok(v * scale)
}

impl Constraint {
    /// `ttft_p99<=200ms`, `itl_p99 <= 50ms`, `e2e <= 5s` (no statistic: every request, i.e. max).
    pub fn parse(text: &str) -> Result<Self, SloError> {
        let (lhs, rhs) = text
            .split_once("<=")
            .ok_or_else(|| SloError::Syntax(text.to_string()))?;
        let lhs = lhs.trim().to_ascii_lowercase();
        let (metric, stat) = Self::split_lhs(text, &lhs)?;
        Ok(Constraint {
            metric,
            stat,
            limit_ms: parse_limit_ms(text, rhs)?,
        })
    }

    fn split_lhs(text: &str, lhs: &str) -> Result<(SloMetric, SloStat), SloError> {
        if let Some(m) = SloMetric::parse(lhs) {
            return Ok((m, SloStat::Max));
        }
        let (m, s) = lhs.rsplit_once('_').ok_or_else(|| SloError::Metric {
            text: text.to_string(),
            metric: lhs.to_string(),
        })?;
        let metric = SloMetric::parse(m).ok_or_else(|| SloError::Metric {
            text: text.to_string(),
            metric: m.to_string(),
        })?;
        let stat = SloStat::parse(s).ok_or_else(|| SloError::Stat {
            text: text.to_string(),
            stat: s.to_string(),
        })?;
        Ok((metric, stat))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub name: String,
    pub constraints: Vec<Constraint>,
    /// Attainment a run must reach to pass (and the sweep's threshold), default 0.9.
    pub target: f64,
}

pub const DEFAULT_TARGET: f64 = 0.9;

impl Slo {
    pub fn new(name: impl Into<String>, constraints: Vec<Constraint>) -> Self {
        Slo {
            name: name.into(),
            constraints,
            target: DEFAULT_TARGET,
        }
    }

    /// Named profiles.
    pub fn profile(name: &str) -> Result<Slo, SloError> {
        let c = |m, s, l| Constraint {
            metric: m,
            stat: s,
            limit_ms: l,
        };
        use SloMetric::*;
        use SloStat::*;
        Ok(match name {
            "chat-interactive" => Slo::new(name, vec![c(Ttft, P99, 200.0), c(Itl, P99, 50.0)]),
            "rag" => Slo::new(name, vec![c(Ttft, P99, 2000.0), c(Itl, P99, 100.0)]),
            "batch" => Slo::new(name, vec![c(E2e, P99, 60_000.0)]),
            "none" => Slo::new(name, vec![]),
            other => return Err(SloError::Profile(other.to_string())),
        })
    }

    /// The profile a workload preset is judged by unless the user says otherwise.
    pub fn default_for_workload(workload: &str) -> Slo {
        Slo::profile(if workload == "rag" {
            "rag"
        } else {
            "chat-interactive"
        })
        .expect("built-in profile")
    }

    /// A TOML profile:
    /// ```toml
    /// name = "my-app"
    /// target = 0.95
    /// constraints = ["ttft_p99 <= 300ms", "e2e <= 5s"]
    /// # or keyed: ttft_p99 = "300ms", itl_p99 = 40  (a bare number is ms)
    /// ```
    pub fn from_toml(text: &str, path: &str) -> Result<Slo, SloError> {
        let err = |msg: String| SloError::File {
            path: path.to_string(),
            msg,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        let mut slo = Slo::new(
            std::path::Path::new(path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "custom".into()),
            vec![],
        );
        for (k, v) in &table {
            match (k.as_str(), v) {
                ("name", toml::Value::String(s)) => slo.name = s.clone(),
                ("target", v) => {
                    slo.target = v
                        .as_float()
                        .or(v.as_integer().map(|i| i as f64))
                        .ok_or_else(|| err("target must be a number".into()))?
                }
                ("constraints", toml::Value::Array(a)) => {
                    for x in a {
                        let s = x.as_str().ok_or_else(|| {
                            err("constraints must be strings like \"ttft_p99 <= 200ms\"".into())
                        })?;
                        slo.constraints
                            .push(Constraint::parse(s).map_err(|e| err(e.to_string()))?);
                    }
                }
                (key, v) => {
                    let lim = match v {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(i) => i.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        _ => return Err(err(format!("'{key}': expected a limit like \"200ms\""))),
                    };
                    let text = format!("{key} <= {lim}");
                    slo.constraints
                        .push(Constraint::parse(&text).map_err(|e| err(e.to_string()))?);
                }
            }
        }
        slo.check_target()?;
        Ok(slo)
    }

    pub fn check_target(&self) -> Result<(), SloError> {
        if !(self.target > 0.0 && self.target <= 1.0) {
            return Err(SloError::Target(self.target));
        }
        Ok(())
    }

    /// Resolve `--slo NAME|FILE.toml` plus extra `--slo-max` constraints.
    pub fn resolve(
        spec: Option<&str>,
        workload: &str,
        extra: &[String],
        target: Option<f64>,
    ) -> Result<Slo, SloError> {
        let mut slo = match spec {
            None if !extra.is_empty() => Slo::new("custom", vec![]),
            None => Slo::default_for_workload(workload),
            Some(s) if s.ends_with(".toml") => {
                let text = std::fs::read_to_string(s).map_err(|e| SloError::File {
                    path: s.to_string(),
                    msg: e.to_string(),
                })?;
                Slo::from_toml(&text, s)?
            }
            Some(s) => Slo::profile(s)?,
        };
        for e in extra {
            let c = Constraint::parse(e)?;
            // A flag overrides the same metric+stat from the profile.
            slo.constraints
                .retain(|x| !(x.metric == c.metric && x.stat == c.stat));
            slo.constraints.push(c);
        }
        if let Some(t) = target {
            slo.target = t;
        }
        slo.check_target()?;
        Ok(slo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_constraints() {
        assert_eq!(
            Constraint::parse("ttft_p99<=200ms").unwrap(),
            Constraint {
                metric: SloMetric::Ttft,
                stat: SloStat::P99,
                limit_ms: 200.0
            }
        );
        assert_eq!(
            Constraint::parse(" e2e <= 5s").unwrap(),
            Constraint {
                metric: SloMetric::E2e,
                stat: SloStat::Max,
                limit_ms: 5000.0
            }
        );
        assert_eq!(
            Constraint::parse("itl_p99.9 <= 500us").unwrap().limit_ms,
            0.5
        );
        assert_eq!(
            Constraint::parse("ttft_engine_p50 <= 7").unwrap().metric,
            SloMetric::TtftEngine
        );
        assert!(matches!(
            Constraint::parse("ttft < 3"),
            Err(SloError::Syntax(_))
        ));
        assert!(matches!(
            Constraint::parse("foo_p99 <= 3"),
            Err(SloError::Metric { .. })
        ));
        assert!(matches!(
            Constraint::parse("ttft_p42 <= 3"),
            Err(SloError::Stat { .. })
        ));
        assert!(matches!(
            Constraint::parse("ttft_p99 <= fast"),
            Err(SloError::Limit { .. })
        ));
        assert_eq!(
            Constraint::parse("e2e<=5s").unwrap().to_string(),
            "e2e <= 5s"
        );
        assert_eq!(
            Constraint::parse("ttft_p99<=200ms").unwrap().to_string(),
            "ttft_p99 <= 200ms"
        );
    }

    #[test]
    fn named_profiles() {
        let c = Slo::profile("chat-interactive").unwrap();
        assert_eq!(
            c.constraints
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            ["ttft_p99 <= 200ms", "itl_p99 <= 50ms"]
        );
        let r = Slo::profile("rag").unwrap();
        assert_eq!(
            r.constraints
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            ["ttft_p99 <= 2s", "itl_p99 <= 100ms"]
        );
        assert_eq!(r.target, 0.9);
        assert!(Slo::profile("nope").is_err());
    }

    #[test]
    fn toml_and_flags() {
        let s = Slo::from_toml("name = \"app\"\ntarget = 0.95\nconstraints = [\"ttft_p99 <= 300ms\"]\ne2e = \"5s\"\nitl_p99 = 40\n", "x.toml").unwrap();
        assert_eq!(s.name, "app");
        assert_eq!(s.target, 0.95);
        let names: Vec<String> = s.constraints.iter().map(|c| c.to_string()).collect();
        assert!(
            names.contains(&"ttft_p99 <= 300ms".to_string())
                && names.contains(&"e2e <= 5s".into())
                && names.contains(&"itl_p99 <= 40ms".into())
        );
        assert!(Slo::from_toml("target = 2\n", "x.toml").is_err());
        assert!(
            Slo::from_toml("bogus_p99 = \"1ms\"\n", "x.toml")
                .unwrap_err()
                .to_string()
                .contains("x.toml")
        );
        let r = Slo::resolve(
            Some("chat-interactive"),
            "chat",
            &["ttft_p99<=100ms".into()],
            Some(0.5),
        )
        .unwrap();
        assert_eq!(r.constraints.len(), 2);
        assert!(
            r.constraints
                .iter()
                .any(|c| c.limit_ms == 100.0 && c.metric == SloMetric::Ttft)
        );
        assert_eq!(r.target, 0.5);
        assert_eq!(Slo::resolve(None, "rag", &[], None).unwrap().name, "rag");
    }
}
