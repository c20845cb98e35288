//! `ember serve`: flags, the engine and the results store's run; the server is `crate::serve`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use ember_bench::record::{RunResult, WorkloadInfo};
use ember_runtime::scheduler::SchedulerConfig;

use crate::engine::EngineOpts;
use crate::serve::{Recording, ServeConfig};
use crate::target::Target;

#[derive(FromArgs)]
/// Serve the model over HTTP with OpenAI's API, on the batching engine (continuous
/// batching, prefix cache): POST /v1/chat/completions (the model's chat template) and
/// /v1/completions (text or token ids), both with "stream": true (server-sent events);
/// GET /v1/models, /health, /metrics (Prometheus: TTFT, ITL, e2e histograms, tokens,
/// running/waiting requests, KV blocks, prefix-cache hits); POST /tokenize and /detokenize
/// (as llama-server). Every request is recorded in the results store (a run with workload
/// 'serve') unless --no-db. Ctrl-C or SIGTERM drains: no new requests, the ones in flight
/// finish (a second signal cancels them), the store is committed, exit 0.
/// Example: ember serve -m model.gguf --port 8080, then any OpenAI client with
/// base_url http://127.0.0.1:8080/v1.
#[argh(subcommand, name = "serve")]
pub struct ServeArgs {
    /// GGUF model file (default: the embedded tiny model)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)
    #[argh(option, default = "IpAddr::from([127, 0, 0, 1])")]
    host: IpAddr,
    /// port to listen on; 0 picks a free one, printed at start (default 8080)
    #[argh(option, default = "8080")]
    port: u16,
    /// require 'Authorization: Bearer KEY' on every endpoint but /health (default: $EMBER_API_KEY if set, else none)
    #[argh(option)]
    api_key: Option<String>,
    /// the model id clients use in "model" and /v1/models lists (default: the file name without .gguf)
    #[argh(option)]
    model_name: Option<String>,
    /// where to run: auto (CUDA if built in and the driver is there, else a hardware GPU if wgpu finds one, else the CPU), cpu, wgpu (any adapter, software ones too), vulkan, metal, cuda (an error where it cannot start) (default auto)
    #[argh(option)]
    backend: Option<String>,
    /// worker threads (default: all cores)
    #[argh(option, short = 't')]
    threads: Option<usize>,
    /// context size in tokens (default: min(training context, 4096))
    #[argh(option, short = 'c')]
    ctx: Option<usize>,
    /// prompt tokens per forward pass (default 512)
    #[argh(option, default = "512")]
    batch: usize,
    /// most sequences decoding at once (default 16)
    #[argh(option, default = "16")]
    max_running: usize,
    /// most requests accepted and not finished; more get 429 with Retry-After (default 256)
    #[argh(option, default = "256")]
    max_queue: usize,
    /// KV cache budget in MiB (default 512, or the --target profile's); on the CPU it is allocated at start, so the server's memory is the weights plus this from the first request on and does not grow (the prefix cache keeps finished requests' blocks inside it)
    #[argh(option)]
    kv_budget_mib: Option<usize>,
    /// turn off prefix caching (shared prompt prefixes are recomputed)
    #[argh(switch)]
    no_prefix_cache: bool,
    /// largest request body in KiB; larger gets 413 (default 4096)
    #[argh(option, default = "4096")]
    max_body_kib: usize,
    /// seconds a client has to send its request headers (slower: the connection is closed), and again its body (slower: 408) (default 30)
    #[argh(option, default = "30.0")]
    body_timeout: f64,
    /// read the weights into memory instead of mapping the file (as on run and bench)
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
    /// device profile (targets/NAME.toml, built in; or a .toml path): threads, backend and the KV budget (caps --ctx); explicit flags win
    #[argh(option)]
    target: Option<String>,
    /// results store to record served requests in (default: $EMBER_DB or ~/.local/share/ember/ember.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// do not record served requests
    #[argh(switch)]
    no_db: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if !(a.body_timeout > 0.0 && a.body_timeout.is_finite()) {
        bail!("--body-timeout must be a positive number of seconds");
    }
    if a.max_running == 0 || a.max_queue == 0 {
        bail!("--max-running and --max-queue must be at least 1");
    }
    let target = match &a.target {
        Some(spec) => Some(Target::resolve(
            spec,
            a.threads,
            a.backend.as_deref(),
            None,
            &[],
            None,
        )?),
        None => None,
    };
    let opts = Target::engine_opts(
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
    // With --target the model is opened first, to size the context and the KV budget to the
    // profile's memory (as bench does).
    let spec_opts = crate::engine::SpecOpts {
        lookup: a.lookup,
        draft: a.draft.clone(),
        draft_max: a.draft_max,
        draft_min: a.draft_min,
        draft_p_min: a.draft_p_min,
    };
    let spec = spec_opts.config()?;
    let (engine, applied) = Target::open_engine(target.as_ref(), opts.clone(), None)?;
    let draft = spec_opts.open_draft(&opts, &engine)?;
    if spec.is_some() {
        eprintln!("ember serve: {}", spec_opts.describe());
    }
    let kv_budget = a
        .kv_budget_mib
        .map(|m| m << 20)
        .or_else(|| applied.and_then(|ap| ap.json["kv_budget_bytes"].as_u64().map(|b| b as usize)));
    let path = engine.file.path().to_path_buf();
    let model_id = a.model_name.clone().unwrap_or_else(|| {
        let name = path
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        name.strip_suffix(".gguf")
            .map(str::to_string)
            .unwrap_or(name)
    });
    let mut aliases = vec![path.display().to_string()];
    if let Some(n) = path.file_name() {
        aliases.push(n.to_string_lossy().into_owned());
    }
    if let Some(m) = &a.model {
        aliases.push(m.display().to_string());
    }
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("EMBER_API_KEY").ok())
        .filter(|k| !k.is_empty());
    if api_key.is_none() && !a.host.is_loopback() {
        eprintln!(
            "ember serve: warning: listening on {} without --api-key: anyone who can reach this port can use the model",
            a.host
        );
    }
    let rec = match super::open_store(a.no_db, a.db.as_ref())? {
        Some(store) => Some(Recording {
            store,
            head: head(
                &engine,
                target.as_ref().map(|t| t.device_profile.clone()),
                &a,
            )?,
        }),
        None => None,
    };
    let cfg = ServeConfig {
        addr: SocketAddr::new(a.host, a.port),
        model_id,
        aliases,
        api_key,
        scheduler: SchedulerConfig {
            kv_budget_bytes: kv_budget.unwrap_or(512 << 20),
            max_running: a.max_running,
            max_batch_tokens: a.batch.max(1),
            prefix_caching: !a.no_prefix_cache,
            ..SchedulerConfig::default()
        },
        spec,
        draft,
        max_queue: a.max_queue,
        body_limit: a.max_body_kib.saturating_mul(1024),
        body_timeout: Duration::from_secs_f64(a.body_timeout),
    };
    crate::serve::serve(engine, cfg, rec)
}

