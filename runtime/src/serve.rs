//! Serving many requests: the interface between the engine and anything that
//! drives it (the benchmark harness, `ember serve`); `ember bench --url` implements it over
//! HTTP for remote servers.
//!
//! A [`Server`] takes requests with [`Server::submit`] and makes progress with
//! [`Server::step`], emitting [`ServeEvent`]s stamped on the monotonic clock at
//! the moment things happen. The caller owns the clock's origin and the
//! meaning of every figure (see `docs/METRICS.md`).
//!
//! The one implementation is the [`Scheduler`](crate::scheduler::Scheduler) (continuous
//! batching); [`SequentialServer`] is that scheduler with one running sequence, and
//! `Engine::generate` drives one too. Each request's validation, sampling, stop strings and end
//! live in [`RequestState`](crate::request::RequestState).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::sample::SamplerConfig;
pub use crate::scheduler::SequentialServer;

pub type RequestId = u64;

#[derive(Clone, Debug)]
pub struct ServeRequest {
    pub id: RequestId,
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
}

/// How a request ended (METRICS.md: `stop`, `length`, `error`, `cancelled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishKind {
    Stop,
    Length,
    Error,
    Cancelled,
}

impl FinishKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishKind::Stop => "stop",
            FinishKind::Length => "length",
            FinishKind::Error => "error",
            FinishKind::Cancelled => "cancelled",
        }
    }
}

/// Prefix-cache accounting for one request (METRICS.md, Prefix cache).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheUse {
    pub cached_prompt_tokens: usize,
    pub computed_prompt_tokens: usize,
    pub cache_lookups: usize,
    pub cache_hit_blocks: usize,
}

/// Speculative decoding's accounting for one request (METRICS.md, Speculative decoding): what
/// was proposed, what the target kept, and where the time went. All zero for a request that
/// did not speculate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecUse {
    /// Draft tokens proposed and checked by the target.
    pub drafted: usize,
    /// Of those, tokens the target accepted (each is an output token that cost no pass of its own).
    pub accepted: usize,
    /// Verify passes that carried at least one draft token for this request.
    pub verify_steps: usize,
    /// Time spent proposing for this request (a draft model's passes, or the n-gram lookup):
    /// a draft pass shared by several requests counts in full for each.
    pub draft_ns: u64,
    /// Time of the target passes that verified this request's drafts, each in full (as a
    /// token's time counts the whole pass it came from).
    pub verify_ns: u64,
}

impl SpecUse {
    /// Draft tokens the target rejected.
    pub fn rejected(&self) -> usize {
        self.drafted - self.accepted
    }
    /// Accepted / drafted (`None` when nothing was drafted).
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.drafted > 0).then(|| self.accepted as f64 / self.drafted as f64)
    }
    /// Mean draft tokens accepted per verify pass (`None` without one).
    pub fn mean_accepted_run(&self) -> Option<f64> {
        (self.verify_steps > 0).then(|| self.accepted as f64 / self.verify_steps as f64)
    }
}

#[derive(Clone, Debug)]
pub enum ServeEvent {
    Enqueued {
        id: RequestId,
        at: Instant,
    },
    /// First placed in a batch.
    Scheduled {
        id: RequestId,
        at: Instant,
    },
    PrefillStart {
        id: RequestId,
        at: Instant,
    },
    PrefillEnd {
        id: RequestId,
        at: Instant,
        cache: CacheUse,
    },
    /// The `index`-th output token (0-based) was sampled.
    Token {
        id: RequestId,
        at: Instant,
        index: usize,
        token: u32,
        text: String,
    },
    Finished {
        id: RequestId,
        at: Instant,
        reason: FinishKind,
        error: Option<String>,
    },
    /// A remote server's reply chunk that carried output text (`ember bench --url`): it may
    /// hold several tokens, so it is not a [`ServeEvent::Token`]. In-process servers never emit it.
    Chunk {
        id: RequestId,
        at: Instant,
        text: String,
    },
    /// Token counts from outside the engine, just before [`ServeEvent::Finished`]: a remote
    /// server's reported `usage`, and the client's own count of the output text with a local
    /// tokenizer. In-process servers never emit it (their `Token` events are the count).
    Usage {
        id: RequestId,
        at: Instant,
        prompt_tokens: Option<usize>,
        output_tokens: Option<usize>,
        cached_prompt_tokens: Option<usize>,
        local_output_tokens: Option<usize>,
    },
    /// A speculating request's totals, just before its [`ServeEvent::Finished`] (only when
    /// the server speculates: `--lookup` or `--draft`).
    Speculation {
        id: RequestId,
        at: Instant,
        spec: SpecUse,
    },
}

impl ServeEvent {
    pub fn id(&self) -> RequestId {
        match self {
            ServeEvent::Enqueued { id, .. }
            | ServeEvent::Scheduled { id, .. }
            | ServeEvent::PrefillStart { id, .. }
            | ServeEvent::PrefillEnd { id, .. }
            | ServeEvent::Token { id, .. }
            | ServeEvent::Finished { id, .. }
            | ServeEvent::Chunk { id, .. }
            | ServeEvent::Usage { id, .. }
            | ServeEvent::Speculation { id, .. } => *id,
        }
    }
    pub fn at(&self) -> Instant {
        match self {
            ServeEvent::Enqueued { at, .. }
            | ServeEvent::Scheduled { at, .. }
            | ServeEvent::PrefillStart { at, .. }
            | ServeEvent::PrefillEnd { at, .. }
            | ServeEvent::Token { at, .. }
            | ServeEvent::Finished { at, .. }
            | ServeEvent::Chunk { at, .. }
            | ServeEvent::Usage { at, .. }
            | ServeEvent::Speculation { at, .. } => *at,
        }
    }
}

/// Memory and cache figures a server can report at any moment.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ServerStats {
    pub weights_bytes: u64,
    pub kv_bytes_used: u64,
    pub kv_bytes_reserved: u64,
    /// Backend allocator's current bytes (0 on the CPU, where RSS covers it).
    pub device_bytes: u64,
    pub device_bytes_peak: u64,
    pub cache_evictions: u64,
    pub running: usize,
    pub waiting: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("request {id}: {reason}")]
    Rejected { id: RequestId, reason: String },
}

pub trait Server {
    /// Hand a request to the engine (emits `Enqueued`). A request that can never
    /// run (e.g. longer than the context) is still accepted and finishes with
    /// `FinishKind::Error`, so the caller records it as a failed request.
    fn submit(&mut self, req: ServeRequest, out: &mut Vec<ServeEvent>);
    /// One engine iteration. Returns false when there was nothing to do.
    fn step(&mut self, out: &mut Vec<ServeEvent>) -> bool;
    fn has_work(&self) -> bool;
    fn stats(&self) -> ServerStats;
    /// Block until [`Server::step`] may have something to record, or until `until` (the
    /// caller's next deadline, e.g. a request due), whichever comes first. An in-process engine
    /// makes its progress inside `step`, so the default returns at once; a remote server waits
    /// for the network here instead of being polled.
    fn wait(&mut self, _until: Option<Instant>) {}
}
