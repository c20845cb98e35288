//! The checks that run a model: `mmap` (weights read in place) and `golden.*`.

use std::path::Path;

use ember_runtime::embedded;
use ember_runtime::engine::{Engine, EngineConfig, GenerateRequest};
use ember_runtime::quant;
use ember_runtime::sample::SamplerConfig;

use super::report::Check;
use super::{GOLDEN, SelftestError, mib};

pub(super) fn check_golden(engine: &Engine, out: &mut Vec<Check>) {
    for g in &GOLDEN {
        let want_text = engine.tokenizer.decode(g.continuation);
        let c = match embedded::run_golden(engine, g) {
            Err(e) => Check::new(
                g.name,
                false,
                None,
                "logit",
                format!("prompt {:?}: running the model failed: {e}", g.prompt),
            ),
            Ok(r) => {
                let same = r
                    .generated
                    .iter()
                    .zip(g.continuation)
                    .take_while(|(a, b)| a == b)
                    .count();
                let pass = r.pass(g);
                let tokens = if r.generated == g.continuation {
                    format!(
                        "prompt {:?} -> {:?} (exact greedy tokens)",
                        g.prompt, r.text
                    )
                } else {
                    format!(
                        "prompt {:?}: expected {want_text:?} {:?}, got {:?} {:?} (first {same} match)",
                        g.prompt, g.continuation, r.text, r.generated
                    )
                };
                let mut msg = format!(
                    "{tokens}; {} ({})",
                    r.diff.describe(),
                    quant::best_isa().name()
                );
                if !pass {
                    msg = format!(
                        "the embedded model's decoder disagrees with its golden output: {msg}"
                    );
                }
                Check::new(g.name, pass, Some(r.diff.worst as f64), "logit", msg)
            }
        };
        out.push(c);
    }
}

/// Resident bytes of the mappings of `path` in /proc/self/smaps: (Rss, Anonymous), `None` when
/// smaps is unreadable or the file is not mapped.
fn smaps_of(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let want = std::fs::canonicalize(path).ok()?;
    let want = want.to_str()?;
    let (mut inside, mut found) = (false, false);
    let (mut rss, mut anon) = (0u64, 0u64);
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_header = first.contains('-')
            && first
                .split('-')
                .all(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
        if is_header {
            inside = line.trim_end().ends_with(want);
            found |= inside;
            continue;
        }
        if !inside {
            continue;
        }
        let kb = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        if line.starts_with("Rss:") {
            rss += kb();
        } else if line.starts_with("Anonymous:") {
            anon += kb();
        }
    }
    found.then_some((rss, anon))
}

/// Opens the model, runs it, and checks the weights are read in place from the mapping.
pub(super) fn open_and_check_mmap(
    path: &Path,
    threads: usize,
    out: &mut Vec<Check>,
) -> Result<Engine, SelftestError> {
    let before = ember_runtime::sys::memory();
    let engine = ember_models::open(path, |train| EngineConfig {
        threads,
        n_ctx: train.min(256),
        prefill_chunk: 64,
    })
    .map_err(|e| SelftestError::Open(format!("{}: {e}", path.display())))?;
    // Run every weight once: a short prompt and a few decode steps.
    let n_vocab = engine.model.config().n_vocab as u32;
    let req = GenerateRequest {
        prompt_tokens: (0..8u32).map(|i| (i * 37 + 11) % n_vocab).collect(),
        max_tokens: 4,
        sampler: SamplerConfig::greedy(),
        stop_strings: vec![],
        top_logprobs: 0,
        echo: false,
        ignore_eos: true,
    };
    let ran = engine.generate(&req, &mut |_| {});
    let after = ember_runtime::sys::memory();
    let weights = engine.model.weight_bytes() as f64;
    let anon_growth = after.rss_anon_bytes as f64 - before.rss_anon_bytes as f64;
    let file_growth = after.rss_file_bytes as f64 - before.rss_file_bytes as f64;
    let smaps = smaps_of(path);
    let name = "mmap";
    let c = if let Err(e) = ran {
        Check::new(
            name,
            false,
            None,
            "MiB",
            format!("running the model failed: {e}"),
        )
    } else if after.rss_bytes == 0 {
        Check::new(
            name,
            true,
            None,
            "MiB",
            "skipped: /proc/self/status is not available on this OS",
        )
    } else {
        // The mapping's own pages: resident, and none of them anonymous (copy-on-write) copies.
        let (map_ok, map_msg) = match smaps {
            Some((rss, anon)) => (
                anon == 0 && rss > 0,
                format!(
                    "; the file's mapping: {:.2} MiB resident, {:.2} MiB anonymous",
                    mib(rss as f64),
                    mib(anon as f64)
                ),
            ),
            None => (
                true,
                "; /proc/self/smaps has no mapping of the file".to_string(),
            ),
        };
        // A second copy of the weights would grow anonymous memory by about their size; KV cache
        // and activations for 12 positions are far below half of any real model. Models under
        // 64 MiB are too small for that to tell, so the mapping's pages decide for them.
        let big = weights >= 64.0 * (1u64 << 20) as f64;
        let growth_ok = !big || anon_growth < 0.5 * weights;
        let pass = map_ok && growth_ok;
        let mut msg = format!(
            "weights {:.2} MiB; after load + run: RssFile {:+.2} MiB (now {:.1}), RssAnon {:+.2} MiB (now {:.1}){map_msg}",
            mib(weights),
            mib(file_growth),
            mib(after.rss_file_bytes as f64),
            mib(anon_growth),
            mib(after.rss_anon_bytes as f64),
        );
        if !big {
            msg += "; model < 64 MiB: judged by the mapping's pages";
        }
        if !pass {
            msg = format!("the weights look copied out of the mapping: {msg}");
        }
        Check::new(name, pass, Some(mib(anon_growth)), "MiB", msg)
    };
    out.push(c);
    Ok(engine)
}
