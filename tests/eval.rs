//! `ember eval ppl` and `ember eval kld` against llama.cpp's `llama-perplexity` on the same
//! files, text and context; what they store; and their refusals.
//!
//! Reference figures (`tests/fixtures/eval-llama-perplexity.json`) come from llama.cpp 0c1e570
//! (vendored in llama-cpp-python 0.3.36), CPU, 2 threads, on `bench/data/corpus.txt`; the
//! fixture lists the commands. The KLD pair is Qwen2.5-Coder-0.5B Q4_K_M (base) and a Q4_0 of
//! it that the test makes with ember's own requantizer (deterministic: the fixture holds the
//! file's sha256, so llama.cpp's figures are for these very bytes).
//!
//! Bounds (issue 18): perplexity within 1% of llama-perplexity's, the KLD figures within 5%.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

const CORPUS: &str = "bench/data/corpus.txt";

fn fixture() -> Value {
    let text = std::fs::read_to_string(common::fixture("eval-llama-perplexity.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(CORPUS)
}

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("eval");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Run `ember eval ARGS`; (exit code, stdout, stderr).
fn eval(args: &[&str]) -> (i32, String, String) {
    let out = common::ember()
        .arg("eval")
        .args(args)
        .output()
        .expect("ember runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn eval_json(args: &[&str]) -> Value {
    let (code, out, err) = eval(args);
    assert_eq!(code, 0, "ember eval {args:?} failed:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn rel(a: f64, b: f64) -> f64 {
    (a / b - 1.0).abs()
}

fn sha256(path: &Path) -> String {
    ember_bench::provenance::sha256_file(path).unwrap()
}

#[test]
fn perplexity_matches_llama_perplexity_within_one_percent() {
    let fx = fixture();
    for case in fx["ppl"].as_array().unwrap() {
        let model = common::real_model(case["model"].as_str().unwrap());
        let ctx = case["ctx"].as_u64().unwrap().to_string();
        assert_eq!(
            sha256(&corpus()),
            fx["text_sha256"].as_str().unwrap(),
            "{CORPUS} changed: the reference figures are for the old text"
        );
        let m = model.to_str().unwrap();
        let c = corpus();
        let args = [
            "ppl",
            "-m",
            m,
            "-f",
            c.to_str().unwrap(),
            "-c",
            &ctx,
            "--backend",
            "cpu",
            "--no-db",
        ];
        let want = case["ppl"].as_f64().unwrap();
        let want_chunks = case["chunks"].as_u64().unwrap();
        // Text output: llama-perplexity's own summary line, so its scripts keep working.
        let (code, out, err) = eval(&args);
        assert_eq!(code, 0, "{err}");
        let line = out
            .lines()
            .find(|l| l.starts_with("Final estimate: PPL = "))
            .unwrap_or_else(|| panic!("no summary line in:\n{out}"));
        let got: f64 = line["Final estimate: PPL = ".len()..]
            .split(" +/- ")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        eprintln!(
            "{} ctx {ctx}: ember {got:.4}, llama.cpp {want:.4} ({:+.3}%)",
            case["model"],
            100.0 * (got / want - 1.0)
        );
        assert!(rel(got, want) < 0.01, "{line} vs llama.cpp {want}");
        // The same figure as JSON, with its error and chunk count.
        let mut j = args.to_vec();
        j.push("--json");
        let v = eval_json(&j);
        assert!((v["ppl"].as_f64().unwrap() - got).abs() < 1e-3);
        assert_eq!(v["chunks"].as_u64().unwrap(), want_chunks);
        let err = v["ppl_stderr"].as_f64().unwrap();
        assert!(
            rel(err, case["stderr"].as_f64().unwrap()) < 0.05,
            "stderr {err}"
        );
    }
}

/// `base` (a real model) re-encoded as Q4_0 by ember's requantizer, written once per target
/// dir, and checked against the sha256 llama.cpp's reference figures are for.
fn requantized_q4_0(base: &str, want_sha: &str) -> PathBuf {
    let out = tmp(&format!("{base}.q4_0-ember.gguf"));
    if !out.exists() || sha256(&out) != want_sha {
        let src = ember_runtime::gguf::GgufFile::open(common::real_model(base)).unwrap();
        let w =
            ember_runtime::gguf::requant::requantize(&src, ember_runtime::quant::GgmlType::Q4_0)
                .unwrap();
        std::fs::write(&out, w.to_bytes()).unwrap();
    }
    assert_eq!(
        sha256(&out),
        want_sha,
        "ember's Q4_0 requantization changed: llama.cpp's reference figures are for the old bytes"
    );
    out
}

fn qwen_q4_0(want_sha: &str) -> PathBuf {
    requantized_q4_0(common::QWEN25, want_sha)
}

/// ember's figures (`ember eval kld --json`) against llama-perplexity's (fixture `k`): each
/// within 5%.
fn assert_kld_matches(live: &Value, k: &Value) {
    let pick = |v: &Value, path: &[&str]| {
        path.iter()
            .fold(v, |v, p| &v[*p])
            .as_f64()
            .unwrap_or_else(|| panic!("{path:?} missing in {v}"))
    };
    for (name, ours, theirs) in [
        ("mean KLD", vec!["kld_mean", "value"], "kld_mean"),
        ("same top p", vec!["same_top", "value"], "same_top"),
        (
            "ln(PPL(Q)/PPL(base))",
            vec!["ln_ppl_ratio", "value"],
            "ln_ppl_ratio",
        ),
        ("PPL(Q)", vec!["ppl", "value"], "ppl_q"),
        ("PPL(base)", vec!["ppl_base", "value"], "ppl_base"),
    ] {
        let got = pick(live, &ours);
        let want = k[theirs].as_f64().unwrap();
        eprintln!(
            "{} {name}: ember {got:.6}, llama.cpp {want:.6} ({:+.2}%)",
            k["base"],
            100.0 * (got / want - 1.0)
        );
        assert!(
            rel(got, want) < 0.05,
            "{name}: ember {got} vs llama.cpp {want}"
        );
    }
    assert_eq!(live["tokens_scored"].as_u64(), k["tokens_scored"].as_u64());
}

#[test]
fn smollm2_kl_divergence_matches_llama_perplexity() {
    let k = &fixture()["kld_smollm2"];
    let model = requantized_q4_0(common::SMOLLM2, k["model_sha256"].as_str().unwrap());
    let base = common::real_model(common::SMOLLM2);
    let c = corpus();
    let ctx = k["ctx"].as_u64().unwrap().to_string();
    let live = eval_json(&[
        "kld",
        "--base",
        base.to_str().unwrap(),
        "-m",
        model.to_str().unwrap(),
        "-f",
        c.to_str().unwrap(),
        "-c",
        &ctx,
        "--backend",
        "cpu",
        "--no-db",
        "--json",
    ]);
    assert_kld_matches(&live, k);
}

#[test]
fn kl_divergence_matches_llama_perplexity_and_a_saved_base_gives_the_same_figures() {
    let fx = fixture();
    let k = &fx["kld"];
    let model = qwen_q4_0(k["model_sha256"].as_str().unwrap());
    let base = common::real_model(common::QWEN25);
    let saved = tmp("qwen-base.kld");
    let _ = std::fs::remove_file(&saved);
    let c = corpus();
    let ctx = k["ctx"].as_u64().unwrap().to_string();
    let live = eval_json(&[
        "kld",
        "--base",
        base.to_str().unwrap(),
        "-m",
        model.to_str().unwrap(),
        "-f",
        c.to_str().unwrap(),
        "-c",
        &ctx,
        "--save-base",
        saved.to_str().unwrap(),
        "--backend",
        "cpu",
        "--no-db",
        "--json",
    ]);
    assert_kld_matches(&live, k);

    // The saved base gives exactly the live figures, with or without the text.
    for with_text in [true, false] {
        let mut args = vec![
            "kld",
            "--base",
            saved.to_str().unwrap(),
            "-m",
            model.to_str().unwrap(),
            "--backend",
            "cpu",
            "--no-db",
            "--json",
        ];
        if with_text {
            args.extend(["-f", c.to_str().unwrap()]);
        }
        let again = eval_json(&args);
        for f in ["kld_mean", "same_top", "ppl", "ppl_base", "dp_rms"] {
            assert_eq!(again[f], live[f], "{f} from the saved base");
        }
        assert_eq!(again["kld_max"], live["kld_max"]);
    }

    // A model of another family, another text: refused, nothing printed as a figure.
    let smol = common::real_model(common::SMOLLM2);
    let (code, out, err) = eval(&[
        "kld",
        "--base",
        saved.to_str().unwrap(),
        "-m",
        smol.to_str().unwrap(),
        "--no-db",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("vocabulary of 151936 tokens, the model 49152"),
        "{err}"
    );
    let readme = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let (code, _, err) = eval(&[
        "kld",
        "--base",
        saved.to_str().unwrap(),
        "-m",
        model.to_str().unwrap(),
        "-f",
        readme.to_str().unwrap(),
        "--no-db",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("does not tokenize to the tokens the base"),
        "{err}"
    );
}

/// kind, ppl, kld_mean, same_top, avg(nll), avg(kld), avg(same_top), the model's sha256.
type StoredRow = (
    String,
    f64,
    Option<f64>,
    Option<f64>,
    f64,
    Option<f64>,
    Option<f64>,
    String,
);

#[test]
fn a_model_against_itself_has_zero_divergence_and_results_are_recomputable_from_the_store() {
    let smol = common::real_model(common::SMOLLM2);
    let m = smol.to_str().unwrap();
    let c = corpus();
    let db = tmp("quality.db");
    let _ = std::fs::remove_file(&db);
    let d = db.to_str().unwrap();
    let common = [
        "-c",
        "128",
        "--chunks",
        "3",
        "--backend",
        "cpu",
        "--db",
        d,
        "--json",
    ];
    let mut args = vec!["kld", "--base", m, "-m", m, "-f", c.to_str().unwrap()];
    args.extend(common);
    let k = eval_json(&args);
    assert!(k["kld_mean"]["value"].as_f64().unwrap().abs() < 1e-5, "{k}");
    assert_eq!(k["same_top"]["value"].as_f64(), Some(1.0));
    // The base's likelihoods are kept as f32.
    let (q, b) = (
        k["ppl"]["value"].as_f64().unwrap(),
        k["ppl_base"]["value"].as_f64().unwrap(),
    );
    assert!(rel(q, b) < 1e-6, "{q} vs {b}");
    assert_eq!(k["tokens_scored"].as_u64(), Some(3 * 63));
    let mut args = vec!["ppl", "-m", m, "-f", c.to_str().unwrap()];
    args.extend(common);
    let p = eval_json(&args);
    // The same tokens scored the same way: the same perplexity both ways.
    assert!(
        rel(
            p["ppl"].as_f64().unwrap(),
            k["ppl"]["value"].as_f64().unwrap()
        ) < 1e-9
    );

    // Both stored under the model's sha256, and recomputable from their tokens by SQL.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: Vec<StoredRow> = conn
        .prepare(
            "SELECT q.kind, q.ppl, q.kld_mean, q.same_top,
                    (SELECT avg(nll) FROM quality_tokens t WHERE t.quality_id = q.quality_id),
                    (SELECT avg(kld) FROM quality_tokens t WHERE t.quality_id = q.quality_id),
                    (SELECT avg(same_top) FROM quality_tokens t WHERE t.quality_id = q.quality_id),
                    m.sha256
             FROM quality_runs q JOIN models m USING (model_id) ORDER BY q.quality_id",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 2);
    let sha = sha256(&smol);
    for (kind, ppl, kld, same, ppl_sql, kld_sql, same_sql, model_sha) in rows {
        assert_eq!(model_sha, sha);
        // exp() is in the sqlite3 shell (3.35+) but not in rusqlite's bundled build.
        let ppl_sql = ppl_sql.exp();
        assert!(rel(ppl, ppl_sql) < 1e-9, "{kind}: {ppl} vs SQL {ppl_sql}");
        if kind == "kld" {
            assert!((kld.unwrap() - kld_sql.unwrap()).abs() < 1e-12);
            assert_eq!(same, same_sql);
        } else {
            assert_eq!((kld, kld_sql, same_sql), (None, None, None));
        }
    }
    // And `ember compare --json` shows both.
    let out = common::ember()
        .args(["compare", d, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cmp: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = cmp["quality"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["kld", "ppl"]);
    assert_eq!(cmp["quality"][1]["ppl"], p["ppl"]);
}

#[test]
fn bad_input_is_a_clear_error() {
    let short = tmp("short.txt");
    std::fs::write(&short, "Too short to fill a chunk.").unwrap();
    let s = short.to_str().unwrap();
    let (code, out, err) = eval(&["ppl", "-f", s, "--no-db"]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("fewer than one chunk of --ctx 512"), "{err}");
    let (code, _, err) = eval(&["ppl", "-f", "/nonexistent/text.txt", "--no-db"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read the text /nonexistent/text.txt"),
        "{err}"
    );
    // A --base that is neither a GGUF nor a saved base.
    let (code, _, err) = eval(&["kld", "--base", s, "-m", s, "--no-db"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a base-logits file"), "{err}");
    // A base GGUF of another family is refused (before its logits are computed).
    let c = corpus();
    let (smol, qwen) = (
        common::real_model(common::SMOLLM2),
        common::real_model(common::QWEN25),
    );
    let (code, _, err) = eval(&[
        "kld",
        "--base",
        smol.to_str().unwrap(),
        "-m",
        qwen.to_str().unwrap(),
        "-f",
        c.to_str().unwrap(),
        "--no-db",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("49152 tokens") && err.contains("151936 tokens"),
        "{err}"
    );
    let (code, _, err) = eval(&["ppl", "-f", s, "-c", "2", "--no-db"]);
    assert_eq!(code, 1);
    assert!(err.contains("--ctx 2 is too small"), "{err}");
}

#[test]
fn bench_score_judges_each_kind_and_stores_accuracy() {
    // The embedded model counts (greedy "abc" → "defg…"), so every verdict is known.
    let ds = tmp("scored.jsonl");
    std::fs::write(
        &ds,
        [
            r#"{"prompt": "abc", "max_tokens": 4, "expected": "defg", "score": "exact", "tags": ["t1"]}"#,
            r#"{"prompt": "abc", "max_tokens": 4, "expected": "xyz", "tags": ["t1"]}"#,
            r#"{"prompt": "abc", "max_tokens": 6, "expected": "^def.*i$", "score": "regex", "tags": ["t1"]}"#,
            r#"{"prompt": "abc", "max_tokens": 1, "expected": "d", "score": "choice", "options": ["q", "d"], "tags": ["t2"]}"#,
            r#"{"prompt": "mno", "max_tokens": 2, "expected": "z", "score": "choice", "options": ["p", "z"], "tags": ["t2"]}"#,
            r#"{"prompt": "abc", "max_tokens": 4, "tags": ["t2"]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let db = tmp("scored.db");
    let _ = std::fs::remove_file(&db);
    let (d, dsp) = (db.to_str().unwrap(), ds.to_str().unwrap());
    let out = common::ember()
        .args([
            "bench",
            "--dataset",
            dsp,
            "--raw-prompts",
            "--score",
            "--by-tag",
            "--temp",
            "0",
            "--warmup",
            "0",
            "--db",
            d,
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("accuracy    3/5 = 60.0% (95% CI 23.1–88.2%)"),
        "{stdout}"
    );
    let t1 = stdout.lines().find(|l| l.starts_with("| t1 ")).unwrap();
    assert!(t1.contains("2/3 = 66.7%"), "{t1}");
    let t2 = stdout.lines().find(|l| l.starts_with("| t2 ")).unwrap();
    assert!(t2.contains("1/2 = 50.0%"), "{t2}");
    // Per request in SQLite, in workload order; the unscored one is NULL.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let correct: Vec<Option<i64>> = conn
        .prepare("SELECT correct FROM requests WHERE warmup = 0 ORDER BY request_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(correct, [Some(1), Some(0), Some(1), Some(1), Some(0), None]);
    let acc: f64 = conn
        .query_row(
            "SELECT value FROM run_metrics WHERE metric = 'accuracy' AND stat = 'value'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!((acc - 0.6).abs() < 1e-12);

    // Bad scoring fields are refused before anything runs, naming the line.
    std::fs::write(
        &ds,
        r#"{"prompt": "abc", "expected": "d", "score": "fuzzy"}"#,
    )
    .unwrap();
    let out = common::ember()
        .args(["bench", "--dataset", dsp, "--score", "--no-db"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(":1: unknown \"score\" kind 'fuzzy'"), "{err}");
    let out = common::ember()
        .args(["bench", "-w", "chat", "--score", "--no-db"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("--score needs --dataset"), "{err}");
}
