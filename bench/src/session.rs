//! A benchmark session: an engine and a typed plan in, figures out, stored as they are made.
//!
//! [`WorkloadPlan`] says what the simulated users send ([`WorkloadSource`]), under which load
//! ([`LoadMode`]: one run, or a sweep for `max_goodput_rate`), against which SLO and on which
//! server ([`ServerPlan`]). [`Session::new`] builds the workload for the engine's tokenizer and
//! context; [`Session::run`] drives the [`harness`] on the real clock, commits every request to
//! the results store the moment it finishes ([`crate::live`]; a sweep stores each step as a run
//! of its own), and returns the run's figures in an [`Outcome`]. llama-bench mode is
//! [`llama_bench`]. The command line builds the plans from its flags (and validates them there),
//! opens the engine and the store, and prints what comes back.

use std::path::PathBuf;
use std::sync::Arc;

use ember_runtime::chat::{ChatError, ChatTemplate};
use ember_runtime::engine::Engine;
use ember_runtime::gguf::GgufFile;
use ember_runtime::model::ModelError;
use ember_runtime::sample::SamplerConfig;
use ember_runtime::scheduler::{Scheduler, SchedulerConfig};
use ember_runtime::serve::{SequentialServer, Server};
use ember_runtime::spec::{SpecConfig, SpecError};
use ember_runtime::tokenizer::Tokenizer;

use crate::harness::{
    self, HarnessOptions, Hooks, Overhead, Progress, RunOutput, SweepConfig, SweepObserver,
    SystemClock,
};
use crate::live::{self, LiveRun, SweepRecorder};
use crate::llamabench::{self, BenchResult, Test};
use crate::load::{Limits, LoadSpec};
use crate::metrics::{self, Summary, TagRow};
use crate::record::{RequestRecord, RunResult, SweepResult, WorkloadInfo};
use crate::remote::{Endpoint, HttpServer};
use crate::slo::Slo;
use crate::store::{self, Store, StoreError};
use crate::workload::{self, DatasetOptions, SyntheticSpec, Workload, WorkloadError};

/// What goes wrong in a session (after the plan was built: the plan's own checks are its
/// builder's).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("reading the dataset {path}")]
    ReadDataset {
        path: String,
        source: std::io::Error,
    },
    #[error("reading the ShareGPT file {path}")]
    ReadShareGpt {
        path: String,
        source: std::io::Error,
    },
    #[error("the model's chat template does not parse")]
    ChatTemplate(#[source] ChatError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(
        "--score: {0} entries are scored \"choice\", which ranks the options by the model's log-probabilities; that needs the model in-process, not --url"
    )]
    ChoiceOverHttp(usize),
}

/// What the simulated users send.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkloadSource {
    /// Synthetic prompts of a preset's shape (lengths possibly overridden and capped).
    Synthetic(SyntheticSpec),
    /// A JSONL dataset file, or `eval` for the evaluation set shipped with ember.
    Dataset(String),
    /// A ShareGPT JSON/JSONL file.
    ShareGpt(PathBuf),
}

impl WorkloadSource {
    /// The workload's name in records and tables: the preset's, `dataset:…` or `sharegpt:…`.
    pub fn name(&self) -> String {
        match self {
            WorkloadSource::Synthetic(spec) => spec.name.clone(),
            WorkloadSource::Dataset(d) => format!("dataset:{d}"),
            WorkloadSource::ShareGpt(p) => format!("sharegpt:{}", p.display()),
        }
    }
}

/// How the requests are sent.
#[derive(Clone, Debug)]
pub enum LoadMode {
    /// One run under this load.
    Run(LoadSpec),
    /// Find `max_goodput_rate`: a series of open-loop runs ([`harness::sweep`]).
    Sweep(SweepConfig),
}

/// Which server drives the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerPlan {
    /// Continuous batching ([`Scheduler`]); else one request at a time ([`SequentialServer`]).
    pub batching: bool,
    /// The scheduler reuses cached prompt prefixes.
    pub prefix_caching: bool,
    /// The scheduler's KV cache budget.
    pub kv_budget_bytes: usize,
    /// Speculative decoding (`--lookup`, `--draft`; the draft model itself comes with
    /// [`Session::with_draft`]).
    pub spec: Option<SpecConfig>,
}

