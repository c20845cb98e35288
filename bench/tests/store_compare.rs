//! `compare`: two files of the same workload hash give one side-by-side
//! table; mismatched workloads are flagged; the regression gate uses the
//! baseline's run-to-run noise. Also the export formats.

use std::path::PathBuf;

use ember_bench::compare::{CompareOptions, compare};
use ember_bench::export::{Format, What, export};
use ember_bench::store::Store;
use ember_bench::store::testdata::{SynthSpec, synth_run};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-store-cmp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn chat(seed: u64, backend: &str, itl_ms: f64) -> SynthSpec {
    SynthSpec {
        seed,
        backend: backend.into(),
        itl_ms,
        workload_hash: "chat-hash-0001".into(),
        device_profile: (backend != "cpu").then(|| "synthetic-gpu".into()),
        ..Default::default()
    }
}

fn write(path: &PathBuf, specs: &[SynthSpec]) {
    let mut s = Store::open(path).unwrap();
    for sp in specs {
        s.save_run(&synth_run(sp)).unwrap();
    }
}

#[test]
fn same_workload_on_two_backends_gives_one_side_by_side_table_and_flags_mismatches() {
    let d = dir("two");
    let (cpu, gpu) = (d.join("cpu.db"), d.join("wgpu.db"));
    write(&cpu, &[chat(1, "cpu", 20.0)]);
    let rag = SynthSpec {
        workload_name: "rag".into(),
        workload_hash: "rag-hash-0002".into(),
        backend: "wgpu".into(),
        ..Default::default()
    };
    write(&gpu, &[chat(1, "wgpu", 8.0), rag]);
    let cmp = compare(
        &[cpu.clone(), gpu.clone()],
        &CompareOptions {
            costs: vec![("synthetic-gpu".into(), 2.5)],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(cmp.groups.len(), 1, "one workload in common");
    let g = &cmp.groups[0];
    assert_eq!(g.workload_hash, "chat-hash-0001");
    assert_eq!(g.columns.len(), 2);
    assert_eq!(g.columns[0].file, "cpu.db");
    assert_eq!(g.columns[1].file, "wgpu.db");
    assert_ne!(
        g.columns[0].device_fingerprint,
        g.columns[1].device_fingerprint
    );
    // the faster device decodes faster
    let itl = |i: usize| g.columns[i].pooled.figures.dist("itl").unwrap().p50;
    assert!(itl(1) < itl(0));
    assert!(
        g.columns[1].pooled.usd_per_mtok().is_some(),
        "cost given for the GPU profile"
    );
    assert!(g.columns[0].pooled.usd_per_mtok().is_none());
    assert_eq!(cmp.mismatched.len(), 1);
    assert_eq!(cmp.mismatched[0].workload_hash, "rag-hash-0002");
    let text = cmp.to_text();
    assert!(
        text.contains("cpu.db: cpu") && text.contains("wgpu.db: synthetic-gpu (wgpu)"),
        "{text}"
    );
    assert!(
        text.contains("TTFT p99 (ms)")
            && text.contains("ITL p50 (ms)")
            && text.contains("TPOT p50 (ms)")
    );
    assert!(
        text.contains("output tokens/s")
            && text.contains("goodput")
            && text.contains("SLO attainment")
    );
    assert!(
        text.contains("peak RSS") && text.contains("prefix hit rate") && text.contains("$/Mtok")
    );
    assert!(
        text.contains("NOT COMPARED") && text.contains("rag"),
        "{text}"
    );
    assert!(text.contains("devices differ"));
    let j = cmp.to_json();
    assert_eq!(j["groups"][0]["columns"].as_array().unwrap().len(), 2);
    assert!(
        j["groups"][0]["columns"][0]["figures"]["ttft_p99"]["value"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let csv = cmp.to_csv();
    assert!(csv.lines().next().unwrap().starts_with("workload_hash,"));
    assert!(
        csv.lines()
            .any(|l| l.contains("wgpu.db") && l.contains(",itl_p99,"))
    );
}

#[test]
fn different_workloads_only_are_never_put_side_by_side() {
    let d = dir("mismatch");
    let (a, b) = (d.join("a.db"), d.join("b.db"));
    write(
        &a,
        &[SynthSpec {
            workload_hash: "aaa".into(),
            ..Default::default()
        }],
    );
    write(
        &b,
        &[SynthSpec {
            workload_hash: "bbb".into(),
            ..Default::default()
        }],
    );
    let cmp = compare(&[a, b], &CompareOptions::default()).unwrap();
    assert!(cmp.groups.is_empty());
    assert_eq!(cmp.mismatched.len(), 2);
}

#[test]
fn regression_gate_uses_baseline_noise() {
    let d = dir("gate");
    let base = d.join("base.db");
    // three repeated runs of the same workload: noise is measurable
    write(
        &base,
        &[
            chat(1, "cpu", 20.0),
            chat(2, "cpu", 20.0),
            chat(3, "cpu", 20.0),
        ],
    );
    let same = d.join("same.db");
    write(&same, &[chat(4, "cpu", 20.0)]);
    let slow = d.join("slow.db");
    write(&slow, &[chat(4, "cpu", 30.0)]);
    let opts = CompareOptions {
        baseline: Some(base.clone()),
        max_regression: Some(0.05),
        ..Default::default()
    };
    let ok = compare(&[same], &opts).unwrap();
    assert!(!ok.gate.is_empty());
    assert!(
        ok.gate.iter().all(|g| g.noise.is_some()),
        "3 baseline runs give a noise figure"
    );
    assert!(!ok.regressed(), "{}", ok.to_text());
    let bad = compare(&[slow], &opts).unwrap();
    assert!(bad.regressed(), "{}", bad.to_text());
    assert!(
        bad.gate
            .iter()
            .any(|g| g.regressed && g.figure.starts_with("ITL p50"))
    );
    assert!(bad.to_text().contains("gate: FAIL"));
    // one baseline run: noise unknown, and said so
    let one = d.join("one.db");
    write(&one, &[chat(1, "cpu", 20.0)]);
    let c = compare(
        &[d.join("slow.db")],
        &CompareOptions {
            baseline: Some(one),
            max_regression: Some(0.05),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(c.gate.iter().all(|g| g.noise.is_none()));
    assert!(c.notes.iter().any(|n| n.contains("noise is unknown")));
}

#[test]
fn export_csv_json_and_llama_bench_markdown() {
    let d = dir("export");
    let db = d.join("x.db");
    write(&db, &[chat(1, "cpu", 20.0), chat(2, "wgpu", 10.0)]);
    let csv = export(std::slice::from_ref(&db), What::Runs, Format::Csv).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("file,run_id,"));
    let json: serde_json::Value =
        serde_json::from_str(&export(std::slice::from_ref(&db), What::Runs, Format::Json).unwrap())
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert!(json[0]["ttft_p99_ms"].as_f64().unwrap() > 0.0);
    let md = export(std::slice::from_ref(&db), What::Runs, Format::Markdown).unwrap();
    assert!(md.starts_with("| model "), "{md}");
    assert!(md.contains("| t/s |") || md.contains(" t/s |"));
    assert!(
        md.lines().filter(|l| l.contains("pp (chat")).count() == 2
            && md.lines().filter(|l| l.contains("tg (chat")).count() == 2,
        "{md}"
    );
    assert!(md.contains(" ± "));
    let req = export(std::slice::from_ref(&db), What::Requests, Format::Csv).unwrap();
    assert!(req.lines().next().unwrap().contains("ttft_ms"));
    assert_eq!(req.lines().count(), 1 + 2 * 41);
}

#[test]
fn quality_evaluations_join_the_latency_columns_of_the_same_model() {
    use ember_bench::store::{QualityRun, QualityToken};
    let d = dir("quality");
    let (cpu, gpu) = (d.join("cpu.db"), d.join("wgpu.db"));
    write(&cpu, &[chat(1, "cpu", 20.0)]);
    write(&gpu, &[chat(1, "wgpu", 8.0)]);
    let prov = synth_run(&chat(1, "cpu", 20.0)).provenance;
    let nll = [2.0, 3.0, 4.0];
    let q = QualityRun {
        kind: "ppl".into(),
        text_sha256: "t".repeat(64),
        text_name: "corpus.txt".into(),
        ctx: 128,
        chunks: 1,
        tokens_scored: 3,
        settings: serde_json::json!({"batch": 512}),
        ppl: 3f64.exp(),
        ppl_stderr: 0.5,
        summary: serde_json::json!({}),
        tokens: nll
            .iter()
            .map(|&nll| QualityToken {
                nll,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Store::open(&cpu).unwrap().save_quality(&prov, &q).unwrap();
    let cmp = compare(&[cpu.clone(), gpu.clone()], &CompareOptions::default()).unwrap();
    assert_eq!(cmp.quality.len(), 1);
    assert_eq!(cmp.quality[0].file, "cpu.db");
    assert_eq!(cmp.quality[0].run.model_sha256, prov.model_sha256);
    assert!((cmp.quality[0].run.ppl - 3f64.exp()).abs() < 1e-12);
    let j = cmp.to_json();
    assert_eq!(j["quality"][0]["kind"], "ppl");
    // Both latency columns ran the same model file: each carries its perplexity.
    for c in j["groups"][0]["columns"].as_array().unwrap() {
        assert_eq!(c["quality"][0]["ppl"].as_f64(), Some(3f64.exp()), "{c}");
        assert_eq!(c["quality"][0]["text"], "corpus.txt");
    }
    // The triangle: each column's quality (its model's perplexity), latency and cost.
    let tri = j["triangle"].as_array().unwrap();
    assert_eq!(tri.len(), 2);
    for r in tri {
        assert_eq!(r["ppl"].as_f64(), Some(3f64.exp()), "{r}");
        assert!(r["ttft_p99_ms"].as_f64().unwrap() > 0.0);
        assert!(r["kld_mean"].is_null() && r["accuracy"].is_null());
    }
    let text = cmp.to_text();
    assert!(text.contains("## quality · latency · cost"), "{text}");
    assert!(text.contains("## quality (ember eval)"), "{text}");
    assert!(
        text.contains("| ppl | corpus.txt | 128 | 3 | 20.0855 ± 0.5000 |"),
        "{text}"
    );
}
