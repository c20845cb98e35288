//! Terminal output: one table of distributions, then throughput, memory, SLO
//! verdicts and the labelled compatibility views.

use std::fmt::Write;

use crate::metrics::{Dist, SloReport, SpecSummary, Summary, TagRow};
use crate::record::{RunResult, SweepResult};

fn num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn row(out: &mut String, name: &str, d: &Dist) {
    if d.n == 0 {
        let _ = writeln!(
            out,
            "| {name:<16} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
            0, "-", "-", "-", "-", "-", "-", "-", "-", "-"
        );
        return;
    }
    let p = |v: f64, label: &str| {
        format!(
            "{}{}",
            num(v),
            if d.small_sample.iter().any(|s| s == label) {
                "*"
            } else {
                ""
            }
        )
    };
    let _ = writeln!(
        out,
        "| {name:<16} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
        d.n,
        num(d.mean),
        p(d.p50, "p50"),
        p(d.p90, "p90"),
        p(d.p95, "p95"),
        p(d.p99, "p99"),
        p(d.p999, "p99.9"),
        num(d.min),
        num(d.max),
        num(d.sd)
    );
}

/// The human-readable report of one run.
pub fn render(
    r: &RunResult,
    s: &Summary,
    sweep: Option<&SweepResult>,
    tags: &[TagRow],
    overhead_fraction: Option<f64>,
) -> String {
    let mut o = String::new();
    let w = &r.workload;
    let _ = writeln!(
        o,
        "ember bench · {} · {} · {} measured (+{} warm-up) · window {:.2} s · workload hash {} (seed {})",
        w.name,
        load_label(&w.load),
        s.n_measured,
        s.n_warmup,
        s.window_s,
        w.hash,
        w.seed
    );
    let p = &r.provenance;
    let _ = writeln!(
        o,
        "model {} ({}) · {} threads · {} {} · {}",
        p.model_path, p.model_arch, p.threads, p.backend, p.adapter, p.cpu_model
    );
    let _ = writeln!(o);
    dists(&mut o, s);
    totals(&mut o, r, s);
    if let Some(slo) = &s.slo {
        slo_verdicts(&mut o, slo, s.n_measured);
    }
    if let Some(sw) = sweep {
        sweep_points(&mut o, sw);
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "compatibility views (their definitions): GuideLLM ITL {} ms · vLLM TPOT mean {} / median {} / p99 {} ms",
        num(s.compat.guidellm_itl_ms),
        num(s.compat.vllm_tpot_mean_ms),
        num(s.compat.vllm_tpot_median_ms),
        num(s.compat.vllm_tpot_p99_ms)
    );
    if let Some(f) = overhead_fraction {
        let _ = writeln!(o, "harness overhead: {:.3}% of engine step time", f * 100.0);
    }
    if !tags.is_empty() {
        tag_rows(&mut o, tags);
    }
    o
}