/// A benchmark run, decided: everything [`Session`] needs besides the engine and the store.
#[derive(Clone, Debug)]
pub struct WorkloadPlan {
    pub source: WorkloadSource,
    pub load: LoadMode,
    /// Measured requests (None: the preset's default, or the dataset's size).
    pub requests: Option<usize>,
    /// Stop sending new requests after this long (ms).
    pub duration_ms: Option<u64>,
    /// Warm-up requests, run first and left out of the figures.
    pub warmup: usize,
    /// Cap on every request's max tokens (datasets: also the default for lines without one).
    pub max_tokens: Option<usize>,
    /// Datasets: send prompts through the model's chat template (else raw text).
    pub chat_template: bool,
    /// Seed of synthetic prompts and arrivals; the sampler carries its own.
    pub seed: u64,
    pub sampler: SamplerConfig,
    pub ignore_eos: bool,
    /// Per-token recording (token text, a memory sample per step); timestamps are kept anyway.
    pub record_tokens: bool,
    pub slo: Slo,
    pub server: ServerPlan,
    /// Device profile name for the provenance.
    pub device_profile: Option<String>,
    /// Also compute figures per request tag.
    pub by_tag: bool,
    /// Score the answers of dataset entries that have `expected` (`--score`).
    pub score: bool,
    /// The power sensor to read during an in-process run ([`crate::power::discover`]).
    pub power: Option<crate::power::PowerSource>,
    /// The price for $/Mtok (`--cost-per-hour`, a profile's, or `--cost-per-mtok`).
    pub price: Option<crate::record::Price>,
}

/// What a session measured, for printing.
pub struct Outcome {
    /// The run as stored: provenance, workload, SLO verdicts, records, memory.
    pub result: RunResult,
    pub summary: Summary,
    /// A sweep's steps; the figures are its reported step's (the best passing rate).
    pub sweep: Option<SweepResult>,
    pub overhead: Overhead,
    /// Per-tag figures when the plan asked for them.
    pub tags: Vec<TagRow>,
    /// What the user should know about the workload (e.g. prompts clamped to the context).
    pub notes: Vec<String>,
    /// None without a store; else how many runs it got (a sweep stores one per step), or the
    /// first thing that kept it from getting every request.
    pub stored: Option<Result<usize, StoreError>>,
}

/// What a session measures: an engine in this process, or a server over HTTP.
#[derive(Clone, Copy)]
pub enum Subject<'e> {
    Engine(&'e Engine),
    Remote(&'e Remote),
}

/// `ember bench --url`: the endpoint, and the GGUF whose tokenizer (and chat template) builds
/// the workload exactly as in-process, so that the workload hash is the same.
pub struct Remote {
    pub endpoint: Endpoint,
    pub file: Arc<GgufFile>,
    pub tokenizer: Arc<Tokenizer>,
    /// The GGUF is the model the server runs (given with `-m`): its sha256 and arch go in the
    /// provenance and the client counts output tokens with its tokenizer. Else (the embedded
    /// model) it only writes the prompts, and the server's `usage` is the only count.
    pub same_model: bool,
    /// The context the workload is cut to (the server's own is unknown).
    pub n_ctx: usize,
}

impl Subject<'_> {
    fn tokenizer(&self) -> &Tokenizer {
        match self {
            Subject::Engine(e) => &e.tokenizer,
            Subject::Remote(r) => &r.tokenizer,
        }
    }
    fn file(&self) -> &GgufFile {
        match self {
            Subject::Engine(e) => &e.file,
            Subject::Remote(r) => &r.file,
        }
    }
    fn n_ctx(&self) -> usize {
        match self {
            Subject::Engine(e) => e.cfg.n_ctx,
            Subject::Remote(r) => r.n_ctx,
        }
    }
}

