//! The engine: a loaded model, its tokenizer and a thread pool, and the
//! generation call. It stamps events on one monotonic clock and hands them
//! to the caller; it never prints and never decides what a metric means.
//!
//! [`Engine::generate`] is one request on a [`Scheduler::sequential`]: the same request state
//! machine ([`crate::request`]) and batch loop as served requests, its events folded into
//! [`Event`]s and a [`Generation`].

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::gguf::GgufFile;
use crate::kv::KvCache;
use crate::model::{LogitsWanted, Model, ModelError};
pub use crate::request::{Position, TopEntry};
use crate::request::{RequestError, RequestOptions, RequestOutput};
use crate::sample::SamplerConfig;
use crate::scheduler::Scheduler;
use crate::serve::{FinishKind, RequestId, ServeEvent, ServeRequest, Server, SpecUse};
use crate::spec::{SpecConfig, SpecError};
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("prompt is empty (no tokens after tokenization, and no BOS)")]
    EmptyPrompt,
    #[error(
        "prompt of {prompt} tokens plus {max_new} new tokens does not fit the context of {n_ctx}"
    )]
    PromptTooLong {
        prompt: usize,
        max_new: usize,
        n_ctx: usize,
    },
    #[error("bad sampling parameters: {0}")]
    Sampling(String),
    /// A request error with no variant of its own here.
    #[error(transparent)]
    Request(RequestError),
    #[error("cannot build the thread pool: {0}")]
    Threads(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// `Engine::generate` words a rejected request as it always has (a served request reports
/// [`RequestError`]'s wording).
impl From<RequestError> for EngineError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::EmptyPrompt => EngineError::EmptyPrompt,
            RequestError::PromptTooLong {
                prompt,
                max_new,
                n_ctx,
            } => EngineError::PromptTooLong {
                prompt,
                max_new,
                n_ctx,
            },
            RequestError::Sampling(s) => EngineError::Sampling(s),
            // The engine's one request is the only holder of its pass's error.
            RequestError::Model(m) => match Arc::try_unwrap(m) {
                Ok(m) => EngineError::Model(m),
                Err(m) => EngineError::Request(RequestError::Model(m)),
            },
            e @ RequestError::KvBudget { .. } => EngineError::Request(e),
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached (or the context filled up).
    Length,
}

impl FinishReason {
    /// A served request's end as a generation's (`None` for an error or a cancel).
    fn of(kind: FinishKind) -> Option<Self> {
        match kind {
            FinishKind::Stop => Some(FinishReason::Stop),
            FinishKind::Length => Some(FinishReason::Length),
            FinishKind::Error | FinishKind::Cancelled => None,
        }
    }
}

/// Engine events, stamped when they happen.
#[derive(Clone, Debug)]
pub enum Event<'a> {
    PrefillStart {
        at: Instant,
        n_prompt: usize,
    },
    PrefillEnd {
        at: Instant,
        n_computed: usize,
    },
    /// A token was sampled; `text` is the newly printable text (may be empty
    /// while a UTF-8 sequence or a possible stop string is incomplete).
    Token {
        at: Instant,
        index: usize,
        id: u32,
        text: &'a str,
    },
    Finish {
        at: Instant,
        reason: FinishReason,
        text: &'a str,
    },
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop_strings: Vec<String>,
    /// Record the top-k logits per position (0 = off).
    pub top_logprobs: usize,
    /// Also record positions inside the prompt.
    pub echo: bool,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub generated_tokens: Vec<u32>,
    pub text: String,
    pub positions: Vec<Position>,
    pub finish_reason: FinishReason,
    /// Speculative decoding's totals, when the generation speculated.
    pub spec: Option<SpecUse>,
}

/// How [`Engine::generate_with`] speculates: prompt lookup, or a draft model proposing.
#[derive(Clone, Copy)]
pub struct Speculate<'a> {
    pub cfg: &'a SpecConfig,
    pub draft: Option<&'a Engine>,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub threads: usize,
    pub n_ctx: usize,
    /// Prompt tokens per forward pass during prefill.
    pub prefill_chunk: usize,
}

pub struct Engine {
    pub file: Arc<GgufFile>,
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    pub cfg: EngineConfig,
    pool: rayon::ThreadPool,
}

