//! `ember bench`: its flags, the typed plan they make ([`BenchCommand`], where every flag is
//! checked), and printing what the `ember_bench` session measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_bench::harness::{Progress, SweepConfig};
use ember_bench::llamabench::{BenchResult, Test};
use ember_bench::load::{Arrivals, LoadSpec};
use ember_bench::remote::{Api, Endpoint};
use ember_bench::session::{
    self, LlamaPlan, LlamaProgress, LoadMode, Outcome, Remote, ServerPlan, Session, WorkloadPlan,
    WorkloadSource,
};
use ember_bench::slo::Slo;
use ember_bench::workload::{LengthDist, SyntheticSpec};
use ember_runtime::engine::Engine;
use ember_runtime::gguf::GgufFile;
use ember_runtime::sample::SamplerConfig;
use ember_runtime::tokenizer::Tokenizer;

use crate::engine::EngineOpts;
use crate::target::Target;

#[derive(FromArgs)]
/// Benchmark what users feel: run a workload (preset, JSONL or ShareGPT) under a
/// load (sync, --concurrency, --rate, sweep) and report TTFT, ITL, TPOT, e2e,
/// throughput, memory and SLO verdicts (definitions: docs/METRICS.md).
/// With no flags: the `chat` preset on the embedded model, sync.
/// llama-bench mode: --pp/--tg/-r print pp<n>/tg<n> tokens/s as mean ± sd,
/// e.g. ember bench -m M --pp 128,512 --tg 128 -r 5
/// Any OpenAI-compatible server (vLLM, SGLang, TGI, llama-server, Ollama, ember serve):
/// ember bench --url http://127.0.0.1:8080/v1 -m M -c 8 (-m: the GGUF it serves)
#[argh(subcommand, name = "bench")]
pub struct BenchArgs {
    /// measure an OpenAI-compatible server at this base URL (…/v1) instead of an engine in this
    /// process; -m names the GGUF it serves (its tokenizer writes the same prompts as
    /// in-process and counts output tokens; without -m the embedded model writes text prompts
    /// and only the server's usage counts)
    #[argh(option)]
    url: Option<String>,
    /// with --url: the API to call, completions (prompts as token ids when -m is given, else text)
    /// or chat (the prompt text as one user message) (default completions)
    #[argh(option, default = "String::from(\"completions\")")]
    api: String,
    /// with --url: the model id to send (default: the first one the server's /models lists)
    #[argh(option)]
    served_model_name: Option<String>,
    /// with --url: API key, sent as a Bearer token (default: $OPENAI_API_KEY if set)
    #[argh(option)]
    api_key: Option<String>,
    /// with --url: seconds to wait for any byte of a reply before the request fails (default 600)
    #[argh(option, default = "600.0")]
    request_timeout: f64,
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
    /// where to run: auto (CUDA if built in and the driver is there, else a hardware GPU if wgpu finds one, else the CPU), cpu, wgpu (any adapter, software ones too), vulkan, metal, cuda (an error where it cannot start) (default auto)
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
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
    /// workload preset: chat, rag, creative, shared-prefix, edit (default chat)
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
    /// keep generating past end-of-generation tokens (presets always do, but edit: its copy ends there)
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
    /// price of the device or cloud instance in USD per hour, for $/Mtok (default: the --target profile's)
    #[argh(option)]
    cost_per_hour: Option<f64>,
    /// price of an API in USD per million output tokens (--url), for $/Mtok at the SLO
    #[argh(option)]
    cost_per_mtok: Option<f64>,
    /// score the answers of dataset entries that have "expected" (exact, contains, regex or choice) and show accuracy with its 95% CI
    #[argh(switch)]
    score: bool,
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

/// `ember bench`, decided: every flag checked and typed, a `--target` profile resolved (the
/// flags win over it).
pub struct BenchCommand {
    engine: EngineOpts,
    /// --lookup, --draft and their limits.
    spec: crate::engine::SpecOpts,
    /// --url: the server to measure instead of an engine.
    remote: Option<RemoteOpts>,
    target: Option<Target>,
    mode: Mode,
    json: bool,
    out: Option<PathBuf>,
    no_db: bool,
    db: Option<PathBuf>,
    /// Power sensors present but not used or not readable (`ember_bench::power::discover`).
    power_notes: Vec<String>,
}

/// `--url` and its flags, checked.
struct RemoteOpts {
    url: String,
    api: Api,
    model: Option<String>,
    api_key: Option<String>,
    timeout: Duration,
}

enum Mode {
    /// llama-bench mode (--pp/--tg/-r).
    Llama(LlamaPlan),
    /// A workload under a load (boxed: the plan is large, llama-bench's small).
    Workload(Box<WorkloadPlan>),
}

impl TryFrom<BenchArgs> for BenchCommand {
    type Error = anyhow::Error;