/// A workload built for an engine, ready to run.
pub struct Session<'e> {
    subject: Subject<'e>,
    /// The draft model that proposes tokens (`--draft`).
    draft: Option<&'e Engine>,
    plan: &'e WorkloadPlan,
    workload: Workload,
    limits: Limits,
}

impl<'e> Session<'e> {
    /// Builds the plan's workload for `engine`: reads and tokenizes a dataset, or cuts
    /// synthetic prompts to fit the engine's context.
    pub fn new(engine: &'e Engine, plan: &'e WorkloadPlan) -> Result<Self, SessionError> {
        Session::with_subject(Subject::Engine(engine), plan)
    }

    /// The same for a remote server (`ember bench --url`): the workload is built with the
    /// GGUF's tokenizer, the requests go over HTTP.
    pub fn remote(remote: &'e Remote, plan: &'e WorkloadPlan) -> Result<Self, SessionError> {
        Session::with_subject(Subject::Remote(remote), plan)
    }

    fn with_subject(subject: Subject<'e>, plan: &'e WorkloadPlan) -> Result<Self, SessionError> {
        let workload = match &plan.source {
            WorkloadSource::Synthetic(spec) => synthetic(subject, plan, spec),
            _ => dataset(subject, plan)?,
        };
        let limits = Limits {
            max_requests: if plan.duration_ms.is_some() && plan.requests.is_none() {
                None
            } else {
                Some(workload.items.len())
            },
            max_duration_ms: plan.duration_ms,
        };
        Ok(Session {
            subject,
            draft: None,
            plan,
            workload,
            limits,
        })
    }

    /// Speculate with this draft model (the plan's `server.spec` says how).
    pub fn with_draft(mut self, draft: Option<&'e Engine>) -> Self {
        self.draft = draft;
        self
    }

    /// Notes about the workload (e.g. prompts clamped to the context).
    pub fn notes(&self) -> &[String] {
        &self.workload.notes
    }

    /// The load of a single run; a sweep's base (each of its steps sets its own).
    fn base_load(&self) -> LoadSpec {
        match &self.plan.load {
            LoadMode::Run(load) => load.clone(),
            LoadMode::Sweep(_) => LoadSpec::Sync,
        }
    }

    /// How many measured requests the run will send (None: until the duration limit).
    pub fn planned_requests(&self) -> Option<usize> {
        harness::planned_requests(&self.base_load(), &self.limits, self.workload.items.len())
    }

    /// "chat · concurrency 4", "rag · sweep": the workload and the load, for progress lines.
    pub fn label(&self) -> String {
        let load = match &self.plan.load {
            LoadMode::Run(load) => load.describe(),
            LoadMode::Sweep(_) => "sweep".into(),
        };
        format!("{} · {load}", self.workload.name)
    }