/// The table of distributions.
fn dists(o: &mut String, s: &Summary) {
    let _ = writeln!(
        o,
        "| {:<16} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "metric", "n", "mean", "p50", "p90", "p95", "p99", "p99.9", "min", "max", "sd"
    );
    let _ = writeln!(
        o,
        "|{:-<18}|{:->7}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", ":", ":", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    row(o, "ttft ms", &s.ttft_ms);
    row(o, "queue ms", &s.queue_ms);
    row(o, "ttft_engine ms", &s.ttft_engine_ms);
    let itl = if s.itl_per_chunk {
        "itl ms (per chunk)"
    } else {
        "itl ms (per gap)"
    };
    row(o, itl, &s.itl_ms);
    row(o, "tpot ms", &s.tpot_ms);
    row(o, "e2e ms", &s.e2e_ms);
    row(o, "prefill tok/s", &s.prefill_tps);
    row(o, "decode tok/s", &s.decode_tps);
    let _ = writeln!(
        o,
        "* nearest-rank percentile from too few samples (n < 1/(1-q))"
    );
    let _ = writeln!(o);
}

/// Throughput, token counts and memory.
fn totals(o: &mut String, r: &RunResult, s: &Summary) {
    let _ = writeln!(
        o,
        "throughput  {} req/s · output {} tok/s · input {} tok/s · prefill total {} tok/s · decode total {} tok/s",
        num(s.rps),
        num(s.output_tps),
        num(s.input_tps),
        num(s.prefill_tps_total),
        num(s.decode_tps_total)
    );
    let _ = writeln!(
        o,
        "tokens      {} in, {} out · errors {}/{} (error_rate {:.1}%) · prefix hit rate {:.1}% · cache evictions {}",
        s.prompt_tokens,
        s.output_tokens,
        s.n_failed,
        s.n_measured,
        s.error_rate * 100.0,
        s.prefix_hit_rate * 100.0,
        r.cache_evictions
    );
    if let Some(t) = &s.spec {
        speculation(o, t);
    }
    if let Some(a) = &s.accuracy {
        let _ = writeln!(o, "accuracy    {} (--score)", a.text());
    }
    if let Some(c) = &s.cost {
        let _ = writeln!(o, "cost        {}", c.text());
    }
    match (&s.energy, &s.energy_gap) {
        (Some(e), None) => {
            let _ = writeln!(o, "energy      {}", e.text());
        }
        (Some(e), Some(gap)) => {
            let _ = writeln!(o, "energy      not measured: {gap}");
            let _ = writeln!(o, "            {}", e.text());
        }
        (None, Some(gap)) => {
            let _ = writeln!(o, "energy      not measured: {gap}");
        }
        (None, None) => {}
    }
    let m = &s.memory;
    if r.provenance.transport == "http" {
        // The server's memory is not visible from here; only chunks and counts are.
        let _ = writeln!(
            o,
            "transport   http · {} chunks for {} output tokens{} · server memory not visible",
            s.chunks,
            s.output_tokens,
            if s.itl_per_chunk {
                " (several tokens per chunk: itl is per chunk)"
            } else {
                ""
            },
        );
        return;
    }
    let _ = writeln!(
        o,
        "memory      rss peak {} · kv used peak {} (reserved peak {}) · device peak {} · weights {} · {} samples",
        bytes(m.rss_peak_bytes),
        bytes(m.kv_bytes_used_peak),
        bytes(m.kv_bytes_reserved_peak),
        bytes(m.device_bytes_peak),
        bytes(r.provenance.weights_bytes),
        m.samples
    );
}

/// Speculative decoding's totals (only for a run that speculated), and how to read the
/// latency table beside them.
fn speculation(o: &mut String, t: &SpecSummary) {
    let pct = |x: Option<f64>| x.map_or("–".into(), |x| format!("{:.1}%", x * 100.0));
    let _ = writeln!(
        o,
        "speculation drafted {} · accepted {} · rejected {} · acceptance {} · mean accepted run {} per verify pass ({} passes) · draft {} ms · verify {} ms ({} requests)",
        t.drafted,
        t.accepted,
        t.rejected,
        pct(t.acceptance_rate),
        t.mean_accepted_run.map_or("–".into(), num),
        t.verify_steps,
        num(t.draft_ms),
        num(t.verify_ms),
        t.requests
    );
    let _ = writeln!(
        o,
        "            tokens of one verify pass are released microseconds apart: compare tpot (per token) with a plain run; itl's percentiles show the bursts"
    );
}

/// The SLO's verdict per constraint, then attainment and goodput.
fn slo_verdicts(o: &mut String, slo: &SloReport, n_measured: usize) {
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "SLO {} (attainment target {:.0}%): {}",
        slo.name,
        slo.target * 100.0,
        if slo.pass { "PASS" } else { "FAIL" }
    );
    for v in &slo.verdicts {
        let small = if slo.small_sample.contains(&v.constraint) {
            " (* too few samples)"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "  {}  {:<22} measured {} ms{small}",
            if v.pass { "PASS" } else { "FAIL" },
            v.constraint,
            num(v.measured)
        );
    }
    let _ = writeln!(
        o,
        "  {}  slo_attainment {:.1}% ({}/{}) >= {:.0}% · goodput {} req/s",
        if slo.slo_attainment >= slo.target {
            "PASS"
        } else {
            "FAIL"
        },
        slo.slo_attainment * 100.0,
        slo.attaining,
        n_measured,
        slo.target * 100.0,
        num(slo.goodput_rps)
    );
}

/// A rate sweep's points and its max goodput rate.
fn sweep_points(o: &mut String, sw: &SweepResult) {
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "sweep (Poisson arrivals; sync service rate {} req/s):",
        num(sw.capacity_rps)
    );
    for pt in &sw.points {
        let _ = writeln!(
            o,
            "  rate {:>8} req/s · n {:>3} · attainment {:>5.1}% · goodput {:>8} req/s · {}",
            num(pt.rate_rps),
            pt.n,
            pt.slo_attainment * 100.0,
            num(pt.goodput_rps),
            if pt.pass { "pass" } else { "fail" }
        );
    }
    match sw.max_goodput_rate {
        Some(x) => {
            let _ = writeln!(
                o,
                "  max_goodput_rate {} req/s (attainment >= {:.0}%)",
                num(x),
                sw.target * 100.0
            );
        }
        None => {
            let _ = writeln!(o, "  max_goodput_rate: no rate tried met the target");
        }
    }
}

/// Per-tag counts and medians.
fn tag_rows(o: &mut String, tags: &[TagRow]) {
    let scored = tags.iter().any(|t| t.accuracy.is_some());
    let _ = writeln!(o);
    let _ = write!(
        o,
        "| {:<16} | {:>4} | {:>6} | {:>12} | {:>10} | {:>8} |",
        "tag", "n", "failed", "ttft p50 ms", "e2e p50 ms", "out tok"
    );
    if scored {
        let _ = write!(o, " {:<34} |", "accuracy (95% CI)");
    }
    let _ = writeln!(o);
    for t in tags {
        let _ = write!(
            o,
            "| {:<16} | {:>4} | {:>6} | {:>12} | {:>10} | {:>8} |",
            t.tag,
            t.n,
            t.n_failed,
            num(t.ttft_p50_ms),
            num(t.e2e_p50_ms),
            t.output_tokens
        );
        if scored {
            let acc = t.accuracy.map_or("–".into(), |a| a.text());
            let _ = write!(o, " {acc:<34} |");
        }
        let _ = writeln!(o);
    }
}

fn load_label(load_json: &str) -> String {
    serde_json::from_str::<crate::load::LoadSpec>(load_json)
        .map(|l| l.describe())
        .unwrap_or_else(|_| load_json.to_string())
}
