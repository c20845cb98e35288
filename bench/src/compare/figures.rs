//! The figures a comparison shows: one [`FigureDef`] per row (how to read it from a column,
//! which way is better, whether the gate checks it), and a column's pooled figures.

use serde::Serialize;

use super::Group;
use crate::llamabench::BenchResult;
use crate::record::MemorySample;
use crate::store::figures::{QUANTILES, thin};
use crate::store::{Figures, ReqSample, RunData};

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
            "j_per_token",
            "energy per output token (measured)",
            "J",
            Better::Lower,
            false,
            |f| {
                let j = f.figures.energy_j?;
                (f.figures.output_tokens > 0).then(|| (j / f.figures.output_tokens as f64, false))
            },
        ),
        FigureDef::new(
            "accuracy",
            "accuracy (--score)",
            "%",
            Better::Higher,
            false,
            |f| f.figures.accuracy.map(|a| (a.accuracy * 100.0, false)),
        ),
        FigureDef::new(
            "usd_per_mtok",
            "$/Mtok (output)",
            "$",
            Better::Lower,
            false,
            |f| f.usd_per_mtok().map(|x| (x, false)),
        ),
        FigureDef::new(
            "usd_per_mtok_at_slo",
            "$/Mtok at the SLO (goodput)",
            "$",
            Better::Lower,
            false,
            |f| f.usd_per_mtok_at_slo().map(|x| (x, false)),
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
    /// Every run's SLO verdicts passed (None: none stored).
    pub slo_pass: Option<bool>,
}

impl ColumnFigures {
    pub fn usd_per_mtok(&self) -> Option<f64> {
        let c = self.cost_per_hour?;
        (self.figures.output_tps > 0.0).then(|| c / (self.figures.output_tps * 3600.0) * 1e6)
    }

    /// $/Mtok counting only the tokens of requests that met their SLO (goodput).
    pub fn usd_per_mtok_at_slo(&self) -> Option<f64> {
        let c = self.cost_per_hour?;
        let g = self.figures.goodput_output_tps?;
        (g > 0.0).then(|| c / (g * 3600.0) * 1e6)
    }

    pub(super) fn build(runs: &[&RunData], cost: Option<f64>) -> ColumnFigures {
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
            slo_pass: runs
                .iter()
                .map(|r| r.slo_pass)
                .collect::<Option<Vec<bool>>>()
                .map(|v| v.iter().all(|&p| p)),
        }
    }
}