    /// Runs the plan (a run or a sweep), storing it in `store` as it goes, and returns the
    /// figures. A run whose requests could not all be stored still returns its figures, with
    /// the storage error in [`Outcome::stored`].
    pub fn run(
        self,
        mut store: Option<&mut Store>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Outcome, SessionError> {
        let head = self.head()?;
        let mut server = make_server(self.subject, &self.plan.server, self.draft)?;
        let opts = HarnessOptions {
            load: self.base_load(),
            limits: self.limits,
            record_tokens: self.plan.record_tokens,
            keep_text: self.plan.score,
            sample_memory: matches!(self.subject, Subject::Engine(_)),
            slo: Some(self.plan.slo.clone()),
            // This machine's power is the client's over --url, not the server's.
            power: match self.subject {
                Subject::Engine(_) => self.plan.power.clone(),
                Subject::Remote(_) => None,
            },
            ..Default::default()
        };
        let (out, sweep, stored) = match &self.plan.load {
            LoadMode::Sweep(cfg) => {
                let mut recorder = store
                    .as_deref_mut()
                    .map(|st| SweepRecorder::new(st, head.clone(), &self.plan.slo));
                let observer: &mut dyn SweepObserver = match recorder.as_mut() {
                    Some(r) => r,
                    None => &mut (),
                };
                let (sw, out) = harness::sweep(
                    &mut *server,
                    &SystemClock,
                    &self.workload,
                    &opts,
                    &self.plan.slo,
                    cfg,
                    progress,
                    observer,
                );
                let stored = recorder.map(|r| r.into_result().map(|runs| runs.len()));
                (out, Some(sw), stored)
            }
            LoadMode::Run(load) => {
                let (out, stored) =
                    self.run_once(&mut *server, store, &head, load, &opts, progress)?;
                (out, None, stored)
            }
        };
        self.figures(head, out, sweep, stored)
    }

    /// One run, its row stored first and each request as it finishes.
    fn run_once(
        &self,
        server: &mut dyn Server,
        mut store: Option<&mut Store>,
        head: &RunResult,
        load: &LoadSpec,
        opts: &HarnessOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(RunOutput, Option<Result<usize, StoreError>>), SessionError> {
        let w = &self.workload;
        let mut live = match store.as_deref_mut() {
            Some(st) => {
                let schedule = harness::arrival_schedule(load, &self.limits, w.items.len());
                let mut h = head.clone();
                h.workload.hash = workload::workload_hash(w, load, &schedule);
                h.workload.load = serde_json::to_string(load)?;
                h.workload.n_requests = w.items.len();
                h.workload.n_warmup = w.warmup.len();
                Some((LiveRun::begin(st, &h)?, h))
            }
            None => None,
        };
        let recording = live.is_some();
        let mut record = |r: &RequestRecord| {
            if let Some((l, _)) = live.as_mut() {
                l.record(r)
            }
        };
        let hooks = Hooks {
            progress: Some(progress),
            record: if recording { Some(&mut record) } else { None },
        };
        let out = harness::run(server, &SystemClock, w, opts, hooks);
        let stored = match (live, store) {
            (Some((live, h)), Some(st)) => {
                let (result, _) = live::run_result(&h, &out, &self.plan.slo);
                Some(live.finish(st, &result).map(|_| 1))
            }
            _ => None,
        };
        Ok((out, stored))
    }

    /// The run's row before it runs: provenance, workload name, seed and parameters, SLO.
    fn head(&self) -> Result<RunResult, SessionError> {
        let (w, plan) = (&self.workload, self.plan);
        let provenance = match self.subject {
            Subject::Engine(e) => crate::provenance::for_engine(e, plan.device_profile.clone()),
            Subject::Remote(r) => crate::provenance::for_remote(r, plan.device_profile.clone()),
        };
        let params = serde_json::json!({
            "workload": w.params, "limits": self.limits, "sampler": format!("{:?}", w.sampler),
            "ignore_eos": w.ignore_eos, "record_tokens": plan.record_tokens,
            "n_ctx": self.subject.n_ctx(),
            "speculation": plan.server.spec.as_ref().map(|s| serde_json::json!({
                "config": s,
                "draft_model": self.draft.map(|d| d.file.path().display().to_string()),
            })),
        });
        Ok(RunResult {
            started_at: store::now_rfc3339(),
            provenance,
            workload: WorkloadInfo {
                name: w.name.clone(),
                seed: plan.seed,
                params: serde_json::to_string(&params)?,
                ..Default::default()
            },
            slo_name: plan.slo.name.clone(),
            slo: serde_json::to_string(&plan.slo)?,
            price: plan.price.clone(),
            ..Default::default()
        })
    }

    /// The figures of the run, or of a sweep's reported step (its best passing rate, whose
    /// workload hash is that of the rate it ran at, without warm-up).
    fn figures(
        mut self,
        mut head: RunResult,
        out: RunOutput,
        sweep: Option<SweepResult>,
        stored: Option<Result<usize, StoreError>>,
    ) -> Result<Outcome, SessionError> {
        let load_used = match (&sweep, &self.plan.load) {
            (Some(sw), LoadMode::Sweep(cfg)) => LoadSpec::Rate {
                rps: sw
                    .max_goodput_rate
                    .or(sw.points.last().map(|p| p.rate_rps))
                    .unwrap_or(1.0),
                arrivals: cfg.arrivals,
                seed: self.plan.seed,
            },
            _ => self.base_load(),
        };
        let w = &mut self.workload;
        if sweep.is_some() {
            w.warmup.clear();
            w.items.truncate(out.records.len().max(1));
        }
        let schedule = harness::arrival_schedule(&load_used, &self.limits, w.items.len());
        head.workload.hash = workload::workload_hash(w, &load_used, &schedule);
        head.workload.load = serde_json::to_string(&load_used)?;
        let (result, summary) = live::run_result(&head, &out, &self.plan.slo);
        let tags = if self.plan.by_tag {
            metrics::by_tag(&out.records)
        } else {
            vec![]
        };
        Ok(Outcome {
            result,
            summary,
            sweep,
            overhead: out.overhead,
            tags,
            notes: std::mem::take(&mut w.notes),
            stored,
        })
    }
}

fn make_server<'e>(
    subject: Subject<'e>,
    s: &ServerPlan,
    draft: Option<&'e Engine>,
) -> Result<Box<dyn Server + 'e>, SessionError> {
    let engine = match subject {
        Subject::Engine(e) => e,
        Subject::Remote(r) => {
            return Ok(Box::new(HttpServer::new(
                r.endpoint.clone(),
                r.tokenizer.clone(),
                r.same_model,
            )));
        }
    };
    let server = if s.batching {
        Scheduler::new(
            engine,
            SchedulerConfig {
                kv_budget_bytes: s.kv_budget_bytes,
                prefix_caching: s.prefix_caching,
                ..Default::default()
            },
        )
    } else if s.spec.is_none() {
        return Ok(Box::new(SequentialServer::new(engine)));
    } else {
        Scheduler::sequential(engine)
    };
    Ok(match &s.spec {
        Some(spec) => Box::new(server.with_speculation(spec.clone(), draft)?),
        None => Box::new(server),
    })
}

