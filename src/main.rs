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
// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    Run(RunArgs),
    Tokenize(TokenizeArgs),
    Inspect(InspectArgs),
    Bench(BenchArgs),
    Compare(CompareArgs),
    Report(ReportArgs),
    Export(ExportArgs),
    Selftest(SelftestArgs),
}

#[derive(FromArgs)]
/// Benchmark what users feel: run a workload (preset, JSONL or ShareGPT) under a
/// load (sync, --concurrency, --rate, sweep) and report TTFT, ITL, TPOT, e2e,
/// throughput, memory and SLO verdicts (definitions: docs/METRICS.md).
/// With no flags: the `chat` preset on the embedded model, sync.
/// llama-bench mode: --pp/--tg/-r print pp<n>/tg<n> tokens/s as mean ± sd,
/// e.g. ember bench -m M --pp 128,512 --tg 128 -r 5
#[argh(subcommand, name = "bench")]
struct BenchArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// llama-bench mode: prompt lengths to test, comma separated (default 512)
    #[argh(option)]
    pp: Option<String>,
    /// llama-bench mode: generation lengths to test, comma separated (default 128)
    #[argh(option)]
    tg: Option<String>,
    /// llama-bench mode: repetitions (default 5)
    #[argh(option, short = 'r')]
    reps: Option<usize>,
    /// where to run: auto (a hardware GPU if wgpu finds one, else the CPU), cpu, wgpu (any adapter, software ones too), vulkan, metal (default auto)
    #[argh(option)]
    backend: Option<String>,
    /// worker threads (default: all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// prompt tokens per prefill pass (default 512, as llama-bench's -b)
    #[argh(option, default = "512")]
    batch: usize,
    /// read the weights into memory (on huge pages where the kernel grants them) instead of
    /// mapping the file: faster decode on the CPU, at the cost of a copy at load and RAM the
    /// kernel cannot reclaim (llama.cpp's --no-mmap)
    #[argh(switch)]
    no_mmap: bool,
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
    /// workload preset: chat, rag, creative, shared-prefix (default chat)
    #[argh(option, short = 'w')]
    workload: Option<String>,
    /// JSONL dataset: one request per line (prompt or messages; max_tokens, expected, tags, stop, raw, repeat); 'eval' = the shipped evaluation set
    #[argh(option)]
    dataset: Option<String>,
    /// import a ShareGPT JSON/JSONL file as the workload
    #[argh(option)]
    sharegpt: Option<PathBuf>,
    /// synthetic input lengths: N, fixed:N, uniform:LO:HI or normal:MEAN:SD:LO:HI (overrides the preset)
    #[argh(option)]
    input_len: Option<String>,
    /// synthetic output lengths, same forms as --input-len (overrides the preset)
    #[argh(option)]
    output_len: Option<String>,
    /// cap every request's max tokens (datasets default to 128 when a line has none)
    #[argh(option)]
    max_tokens: Option<usize>,
    /// measured requests (default: per preset, or the dataset's size)
    #[argh(option, short = 'n')]
    requests: Option<usize>,
    /// stop sending new requests after this many seconds
    #[argh(option)]
    duration: Option<f64>,
    /// warm-up requests, run first and excluded from figures (default 1)
    #[argh(option, default = "1")]
    warmup: usize,
    /// simulated users (N), each sending its next request when its last one finished
    #[argh(option, short = 'c')]
    concurrency: Option<usize>,
    /// think time of each simulated user between requests, ms (default 0)
    #[argh(option, default = "0")]
    think_ms: u64,
    /// open-loop arrival rate, requests/s (intended arrival times; queueing shows in ttft)
    #[argh(option)]
    rate: Option<f64>,
    /// arrivals for --rate and sweep: poisson or constant (default poisson)
    #[argh(option, default = "String::from(\"poisson\")")]
    arrivals: String,
    /// find max_goodput_rate: the highest rate whose SLO attainment meets the target
    #[argh(switch)]
    sweep: bool,
    /// sweep: at most this many rates (default 6)
    #[argh(option, default = "6")]
    sweep_points: usize,
    /// sweep: time budget in seconds (default 120)
    #[argh(option, default = "120.0")]
    sweep_budget: f64,
    /// SLO profile (chat-interactive, rag, batch, none) or a .toml file (default: by workload)
    #[argh(option)]
    slo: Option<String>,
    /// extra SLO constraint, e.g. 'ttft_p99<=200ms', 'e2e<=5s' (repeatable)
    #[argh(option)]
    slo_max: Vec<String>,
    /// SLO attainment target in (0, 1] (default 0.9)
    #[argh(option)]
    slo_target: Option<f64>,
    /// seed for synthetic prompts and arrivals (default 0)
    #[argh(option, default = "0")]
    seed: u64,
    /// sampling temperature (default 0 = greedy)
    #[argh(option, default = "0.0")]
    temp: f32,
    /// keep generating past end-of-generation tokens (presets always do)
    #[argh(switch)]
    ignore_eos: bool,
    /// send dataset prompts as raw text instead of through the chat template
    #[argh(switch)]
    raw_prompts: bool,
    /// context size in tokens (default: min(training context, 4096))
    #[argh(option)]
    ctx: Option<usize>,
    /// disable per-token recording (token text, per-step memory samples); token timestamps stay
    #[argh(switch)]
    no_token_recording: bool,
    /// also print figures split by request tag
    #[argh(switch)]
    by_tag: bool,
    /// write the whole run (records, memory samples, summary) as JSON to this file
    #[argh(option)]
    out: Option<PathBuf>,
    /// device profile name to record in the provenance
    #[argh(option)]
    device_profile: Option<String>,
    /// results store to write this run to (default: $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// do not write the run to the results store
    #[argh(switch)]
    no_db: bool,
    /// serve one request at a time instead of continuous batching
    #[argh(switch)]
    no_batching: bool,
    /// turn off prefix caching (shared prompt prefixes are recomputed)
    #[argh(switch)]
    no_prefix_cache: bool,
    /// KV cache budget in MiB for the batching server (default 512, or the --target profile's)
    #[argh(option)]
    kv_budget_mib: Option<usize>,
    /// device profile (targets/NAME.toml, built in; or a .toml path): sets threads, the memory/KV budget (caps --ctx) and the default SLO; explicit flags win
    #[argh(option)]
    target: Option<String>,
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
    /// where to run: auto (a hardware GPU if wgpu finds one, else the CPU), cpu, wgpu (any adapter, software ones too), vulkan, metal (default auto)
    #[argh(option)]
    backend: Option<String>,
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
    /// read the weights into memory (on huge pages where the kernel grants them) instead of
    /// mapping the file: faster decode on the CPU, at the cost of a copy at load and RAM the
    /// kernel cannot reclaim (llama.cpp's --no-mmap)
    #[argh(switch)]
    no_mmap: bool,
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

