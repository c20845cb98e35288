//! `ember synth`: a GGUF with a real model's shapes and made-up weights.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_runtime::gguf::GgufFile;
use ember_runtime::gguf::synth::synth_like;

#[derive(FromArgs)]
/// Write a synthetic GGUF: the metadata (tokenizer included), tensor names, shapes and block
/// types of --like, with seeded made-up weights (one random row per tensor, repeated, so the
/// file compresses to almost nothing with xz). For measuring speed where the real file cannot
/// go, e.g. a GPU machine that takes at most 64 MiB: speed does not depend on the weights'
/// values, llama.cpp reads the same file, and runs must use --ignore-eos (presets do). The
/// output text is meaningless; the file says it is synthetic (ember.synthetic).
#[argh(subcommand, name = "synth")]
pub struct SynthArgs {
    /// the GGUF whose shapes, types and metadata to copy
    #[argh(option)]
    like: PathBuf,
    /// seed of the made-up weights (default 0)
    #[argh(option, default = "0")]
    seed: u64,
    /// overwrite OUT if it exists
    #[argh(switch)]
    force: bool,
    /// where to write the synthetic GGUF
    #[argh(positional)]
    out: PathBuf,
}

pub fn run(a: SynthArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        bail!("{} exists; pass --force to overwrite it", a.out.display());
    }
    let src = GgufFile::open(&a.like).with_context(|| format!("opening {}", a.like.display()))?;
    let w =
        synth_like(&src, a.seed).with_context(|| format!("synthesising {}", a.like.display()))?;
    let bytes = w.to_bytes();
    // Write beside the target, then rename: an interrupted run leaves no half file at OUT.
    let tmp = a.out.with_extension("gguf.partial");
    if let Err(e) = std::fs::write(&tmp, &bytes) {
        // A full disk leaves no half-written partial file behind either.
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "ember synth: wrote {} ({:.1} MiB, {} tensors like {}, seed {})",
        a.out.display(),
        bytes.len() as f64 / (1 << 20) as f64,
        src.tensors.len(),
        a.like.display(),
        a.seed
    );
    Ok(())
}