fn synthetic(subject: Subject, plan: &WorkloadPlan, spec: &SyntheticSpec) -> Workload {
    let n = plan.requests.unwrap_or_else(|| spec.default_requests());
    spec.build_for(
        subject.tokenizer(),
        &subject.file().metadata,
        subject.n_ctx(),
        n,
        plan.warmup,
        plan.seed,
        plan.sampler.clone(),
    )
}

/// A dataset or ShareGPT workload: its entries tokenized (through the chat template unless
/// the plan says raw), cycled to the requests asked for; warm-ups repeat the first entry that
/// fits the context.
fn dataset(subject: Subject, plan: &WorkloadPlan) -> Result<Workload, SessionError> {
    let name = plan.source.name();
    let (entries, sharegpt) = match &plan.source {
        WorkloadSource::Dataset(d) if d == "eval" => (
            workload::parse_jsonl(workload::EVAL_SET, "bench/data/eval.jsonl")?,
            false,
        ),
        WorkloadSource::Dataset(d) => {
            let text = std::fs::read_to_string(d).map_err(|source| SessionError::ReadDataset {
                path: d.clone(),
                source,
            })?;
            (workload::parse_jsonl(&text, d)?, false)
        }
        WorkloadSource::ShareGpt(p) => {
            let path = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|source| SessionError::ReadShareGpt {
                path: path.clone(),
                source,
            })?;
            (workload::parse_sharegpt(&text, &path)?, true)
        }
        WorkloadSource::Synthetic(_) => unreachable!("synthetic workloads are built apart"),
    };
    let tpl = if plan.chat_template {
        Some(
            ChatTemplate::from_metadata_or_builtin(&subject.file().metadata)
                .map_err(SessionError::ChatTemplate)?,
        )
    } else {
        None
    };
    let opts = DatasetOptions {
        template: tpl.as_ref(),
        default_max_tokens: plan.max_tokens.unwrap_or(128),
        max_tokens_cap: plan.max_tokens,
        size_from_expected: sharegpt,
        score: plan.score,
    };
    let mut items = workload::build_dataset_items(&entries, subject.tokenizer(), &opts)?;
    decide_choices(subject, &mut items)?;
    let n = plan.requests.unwrap_or(items.len());
    let n_ctx = subject.n_ctx();
    let warmup = items
        .iter()
        .filter(|i| !i.prompt_tokens.is_empty() && i.prompt_tokens.len() < n_ctx)
        .take(1)
        .cloned()
        .cycle()
        .take(plan.warmup)
        .collect();
    Ok(Workload {
        name: name.clone(),
        seed: plan.seed,
        items: items.into_iter().cycle().take(n.max(1)).collect(),
        warmup,
        sampler: plan.sampler.clone(),
        ignore_eos: plan.ignore_eos,
        notes: vec![],
        params: serde_json::json!({"source": name, "template": plan.chat_template, "max_tokens_cap": plan.max_tokens}),
    })
}