/// Decide where to run (`--backend`) and say so on stderr when it is not the plain CPU choice.
fn place(backend: &str) -> Result<ember_runtime::accel::Placement> {
    use ember_runtime::accel::{BackendChoice, Placement, choose};
    let choice: BackendChoice = backend
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--backend: {e}"))?;
    let p = choose(choice);
    match (&p, choice) {
        (Placement::Cpu { .. }, BackendChoice::Cpu) => log::info!("{}", p.describe()),
        (Placement::Cpu { reason }, _) => {
            eprintln!("ember: --backend {choice}: falling back to the CPU: {reason}")
        }
        #[cfg(feature = "wgpu")]
        (Placement::Gpu { .. }, _) => eprintln!("ember: {}", p.describe()),
    }
    Ok(p)
}

fn open_engine(
    model: Option<PathBuf>,
    backend: &str,
    threads: Option<usize>,
    ctx: Option<usize>,
    batch: usize,
    no_mmap: bool,
) -> Result<Engine> {
    let path = model_path(model)?;
    let threads = threads.unwrap_or_else(ember_runtime::sys::available_cores);
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let placement = place(backend)?;
    let file = if no_mmap {
        GgufFile::read(&path)?
    } else {
        GgufFile::open(&path)?
    };
    let engine = ember_models::open_file_on(std::sync::Arc::new(file), &placement, |train_ctx| {
        let n_ctx = match ctx {
            // Beyond the training context RoPE positions are untrained and the KV cache grows
            // for nothing: clamp, as a user would want, and say so.
            Some(c) if c > train_ctx => {
                eprintln!(
                    "ember: --ctx {c} is more than the model's training context; using {train_ctx}"
                );
                train_ctx
            }
            Some(c) => c,
            None => train_ctx.min(4096),
        };
        EngineConfig {
            threads,
            n_ctx,
            prefill_chunk: batch.max(1),
        }
    })?;
    let c = engine.model.config();
    log::info!(
        "loaded {} ({}, {} layers, d={}, vocab {}), {:.1} MB of weights {}, ctx {}, {} threads, kernels {:?}",
        path.display(),
        c.arch,
        c.n_layers,
        c.n_embd,
        c.n_vocab,
        engine.model.weight_bytes() as f64 / 1e6,
        if no_mmap {
            "read into memory"
        } else {
            "mapped"
        },
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
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading the prompt from stdin")?;
            Ok(s)
        }
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the prompt from {}", f.display())),
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
    let engine = open_engine(
        a.model.clone(),
        a.backend.as_deref().unwrap_or("auto"),
        a.threads,
        a.ctx,
        a.batch,
        a.no_mmap,
    )?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let tok = &engine.tokenizer;
    let text = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: prompt,
        });
        if engine
            .file
            .metadata
            .get_str(ember_runtime::gguf::keys::CHAT_TEMPLATE)
            .is_none()
        {
            log::warn!("model has no chat template; using ChatML");
        }
        let tpl = ChatTemplate::from_metadata_or_chatml(&engine.file.metadata)
            .context("the model's chat template does not parse")?;
        tpl.render(&msgs, true)
            .context("rendering the chat template")?
    } else {
        prompt
    };
    // A chat template already writes BOS where the model wants it.
    let add_bos = !a.no_bos && !a.chat && tok.add_bos_default();
    let prompt_tokens = tok
        .encode(&text, add_bos, true)
        .context("tokenizing the prompt")?;
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
                io_err = stdout
                    .write_all(text.as_bytes())
                    .and_then(|_| stdout.flush())
                    .err();
            }
        }
        Event::Finish { text, .. } => {
            if !a.json && io_err.is_none() {
                io_err = stdout
                    .write_all(text.as_bytes())
                    .and_then(|_| stdout.flush())
                    .err();
            }
        }
    });
    let generation = gen_result?;
    if let Some(e) = io_err
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e).context("writing to stdout");
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
    let dev = match engine.model.device_memory() {
        Some(m) => format!(
            " | device: weights {:.0} MiB, peak {:.0} MiB",
            m.weights_bytes as f64 / (1 << 20) as f64,
            m.peak_bytes as f64 / (1 << 20) as f64
        ),
        None => String::new(),
    };
    eprintln!(
        "\nember: {} | {n_prompt} prompt tokens, {n_gen} generated ({:?}) | load {load_ms:.0} ms | TTFT {ttft_ms:.1} ms | prefill {:.1} tok/s | decode {} | RSS peak {:.0} MiB{dev}",
        engine.model.backend(),
        generation.finish_reason,
        n_prompt as f64 / (prefill_ms / 1e3),
        if n_gen >= 2 {
            format!("{:.1} tok/s", (n_gen - 1) as f64 / (decode_ms / 1e3))
        } else {
            "n/a (<2 tokens)".into()
        },
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
                    Value::Array(arr) => {
                        serde_json::json!({"array_len": arr.len(), "type": v.type_name()})
                    }
                    Value::String(s) => serde_json::Value::String(s.clone()),
                    Value::Bool(b) => serde_json::Value::Bool(*b),
                    other => other
                        .as_f64()
                        .map(|f| serde_json::json!(f))
                        .unwrap_or(serde_json::Value::Null),
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
            .map(|(k, (n, el, b))| {
                (
                    k.to_string(),
                    serde_json::json!({"tensors": n, "elements": el, "bytes": b}),
                )
            })
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
    println!(
        "gguf:       v{}, alignment {}, {} metadata keys, {} tensors",
        file.version,
        file.alignment,
        file.metadata.len(),
        file.tensors.len()
    );
    println!(
        "size:       {:.2} MB file, {:.2} MB tensor data",
        file.file_len() as f64 / 1e6,
        tensor_bytes as f64 / 1e6
    );
    println!(
        "parameters: {n_params} ({:.1} M), {:.3} bits/weight",
        n_params as f64 / 1e6,
        tensor_bytes as f64 * 8.0 / n_params as f64
    );
    println!("quant mix:");
    for (k, (n, el, b)) in &mix {
        println!(
            "  {k:<6} {n:>4} tensors {:>12} weights {:>10.2} MB",
            el,
            *b as f64 / 1e6
        );
    }
    println!("metadata:");
    for (k, v) in file.metadata.iter() {
        println!("  {k} = {v}");
    }
    if a.tensors {
        println!("tensors:");
        for t in &file.tensors {
            println!(
                "  {:<40} {:<6} {:?} {} bytes",
                t.name,
                t.ty.name(),
                t.dims,
                t.n_bytes
            );
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
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .with_context(|| format!("--{flag}: '{x}' is not a token count"))
        })
        .collect()
}