/// The serve run's row: provenance as bench stores it, workload 'serve' (what clients send is
/// not a workload ember chose, so its hash is this run's own), load `{"mode":"serve"}`.
fn head(
    engine: &ember_runtime::engine::Engine,
    device_profile: Option<String>,
    a: &ServeArgs,
) -> Result<RunResult> {
    let started = ember_bench::store::now_rfc3339();
    let provenance = ember_bench::provenance::for_engine(engine, device_profile);
    let hash = format!(
        "serve-{}-{}-{}",
        provenance.model_sha256.get(..16).unwrap_or(""),
        started,
        std::process::id()
    );
    let params = serde_json::json!({
        "transport": "http", "n_ctx": engine.cfg.n_ctx, "max_running": a.max_running,
        "max_queue": a.max_queue, "prefix_caching": !a.no_prefix_cache,
        "kv_budget_mib": a.kv_budget_mib,
        "lookup": a.lookup, "draft": a.draft.as_ref().map(|p| p.display().to_string()),
        "draft_max": a.draft_max, "draft_min": a.draft_min, "draft_p_min": a.draft_p_min,
    });
    let slo = ember_bench::slo::Slo::resolve(Some("none"), "serve", &[], None)
        .context("the 'none' SLO")?;
    Ok(RunResult {
        started_at: started,
        provenance,
        workload: WorkloadInfo {
            name: "serve".into(),
            seed: 0,
            hash,
            load: serde_json::json!({"mode": "serve", "transport": "http"}).to_string(),
            params: params.to_string(),
            n_requests: 0,
            n_warmup: 0,
        },
        slo_name: slo.name.clone(),
        slo: serde_json::to_string(&slo)?,
        ..Default::default()
    })
}