    fn try_from(a: BenchArgs) -> Result<BenchCommand> {
        let target = match &a.target {
            Some(spec) => Some(Target::resolve(
                spec,
                a.threads,
                a.backend.as_deref(),
                a.slo.as_deref(),
                &a.slo_max,
                a.device_profile.as_deref(),
            )?),
            None => None,
        };
        let engine = Target::engine_opts(
            target.as_ref(),
            EngineOpts {
                model: a.model.clone(),
                backend: a.backend.clone(),
                threads: a.threads,
                ctx: a.ctx,
                batch: a.batch,
                no_mmap: a.no_mmap,
            },
        );
        let device_profile = match &target {
            Some(t) => Some(t.device_profile.clone()),
            None => a.device_profile.clone(),
        };
        let remote = remote_opts(&a)?;
        let spec = crate::engine::SpecOpts {
            lookup: a.lookup,
            draft: a.draft.clone(),
            draft_max: a.draft_max,
            draft_min: a.draft_min,
            draft_p_min: a.draft_p_min,
        };
        let mut power_notes = vec![];
        let mode = if a.pp.is_some() || a.tg.is_some() || a.reps.is_some() {
            if spec.lookup.is_some() || spec.draft.is_some() {
                bail!(
                    "--lookup/--draft apply to workload runs (-w, --dataset), not to --pp/--tg: speculation changes how tokens are generated, which a fixed prompt/generation count does not measure"
                );
            }
            Mode::Llama(llama_plan(&a, device_profile)?)
        } else {
            let slo = match &target {
                Some(t) => t.slo.clone(),
                None => a.slo.clone(),
            };
            let mut plan = workload_plan(&a, slo.as_deref(), device_profile)?;
            plan.server.spec = spec.config()?;
            plan.price = price(&a, target.as_ref())?;
            if remote.is_none() {
                let found = ember_bench::power::discover(&ember_bench::power::sysfs_root());
                plan.power = found.source;
                power_notes = found.notes;
            }
            Mode::Workload(Box::new(plan))
        };
        Ok(BenchCommand {
            engine,
            spec,
            remote,
            target,
            mode,
            json: a.json,
            out: a.out,
            no_db: a.no_db,
            db: a.db,
            power_notes,
        })
    }
}

/// `--url` and the flags that go with it; the engine's own flags make no sense with it.
fn remote_opts(a: &BenchArgs) -> Result<Option<RemoteOpts>> {
    let Some(url) = a.url.clone() else {
        for (set, flag) in [
            (a.served_model_name.is_some(), "--served-model-name"),
            (a.api_key.is_some(), "--api-key"),
            (a.api != "completions", "--api"),
        ] {
            if set {
                bail!("{flag} goes with --url");
            }
        }
        return Ok(None);
    };
    let engine_flags = [
        (
            a.pp.is_some() || a.tg.is_some() || a.reps.is_some(),
            "--pp/--tg/-r",
        ),
        (a.backend.is_some(), "--backend"),
        (a.threads.is_some(), "--threads"),
        (a.no_mmap, "--no-mmap"),
        (a.no_batching, "--no-batching"),
        (a.no_prefix_cache, "--no-prefix-cache"),
        (a.kv_budget_mib.is_some(), "--kv-budget-mib"),
        (a.target.is_some(), "--target"),
        (a.lookup.is_some(), "--lookup"),
        (a.draft.is_some(), "--draft"),
    ];
    for (set, flag) in engine_flags {
        if set {
            bail!("{flag} does not apply with --url: the server runs the model its own way");
        }
    }
    if !(a.request_timeout > 0.0 && a.request_timeout.is_finite()) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    Ok(Some(RemoteOpts {
        url,
        api: Api::parse(&a.api).map_err(anyhow::Error::msg)?,
        model: a.served_model_name.clone(),
        api_key: a.api_key.clone().or_else(|| {
            std::env::var("OPENAI_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        }),
        timeout: Duration::from_secs_f64(a.request_timeout),
    }))
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

fn llama_plan(a: &BenchArgs, device_profile: Option<String>) -> Result<LlamaPlan> {
    let pp = parse_list("pp", a.pp.as_deref().unwrap_or("512"))?;
    let tg = parse_list("tg", a.tg.as_deref().unwrap_or("128"))?;
    let reps = a.reps.unwrap_or(5);
    if reps == 0 {
        bail!("-r must be at least 1");
    }
    let tests: Vec<(Test, usize)> = pp
        .iter()
        .map(|&n| (Test::Pp, n))
        .chain(tg.iter().map(|&n| (Test::Tg, n)))
        .collect();
    let plan = LlamaPlan {
        tests,
        reps,
        device_profile,
    };
    if plan.longest() == 0 {
        bail!("nothing to run: give --pp and/or --tg");
    }
    Ok(plan)
}

/// The workload plan of the flags; `slo` is --slo or the --target profile's default.
fn workload_plan(
    a: &BenchArgs,
    slo: Option<&str>,
    device_profile: Option<String>,
) -> Result<WorkloadPlan> {
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
    let load = load_mode(a)?;
    if a.requests == Some(0) {
        bail!("--requests must be at least 1");
    }
    let sampler = SamplerConfig {
        temperature: a.temp,
        seed: a.seed,
        ..SamplerConfig::default()
    };
    sampler
        .validate()
        .map_err(|e| anyhow::anyhow!("bad sampling parameters: {e}"))?;
    let source = workload_source(a)?;
    let slo = Slo::resolve(slo, &source.name(), &a.slo_max, a.slo_target)?;
    Ok(WorkloadPlan {
        source,
        load,
        requests: a.requests,
        duration_ms: a.duration.map(|d| (d * 1000.0) as u64),
        warmup: a.warmup,
        max_tokens: a.max_tokens,
        chat_template: !a.raw_prompts,
        seed: a.seed,
        sampler,
        ignore_eos: a.ignore_eos,
        record_tokens: !a.no_token_recording,
        slo,
        server: ServerPlan {
            batching: !a.no_batching,
            prefix_caching: !a.no_prefix_cache,
            kv_budget_bytes: a.kv_budget_mib.map(|m| m << 20).unwrap_or(512 << 20),
            spec: None,
        },
        device_profile,
        by_tag: a.by_tag,
        score: a.score,
        power: None,
        price: None,
    })
}

/// The price for $/Mtok: --cost-per-mtok, --cost-per-hour, else the --target profile's.
fn price(a: &BenchArgs, target: Option<&Target>) -> Result<Option<ember_bench::record::Price>> {
    use ember_bench::record::Price;
    let ok = |v: f64, flag: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(anyhow::anyhow!(
                "{flag} must be a price of zero or more, got {v}"
            ))
        }
    };
    Ok(match (a.cost_per_mtok, a.cost_per_hour) {
        (Some(_), Some(_)) => bail!(
            "give --cost-per-hour (a device or instance) or --cost-per-mtok (an API), not both"
        ),
        (Some(m), None) => Some(Price {
            source: "--cost-per-mtok".into(),
            usd_per_hour: None,
            usd_per_mtok: Some(ok(m, "--cost-per-mtok")?),
        }),
        (None, Some(h)) => Some(Price {
            source: "--cost-per-hour".into(),
            usd_per_hour: Some(ok(h, "--cost-per-hour")?),
            usd_per_mtok: None,
        }),
        (None, None) => target
            .filter(|t| t.profile.cost_per_hour_usd > 0.0)
            .map(|t| Price {
                source: format!("profile {}", t.device_profile),
                usd_per_hour: Some(t.profile.cost_per_hour_usd),
                usd_per_mtok: None,
            }),
    })
}

/// One run under a load (sync, --concurrency, --rate; --think-ms alone is one thinking
/// user), or --sweep.
fn load_mode(a: &BenchArgs) -> Result<LoadMode> {
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
    if a.sweep {
        return Ok(LoadMode::Sweep(SweepConfig {
            requests_per_point: a.requests.unwrap_or(16).max(4),
            max_points: a.sweep_points.max(1),
            budget: Duration::from_secs_f64(a.sweep_budget.max(1.0)),
            arrivals,
            seed: a.seed,
        }));
    }
    Ok(LoadMode::Run(match (a.concurrency, a.rate) {
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
    }))
}

/// --dataset, --sharegpt, or a preset (default chat) with --input-len/--output-len/--max-tokens.
fn workload_source(a: &BenchArgs) -> Result<WorkloadSource> {
    if a.score && a.dataset.is_none() {
        bail!(
            "--score needs --dataset (entries with \"expected\" answers, e.g. --dataset eval); synthetic prompts and ShareGPT replies have nothing to score"
        );
    }
    if let Some(d) = &a.dataset {
        return Ok(WorkloadSource::Dataset(d.clone()));
    }
    if let Some(p) = &a.sharegpt {
        return Ok(WorkloadSource::ShareGpt(p.clone()));
    }
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
    Ok(WorkloadSource::Synthetic(spec))
}

pub fn run(a: BenchArgs) -> Result<()> {
    let cmd = BenchCommand::try_from(a)?;
    match &cmd.mode {
        Mode::Llama(plan) => cmd.llama_bench(plan),
        Mode::Workload(plan) => cmd.workload(plan),
    }
}

impl BenchCommand {
    /// The engine, with context `ctx` when given (else the flags'). With --target the model is
    /// opened first, to size the context to the profile's KV budget, and the engine is built
    /// over it; the applied profile comes back for the JSON output.
    fn open(&self, ctx: Option<usize>) -> Result<(Engine, Option<serde_json::Value>)> {
        let (engine, applied) =
            Target::open_engine(self.target.as_ref(), self.engine.clone(), ctx)?;
        Ok((engine, applied.map(|a| a.json)))
    }

    fn llama_bench(&self, plan: &LlamaPlan) -> Result<()> {
        let longest = plan.longest();
        let (engine, target) = self.open(Some(longest.max(16)))?;
        let c = engine.model.config();
        if longest > c.n_ctx_train {
            bail!(
                "--pp/--tg of {longest} tokens exceeds the model's training context of {}",
                c.n_ctx_train
            );
        }
        let mut store = super::open_store(self.no_db, self.db.as_ref())?;
        let bar = super::progress_bar(
            plan.tests.len() * plan.reps,
            "{spinner} bench [{bar:30}] {pos}/{len} {msg}",
        );
        let outcome = session::llama_bench(&engine, plan, store.as_mut(), &mut |p| match p {
            LlamaProgress::Test(name) => bar.set_message(name.to_string()),
            LlamaProgress::Rep => bar.inc(1),
        })?;
        bar.finish_and_clear();
        print_llama_bench(&engine, &outcome.results, self.json, target)?;
        match outcome.stored {
            Some(Ok(path)) => {
                eprintln!("ember: run saved to {}", path.display());
                Ok(())
            }
            Some(Err(e)) => Err(e).context("the results store did not get the run"),
            None => Ok(()),
        }
    }

    /// The server to measure (`--url`): its endpoint checked and asked for its model, the GGUF
    /// opened for its tokenizer only (no weights are read).
    fn remote(&self, r: &RemoteOpts) -> Result<Remote> {
        let same_model = self.engine.model.is_some();
        let path = crate::engine::model_path(self.engine.model.clone())?;
        let file =
            Arc::new(GgufFile::open(&path).with_context(|| format!("opening {}", path.display()))?);
        let tokenizer = Arc::new(
            Tokenizer::from_gguf(&file.metadata)
                .with_context(|| format!("the tokenizer of {}", path.display()))?,
        );
        let train_ctx = file
            .metadata
            .get_str("general.architecture")
            .and_then(|a| file.metadata.get_u64(&format!("{a}.context_length")))
            .map_or(4096, |n| n as usize);
        let endpoint = Endpoint::connect(
            &r.url,
            r.api,
            r.model.clone(),
            r.api_key.clone(),
            same_model,
            r.timeout,
        )?;
        eprintln!(
            "ember bench: {} · model '{}'{} · {} API",
            endpoint.base,
            endpoint.model,
            match endpoint.server_header.as_str() {
                "" => String::new(),
                h => format!(" · server {h}"),
            },
            endpoint.api.name()
        );
        Ok(Remote {
            endpoint,
            file,
            tokenizer,
            same_model,
            n_ctx: self.engine.ctx.unwrap_or(train_ctx.min(4096)),
        })
    }

    /// A workload run (or sweep): the session runs and stores it, this prints it.
    fn workload(&self, plan: &WorkloadPlan) -> Result<()> {
        let (engine, remote, target, draft);
        let session = match &self.remote {
            Some(r) => {
                remote = self.remote(r)?;
                target = None;
                Session::remote(&remote, plan)?
            }
            None => {
                (engine, target) = self.open(None)?;
                draft = self.spec.open_draft(&self.engine, &engine)?;
                if plan.server.spec.is_some() {
                    eprintln!("ember bench: {}", self.spec.describe());
                }
                Session::new(&engine, plan)?.with_draft(draft.as_ref())
            }
        };
        for note in session.notes() {
            eprintln!("ember bench: {note}");
        }
        let bar = super::progress_bar(
            session.planned_requests().unwrap_or(0),
            "{spinner} bench {msg} [{bar:30}] {pos}/{len} requests, {elapsed}",
        );
        bar.set_message(session.label());
        let mut on_progress = |p: &Progress| {
            if let Some(n) = p.planned {
                bar.set_length(n as u64);
            }
            bar.set_position(p.done as u64);
        };
        // The results store: the run row first, then each request as it finishes (a sweep
        // stores each of its steps so, as a run of its own).
        let mut store = super::open_store(self.no_db, self.db.as_ref())?;
        let mut outcome = session.run(store.as_mut(), &mut on_progress)?;
        bar.finish_and_clear();
        self.energy_fallback(&mut outcome.summary);
        match (&outcome.stored, &store) {
            (Some(Ok(n)), Some(st)) if *n > 1 => {
                eprintln!(
                    "ember: {n} sweep steps saved as runs to {}",
                    st.path().display()
                )
            }
            (Some(Ok(_)), Some(st)) => eprintln!("ember: run saved to {}", st.path().display()),
            _ => {}
        }
        self.print_workload(plan, &outcome, target)?;
        let failed: Vec<&str> = outcome
            .result
            .records
            .iter()
            .filter(|r| !r.warmup && r.failed())
            .filter_map(|r| r.error.as_deref())
            .collect();
        if let Some(first) = failed.first() {
            eprintln!(
                "ember bench: {} requests failed; the first: {first}",
                failed.len()
            );
        }
        if !failed.is_empty() && failed.len() == outcome.summary.n_measured {
            match self.remote {
                Some(_) => bail!("every request to the server failed"),
                None => bail!("every request failed"),
            }
        }
        // Figures first, then the verdict on storing them: a run that could not record what it
        // measured exits non-zero.
        match outcome.stored {
            Some(Err(e)) => Err(e).context("the results store did not get the whole run"),
            _ => Ok(()),
        }
    }

    /// Where no sensor measured the run: say why, and with a --target profile give its
    /// estimate, labelled as one (shown, never stored as a measurement).
    fn energy_fallback(&self, s: &mut ember_bench::metrics::Summary) {
        if s.energy.is_some() || s.energy_gap.is_some() {
            return;
        }
        if self.remote.is_some() {
            s.energy_gap = Some("the server's power is not visible from this client".into());
            return;
        }
        let mut why = "no power sensor found (RAPL, hwmon, INA3221, Pi 5 PMIC)".to_string();
        for n in &self.power_notes {
            why.push_str("; ");
            why.push_str(n);
        }
        s.energy_gap = Some(why);
        if let Some(t) = &self.target {
            let w = t.profile.typical_power_w;
            s.energy = Some(ember_bench::power::Energy::new(
                "estimate",
                &format!("profile {}: typical {w} W × the window", t.device_profile),
                w * s.window_s,
                s.window_s,
                s.output_tokens,
            ));
        }
    }

    /// --out, then the JSON or the table.
    fn print_workload(
        &self,
        plan: &WorkloadPlan,
        o: &Outcome,
        target: Option<serde_json::Value>,
    ) -> Result<()> {
        if let Some(path) = &self.out {
            let j = serde_json::json!({"run": o.result, "sweep": o.sweep, "overhead": o.overhead});
            std::fs::write(path, serde_json::to_vec_pretty(&j)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if self.json {
            let j = serde_json::json!({
                "workload": o.result.workload, "provenance": o.result.provenance, "slo": plan.slo,
                "summary": o.summary, "sweep": o.sweep, "by_tag": o.tags, "overhead": o.overhead,
                "notes": o.notes, "target": target,
            });
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            print!(
                "{}",
                ember_bench::table::render(
                    &o.result,
                    &o.summary,
                    o.sweep.as_ref(),
                    &o.tags,
                    // Over HTTP `step` only drains a channel: there is no engine time to weigh.
                    self.remote.is_none().then(|| o.overhead.fraction())
                )
            );
        }
        Ok(())
    }
}

/// llama-bench's table (or JSON): one row per test, tokens/s as mean ± sd.
fn print_llama_bench(
    engine: &Engine,
    results: &[BenchResult],
    json: bool,
    target: Option<serde_json::Value>,
) -> Result<()> {
    let name = engine
        .file
        .metadata
        .get_str("general.name")
        .unwrap_or("?")
        .to_string();
    let size_mib = engine.model.weight_bytes() as f64 / (1 << 20) as f64;
    let threads = engine.cfg.threads;
    if json {
        let out = serde_json::json!({
            "model": name, "model_path": engine.file.path(), "weights_bytes": engine.model.weight_bytes(),
            "threads": threads, "backend": engine.model.backend(), "adapter": engine.model.adapter().map(|a| a.0),
            "isa": format!("{:?}", ember_runtime::quant::best_isa()),
            "target": target,
            "results": results, "rss_peak_bytes": ember_runtime::sys::memory().rss_peak_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        // On a GPU, a column of kernel launches per token (what bounds a small model there).
        let gpu = results.iter().any(|r| r.launches_per_token.is_some());
        let (lh, ls) = if gpu {
            (" launches/token |", " ---: |")
        } else {
            ("", "")
        };
        println!("| model | size | backend | threads | test | t/s |{lh}");
        println!("| --- | ---: | --- | ---: | ---: | ---: |{ls}");
        for r in results {
            let be = match engine.model.adapter() {
                Some((a, _)) => format!("{} ({a})", engine.model.backend()),
                None => format!("CPU ({:?})", ember_runtime::quant::best_isa()),
            };
            let l = r
                .launches_per_token
                .map(|l| format!(" {l:.1} |"))
                .unwrap_or_default();
            println!(
                "| {name} | {size_mib:.2} MiB | {be} | {threads} | {} | {:.2} ± {:.2} |{l}",
                r.test, r.mean_tps, r.sd_tps
            );
        }
    }
    Ok(())
}