impl Engine {
    pub fn new(
        file: Arc<GgufFile>,
        mut model: Box<dyn Model>,
        tokenizer: Tokenizer,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        model.set_context(cfg.n_ctx);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("ember-worker-{i}"))
            .build()
            .map_err(|e| EngineError::Threads(e.to_string()))?;
        Ok(Engine {
            file,
            model,
            tokenizer,
            cfg,
            pool,
        })
    }

    /// Run `f` on the engine's thread pool (kernels use `rayon::current_num_threads`).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    pub fn new_cache(&self) -> KvCache {
        self.model.new_cache(self.cfg.n_ctx)
    }

    /// Forward `tokens` through the model on the engine's pool.
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        wanted: LogitsWanted,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.pool
            .install(|| self.model.forward(tokens, kv, wanted, logits))
    }

    /// Generate for one request on a fresh cache, reporting events as they happen: the
    /// request runs on a [`Scheduler::sequential`] like any served one, and its events are
    /// folded into this call's.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Generation, EngineError> {
        self.generate_with(req, None, on_event)
    }

    /// [`Engine::generate`], speculating when `spec` is given (module [`crate::spec`]): the
    /// same tokens under greedy sampling, the same distribution at a temperature; several
    /// tokens may come from one step.
    pub fn generate_with(
        &self,
        req: &GenerateRequest,
        spec: Option<Speculate<'_>>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Generation, EngineError> {
        const ID: RequestId = 0;
        let mut server = Scheduler::sequential(self);
        if let Some(sp) = spec {
            server = server.with_speculation(sp.cfg.clone(), sp.draft)?;
        }
        let mut spec_use = None;
        let mut out = Vec::new();
        let serve = ServeRequest {
            id: ID,
            prompt_tokens: req.prompt_tokens.clone(),
            max_tokens: req.max_tokens,
            sampler: req.sampler.clone(),
            stop_strings: req.stop_strings.clone(),
            ignore_eos: req.ignore_eos,
        };
        let opts = RequestOptions {
            top_logprobs: req.top_logprobs,
            echo: req.echo,
            keep: true,
        };
        server.submit_with(serve, opts, &mut out);
        let n_prompt = req.prompt_tokens.len();
        while server.has_work() {
            server.step(&mut out);
            let done = server.take_finished(ID);
            // What the last token held back until the end goes with `Finish`, not the token.
            let tail = done.as_ref().map_or("", |s| s.tail());
            for ev in out.drain(..) {
                match ev {
                    ServeEvent::PrefillStart { at, .. } => {
                        on_event(Event::PrefillStart { at, n_prompt })
                    }
                    ServeEvent::PrefillEnd { at, cache, .. } => on_event(Event::PrefillEnd {
                        at,
                        n_computed: cache.computed_prompt_tokens,
                    }),
                    ServeEvent::Token {
                        at,
                        index,
                        token,
                        text,
                        ..
                    } => on_event(Event::Token {
                        at,
                        index,
                        id: token,
                        text: text.strip_suffix(tail).unwrap_or(&text),
                    }),
                    ServeEvent::Finished { at, reason, .. } => {
                        if let Some(reason) = FinishReason::of(reason) {
                            on_event(Event::Finish {
                                at,
                                reason,
                                text: tail,
                            })
                        }
                    }
                    // Scheduler events the caller does not see, and the remote-only ones.
                    ServeEvent::Enqueued { .. }
                    | ServeEvent::Scheduled { .. }
                    | ServeEvent::Chunk { .. }
                    | ServeEvent::Usage { .. } => {}
                    ServeEvent::Speculation { spec, .. } => spec_use = Some(spec),
                }
            }
            if let Some(state) = done {
                return generation(state.into_output(), spec_use);
            }
        }
        unreachable!("a request kept for Engine::generate always finishes")
    }
}

fn generation(o: RequestOutput, spec: Option<SpecUse>) -> Result<Generation, EngineError> {
    let finish_reason = match o.outcome {
        Some(Ok(kind)) => {
            FinishReason::of(kind).expect("a request ends in stop, length or an error")
        }
        Some(Err(e)) => return Err(e.into()),
        None => unreachable!("only finished requests are taken"),
    };
    Ok(Generation {
        prompt_tokens: o.prompt_tokens,
        generated_tokens: o.generated_tokens,
        text: o.text,
        positions: o.positions,
        finish_reason,
        spec,
    })
}
