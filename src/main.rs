//! `ember`: the command line. Parse, validate, dispatch; nothing else.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_runtime::chat::{ChatMessage, ChatTemplate};
use ember_runtime::engine::{Engine, EngineConfig, Event, GenerateRequest};
use ember_runtime::gguf::{GgufFile, Value};
use ember_runtime::sample::SamplerConfig;

#[derive(FromArgs)]
/// ember: run quantized GGUF language models on this device, and measure them.
///
/// With no --model, commands use a tiny built-in model (written to the cache
/// directory on first use) so everything works without a download.
struct Cli {
    /// log more (also: RUST_LOG=debug)
    #[argh(switch, short = 'v')]
    verbose: bool,
    #[argh(subcommand)]
    cmd: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Run(RunArgs),
    Tokenize(TokenizeArgs),
    Inspect(InspectArgs),
    Bench(BenchArgs),
}

#[derive(FromArgs)]
/// Benchmark throughput like llama-bench: pp<n> prefills n tokens into an empty
/// context, tg<n> decodes n tokens one by one; tokens/s as mean ± sd over -r
/// repetitions (after one warm-up). Example: ember bench -m M --pp 128,512 --tg 128 -r 5
#[argh(subcommand, name = "bench")]
struct BenchArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// prompt lengths to test, comma separated (default 512)
    #[argh(option, default = "String::from(\"512\")")]
    pp: String,
    /// generation lengths to test, comma separated (default 128)
    #[argh(option, default = "String::from(\"128\")")]
    tg: String,
    /// repetitions (default 5)
    #[argh(option, short = 'r', default = "5")]
    reps: usize,
    /// worker threads (default: all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// prompt tokens per prefill pass (default 512, as llama-bench's -b)
    #[argh(option, default = "512")]
    batch: usize,
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Generate text: streams the completion to stdout and a summary (prompt
/// tokens, TTFT, prefill and decode speed, memory) to stderr.
#[argh(subcommand, name = "run")]
struct RunArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// the prompt text
    #[argh(option, short = 'p')]
    prompt: Option<String>,
    /// read the prompt from this file ('-' for stdin)
    #[argh(option, short = 'f')]
    file: Option<PathBuf>,
    /// wrap the prompt as a user message in the model's chat template
    #[argh(switch)]
    chat: bool,
    /// system message for --chat
    #[argh(option)]
    system: Option<String>,
    /// maximum new tokens (default 128)
    #[argh(option, short = 'n', default = "128")]
    n_predict: usize,
    /// worker threads (default: all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// context size in tokens (default: min(training context, 4096))
    #[argh(option, short = 'c')]
    ctx: Option<usize>,
    /// sampling temperature; 0 = greedy (default 0.8)
    #[argh(option, default = "0.8")]
    temp: f32,
    /// top-k, 0 = off (default 40)
    #[argh(option, default = "40")]
    top_k: usize,
    /// top-p nucleus, 1 = off (default 0.95)
    #[argh(option, default = "0.95")]
    top_p: f32,
    /// min-p, 0 = off (default 0.05)
    #[argh(option, default = "0.05")]
    min_p: f32,
    /// repetition penalty, 1 = off (default 1.0)
    #[argh(option, default = "1.0")]
    repeat_penalty: f32,
    /// tokens the repetition penalty looks back over (default 64)
    #[argh(option, default = "64")]
    repeat_last_n: usize,
    /// RNG seed (default 0)
    #[argh(option, default = "0")]
    seed: u64,
    /// stop when this string is generated (repeatable)
    #[argh(option)]
    stop: Vec<String>,
    /// do not add BOS even if the model asks for it
    #[argh(switch)]
    no_bos: bool,
    /// keep generating past end-of-generation tokens
    #[argh(switch)]
    ignore_eos: bool,
    /// print one JSON object (tokens, text, per-position top logits) instead of streaming
    #[argh(switch)]
    json: bool,
    /// with --json: how many top logits per position (default 8)
    #[argh(option, default = "8")]
    top_logprobs: usize,
    /// with --json: include every prompt position too
    #[argh(switch)]
    echo: bool,
    /// prompt tokens per prefill pass (default 512)
    #[argh(option, default = "512")]
    batch: usize,
}

