//! `ember eval`: quality from the model's own logits. `ppl` is `llama-perplexity`'s
//! perplexity; `kld` the KL divergence against a higher-precision base of the same model, as
//! `llama-perplexity --kl-divergence` reports it. Results go to the store next to the latency
//! runs of the same model file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_bench::eval::kld::{BaseHeader, BaseLogits, Kld, kl_divergence};
use ember_bench::eval::ppl::{Perplexity, perplexity};
use ember_bench::eval::{Chunks, vocab_sha256};
use ember_bench::provenance::sha256_hex;
use ember_bench::store::{QualityRun, QualityToken, now_rfc3339};
use ember_runtime::engine::Engine;

use crate::engine::{EngineOpts, open_engine};

#[derive(FromArgs)]
/// Measure a model's quality from its logits on a text: perplexity (ppl) or
/// KL divergence against a higher-precision base of the same model (kld).
/// Results are stored with the latency runs of the same model file.
#[argh(subcommand, name = "eval")]
pub struct EvalArgs {
    #[argh(subcommand)]
    cmd: EvalCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum EvalCommand {
    Ppl(PplArgs),
    Kld(KldArgs),
}

#[derive(FromArgs)]
/// Perplexity by llama-perplexity's method: the text is cut into chunks of
/// --ctx tokens, each run from a fresh context (BOS first when the model adds
/// one) and scored on its second half. Ends with llama-perplexity's own line,
/// "Final estimate: PPL = X +/- Y".
#[argh(subcommand, name = "ppl")]
pub struct PplArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// the text to score ('-' for stdin)
    #[argh(option, short = 'f')]
    file: PathBuf,
    /// tokens per chunk (default 512, as llama-perplexity is usually run)
    #[argh(option, short = 'c', default = "512")]
    ctx: usize,
    /// score at most this many chunks (default: all the text holds)
    #[argh(option)]
    chunks: Option<usize>,
    /// prompt tokens per forward pass (default 512)
    #[argh(option, short = 'b', default = "512")]
    batch: usize,
    /// where to run: auto, cpu, wgpu, vulkan, metal, cuda (default auto)
    #[argh(option)]
    backend: Option<String>,
    /// worker threads (default: all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// read the weights into memory instead of mapping the file
    #[argh(switch)]
    no_mmap: bool,
    /// print one JSON object instead of text
    #[argh(switch)]
    json: bool,
    /// the results store (default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// do not store the result
    #[argh(switch)]
    no_db: bool,
}

#[derive(FromArgs)]
/// KL divergence of a model against a base (a higher-precision file of the
/// same model), per scored token, with llama-perplexity --kl-divergence's
/// statistics: mean, percentiles and max KLD, Δp, "same top p", and the two
/// perplexities. --base is a GGUF (run here; --save-base keeps its
/// distributions), a file written by --save-base, or one written by
/// llama-perplexity --kl-divergence-base (no base model needed).
#[argh(subcommand, name = "kld")]
pub struct KldArgs {
    /// the base: a GGUF file of the same model at higher precision, a --save-base file, or a llama-perplexity --kl-divergence-base file
    #[argh(option)]
    base: PathBuf,
    /// GGUF model file to score against the base
    #[argh(option, short = 'm')]
    model: PathBuf,
    /// the text ('-' for stdin); required with a GGUF base, checked against a saved one
    #[argh(option, short = 'f')]
    file: Option<PathBuf>,
    /// write the base's distributions to this file (a GGUF base only)
    #[argh(option)]
    save_base: Option<PathBuf>,
    /// base tokens kept per position, the rest summed as one bin; 0 = all (default 4096)
    #[argh(option, default = "4096")]
    top_k: usize,
    /// tokens per chunk (default 512; a saved base keeps its own)
    #[argh(option, short = 'c', default = "512")]
    ctx: usize,
    /// score at most this many chunks (default: all the text holds)
    #[argh(option)]
    chunks: Option<usize>,
    /// prompt tokens per forward pass (default 512)
    #[argh(option, short = 'b', default = "512")]
    batch: usize,
    /// where to run both models: auto, cpu, wgpu, vulkan, metal, cuda (default auto)
    #[argh(option)]
    backend: Option<String>,
    /// worker threads (default: all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// print one JSON object instead of text
    #[argh(switch)]
    json: bool,
    /// the results store (default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// do not store the result
    #[argh(switch)]
    no_db: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    match a.cmd {
        EvalCommand::Ppl(a) => run_ppl(a),
        EvalCommand::Kld(a) => run_kld(a),
    }
}

/// The text's bytes and a name for records ('-': stdin).
fn read_text(path: &Path) -> Result<(String, String)> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the text from stdin")?;
        return Ok((s, "stdin".into()));
    }
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the text {}", path.display()))?;
    Ok((s, file_name(path)))
}

