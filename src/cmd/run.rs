//! `ember run`: generate text, streamed to stdout, with a summary on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_runtime::chat::{ChatMessage, ChatTemplate};
use ember_runtime::engine::{Engine, Event, GenerateRequest, Generation, Speculate};
use ember_runtime::sample::SamplerConfig;

use crate::engine::{EngineOpts, open_engine};

#[derive(FromArgs)]
/// Generate text: streams the completion to stdout and a summary (prompt
/// tokens, TTFT, prefill and decode speed, memory) to stderr.
#[argh(subcommand, name = "run")]
pub struct RunArgs {
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
    /// where to run: auto (CUDA if built in and the driver is there, else a hardware GPU if wgpu finds one, else the CPU), cpu, wgpu (any adapter, software ones too), vulkan, metal, cuda (an error where it cannot start) (default auto)
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
    /// speculative decoding by prompt lookup: propose the tokens that followed the latest
    /// earlier occurrence of the last N tokens (N down to 1) in the prompt and output, verify
    /// them in one pass; the output is unchanged (greedy: token for token)
    #[argh(option)]
    lookup: Option<usize>,
    /// speculative decoding with this draft model (a GGUF with the target's vocabulary, e.g.
    /// a smaller or requantized sibling); the output is unchanged
    #[argh(option)]
    draft: Option<PathBuf>,
    /// most draft tokens proposed per step (default 16)
    #[argh(option, default = "16")]
    draft_max: usize,
    /// fewer proposed tokens than this are not verified: the step decodes plainly (default 0)
    #[argh(option, default = "0")]
    draft_min: usize,
    /// a draft model stops proposing at a token below this probability (default 0.8)
    #[argh(option, default = "0.8")]
    draft_p_min: f32,
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

/// The prompt as the model sees it: as given, or (--chat) rendered as a user message, after
/// an optional system message, by the model's chat template.
fn render_prompt(engine: &Engine, a: &RunArgs, prompt: String) -> Result<String> {
    if !a.chat {
        return Ok(prompt);
    }
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
        log::warn!(
            "model has no chat template; using the built-in {} format",
            ember_runtime::chat::builtin_for(&engine.file.metadata)
        );
    }
    let tpl = ChatTemplate::from_metadata_or_builtin(&engine.file.metadata)
        .context("the model's chat template does not parse")?;
    tpl.render(&msgs, true)
        .context("rendering the chat template")
}

/// When the engine's events happened, for the summary.
#[derive(Default)]
struct Times {
    start: Option<Instant>,
    prefill_end: Option<Instant>,
    first: Option<Instant>,
    last: Option<Instant>,
    n_gen: usize,
}

pub fn run(a: RunArgs) -> Result<()> {
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
    let opts = EngineOpts {
        model: a.model.clone(),
        backend: a.backend.clone(),
        threads: a.threads,
        ctx: a.ctx,
        batch: a.batch,
        no_mmap: a.no_mmap,
    };
    let spec_opts = crate::engine::SpecOpts {
        lookup: a.lookup,
        draft: a.draft.clone(),
        draft_max: a.draft_max,
        draft_min: a.draft_min,
        draft_p_min: a.draft_p_min,
    };
    let spec = spec_opts.config()?;
    let engine = open_engine(&opts, None)?;
    let draft = spec_opts.open_draft(&opts, &engine)?;
    if spec.is_some() {
        eprintln!("ember: {}", spec_opts.describe());
    }
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let tok = &engine.tokenizer;
    let text = render_prompt(&engine, &a, prompt)?;
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
    let speculate = spec.as_ref().map(|cfg| Speculate {
        cfg,
        draft: draft.as_ref(),
    });
    let (generation, times) = generate(&engine, &req, speculate, a.json)?;
    print_summary(&engine, &generation, &times, load_ms);
    Ok(())
}

/// Generate, streaming the text to stdout (or, with `json`, printing the generation as JSON at
/// the end); a closed stdout ends nothing but the streaming.
fn generate(
    engine: &Engine,
    req: &GenerateRequest,
    spec: Option<Speculate<'_>>,
    json: bool,
) -> Result<(Generation, Times)> {
    let mut stdout = std::io::stdout().lock();
    let mut t = Times::default();
    let mut io_err: Option<std::io::Error> = None;
    let mut write = |text: &str| {
        if !json && io_err.is_none() {
            io_err = stdout
                .write_all(text.as_bytes())
                .and_then(|_| stdout.flush())
                .err();
        }
    };
    let mut on_event = |ev: Event<'_>| match ev {
        Event::PrefillStart { at, .. } => t.start = Some(at),
        Event::PrefillEnd { at, .. } => t.prefill_end = Some(at),
        Event::Token { at, text, .. } => {
            t.n_gen += 1;
            t.first.get_or_insert(at);
            t.last = Some(at);
            write(text);
        }
        Event::Finish { text, .. } => write(text),
    };
    // `-v` on a GPU: count the kernel launches (the observer costs nothing when off).
    let count =
        log::log_enabled!(log::Level::Debug) && matches!(engine.model.backend(), "wgpu" | "cuda");
    let gen_result = if count {
        let (r, launches) = ember_runtime::backend::count_launches(|| {
            engine.generate_with(req, spec, &mut on_event)
        });
        // One pass for the prompt (and the first token), one per token after it.
        let passes = t.n_gen.max(1);
        log::debug!("{}", launches_summary(&launches, passes));
        r
    } else {
        engine.generate_with(req, spec, &mut on_event)
    };
    let generation = gen_result?;
    if let Some(e) = io_err
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e).context("writing to stdout");
    }
    if json {
        serde_json::to_writer(&mut stdout, &generation)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout).ok();
    }
    Ok((generation, t))
}

/// `-v` on wgpu: the kernel launches of the whole generation, the busiest kernels first.
fn launches_summary(l: &ember_runtime::backend::Launches, passes: usize) -> String {
    let mut top: Vec<_> = l.by_kernel.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    let names: Vec<String> = top
        .iter()
        .take(6)
        .map(|(k, n)| {
            let k = k.trim_end_matches('>');
            format!("{n} {}", k.rsplit(['<', ':']).next().unwrap_or(k))
        })
        .collect();
    format!(
        "wgpu: {} kernel launches over {passes} forward passes, {:.0} per pass (busiest: {})",
        l.total(),
        l.total() as f64 / passes as f64,
        names.join(", ")
    )
}

/// The one-line summary on stderr: tokens, finish reason, load, TTFT, prefill and decode
/// speed, peak RSS and device memory.
fn print_summary(engine: &Engine, generation: &Generation, t: &Times, load_ms: f64) {
    let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64() * 1e3,
        _ => f64::NAN,
    };
    let n_prompt = generation.prompt_tokens.len();
    let n_gen = t.n_gen;
    let prefill_ms = ms(t.start, t.prefill_end);
    let ttft_ms = ms(t.start, t.first);
    let decode_ms = ms(t.first, t.last);
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
    if let Some(s) = &generation.spec {
        eprintln!(
            "ember: speculation | drafted {} | accepted {} ({}) | {:.2} accepted per verify pass over {} passes | draft {:.1} ms | verify {:.1} ms",
            s.drafted,
            s.accepted,
            s.acceptance_rate()
                .map_or("n/a".into(), |r| format!("{:.1}%", r * 100.0)),
            s.mean_accepted_run().unwrap_or(0.0),
            s.verify_steps,
            s.draft_ns as f64 / 1e6,
            s.verify_ns as f64 / 1e6,
        );
    }
}
