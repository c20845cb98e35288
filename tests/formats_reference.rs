//! The four block formats added after the first eleven — Q2_K, Q3_K, IQ4_NL, IQ4_XS — on real
//! models, against llama.cpp run on the very same files.
//!
//! The files are the two test models of `models/fetch.sh` (SmolLM2-135M Q4_1, Qwen2.5-Coder-0.5B
//! Q4_K_M) requantized as llama.cpp's `llama-quantize --allow-requantize IN OUT TYPE` writes them.
//! CI has no llama.cpp: the test makes each file with `ember quantize --allow-requantize`, which
//! writes llama-quantize's bytes, checks its sha256 against the one the fixture was made from
//! (`tests/fixtures/fmt-*.json`: the llama-quantize command and the sha256 in `model_source`, the
//! rebuild in `regenerate`), then holds ember on the CPU and (one file per format) through wgpu
//! to llama.cpp's logits with `reference_logits.rs`'s acceptance (`common::reference`): at every
//! position of every case (a 313/318-token prose prompt and a short code prompt, each with
//! llama.cpp's 24 greedy tokens, in one prefill) ember's logit for each of llama.cpp's top-8 ids
//! within `Bounds::logit`, the row's logsumexp within `Bounds::logsumexp`, the top-1 llama.cpp's
//! wherever llama.cpp's margin is at least 1.0; and the decode path, teacher-forced, picks
//! llama.cpp's greedy tokens.
//!
//! Which formats a file holds is the mix's choice, not the name's. Both models have rows of 576
//! and 896 elements, not whole 256-element super-blocks, so llama-quantize falls back to Q4_0 /
//! Q5_0 / IQ4_NL for every matrix but `ffn_down` (rows of 1536 and 4864): the Q2_K mix puts
//! `ffn_down` at Q3_K, the Q3_K_M mix at Q4_K (Q3_K_M files hold none of the new formats, so
//! they are not here), and real Q2_K tensors come only from `--pure` (`ffn_down` at Q2_K).
//! IQ4_NL files are IQ4_NL nearly throughout; IQ4_XS files are IQ4_XS in `ffn_down` and IQ4_NL
//! elsewhere (so Qwen's IQ4_NL is checked in its IQ4_XS file, and its own slow-to-encode IQ4_NL
//! file is left out). Each test asserts the file holds the formats it is about.

mod common;

use std::path::{Path, PathBuf};

use common::reference::{self, Bounds, Outcome, Reference};
use ember_runtime::accel::Placement;
use ember_runtime::engine::EngineConfig;
use ember_runtime::quant::GgmlType;

/// Teacher-forced decode steps checked per case.
const DECODE_STEPS: usize = 8;
/// llama.cpp margins under this are ties (`reference_logits.rs`'s `NEAR_TIE`).
const NEAR_TIE: f32 = 0.35;

/// One requantized file: the model it comes from, `ember quantize`'s arguments, its fixture,
/// the new formats it must hold, its bounds, and whether it also runs through wgpu.
struct Requant {
    model: &'static str,
    ty: &'static str,
    pure: bool,
    fixture: &'static str,
    holds: &'static [GgmlType],
    bounds: Bounds,
    /// Through wgpu too. Lavapipe takes 66 s per SmolLM2 file and 164 s per Qwen file here
    /// (every position's logits through a software adapter), so one file per format goes
    /// through it: the SmolLM2 Q2_K (Q3_K), Q2_K --pure (Q2_K) and IQ4_XS (IQ4_XS, IQ4_NL)
    /// files. `tests/gpu_parity.rs` holds the GPU matmul of each format to the CPU kernels.
    wgpu: bool,
}