fn open(
    model: Option<PathBuf>,
    backend: &Option<String>,
    threads: Option<usize>,
    ctx: usize,
    batch: usize,
    no_mmap: bool,
) -> Result<Engine> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let engine = open_engine(
        &EngineOpts {
            model,
            backend: backend.clone(),
            threads,
            ctx: Some(ctx),
            batch,
            no_mmap,
        },
        None,
    )?;
    if engine.cfg.n_ctx < ctx {
        bail!(
            "--ctx {ctx} is more than the model's training context ({})",
            engine.cfg.n_ctx
        );
    }
    Ok(engine)
}

/// The text tokenized as llama-perplexity does (BOS when the model adds one; special-token
/// text stays text), cut into chunks.
fn chunks_for(engine: &Engine, text: &str, ctx: usize, max: Option<usize>) -> Result<Chunks> {
    let tok = &engine.tokenizer;
    let bos = tok.bos_id().filter(|_| tok.add_bos_default());
    let tokens = tok.encode(text, bos.is_some(), false)?;
    Ok(Chunks::new(tokens, ctx, max, bos)?)
}

fn progress(n: usize, what: &str) -> indicatif::ProgressBar {
    super::progress_bar(
        n,
        &format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} chunks, {{elapsed}} elapsed, ETA {{eta}} {{msg}}"
        ),
    )
}

fn store_quality(no_db: bool, db: Option<&PathBuf>, engine: &Engine, q: &QualityRun) -> Result<()> {
    let Some(mut store) = super::open_store(no_db, db)? else {
        return Ok(());
    };
    let p = ember_bench::provenance::for_engine(engine, None);
    store.save_quality(&p, q)?;
    eprintln!("ember: stored in {}", store.path().display());
    Ok(())
}