fn cmd_bench(mut a: BenchArgs) -> Result<()> {
    if let Some(spec) = a.target.clone() {
        apply_target(&mut a, &spec)?;
    }
    if a.pp.is_some() || a.tg.is_some() || a.reps.is_some() {
        cmd_llama_bench(a)
    } else {
        cmd_bench_workload(a)
    }
}

fn cmd_llama_bench(a: BenchArgs) -> Result<()> {
    use ember_bench::llamabench::{Test, run_test};
    let pp = parse_list("pp", a.pp.as_deref().unwrap_or("512"))?;
    let tg = parse_list("tg", a.tg.as_deref().unwrap_or("128"))?;
    let reps = a.reps.unwrap_or(5);
    if reps == 0 {
        bail!("-r must be at least 1");
    }
    let longest = pp.iter().chain(&tg).copied().max().unwrap_or(0);
    if longest == 0 {
        bail!("nothing to run: give --pp and/or --tg");
    }
    let engine = open_engine(
        a.model.clone(),
        a.backend.as_deref().unwrap_or("auto"),
        a.threads,
        Some(longest.max(16)),
        a.batch,
        a.no_mmap,
    )?;
    let c = engine.model.config();
    if longest > c.n_ctx_train {
        bail!(
            "--pp/--tg of {longest} tokens exceeds the model's training context of {}",
            c.n_ctx_train
        );
    }
    let tests: Vec<(Test, usize)> = pp
        .iter()
        .map(|&n| (Test::Pp, n))
        .chain(tg.iter().map(|&n| (Test::Tg, n)))
        .collect();
    let mut store = open_store(a.no_db, a.db.as_ref())?;
    let started_at = ember_bench::store::now_rfc3339();
    let bar = indicatif::ProgressBar::new((tests.len() * reps) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} bench [{bar:30}] {pos}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let mut results = vec![];
    for &(kind, n) in &tests {
        bar.set_message(ember_bench::llamabench::test_name(kind, n));
        results.push(run_test(&engine, kind, n, reps, || bar.inc(1))?);
    }
    bar.finish_and_clear();
    let stored = store.as_mut().map(|st| {
        let head = ember_bench::llamabench::run_head(
            ember_bench::provenance::for_engine(&engine, a.device_profile.clone()),
            started_at,
            &tests,
            engine.cfg.prefill_chunk,
            reps,
        );
        let mem = ember_runtime::sys::memory();
        let device_peak = engine.model.device_memory().map_or(0, |m| m.peak_bytes);
        st.save_llama_bench(
            &head,
            engine.cfg.prefill_chunk,
            &results,
            mem.rss_peak_bytes,
            device_peak,
        )
        .map(|_| st.path().display().to_string())
    });
    let name = engine
        .file
        .metadata
        .get_str("general.name")
        .unwrap_or("?")
        .to_string();
    let size_mib = engine.model.weight_bytes() as f64 / (1 << 20) as f64;
    let threads = engine.cfg.threads;
    if a.json {
        let out = serde_json::json!({
            "model": name, "model_path": engine.file.path(), "weights_bytes": engine.model.weight_bytes(),
            "threads": threads, "backend": engine.model.backend(), "adapter": engine.model.adapter().map(|a| a.0),
            "isa": format!("{:?}", ember_runtime::quant::best_isa()),
            "target": APPLIED_TARGET.get(),
            "results": results, "rss_peak_bytes": ember_runtime::sys::memory().rss_peak_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("| model | size | backend | threads | test | t/s |");
        println!("| --- | ---: | --- | ---: | ---: | ---: |");
        for r in &results {
            let be = match engine.model.adapter() {
                Some((a, _)) => format!("wgpu ({a})"),
                None => format!("CPU ({:?})", ember_runtime::quant::best_isa()),
            };
            println!(
                "| {name} | {size_mib:.2} MiB | {be} | {threads} | {} | {:.2} ± {:.2} |",
                r.test, r.mean_tps, r.sd_tps
            );
        }
    }
    match stored {
        Some(Ok(path)) => {
            eprintln!("ember: run saved to {path}");
            Ok(())
        }
        Some(Err(e)) => Err(e).context("the results store did not get the run"),
        None => Ok(()),
    }
}

/// `ember bench` with a workload: build it, drive the engine through the
/// harness, print the table (or JSON).
fn cmd_bench_workload(a: BenchArgs) -> Result<()> {
    use ember_bench::harness::{self, HarnessOptions, SweepConfig, SystemClock};
    use ember_bench::load::{Arrivals, Limits, LoadSpec};
    use ember_bench::record::{RunResult, WorkloadInfo};
    use ember_bench::slo::Slo;
    use ember_bench::workload::{self, Corpus, DatasetOptions, LengthDist, SyntheticSpec};
    use ember_runtime::serve::SequentialServer;

    let modes = [a.concurrency.is_some(), a.rate.is_some(), a.sweep]
        .iter()
        .filter(|x| **x)
        .count();
    if modes > 1 {
        bail!("give at most one of --concurrency, --rate and --sweep");
    }
    if a.dataset.is_some() as u8 + a.sharegpt.is_some() as u8 + a.workload.is_some() as u8 > 1 {
        bail!("give at most one of --workload, --dataset and --sharegpt");
    }
    let arrivals = match a.arrivals.as_str() {
        "poisson" => Arrivals::Poisson,
        "constant" => Arrivals::Constant,
        other => bail!("--arrivals: '{other}' is neither poisson nor constant"),
    };
    if let Some(r) = a.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of requests per second");
    }
    if a.concurrency == Some(0) {
        bail!("--concurrency must be at least 1");
    }
    if a.requests == Some(0) {
        bail!("--requests must be at least 1");
    }
    let engine = open_engine(
        a.model.clone(),
        a.backend.as_deref().unwrap_or("auto"),
        a.threads,
        a.ctx,
        a.batch,
        a.no_mmap,
    )?;
    let n_ctx = engine.cfg.n_ctx;
    let sampler = SamplerConfig {
        temperature: a.temp,
        seed: a.seed,
        ..SamplerConfig::default()
    };
    sampler
        .validate()
        .map_err(|e| anyhow::anyhow!("bad sampling parameters: {e}"))?;

    // ---- workload
    let wname;
    let mut w = if a.dataset.is_some() || a.sharegpt.is_some() {
        let (entries, name, sharegpt) = if let Some(d) = &a.dataset {
            let text = if d == "eval" {
                workload::EVAL_SET.to_string()
            } else {
                std::fs::read_to_string(d).with_context(|| format!("reading the dataset {d}"))?
            };
            (
                workload::parse_jsonl(
                    &text,
                    if d == "eval" {
                        "bench/data/eval.jsonl"
                    } else {
                        d
                    },
                )?,
                format!("dataset:{d}"),
                false,
            )
        } else {
            let p = a.sharegpt.as_ref().unwrap();
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the ShareGPT file {}", p.display()))?;
            (
                workload::parse_sharegpt(&text, &p.display().to_string())?,
                format!("sharegpt:{}", p.display()),
                true,
            )
        };
        let tpl = if a.raw_prompts {
            None
        } else {
            Some(
                ChatTemplate::from_metadata_or_chatml(&engine.file.metadata)
                    .context("the model's chat template does not parse")?,
            )
        };
        let opts = DatasetOptions {
            template: tpl.as_ref(),
            default_max_tokens: a.max_tokens.unwrap_or(128),
            max_tokens_cap: a.max_tokens,
            size_from_expected: sharegpt,
        };
        let items = workload::build_dataset_items(&entries, &engine.tokenizer, &opts)?;
        wname = name;
        let n = a.requests.unwrap_or(items.len());
        let warmup = items
            .iter()
            .filter(|i| !i.prompt_tokens.is_empty() && i.prompt_tokens.len() < n_ctx)
            .take(1)
            .cloned()
            .cycle()
            .take(a.warmup)
            .collect();
        workload::Workload {
            name: wname.clone(),
            seed: a.seed,
            items: items.into_iter().cycle().take(n.max(1)).collect(),
            warmup,
            sampler,
            ignore_eos: a.ignore_eos,
            notes: vec![],
            params: serde_json::json!({"source": wname, "template": !a.raw_prompts, "max_tokens_cap": a.max_tokens}),
        }
    } else {
        let name = a.workload.clone().unwrap_or_else(|| "chat".into());
        let mut spec = SyntheticSpec::preset(&name)?;
        if let Some(x) = &a.input_len {
            spec.input = LengthDist::parse(x)?;
        }
        if let Some(x) = &a.output_len {
            spec.output = LengthDist::parse(x)?;
        }
        if let Some(m) = a.max_tokens {
            spec.output = spec.output.capped(m);
        }
        let corpus = Corpus::new(&engine.tokenizer, workload::CORPUS);
        let n = a.requests.unwrap_or_else(|| spec.default_requests());
        wname = name;
        spec.build(&corpus, n_ctx, n, a.warmup, a.seed, sampler)
    };
    for note in &w.notes {
        eprintln!("ember bench: {note}");
    }
    let slo = Slo::resolve(a.slo.as_deref(), &wname, &a.slo_max, a.slo_target)?;

    // ---- load
    let load = match (a.concurrency, a.rate) {
        (Some(c), _) => LoadSpec::Concurrency {
            users: c,
            think_ms: a.think_ms,
        },
        (_, Some(r)) => LoadSpec::Rate {
            rps: r,
            arrivals,
            seed: a.seed,
        },
        _ if a.think_ms > 0 => LoadSpec::Concurrency {
            users: 1,
            think_ms: a.think_ms,
        },
        _ => LoadSpec::Sync,
    };
    let limits = Limits {
        max_requests: if a.duration.is_some() && a.requests.is_none() {
            None
        } else {
            Some(w.items.len())
        },
        max_duration_ms: a.duration.map(|d| (d * 1000.0) as u64),
    };
    let opts = HarnessOptions {
        load: load.clone(),
        limits,
        record_tokens: !a.no_token_recording,
        ..Default::default()
    };

    // ---- run
    let planned = harness::planned_requests(&load, &limits, w.items.len());
    let bar = indicatif::ProgressBar::new(planned.unwrap_or(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} bench {msg} [{bar:30}] {pos}/{len} requests, {elapsed}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_message(format!(
        "{wname} · {}",
        if a.sweep {
            "sweep".into()
        } else {
            load.describe()
        }
    ));
    let mut on_progress = |p: &harness::Progress| {
        if let Some(n) = p.planned {
            bar.set_length(n as u64);
        }
        bar.set_position(p.done as u64);
    };
    let provenance = ember_bench::provenance::for_engine(&engine, a.device_profile.clone());
    let started_at = ember_bench::store::now_rfc3339();
    let mut sequential = SequentialServer::new(&engine);
    let kv_budget_bytes = a.kv_budget_mib.map(|m| m << 20).unwrap_or(512 << 20);
    let mut scheduler = ember_runtime::scheduler::Scheduler::new(
        &engine,
        ember_runtime::scheduler::SchedulerConfig {
            kv_budget_bytes,
            prefix_caching: !a.no_prefix_cache,
            ..Default::default()
        },
    );
    let server: &mut dyn ember_runtime::serve::Server = if a.no_batching {
        &mut sequential
    } else {
        &mut scheduler
    };
    // The results store: the run row first, then each request as it finishes (a sweep stores
    // each of its steps so, as a run of its own).
    let mut store = open_store(a.no_db, a.db.as_ref())?;
    let head = RunResult {
        started_at: started_at.clone(),
        provenance: provenance.clone(),
        workload: WorkloadInfo {
            name: wname.clone(),
            seed: a.seed,
            params: serde_json::to_string(
                &serde_json::json!({"workload": w.params, "limits": limits, "sampler": format!("{:?}", w.sampler), "ignore_eos": w.ignore_eos, "record_tokens": !a.no_token_recording, "n_ctx": n_ctx}),
            )?,
            ..Default::default()
        },
        slo_name: slo.name.clone(),
        slo: serde_json::to_string(&slo)?,
        ..Default::default()
    };
    let (out, sweep, stored) = if a.sweep {
        let cfg = SweepConfig {
            requests_per_point: a.requests.unwrap_or(16).max(4),
            max_points: a.sweep_points.max(1),
            budget: std::time::Duration::from_secs_f64(a.sweep_budget.max(1.0)),
            arrivals,
            seed: a.seed,
        };
        let mut recorder = store
            .as_mut()
            .map(|st| ember_bench::live::SweepRecorder::new(st, head.clone(), &slo));
        let observer: &mut dyn harness::SweepObserver = match recorder.as_mut() {
            Some(r) => r,
            None => &mut (),
        };
        let (sw, out) = harness::sweep(
            server,
            &SystemClock,
            &w,
            &opts,
            &slo,
            &cfg,
            &mut on_progress,
            observer,
        );
        let stored = recorder.map(|r| r.into_result().map(|runs| runs.len()));
        (out, Some(sw), stored)
    } else {
        let live = match store.as_mut() {
            Some(st) => {
                let schedule = harness::arrival_schedule(&load, &limits, w.items.len());
                let mut h = head.clone();
                h.workload.hash = workload::workload_hash(&w, &load, &schedule);
                h.workload.load = serde_json::to_string(&load)?;
                h.workload.n_requests = w.items.len();
                h.workload.n_warmup = w.warmup.len();
                Some((ember_bench::live::LiveRun::begin(st, &h)?, h))
            }
            None => None,
        };
        let out = harness::run(server, &SystemClock, &w, &opts, &mut on_progress);
        let stored = match (live, store.as_mut()) {
            (Some((live, h)), Some(st)) => {
                let (result, _) = ember_bench::live::run_result(&h, &out, &slo);
                Some(live.finish(st, &result).map(|_| 1))
            }
            _ => None,
        };
        (out, None, stored)
    };
    bar.finish_and_clear();

    // ---- figures: of the run, or of the sweep's reported step (its best passing rate)
    let load_used = match &sweep {
        Some(sw) => LoadSpec::Rate {
            rps: sw
                .max_goodput_rate
                .or(sw.points.last().map(|p| p.rate_rps))
                .unwrap_or(1.0),
            arrivals,
            seed: a.seed,
        },
        None => load.clone(),
    };
    if sweep.is_some() {
        // The reported step carries no warm-up.
        w.warmup.clear();
        w.items.truncate(out.records.len().max(1));
    }
    let schedule = harness::arrival_schedule(&load_used, &limits, w.items.len());
    let mut head = head;
    head.workload.hash = workload::workload_hash(&w, &load_used, &schedule);
    head.workload.load = serde_json::to_string(&load_used)?;
    let (result, summary) = ember_bench::live::run_result(&head, &out, &slo);
    let tags = if a.by_tag {
        ember_bench::metrics::by_tag(&out.records)
    } else {
        vec![]
    };
    match (&stored, &store) {
        (Some(Ok(n)), Some(st)) if *n > 1 => {
            eprintln!(
                "ember: {n} sweep steps saved as runs to {}",
                st.path().display()
            )
        }
        (Some(Ok(_)), Some(st)) => eprintln!("ember: run saved to {}", st.path().display()),
        _ => {}
    }
    if let Some(path) = &a.out {
        let j = serde_json::json!({"run": result, "sweep": sweep, "overhead": out.overhead});
        std::fs::write(path, serde_json::to_vec_pretty(&j)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        let j = serde_json::json!({
            "workload": result.workload, "provenance": result.provenance, "slo": slo, "summary": summary,
            "sweep": sweep, "by_tag": tags, "overhead": out.overhead, "notes": w.notes,
            "target": APPLIED_TARGET.get(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!(
            "{}",
            ember_bench::table::render(
                &result,
                &summary,
                sweep.as_ref(),
                &tags,
                Some(out.overhead.fraction())
            )
        );
    }
    // Figures first, then the verdict on storing them: a run that could not record what it
    // measured exits non-zero.
    match stored {
        Some(Err(e)) => Err(e).context("the results store did not get the whole run"),
        _ => Ok(()),
    }
}

/// The results store for `bench`: none with --no-db, else --db, $EMBER_DB or the default path.
fn open_store(no_db: bool, db: Option<&PathBuf>) -> Result<Option<ember_bench::store::Store>> {
    if no_db {
        return Ok(None);
    }
    let path = db
        .cloned()
        .unwrap_or_else(ember_bench::store::default_db_path);
    // The store's errors name the file.
    let store = ember_bench::store::Store::open(&path).context("opening the results store")?;
    Ok(Some(store))
}

// ---- results store: compare, report, export (bench/STORE.md) ----

#[derive(FromArgs)]
/// Compare runs from store files side by side, matched by workload hash
/// (TTFT/ITL/TPOT percentiles, tokens/s, goodput, attainment, peak memory,
/// prefix hit rate, $/Mtok). Runs whose workload differs are flagged, never
/// compared; with two or more files and no workload in common it refuses.
/// Regression gate: ember compare --baseline A.db B.db --max-regression 5%
/// exits with status 3 when a figure got worse by more than 5% beyond the
/// run-to-run noise of the baseline's repeated runs.
#[argh(subcommand, name = "compare")]
struct CompareArgs {
    /// store files, or folders of .db files (default: --db or the default store)
    #[argh(positional)]
    dbs: Vec<PathBuf>,
    /// a store file (same as a positional; default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// the baseline store file: its runs are marked and the gate compares against them
    #[argh(option)]
    baseline: Option<PathBuf>,
    /// with --baseline: fail (exit 3) when a figure got worse by more than this, e.g. 5%
    #[argh(option)]
    max_regression: Option<String>,
    /// device cost for $/Mtok as LABEL=USD_PER_HOUR, LABEL a device profile, file name or backend (repeatable)
    #[argh(option)]
    cost: Vec<String>,
    /// also use runs that never finished (e.g. killed mid-run)
    #[argh(switch)]
    include_unfinished: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
    /// print CSV (one row per workload, column and figure)
    #[argh(switch)]
    csv: bool,
}

#[derive(FromArgs)]
/// Write one self-contained HTML report (inline SVG plots, no network) of the
/// runs in store files: latency CDFs, ITL over time, sweeps, memory, devices.
#[argh(subcommand, name = "report")]
struct ReportArgs {
    /// store files, or folders of .db files (default: --db or the default store)
    #[argh(positional)]
    dbs: Vec<PathBuf>,
    /// a store file (same as a positional; default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// output HTML file (default ember-report.html)
    #[argh(option, short = 'o', default = "PathBuf::from(\"ember-report.html\")")]
    output: PathBuf,
    /// report title
    #[argh(option, default = "String::from(\"ember benchmark report\")")]
    title: String,
}

#[derive(FromArgs)]
/// Export runs from store files as CSV, JSON, or a llama-bench-style markdown
/// table (md); or every request's latencies (--what requests).
#[argh(subcommand, name = "export")]
struct ExportArgs {
    /// store files, or folders of .db files (default: --db or the default store)
    #[argh(positional)]
    dbs: Vec<PathBuf>,
    /// a store file (same as a positional; default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// csv, json or md (default csv)
    #[argh(option, short = 'f', default = "String::from(\"csv\")")]
    format: String,
    /// runs or requests (default runs)
    #[argh(option, default = "String::from(\"runs\")")]
    what: String,
    /// write here instead of stdout
    #[argh(option, short = 'o')]
    output: Option<PathBuf>,
}

fn store_files(dbs: Vec<PathBuf>, db: Option<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut all = dbs;
    all.extend(db);
    if all.is_empty() {
        all.push(ember_bench::store::default_db_path());
    }
    Ok(ember_bench::store::expand_db_args(&all)?)
}

fn cmd_compare(a: CompareArgs) -> Result<()> {
    use ember_bench::compare::{CompareOptions, compare, parse_fraction};
    if a.json && a.csv {
        bail!("give --json or --csv, not both");
    }
    let max_regression = a
        .max_regression
        .as_deref()
        .map(parse_fraction)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--max-regression: {e}"))?;
    if max_regression.is_some() && a.baseline.is_none() {
        bail!("--max-regression needs --baseline FILE");
    }
    let mut costs = vec![];
    for c in &a.cost {
        let (label, usd) = c
            .split_once('=')
            .with_context(|| format!("--cost '{c}': expected LABEL=USD_PER_HOUR"))?;
        let usd: f64 = usd
            .trim()
            .parse()
            .with_context(|| format!("--cost '{c}': '{usd}' is not a number"))?;
        costs.push((label.trim().to_string(), usd));
    }
    let files = if a.dbs.is_empty() && a.db.is_none() && a.baseline.is_some() {
        bail!("give the store file(s) to compare against the baseline");
    } else {
        store_files(a.dbs, a.db)?
    };
    if let Some(b) = &a.baseline
        && !b.is_file()
    {
        bail!("{}: no such baseline store", b.display());
    }
    let opts = CompareOptions {
        baseline: a.baseline.clone(),
        max_regression,
        costs,
        include_unfinished: a.include_unfinished,
    };
    let cmp = compare(&files, &opts)?;
    let n_files = cmp.files.len();
    if cmp.groups.is_empty() && n_files >= 2 {
        eprint!("{}", cmp.to_text());
        bail!(
            "no workload hash is shared by the {n_files} files: refusing to compare different workloads"
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&cmp.to_json())?);
    } else if a.csv {
        print!("{}", cmp.to_csv());
    } else {
        print!("{}", cmp.to_text());
    }
    if cmp.regressed() {
        std::io::stdout().flush().ok();
        eprintln!("ember compare: regression beyond --max-regression (see the gate table)");
        std::process::exit(3);
    }
    Ok(())
}

fn cmd_report(a: ReportArgs) -> Result<()> {
    let files = store_files(a.dbs, a.db)?;
    let opts = ember_bench::report::ReportOptions {
        title: a.title,
        ..Default::default()
    };
    let html = ember_bench::report::render(&files, &opts)?;
    std::fs::write(&a.output, html).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("ember: wrote {}", a.output.display());
    Ok(())
}

fn cmd_export(a: ExportArgs) -> Result<()> {
    use ember_bench::export::{Format, What, export};
    let format: Format = a
        .format
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--format: {e}"))?;
    let what: What = a
        .what
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--what: {e}"))?;
    let files = store_files(a.dbs, a.db)?;
    let out = export(&files, what, format)?;
    match &a.output {
        Some(p) => std::fs::write(p, out).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{out}"),
    }
    Ok(())
}

// ---- device profiles (--target) and the self-test ----

/// What `--target` applied to `ember bench`, echoed in its `--json` output.
static APPLIED_TARGET: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();

/// Apply a device profile to `ember bench`: threads, the default SLO and the
/// memory budget (the KV cache gets what the weights leave of it, or the
/// profile's kv_budget_gib, which caps the context). Explicit flags win.
fn apply_target(a: &mut BenchArgs, spec: &str) -> Result<()> {
    let p = ember_bench::profile::DeviceProfile::resolve(spec)?;
    if !p.matches_this_arch() {
        eprintln!(
            "ember bench: note: profile {} is for {}, this binary is {}",
            p.name,
            p.target_triple,
            std::env::consts::ARCH
        );
    }
    let threads = *a.threads.get_or_insert(p.threads);
    // The profile's preferred backend, unless --backend says otherwise.
    let backend = a
        .backend
        .get_or_insert_with(|| {
            match p.backends.first().map(String::as_str) {
                Some("wgpu-vulkan") => "vulkan",
                Some("wgpu-metal") => "metal",
                Some("wgpu-dx12") => "wgpu",
                _ => "cpu",
            }
            .to_string()
        })
        .clone();
    if a.slo.is_none() && a.slo_max.is_empty() {
        a.slo = Some(p.default_slo.clone());
    }
    a.device_profile.get_or_insert_with(|| p.name.clone());
    // The budget needs the model's weight and KV sizes: map the file (cheap) and read its config.
    let path = model_path(a.model.clone())?;
    a.model = Some(path.clone());
    let file = std::sync::Arc::new(GgufFile::open(&path)?);
    let model = ember_models::load(file.clone())
        .with_context(|| format!("{}: cannot load the model", path.display()))?;
    let weights = model.weight_bytes();
    let c = model.config();
    let kv_budget = p.kv_budget_bytes(weights).map_err(|e| anyhow::anyhow!(e))?;
    let per_tok = c.kv_bytes_per_token().max(1) as u64;
    let ctx_cap = (kv_budget / per_tok) as usize;
    if ctx_cap < 16 {
        bail!(
            "profile {}: a KV budget of {kv_budget} bytes holds only {ctx_cap} positions of this model",
            p.name
        );
    }
    let want = a.ctx.unwrap_or(c.n_ctx_train.min(4096));
    let ctx = want.min(ctx_cap);
    a.ctx = Some(ctx);
    let applied = serde_json::json!({
        "name": p.name, "target_triple": p.target_triple, "backends": p.backends, "backend": backend,
        "threads": threads, "memory_budget_bytes": p.memory_budget_bytes(), "weights_bytes": weights,
        "kv_budget_bytes": kv_budget, "kv_bytes_per_token": per_tok, "ctx": ctx, "ctx_capped_by_budget": ctx < want,
        "slo": a.slo, "cost_per_hour_usd": p.cost_per_hour_usd, "typical_power_w": p.typical_power_w,
    });
    eprintln!(
        "ember bench: target {}: backend {backend}, threads {threads}, memory budget {:.2} GiB (weights {:.1} MiB, KV budget {:.1} MiB = {ctx_cap} positions), ctx {ctx}, SLO {}",
        p.name,
        p.memory_budget_gib,
        weights as f64 / (1 << 20) as f64,
        kv_budget as f64 / (1 << 20) as f64,
        a.slo.as_deref().unwrap_or("custom")
    );
    APPLIED_TARGET.set(applied).ok();
    Ok(())
}

#[derive(FromArgs)]
/// Check this device: kernel parity on every ISA against the portable and an
/// f64 reference, block-format round trips, the dense ops, an exact-token golden
/// decode of the embedded model, that the weights stay in the mmap, memory
/// bandwidth and matmul FLOP/s, a short benchmark and the decode roofline.
/// One row per check, also written to the results store. Exit status 0 only
/// when every check passes.
#[argh(subcommand, name = "selftest")]
struct SelftestArgs {
    /// GGUF model for the model-dependent checks (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// device profile (targets/NAME.toml, built in; or a .toml path): threads, budget, nominal bandwidth
    #[argh(option)]
    target: Option<String>,
    /// worker threads (default: the profile's, else all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// results store to write the rows to (default $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// do not write to the results store
    #[argh(switch)]
    no_db: bool,
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
}

fn cmd_selftest(a: SelftestArgs) -> Result<()> {
    use ember_bench::selftest;
    let profile = a
        .target
        .as_deref()
        .map(ember_bench::profile::DeviceProfile::resolve)
        .transpose()?;
    let opts = selftest::Options {
        model: a.model.clone(),
        threads: a.threads,
        profile,
        fault: std::env::var(selftest::FAULT_ENV).ok(),
        ..Default::default()
    };
    if let Some(f) = &opts.fault {
        eprintln!(
            "ember selftest: {}={f}: fault injection is on, a parity check will fail on purpose",
            selftest::FAULT_ENV
        );
    }
    let json = a.json;
    let report = selftest::run(&opts, |c| {
        if !json {
            eprintln!("  {:<4} {}", c.status(), c.name);
        }
    })?;
    if !a.no_db {
        let db =
            a.db.clone()
                .unwrap_or_else(ember_bench::store::default_db_path);
        let mut store = ember_bench::store::Store::open(&db)?;
        let run = report.save(&mut store)?;
        eprintln!(
            "ember selftest: wrote {} rows to {} (run {})",
            report.checks.len(),
            db.display(),
            run.0
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_table());
    }
    let failed = report.failed();
    if !failed.is_empty() {
        std::io::stdout().flush().ok();
        for c in &failed {
            eprintln!("ember selftest: FAILED {}: {}", c.name, c.message);
        }
        bail!(
            "{} of {} self-test checks failed",
            failed.len(),
            report.checks.len()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread is started.
    unsafe { ember_runtime::accel::quiet_headless_probe() };
    let cli: Cli = argh::from_env();
    let level = if cli.verbose { "debug" } else { "warn" };
    // wgpu's HAL logs failed probes of APIs that are not there (EGL without a GL driver) as
    // errors; ember reports the adapter it chose, or why none, itself. RUST_LOG overrides.
    let filter = format!("{level},wgpu_hal=off");
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
        .format_timestamp(None)
        .init();
    let r = match cli.cmd {
        Command::Run(a) => cmd_run(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Compare(a) => cmd_compare(a),
        Command::Report(a) => cmd_report(a),
        Command::Export(a) => cmd_export(a),
        Command::Selftest(a) => cmd_selftest(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, "outer: inner: ...", each message once: library errors
/// often quote their cause in their own message (SQLite's, the OS's), and printing the chain as
/// it is would repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}
