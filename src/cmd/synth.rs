//! `ember synth`: a GGUF with a real model's shapes and made-up weights (`--like`), or a tiny
//! random-weight model of an architecture no real file here has (`--arch`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_runtime::gguf::GgufFile;
use ember_runtime::gguf::synth::{TinyArch, synth_like, tiny_with};

#[derive(FromArgs)]
/// Write a synthetic GGUF. With --like: the metadata (tokenizer included), tensor names, shapes
/// and block types of that model, with seeded made-up weights (one random row per tensor,
/// repeated, so the file compresses to almost nothing with xz). For measuring speed where the
/// real file cannot go, e.g. a GPU machine that takes at most 64 MiB: speed does not depend on
/// the weights' values, llama.cpp reads the same file, and runs must use --ignore-eos (presets
/// do). The output text is meaningless; the file says it is synthetic (ember.synthetic).
/// With --arch (qwen3, phi3, llama-rope-freqs) and --tokenizer-from: a tiny random-weight model
/// of that architecture (4 layers, 256 wide) laid out as llama.cpp reads it, with the tokenizer
/// of --tokenizer-from: the files tests/arch_reference.rs compares with llama.cpp's logits.
#[argh(subcommand, name = "synth")]
pub struct SynthArgs {
    /// the GGUF whose shapes, types and metadata to copy
    #[argh(option)]
    like: Option<PathBuf>,
    /// a tiny model of this architecture: qwen3, phi3 or llama-rope-freqs
    #[argh(option)]
    arch: Option<String>,
    /// with --arch: the GGUF whose tokenizer (every tokenizer.* key) to copy
    #[argh(option)]
    tokenizer_from: Option<PathBuf>,
    /// with --arch: leave out this tensor or metadata key, all else identical (repeatable; for
    /// control files, e.g. --without rope_freqs.weight)
    #[argh(option)]
    without: Vec<String>,
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
    let (w, what) = match (&a.like, &a.arch) {
        (Some(like), None) => {
            if a.tokenizer_from.is_some() || !a.without.is_empty() {
                bail!("--tokenizer-from and --without go with --arch, not --like");
            }
            let src =
                GgufFile::open(like).with_context(|| format!("opening {}", like.display()))?;
            let w = synth_like(&src, a.seed)
                .with_context(|| format!("synthesising {}", like.display()))?;
            (
                w,
                format!("{} tensors like {}", src.tensors.len(), like.display()),
            )
        }
        (None, Some(name)) => {
            let arch = TinyArch::from_name(name).with_context(|| {
                let names: Vec<&str> = TinyArch::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "unknown --arch {name}: ember synth builds {}",
                    names.join(", ")
                )
            })?;
            let Some(tok) = &a.tokenizer_from else {
                bail!("--arch needs --tokenizer-from MODEL.gguf (the tokenizer to copy)");
            };
            let src = GgufFile::open(tok).with_context(|| format!("opening {}", tok.display()))?;
            let without: Vec<&str> = a.without.iter().map(String::as_str).collect();
            let w = tiny_with(arch, &src, a.seed, &without)
                .with_context(|| format!("building the tiny {name} model"))?;
            let mut what = format!("a tiny {name} model, tokenizer of {}", tok.display());
            if !without.is_empty() {
                what += &format!(", without {}", without.join(", "));
            }
            (w, what)
        }
        _ => bail!("pass either --like MODEL.gguf or --arch ARCH --tokenizer-from MODEL.gguf"),
    };
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
        "ember synth: wrote {} ({:.1} MiB, {what}, seed {})",
        a.out.display(),
        bytes.len() as f64 / (1 << 20) as f64,
        a.seed
    );
    Ok(())
}