fn run_ppl(a: PplArgs) -> Result<()> {
    let (text, text_name) = read_text(&a.file)?;
    let engine = open(a.model, &a.backend, a.threads, a.ctx, a.batch, a.no_mmap)?;
    let chunks = chunks_for(&engine, &text, a.ctx, a.chunks)?;
    eprintln!(
        "ember: scoring {} chunks of {} tokens ({} scored, of {} in the text)",
        chunks.n_chunks,
        chunks.ctx,
        chunks.scored(),
        chunks.text_tokens
    );
    let started = now_rfc3339();
    let t0 = Instant::now();
    let bar = progress(chunks.n_chunks, "ppl");
    let mut line = String::new();
    let r: Perplexity = perplexity(&engine, &chunks, a.batch, &mut |i, ppl| {
        bar.inc(1);
        bar.set_message(format!("PPL {ppl:.4}"));
        line.push_str(&format!("[{}]{ppl:.4},", i + 1));
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let q = QualityRun {
        kind: "ppl".into(),
        started_at: started,
        text_sha256: sha256_hex(text.as_bytes()),
        text_name,
        ctx: r.ctx,
        chunks: r.chunks,
        tokens_scored: r.tokens_scored,
        settings: serde_json::json!({"batch": a.batch, "threads": engine.cfg.threads}),
        ppl: r.ppl,
        ppl_stderr: r.ppl_stderr,
        summary: serde_json::to_value(&r)?,
        tokens: r
            .token_nll
            .iter()
            .map(|&nll| QualityToken {
                nll,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = serde_json::json!(secs);
        v["text"] = serde_json::json!(q.text_name);
        v["text_sha256"] = serde_json::json!(q.text_sha256);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{line}");
        println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
    }
    eprintln!(
        "ember: {} tokens scored in {secs:.1} s ({:.1} tokens/s)",
        r.tokens_scored,
        (r.chunks * (r.ctx - 1)) as f64 / secs
    );
    store_quality(a.no_db, a.db.as_ref(), &engine, &q)
}

fn run_kld(a: KldArgs) -> Result<()> {
    let text = a.file.as_deref().map(read_text).transpose()?;
    let magic = base_magic(&a.base)?;
    let base_is_gguf = magic.starts_with(b"GGUF");
    let started = now_rfc3339();
    let t0 = Instant::now();
    let (base, text_sha256, text_name) = if base_is_gguf {
        let Some((text, text_name)) = &text else {
            bail!("-f TEXT is required with a GGUF --base (the base's logits are computed on it)");
        };
        let engine = open(
            Some(a.base.clone()),
            &a.backend,
            a.threads,
            a.ctx,
            a.batch,
            false,
        )?;
        let chunks = chunks_for(&engine, text, a.ctx, a.chunks)?;
        let header = BaseHeader {
            model: file_name(&a.base),
            model_sha256: ember_bench::provenance::sha256_file(&a.base)
                .with_context(|| format!("hashing {}", a.base.display()))?,
            vocab_sha256: vocab_sha256(&engine.tokenizer),
            n_vocab: engine.model.config().n_vocab,
            ctx: chunks.ctx,
            n_chunks: chunks.n_chunks,
            top_k: a.top_k,
            bos: chunks.bos,
            text_tokens: chunks.text_tokens,
        };
        eprintln!(
            "ember: base {}: {} chunks of {} tokens ({} scored)",
            header.model,
            chunks.n_chunks,
            chunks.ctx,
            chunks.scored()
        );
        // Refuse another model family now, before the base's logits are computed.
        let (n_tokens, vocab) = model_vocab(&a.model)?;
        if vocab != header.vocab_sha256 {
            bail!(
                "the base ({}, {} tokens) and the model ({}, {n_tokens} tokens) have different vocabularies: KL divergence needs the same model family",
                header.model,
                engine.tokenizer.vocab_size(),
                file_name(&a.model)
            );
        }
        let bar = progress(chunks.n_chunks, "base");
        let base = BaseLogits::compute(&engine, &chunks, a.top_k, a.batch, header, &mut |_| {
            bar.inc(1)
        })?;
        bar.finish_and_clear();
        if let Some(path) = &a.save_base {
            base.save(path)?;
            eprintln!(
                "ember: base distributions saved to {} (top {} per position)",
                path.display(),
                base.header.top_k
            );
        }
        (base, sha256_hex(text.as_bytes()), text_name.clone())
    } else {
        if a.save_base.is_some() {
            bail!(
                "--save-base needs a GGUF --base: {} is a saved base already",
                a.base.display()
            );
        }
        // `_logits_`: written by llama-perplexity --kl-divergence-base.
        let base = if magic.starts_with(b"_logits_") {
            BaseLogits::load_llama_cpp(&a.base, a.top_k)?
        } else {
            BaseLogits::load(&a.base)?
        };
        eprintln!(
            "ember: saved base {} ({}): {} chunks of {} tokens, top {}",
            a.base.display(),
            base.header.model,
            base.header.n_chunks,
            base.header.ctx,
            base.header.top_k
        );
        let (text_sha, name) = match &text {
            Some((t, name)) => (sha256_hex(t.as_bytes()), name.clone()),
            None => {
                let bytes: Vec<u8> = base.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
                (sha256_hex(&bytes), "saved base tokens".into())
            }
        };
        (base, text_sha, name)
    };
    let mut base = base;
    let ctx = base.header.ctx;
    let engine = open(
        Some(a.model.clone()),
        &a.backend,
        a.threads,
        ctx,
        a.batch,
        false,
    )?;
    base.check_model(
        engine.model.config().n_vocab,
        &vocab_sha256(&engine.tokenizer),
    )?;
    if base.header.model_sha256.is_empty() {
        // A llama.cpp base file: each chunk starts with BOS when the model adds one, as
        // llama-perplexity runs it.
        let tok = &engine.tokenizer;
        base.header.bos = tok.bos_id().filter(|_| tok.add_bos_default());
    }
    if !base_is_gguf && let Some((t, _)) = &text {
        // The model must read the tokens the base read: the same text, cut the same way.
        let mine = chunks_for(&engine, t, ctx, Some(base.header.n_chunks))?;
        if mine.tokens != base.tokens {
            bail!(
                "the text does not tokenize to the tokens the base was computed on (another text, or another --ctx)"
            );
        }
    }
    let chunks = base.header.n_chunks;
    let bar = progress(chunks, "kld");
    let r: Kld = kl_divergence(&engine, &base, a.batch, &mut |_, mean| {
        bar.inc(1);
        bar.set_message(format!("mean KLD {mean:.6}"));
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let q = QualityRun {
        kind: "kld".into(),
        started_at: started,
        // A llama.cpp base file names no model.
        base_sha256: Some(r.base_sha256.clone()).filter(|s| !s.is_empty()),
        base_path: Some(r.base_model.clone()),
        text_sha256,
        text_name,
        ctx: r.ctx,
        chunks: r.chunks,
        tokens_scored: r.tokens_scored,
        settings: serde_json::json!({"batch": a.batch, "threads": engine.cfg.threads, "top_k": r.top_k}),
        ppl: r.ppl.value,
        ppl_stderr: r.ppl.stderr,
        kld_mean: Some(r.kld_mean.value),
        kld_p99: Some(r.kld_p99),
        same_top: Some(r.same_top.value),
        ppl_base: Some(r.ppl_base.value),
        summary: serde_json::to_value(&r)?,
        tokens: r
            .per_token
            .iter()
            .map(|t| QualityToken {
                nll: t.nll,
                nll_base: Some(t.nll_base),
                kld: Some(t.kld),
                same_top: Some(t.same_top),
            })
            .collect(),
        ..Default::default()
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = serde_json::json!(secs);
        v["text"] = serde_json::json!(q.text_name);
        v["text_sha256"] = serde_json::json!(q.text_sha256);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_kld(&r);
    }
    store_quality(a.no_db, a.db.as_ref(), &engine, &q)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
}

/// The vocabulary size and [`vocab_sha256`] of a model file, from its metadata alone.
fn model_vocab(path: &Path) -> Result<(usize, String)> {
    let file = ember_runtime::gguf::GgufFile::open(path)
        .with_context(|| format!("cannot open the model {}", path.display()))?;
    let tok = ember_runtime::tokenizer::Tokenizer::from_gguf(&file.metadata)
        .with_context(|| format!("{}: cannot build the tokenizer", path.display()))?;
    Ok((tok.vocab_size(), vocab_sha256(&tok)))
}

/// The first 8 bytes of `--base` (fewer for a shorter file), which say what kind it is.
fn base_magic(p: &Path) -> Result<Vec<u8>> {
    let f =
        std::fs::File::open(p).with_context(|| format!("cannot open --base {}", p.display()))?;
    let mut magic = Vec::with_capacity(8);
    f.take(8)
        .read_to_end(&mut magic)
        .with_context(|| format!("cannot read --base {}", p.display()))?;
    Ok(magic)
}

/// llama-perplexity --kl-divergence's summary, line for line where ember has the figure.
fn print_kld(r: &Kld) {
    println!("====== Perplexity statistics ======");
    println!(
        "Mean PPL(Q)                   : {:10.6} ± {:10.6}",
        r.ppl.value, r.ppl.stderr
    );
    println!(
        "Mean PPL(base)                : {:10.6} ± {:10.6}",
        r.ppl_base.value, r.ppl_base.stderr
    );
    println!(
        "Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%",
        100.0 * r.ln_ppl_correlation
    );
    println!(
        "Mean ln(PPL(Q)/PPL(base))     : {:10.6} ± {:10.6}",
        r.ln_ppl_ratio.value, r.ln_ppl_ratio.stderr
    );
    println!(
        "Mean PPL(Q)/PPL(base)         : {:10.6} ± {:10.6}",
        r.ppl_ratio.value, r.ppl_ratio.stderr
    );
    println!(
        "Mean PPL(Q)-PPL(base)         : {:10.6} ± {:10.6}",
        r.ppl_diff.value, r.ppl_diff.stderr
    );
    println!();
    println!("====== KL divergence statistics ======");
    println!(
        "Mean    KLD: {:10.6} ± {:10.6}",
        r.kld_mean.value, r.kld_mean.stderr
    );
    for (label, v) in [
        ("Maximum KLD", r.kld_max),
        ("99.9%   KLD", r.kld_p99_9),
        ("99.0%   KLD", r.kld_p99),
        ("95.0%   KLD", r.kld_p95),
        ("90.0%   KLD", r.kld_p90),
        ("Median  KLD", r.kld_median),
        ("10.0%   KLD", r.kld_p10),
        (" 5.0%   KLD", r.kld_p5),
        (" 1.0%   KLD", r.kld_p1),
        (" 0.1%   KLD", r.kld_p0_1),
        ("Minimum KLD", r.kld_min),
    ] {
        println!("{label}: {v:10.6}");
    }
    println!();
    println!("====== Token probability statistics ======");
    println!(
        "Mean    Δp: {:6.3} ± {:5.3} %",
        100.0 * r.dp_mean.value,
        100.0 * r.dp_mean.stderr
    );
    for (label, v) in [
        ("Maximum Δp", r.dp_max),
        ("99.0%   Δp", r.dp_p99),
        ("95.0%   Δp", r.dp_p95),
        ("Median  Δp", r.dp_median),
        (" 5.0%   Δp", r.dp_p5),
        (" 1.0%   Δp", r.dp_p1),
        ("Minimum Δp", r.dp_min),
    ] {
        println!("{label}: {:6.3}%", 100.0 * v);
    }
    println!(
        "RMS Δp    : {:6.3} ± {:5.3} %",
        100.0 * r.dp_rms.value,
        100.0 * r.dp_rms.stderr
    );
    println!(
        "Same top p: {:6.3} ± {:5.3} %",
        100.0 * r.same_top.value,
        100.0 * r.same_top.stderr
    );
    println!();
    println!(
        "{} tokens scored in {} chunks of {} against {} (its top {} tokens per position; mean mass outside them {:.2e})",
        r.tokens_scored, r.chunks, r.ctx, r.base_model, r.top_k, r.base_rest_mass
    );
}
