//! `ember quantize` against llama.cpp's `llama-quantize`: the same bytes for the same input
//! and type, its refusals, and its output running in ember.
//!
//! CI has no llama.cpp: `tests/fixtures/quantize-llama.json` holds the sha256 of
//! llama-quantize's output (llama.cpp 0c1e570, no importance matrix) for each case, made by
//! `tools/quantize-ref/make_fixture.py`. The inputs are the real SmolLM2 and Qwen2.5 files of
//! `models/fetch.sh` and an F16 of SmolLM2, which the tests make with ember itself and check
//! against llama-quantize's F16 first. From F16 the cases cover every mix but IQ4_NL/IQ4_XS
//! (the slow encoder: ~30 s each here), which come from the real SmolLM2 file together with
//! Q2_K and Q3_K_M (the four new block formats' test models are made that way); Qwen2.5 adds
//! Q2_K and Q3_K_M with its own shapes (GQA 7: attn_v at Q4_K).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(common::fixture("quantize-llama.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("quantize")
        .join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sha256(path: &Path) -> String {
    ember_bench::provenance::sha256_file(path).unwrap()
}

fn quantize(args: &[&str]) -> Output {
    common::ember()
        .arg("quantize")
        .args(args)
        .output()
        .expect("ember runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `ember quantize --allow-requantize IN OUT TYPE` must succeed and write llama-quantize's
/// bytes (`want`); OUT is removed afterwards unless `keep`.
fn assert_quantizes_to(input: &Path, out: &Path, ty: &str, want: &str, extra: &[&str]) {
    let mut args = vec!["-q", "--allow-requantize"];
    args.extend_from_slice(extra);
    args.extend([s(input), s(out), ty]);
    let o = quantize(&args);
    assert!(
        o.status.success(),
        "ember quantize {args:?}:\n{}",
        stderr(&o)
    );
    let got = sha256(out);
    assert_eq!(
        got,
        want,
        "ember quantize {} {ty}: not llama-quantize's bytes \
         (tools/quantize-ref/compare.py shows which tensors differ)",
        input.display()
    );
}

/// The F16 of SmolLM2 (ember's, checked to be llama-quantize's), made once per target dir (and
/// once per test process: the tests that use it run in parallel).
fn smol_f16() -> PathBuf {
    static F16: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    F16.get_or_init(make_smol_f16).clone()
}

fn make_smol_f16() -> PathBuf {
    let want = fixture()["f16_source"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let out = dir("src").join("smollm2-f16.gguf");
    if !out.exists() || sha256(&out) != want {
        let real = common::real_model(common::SMOLLM2);
        assert_quantizes_to(&real, &out, "F16", &want, &[]);
    }
    out
}

#[test]
fn from_f16_every_mix_is_llama_quantizes_file() {
    let f16 = smol_f16();
    let d = dir("from-f16");
    let fx = fixture();
    let cases: Vec<&Value> = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["input"] == "f16")
        .collect();
    assert!(cases.len() >= 18, "the fixture lost cases");
    for c in cases {
        let ty = c["type"].as_str().unwrap();
        // Extra llama-quantize flags the case was made with (--pure).
        let args: Vec<&str> = c["args"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
            .unwrap_or_default();
        let out = d.join(format!("{ty}{}.gguf", args.concat()));
        assert_quantizes_to(&f16, &out, ty, c["sha256"].as_str().unwrap(), &args);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn requantized_real_models_are_llama_quantizes_files() {
    let d = dir("from-real");
    let fx = fixture();
    for c in fx["cases"].as_array().unwrap() {
        let input = c["input"].as_str().unwrap();
        if input == "f16" {
            continue;
        }
        let ty = c["type"].as_str().unwrap();
        let out = d.join(format!("{input}.{ty}.gguf"));
        let real = common::real_model(input);
        assert_quantizes_to(&real, &out, ty, c["sha256"].as_str().unwrap(), &[]);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn the_bytes_do_not_depend_on_the_thread_count() {
    let f16 = smol_f16();
    let fx = fixture();
    let want = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["input"] == "f16" && c["type"] == "Q4_K_M" && c["args"].is_null())
        .unwrap()["sha256"]
        .as_str()
        .unwrap();
    let out = dir("threads").join("q4_k_m-1-thread.gguf");
    assert_quantizes_to(&f16, &out, "Q4_K_M", want, &["-t", "1"]);
    std::fs::remove_file(&out).unwrap();
}

/// The quantized files load and generate in ember (the mixes of block types ember computes).
#[test]
fn quantized_files_run_in_ember() {
    let f16 = smol_f16();
    let d = dir("run");
    for ty in ["Q4_K_M", "Q8_0", "Q5_0"] {
        let out = d.join(format!("{ty}.gguf"));
        let o = quantize(&["-q", s(&f16), s(&out), ty]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = common::ember()
            .args(["run", "--backend", "cpu", "--temp", "0", "-n", "4", "-p"])
            .arg("The capital of France is")
            .arg("-m")
            .arg(&out)
            .env("EMBER_WGPU_BACKENDS", "none")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(o.status.success(), "ember run on {ty}:\n{err}");
        assert!(err.contains("4 generated"), "{ty}: {err}");
        assert!(!o.stdout.is_empty(), "{ty}: no text");
        std::fs::remove_file(&out).unwrap();
    }
}

/// `ember quantize ARGS` fails with status 1, without a panic, says `want` on stderr, and leaves
/// neither `out` nor `out.tmp`.
fn assert_fails(args: &[&str], out: &Path, want: &str) -> String {
    let o = quantize(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}:\n{err}");
    assert!(err.contains(want), "{args:?}: wanted {want:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "{} was left behind", out.display());
    let tmp = PathBuf::from(format!("{}.tmp", out.display()));
    assert!(!tmp.exists(), "{} was left behind", tmp.display());
    err
}

#[test]
fn refusals_and_errors_are_clear_and_leave_no_file() {
    let d = dir("errors");
    let real = common::real_model(common::SMOLLM2);
    let out = d.join("out.gguf");
    let _ = std::fs::remove_file(&out);

    // An unknown type lists the valid ones.
    let err = assert_fails(
        &[s(&real), s(&out), "Q4_3"],
        &out,
        "unknown quantization type 'Q4_3'",
    );
    for t in ["Q4_K_M", "IQ4_XS", "Q2_K", "F16"] {
        assert!(err.contains(t), "{err}");
    }
    // A quantized source needs --allow-requantize; the error says so before anything is written.
    let err = assert_fails(&[s(&real), s(&out), "Q4_0"], &out, "--allow-requantize");
    assert!(err.contains("already quantized"), "{err}");
    // Missing and non-GGUF inputs are named.
    let missing = d.join("nope.gguf");
    assert_fails(&[s(&missing), s(&out), "Q4_0"], &out, "nope.gguf");
    let text = d.join("text.gguf");
    std::fs::write(&text, "not a model").unwrap();
    assert_fails(&[s(&text), s(&out), "Q4_0"], &out, "not a GGUF file");
    // OUT = IN is refused and the input stays as it was.
    let copy = d.join("copy.gguf");
    std::fs::copy(&real, &copy).unwrap();
    let before = sha256(&copy);
    let o = quantize(&["--allow-requantize", s(&copy), s(&copy), "Q4_0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is the input file"), "{}", stderr(&o));
    assert_eq!(sha256(&copy), before);
    std::fs::remove_file(&copy).unwrap();
    // An unwritable destination.
    let nodir = d.join("no-such-dir").join("out.gguf");
    assert_fails(
        &["--allow-requantize", s(&real), s(&nodir), "Q8_0"],
        &nodir,
        "no-such-dir",
    );
    assert_fails(
        &["-t", "0", "--allow-requantize", s(&real), s(&out), "Q8_0"],
        &out,
        "--threads",
    );
}

/// A write that fails part way (here: a file size limit, with SIGXFSZ ignored so that write
/// returns EFBIG) is an error and removes the partial OUT.tmp; OUT never appears.
#[cfg(unix)]
#[test]
fn a_failed_write_leaves_no_partial_file() {
    let d = dir("partial");
    let real = common::real_model(common::SMOLLM2);
    let out = d.join("out.gguf");
    let _ = std::fs::remove_file(&out);
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"trap '' XFSZ; ulimit -f 2048; exec "$0" quantize -q --allow-requantize "$1" "$2" Q8_0"#)
        .arg(env!("CARGO_BIN_EXE_ember"))
        .arg(&real)
        .arg(&out)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("out.gguf.tmp"), "{err}");
    assert!(!out.exists());
    assert!(!d.join("out.gguf.tmp").exists(), "partial file left");
}

#[test]
fn requantizing_warns_and_dry_run_writes_nothing() {
    let d = dir("warn");
    let real = common::real_model(common::SMOLLM2);
    let out = d.join("out.gguf");
    let _ = std::fs::remove_file(&out);
    // The plan: SmolLM2's rows (576) are not whole K blocks, so its Q4_K_M falls back to
    // Q5_0, except ffn_down (1536 = 6 x 256) at Q4_K/Q6_K; the tied embeddings get Q8_0, which
    // they already are: copied.
    let o = quantize(&[
        "--dry-run",
        "--allow-requantize",
        s(&real),
        s(&out),
        "Q4_K_M",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!out.exists());
    assert!(err.contains("warning: requantizing"), "{err}");
    let line = |name: &str| {
        err.lines()
            .find(|l| l.contains(&format!(" {name} ")))
            .unwrap_or_else(|| panic!("no line for {name} in:\n{err}"))
            .to_string()
    };
    assert!(line("token_embd.weight").contains("type =   Q8_0, size ="));
    assert!(line("blk.0.attn_q.weight").contains("converting to   Q5_0 (fallback)"));
    assert!(line("blk.0.ffn_down.weight").contains("converting to   Q6_K"));
    assert!(line("blk.3.ffn_down.weight").contains("converting to   Q4_K"));
    assert!(line("blk.0.attn_norm.weight").contains("size ="));
    assert!(err.contains("dry run, nothing written"), "{err}");
}