// Bounds, per model (the same on the CPU and through wgpu). Measured worst top-8 |Δlogit| /
// |Δlogsumexp| (`cargo test --test formats_reference -- --nocapture`; wgpu: lavapipe), and how
// far llama.cpp moves against itself on the same file and prose prompt, flash attention on or
// its weight repacking off (`tools/llama-ref/arch_controls.py --b-arg=--fa` /
// `--b-arg=--no-extra-bufts`, the larger of the two):
//
// | file | ember CPU | ember wgpu | llama.cpp vs itself |
// |---|---|---|---|
// | SmolLM2 Q2_K | 1.081 / 0.989 | 1.017 / 0.843 | 1.768 / 1.298 |
// | SmolLM2 Q2_K --pure | 1.630 / 1.352 | 1.535 / 1.112 | 1.484 / 1.132 |
// | SmolLM2 IQ4_NL | 0.842 / 0.603 | 0.788 / 0.615 | 1.465 / 1.163 |
// | SmolLM2 IQ4_XS | 1.412 / 0.857 | 1.040 / 0.688 | 1.004 / 0.683 |
// | Qwen2.5 Q2_K | 0.404 / 0.254 | 0.453 / 0.230 | 0.520 / 0.217 |
// | Qwen2.5 Q2_K --pure | 0.316 / 0.217 | 0.391 / 0.253 | 0.339 / 0.170 |
// | Qwen2.5 IQ4_XS | 0.504 / 0.219 | 0.388 / 0.376 | 0.352 / 0.263 |
//
// SmolLM2's massive activations make it this sensitive to summation order (`reference_logits.rs`
// allows 1.5 on the Q4_1 file's long prompts; llama.cpp moves by up to 1.77 here). A wrong
// kernel moves the logits by tens of units: on the Qwen files, on the CPU
// (`compare_any_file`), Q2_K's mins left out 30.1 (3469 failures), Q3_K's high bit read one
// bit off 34.7 (3473), IQ4_XS's sub-block scales swapped in pairs 33.7 (3460). What these
// bounds cannot see is a slight error (one IQ4 table level 89 → 88: 0.486, as clean 0.504):
// the kernel tests hold the kernels to exact integer math (`cargo test -p ember-runtime --lib
// quant`) and the hand-built blocks to ggml's values.

/// SmolLM2: a sixth over the worst seen (1.630 / 1.352), over llama.cpp's own 1.768 / 1.298.
const SMOLLM2: Bounds = Bounds {
    logit: 2.0,
    logsumexp: 1.6,
};
/// Qwen2.5: `reference_logits.rs`'s bounds for its long prompts, half as much again over the
/// worst seen (0.504 / 0.376).
const QWEN25: Bounds = Bounds {
    logit: 0.75,
    logsumexp: 0.6,
};

const SMOLLM2_Q2_K_MIX: Requant = Requant {
    model: common::SMOLLM2,
    ty: "Q2_K",
    pure: false,
    fixture: "fmt-smollm2-q2_k.json",
    holds: &[GgmlType::Q3_K],
    bounds: SMOLLM2,
    wgpu: true,
};
const SMOLLM2_Q2_K_ONLY: Requant = Requant {
    model: common::SMOLLM2,
    ty: "Q2_K",
    pure: true,
    fixture: "fmt-smollm2-q2_k-pure.json",
    holds: &[GgmlType::Q2_K],
    bounds: SMOLLM2,
    wgpu: true,
};
const SMOLLM2_IQ4_NL_MIX: Requant = Requant {
    model: common::SMOLLM2,
    ty: "IQ4_NL",
    pure: false,
    fixture: "fmt-smollm2-iq4_nl.json",
    holds: &[GgmlType::IQ4_NL],
    bounds: SMOLLM2,
    wgpu: false,
};
const SMOLLM2_IQ4_XS_MIX: Requant = Requant {
    model: common::SMOLLM2,
    ty: "IQ4_XS",
    pure: false,
    fixture: "fmt-smollm2-iq4_xs.json",
    holds: &[GgmlType::IQ4_XS, GgmlType::IQ4_NL],
    bounds: SMOLLM2,
    wgpu: true,
};
const QWEN25_Q2_K_MIX: Requant = Requant {
    model: common::QWEN25,
    ty: "Q2_K",
    pure: false,
    fixture: "fmt-qwen2.5-q2_k.json",
    holds: &[GgmlType::Q3_K],
    bounds: QWEN25,
    wgpu: false,
};
const QWEN25_Q2_K_ONLY: Requant = Requant {
    model: common::QWEN25,
    ty: "Q2_K",
    pure: true,
    fixture: "fmt-qwen2.5-q2_k-pure.json",
    holds: &[GgmlType::Q2_K],
    bounds: QWEN25,
    wgpu: false,
};
const QWEN25_IQ4_XS_MIX: Requant = Requant {
    model: common::QWEN25,
    ty: "IQ4_XS",
    pure: false,
    fixture: "fmt-qwen2.5-iq4_xs.json",
    holds: &[GgmlType::IQ4_XS, GgmlType::IQ4_NL],
    bounds: QWEN25,
    wgpu: false,
};