/// `choice` entries: rank each one's options by the model's log-probabilities now, before the
/// run (they do not depend on what it generates).
fn decide_choices(subject: Subject, items: &mut [workload::WorkItem]) -> Result<(), SessionError> {
    use crate::score::ScoreKind;
    let choices = items
        .iter()
        .filter(|i| {
            i.score
                .as_ref()
                .is_some_and(|s| s.kind == ScoreKind::Choice)
        })
        .count();
    if choices == 0 {
        return Ok(());
    }
    let engine = match subject {
        Subject::Engine(e) => e,
        Subject::Remote(_) => return Err(SessionError::ChoiceOverHttp(choices)),
    };
    for it in items.iter_mut() {
        if let Some(s) = it.score.as_mut().filter(|s| s.kind == ScoreKind::Choice) {
            let prompt = it.prompt_tokens.clone();
            s.chosen =
                Some(engine.install(|| crate::score::choose(engine, &prompt, &s.option_tokens))?);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- llama-bench mode

/// llama-bench mode: the tests to time, in order, and their repetitions.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaPlan {
    pub tests: Vec<(Test, usize)>,
    pub reps: usize,
    /// Device profile name for the provenance.
    pub device_profile: Option<String>,
}

impl LlamaPlan {
    /// The longest test, in tokens (the context it needs).
    pub fn longest(&self) -> usize {
        self.tests.iter().map(|&(_, n)| n).max().unwrap_or(0)
    }
}

/// What [`llama_bench`] reports as it goes.
pub enum LlamaProgress<'a> {
    /// A test starts ("pp512").
    Test(&'a str),
    /// One timed repetition is done.
    Rep,
}

/// What llama-bench mode measured.
pub struct LlamaOutcome {
    pub results: Vec<BenchResult>,
    /// None without a store; else the store file it went to, or why it did not.
    pub stored: Option<Result<PathBuf, StoreError>>,
}

/// Times the plan's tests on `engine` and stores the run (one row per test, with every
/// repetition, the peak RSS and device memory).
pub fn llama_bench(
    engine: &Engine,
    plan: &LlamaPlan,
    store: Option<&mut Store>,
    progress: &mut dyn FnMut(LlamaProgress<'_>),
) -> Result<LlamaOutcome, SessionError> {
    let started_at = store::now_rfc3339();
    let mut results = vec![];
    for &(kind, n) in &plan.tests {
        progress(LlamaProgress::Test(&llamabench::test_name(kind, n)));
        results.push(llamabench::run_test(engine, kind, n, plan.reps, || {
            progress(LlamaProgress::Rep)
        })?);
    }
    let n_batch = engine.cfg.prefill_chunk;
    let stored = store.map(|st| {
        let head = llamabench::run_head(
            crate::provenance::for_engine(engine, plan.device_profile.clone()),
            started_at,
            &plan.tests,
            n_batch,
            plan.reps,
        );
        let mem = ember_runtime::sys::memory();
        let device_peak = engine.model.device_memory().map_or(0, |m| m.peak_bytes);
        st.save_llama_bench(&head, n_batch, &results, mem.rss_peak_bytes, device_peak)
            .map(|_| st.path().to_path_buf())
    });
    Ok(LlamaOutcome { results, stored })
}