#[derive(FromArgs)]
/// Tokenize text and print the token ids as a JSON array. Special-token text
/// such as <|im_start|> becomes the special token.
#[argh(subcommand, name = "tokenize")]
struct TokenizeArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// do not add BOS even if the model asks for it
    #[argh(switch)]
    no_bos: bool,
    /// treat special-token text as plain text
    #[argh(switch)]
    no_special: bool,
    /// the text
    #[argh(positional)]
    text: String,
}

#[derive(FromArgs)]
/// Show a GGUF file's metadata, tensors, quantization mix, parameter count and size.
#[argh(subcommand, name = "inspect")]
struct InspectArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(positional)]
    model: Option<PathBuf>,
    /// list every tensor
    #[argh(switch)]
    tensors: bool,
    /// machine-readable output
    #[argh(switch)]
    json: bool,
}

fn model_path(p: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = p {
        return Ok(p);
    }
    let dir = ember_runtime::embedded::default_dir();
    let (path, written) = ember_runtime::embedded::ensure_in(&dir)
        .with_context(|| format!("cannot write the embedded model under {}", dir.display()))?;
    eprintln!(
        "ember: no --model given; using the embedded default model '{}' ({}{})",
        ember_runtime::embedded::NAME,
        path.display(),
        if written { ", just written" } else { "" }
    );
    Ok(path)
}

fn open_engine(model: Option<PathBuf>, threads: Option<usize>, ctx: Option<usize>, batch: usize) -> Result<Engine> {
    let path = model_path(model)?;
    let threads = threads.unwrap_or_else(ember_runtime::sys::available_cores);
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let engine = ember_models::open(&path, |train_ctx| EngineConfig {
        threads,
        n_ctx: ctx.unwrap_or(train_ctx.min(4096)),
        prefill_chunk: batch.max(1),
    })?;
    let c = engine.model.config();
    log::info!(
        "loaded {} ({}, {} layers, d={}, vocab {}), {:.1} MB of weights mapped, ctx {}, {} threads, kernels {:?}",
        path.display(),
        c.arch,
        c.n_layers,
        c.n_embd,
        c.n_vocab,
        engine.model.weight_bytes() as f64 / 1e6,
        engine.cfg.n_ctx,
        threads,
        ember_runtime::quant::best_isa()
    );
    Ok(engine)
}