/// A requantized file in a directory of its own, removed when dropped.
struct QuantFile {
    dir: PathBuf,
    path: PathBuf,
}

impl Drop for QuantFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ember quantize --allow-requantize [--pure] MODEL OUT TYPE` into a fresh directory.
fn requantize(q: &Requant) -> QuantFile {
    let name = q.fixture.trim_end_matches(".json");
    let dir = std::env::temp_dir().join(format!("ember-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    let mut cmd = common::ember();
    cmd.args(["quantize", "-q", "--allow-requantize"]);
    if q.pure {
        cmd.arg("--pure");
    }
    let o = cmd
        .arg(common::real_model(q.model))
        .arg(&path)
        .arg(q.ty)
        .output()
        .expect("run ember quantize");
    assert!(
        o.status.success(),
        "ember quantize {} {}: {}",
        q.model,
        q.ty,
        String::from_utf8_lossy(&o.stderr)
    );
    QuantFile { dir, path }
}

/// The fixture, after checking that it was made from the file just written.
fn reference_for(q: &Requant, file: &Path) -> Reference {
    let fpath = common::fixture(q.fixture);
    let r = reference::read_reference(&fpath);
    let actual = ember_bench::provenance::sha256_file(file).unwrap();
    assert_eq!(
        r.model_sha256,
        actual,
        "{} was made from llama-quantize's {} of {} (sha256 {}), but `ember quantize` now writes \
         sha256 {}: ember quantize no longer writes llama-quantize's bytes, or the fixture is for \
         another llama.cpp. To rebuild the fixture: {}",
        fpath.display(),
        q.ty,
        q.model,
        r.model_sha256,
        actual,
        r.regenerate
            .as_deref()
            .unwrap_or("see tools/llama-ref/README.md")
    );
    r
}

/// The file holds at least one tensor of each format the test is about.
fn assert_holds(q: &Requant, file: &Path) {
    let g = ember_runtime::gguf::GgufFile::open(file).unwrap();
    for ty in q.holds {
        let n = g.tensors.iter().filter(|t| t.ty == *ty).count();
        assert!(
            n > 0,
            "{} {}{}: no {ty} tensor in the file, so it checks nothing of {ty}",
            q.model,
            q.ty,
            if q.pure { " --pure" } else { "" }
        );
        eprintln!("{}: {n} {ty} tensors", q.fixture);
    }
}

/// Every case of `r` on the model at `path` through `placement`, one engine per context size.
fn compare(path: &Path, r: &Reference, placement: &Placement, b: Bounds) -> Outcome {
    let context_of = |c: &reference::Case| c.n_ctx.unwrap_or(512);
    let mut ctxs: Vec<usize> = r.cases.iter().map(context_of).collect();
    ctxs.sort_unstable();
    ctxs.dedup();
    let mut out = Outcome::default();
    for n_ctx in ctxs {
        let engine = ember_models::open_on(path, placement, |_| EngineConfig {
            threads: 2,
            n_ctx,
            prefill_chunk: n_ctx,
        })
        .unwrap_or_else(|e| panic!("ember cannot open {}: {e}", path.display()));
        assert_eq!(engine.model.config().n_vocab, r.n_vocab, "n_vocab");
        for case in r.cases.iter().filter(|c| context_of(c) == n_ctx) {
            reference::compare_positions(&engine, case, r.n_vocab, b, &mut out);
            reference::compare_decode(&engine, case, DECODE_STEPS, NEAR_TIE, &mut out);
        }
    }
    out
}

fn report(q: &Requant, tag: &str, b: Bounds, out: &Outcome) -> Option<String> {
    eprintln!(
        "{} on {tag}: worst |Δlogit| on llama.cpp's top-8 = {:.3} ({}), bound {}; worst \
         |Δlogsumexp| = {:.3} ({}), bound {}; top-1 compared at {} positions",
        q.fixture,
        out.worst.value,
        out.worst.at,
        b.logit,
        out.worst_lse.value,
        out.worst_lse.at,
        b.logsumexp,
        out.top1_checked
    );
    for n in &out.notes {
        eprintln!("  note: {n}");
    }
    (!out.failures.is_empty()).then(|| {
        format!(
            "{} on {tag} against llama.cpp, {} failures:\n{}",
            q.fixture,
            out.failures.len(),
            out.failures
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// Make the file, check it is llama-quantize's and holds its formats, then compare on the CPU
/// and (with the `wgpu` feature, lavapipe in CI) through wgpu.
fn check(q: &Requant) {
    let t0 = std::time::Instant::now();
    let file = requantize(q);
    eprintln!(
        "{}: ember quantize {:.1} s",
        q.fixture,
        t0.elapsed().as_secs_f32()
    );
    let r = reference_for(q, &file.path);
    assert_holds(q, &file.path);
    let cpu = ember_runtime::accel::choose(ember_runtime::accel::BackendChoice::Cpu);
    let mut failed = vec![];
    let t0 = std::time::Instant::now();
    let out = compare(&file.path, &r, &cpu, q.bounds);
    eprintln!("{}: cpu {:.1} s", q.fixture, t0.elapsed().as_secs_f32());
    failed.extend(report(q, "cpu", q.bounds, &out));
    #[cfg(feature = "wgpu")]
    if q.wgpu {
        let t0 = std::time::Instant::now();
        let out = compare(&file.path, &r, &common::wgpu_placement(), q.bounds);
        eprintln!("{}: wgpu {:.1} s", q.fixture, t0.elapsed().as_secs_f32());
        failed.extend(report(q, "wgpu", q.bounds, &out));
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn smollm2_q2_k_mix_matches_llama_cpp() {
    check(&SMOLLM2_Q2_K_MIX);
}

#[test]
fn smollm2_q2_k_pure_matches_llama_cpp() {
    check(&SMOLLM2_Q2_K_ONLY);
}

#[test]
fn smollm2_iq4_nl_matches_llama_cpp() {
    check(&SMOLLM2_IQ4_NL_MIX);
}

#[test]
fn smollm2_iq4_xs_matches_llama_cpp() {
    check(&SMOLLM2_IQ4_XS_MIX);
}

#[test]
fn qwen25_q2_k_mix_matches_llama_cpp() {
    check(&QWEN25_Q2_K_MIX);
}

#[test]
fn qwen25_q2_k_pure_matches_llama_cpp() {
    check(&QWEN25_Q2_K_ONLY);
}

#[test]
fn qwen25_iq4_xs_matches_llama_cpp() {
    check(&QWEN25_IQ4_XS_MIX);
}

/// Diagnostic, not a check: `EMBER_FMT_MODEL=FILE.gguf EMBER_FMT_FIXTURE=FIXTURE.json cargo
/// test --test formats_reference compare_any_file -- --ignored --nocapture` compares any model
/// with any fixture (e.g. llama-quantize's own file, or a file with a kernel broken on purpose)
/// on the CPU (`EMBER_FMT_BACKEND=wgpu`: through wgpu) and prints the worst deviations.
#[test]
#[ignore = "diagnostic tool; needs EMBER_FMT_MODEL and EMBER_FMT_FIXTURE"]
fn compare_any_file() {
    let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("set {k}")));
    let (model, fixture) = (var("EMBER_FMT_MODEL"), var("EMBER_FMT_FIXTURE"));
    let r = reference::read_reference(&fixture);
    let placement = match std::env::var("EMBER_FMT_BACKEND").as_deref() {
        #[cfg(feature = "wgpu")]
        Ok("wgpu") => common::wgpu_placement(),
        _ => ember_runtime::accel::choose(ember_runtime::accel::BackendChoice::Cpu),
    };
    let out = compare(&model, &r, &placement, SMOLLM2);
    eprintln!(
        "worst |Δlogit| {:.3} ({}); worst |Δlogsumexp| {:.3} ({}); top-1 compared at {}; {} failures",
        out.worst.value,
        out.worst.at,
        out.worst_lse.value,
        out.worst_lse.at,
        out.top1_checked,
        out.failures.len()
    );
    for f in out.failures.iter().take(20) {
        eprintln!("  {f}");
    }
}