fn read_prompt(a: &RunArgs) -> Result<String> {
    match (&a.prompt, &a.file) {
        (Some(_), Some(_)) => bail!("give either -p/--prompt or -f/--file, not both"),
        (Some(p), None) => Ok(p.clone()),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading the prompt from stdin")?;
            Ok(s)
        }
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading the prompt from {}", f.display())),
        (None, None) => bail!("no prompt: give -p TEXT or -f FILE"),
    }
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let prompt = read_prompt(&a)?;
    let sampler = SamplerConfig {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: a.seed,
    };
    sampler.validate().map_err(|e| anyhow::anyhow!(e))?;
    let t_load = Instant::now();
    let engine = open_engine(a.model.clone(), a.threads, a.ctx, a.batch)?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let tok = &engine.tokenizer;
    let text = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(ChatMessage { role: "system".into(), content: s.clone() });
        }
        msgs.push(ChatMessage { role: "user".into(), content: prompt });
        if engine.file.metadata.get_str(ember_runtime::gguf::keys::CHAT_TEMPLATE).is_none() {
            log::warn!("model has no chat template; using ChatML");
        }
        let tpl = ChatTemplate::from_metadata_or_chatml(&engine.file.metadata)
            .context("the model's chat template does not parse")?;
        tpl.render(&msgs, true).context("rendering the chat template")?
    } else {
        prompt
    };
    // A chat template already writes BOS where the model wants it.
    let add_bos = !a.no_bos && !a.chat && tok.add_bos_default();
    let prompt_tokens = tok.encode(&text, add_bos, true).context("tokenizing the prompt")?;
    let n_ctx = engine.cfg.n_ctx;
    if prompt_tokens.len() >= n_ctx {
        bail!(
            "the prompt is {} tokens, longer than the context of {n_ctx} tokens (use a shorter prompt or a larger --ctx, up to the model's {})",
            prompt_tokens.len(),
            engine.model.config().n_ctx_train
        );
    }
    let req = GenerateRequest {
        prompt_tokens,
        max_tokens: a.n_predict,
        sampler,
        stop_strings: a.stop.clone(),
        top_logprobs: if a.json { a.top_logprobs } else { 0 },
        echo: a.echo,
        ignore_eos: a.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let (mut t_start, mut t_pf_end, mut t_first, mut t_last) = (None, None, None, None);
    let mut n_gen = 0usize;
    let mut io_err = None;
    let gen_result = engine.generate(&req, &mut |ev| match ev {
        Event::PrefillStart { at, .. } => t_start = Some(at),
        Event::PrefillEnd { at, .. } => t_pf_end = Some(at),
        Event::Token { at, text, .. } => {
            n_gen += 1;
            t_first.get_or_insert(at);
            t_last = Some(at);
            if !a.json && io_err.is_none() {
                io_err = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).err();
            }
        }
        Event::Finish { text, .. } => {
            if !a.json && io_err.is_none() {
                io_err = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).err();
            }
        }
    });
    let generation = gen_result?;
    if let Some(e) = io_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
    }
    if a.json {
        serde_json::to_writer(&mut stdout, &generation)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout).ok();
    }
    let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64() * 1e3,
        _ => f64::NAN,
    };
    let n_prompt = generation.prompt_tokens.len();
    let prefill_ms = ms(t_start, t_pf_end);
    let ttft_ms = ms(t_start, t_first);
    let decode_ms = ms(t_first, t_last);
    let mem = ember_runtime::sys::memory();
    eprintln!(
        "\nember: {n_prompt} prompt tokens, {n_gen} generated ({:?}) | load {load_ms:.0} ms | TTFT {ttft_ms:.1} ms | prefill {:.1} tok/s | decode {} | RSS peak {:.0} MiB",
        generation.finish_reason,
        n_prompt as f64 / (prefill_ms / 1e3),
        if n_gen >= 2 { format!("{:.1} tok/s", (n_gen - 1) as f64 / (decode_ms / 1e3)) } else { "n/a (<2 tokens)".into() },
        mem.rss_peak_bytes as f64 / (1 << 20) as f64,
    );
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let path = model_path(a.model)?;
    let file = GgufFile::open(&path)?;
    let tok = ember_runtime::tokenizer::Tokenizer::from_gguf(&file.metadata)
        .with_context(|| format!("{}: cannot build the tokenizer", path.display()))?;
    let ids = tok.encode(&a.text, !a.no_bos && tok.add_bos_default(), !a.no_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let path = model_path(a.model)?;
    let file = GgufFile::open(&path)?;
    let mut mix: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    let mut n_params = 0u64;
    for t in &file.tensors {
        let e = mix.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        e.2 += t.n_bytes;
        n_params += t.n_elements();
    }
    let tensor_bytes: u64 = file.tensors.iter().map(|t| t.n_bytes).sum();
    if a.json {
        let md: serde_json::Map<String, serde_json::Value> = file
            .metadata
            .iter()
            .map(|(k, v)| {
                let j = match v {
                    Value::Array(arr) => serde_json::json!({"array_len": arr.len(), "type": v.type_name()}),
                    Value::String(s) => serde_json::Value::String(s.clone()),
                    Value::Bool(b) => serde_json::Value::Bool(*b),
                    other => other.as_f64().map(|f| serde_json::json!(f)).unwrap_or(serde_json::Value::Null),
                };
                (k.to_string(), j)
            })
            .collect();
        let tensors: Vec<_> = file
            .tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "dims": t.dims, "type": t.ty.name(), "bytes": t.n_bytes}))
            .collect();
        let quant: serde_json::Map<String, serde_json::Value> = mix
            .iter()
            .map(|(k, (n, el, b))| (k.to_string(), serde_json::json!({"tensors": n, "elements": el, "bytes": b})))
            .collect();
        let out = serde_json::json!({
            "path": path, "version": file.version, "alignment": file.alignment,
            "file_bytes": file.file_len(), "tensor_bytes": tensor_bytes, "n_params": n_params,
            "n_tensors": file.tensors.len(), "quant_mix": quant, "metadata": md, "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("file:       {}", path.display());
    println!("gguf:       v{}, alignment {}, {} metadata keys, {} tensors", file.version, file.alignment, file.metadata.len(), file.tensors.len());
    println!("size:       {:.2} MB file, {:.2} MB tensor data", file.file_len() as f64 / 1e6, tensor_bytes as f64 / 1e6);
    println!("parameters: {n_params} ({:.1} M), {:.3} bits/weight", n_params as f64 / 1e6, tensor_bytes as f64 * 8.0 / n_params as f64);
    println!("quant mix:");
    for (k, (n, el, b)) in &mix {
        println!("  {k:<6} {n:>4} tensors {:>12} weights {:>10.2} MB", el, *b as f64 / 1e6);
    }
    println!("metadata:");
    for (k, v) in file.metadata.iter() {
        println!("  {k} = {v}");
    }
    if a.tensors {
        println!("tensors:");
        for t in &file.tensors {
            println!("  {:<40} {:<6} {:?} {} bytes", t.name, t.ty.name(), t.dims, t.n_bytes);
        }
    } else {
        println!("({} tensors; --tensors lists them)", file.tensors.len());
    }
    Ok(())
}

fn parse_list(flag: &str, s: &str) -> Result<Vec<usize>> {
    if s.trim().is_empty() || s.trim() == "0" {
        return Ok(vec![]);
    }
    s.split(',')
        .map(|x| x.trim().parse::<usize>().with_context(|| format!("--{flag}: '{x}' is not a token count")))
        .collect()
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    use ember_bench::llamabench::{Test, run_test};
    let pp = parse_list("pp", &a.pp)?;
    let tg = parse_list("tg", &a.tg)?;
    if a.reps == 0 {
        bail!("-r must be at least 1");
    }
    let longest = pp.iter().chain(&tg).copied().max().unwrap_or(0);
    if longest == 0 {
        bail!("nothing to run: give --pp and/or --tg");
    }
    let engine = open_engine(a.model.clone(), a.threads, Some(longest.max(16)), a.batch)?;
    let c = engine.model.config();
    if longest > c.n_ctx_train {
        bail!("--pp/--tg of {longest} tokens exceeds the model's training context of {}", c.n_ctx_train);
    }
    let tests: Vec<(Test, usize)> = pp.iter().map(|&n| (Test::Pp, n)).chain(tg.iter().map(|&n| (Test::Tg, n))).collect();
    let bar = indicatif::ProgressBar::new((tests.len() * a.reps) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} bench [{bar:30}] {pos}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let mut results = vec![];
    for (kind, n) in tests {
        bar.set_message(format!("{}{n}", if kind == Test::Pp { "pp" } else { "tg" }));
        results.push(run_test(&engine, kind, n, a.reps, || bar.inc(1))?);
    }
    bar.finish_and_clear();
    let name = engine.file.metadata.get_str("general.name").unwrap_or("?").to_string();
    let size_mib = engine.model.weight_bytes() as f64 / (1 << 20) as f64;
    let threads = engine.cfg.threads;
    if a.json {
        let out = serde_json::json!({
            "model": name, "model_path": engine.file.path(), "weights_bytes": engine.model.weight_bytes(),
            "threads": threads, "backend": "cpu", "isa": format!("{:?}", ember_runtime::quant::best_isa()),
            "results": results, "rss_peak_bytes": ember_runtime::sys::memory().rss_peak_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("| model | size | backend | threads | test | t/s |");
        println!("| --- | ---: | --- | ---: | ---: | ---: |");
        for r in &results {
            println!("| {name} | {size_mib:.2} MiB | CPU ({:?}) | {threads} | {} | {:.2} ± {:.2} |", ember_runtime::quant::best_isa(), r.test, r.mean_tps, r.sd_tps);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    let level = if cli.verbose { "debug" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_timestamp(None).init();
    let r = match cli.cmd {
        Command::Run(a) => cmd_run(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Bench(a) => cmd_bench(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
