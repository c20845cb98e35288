//! Serving many requests: the interface between the engine and anything that
//! drives it (the benchmark harness today; an HTTP server later).
//!
//! A [`Server`] takes requests with [`Server::submit`] and makes progress with
//! [`Server::step`], emitting [`ServeEvent`]s stamped on the monotonic clock at
//! the moment things happen. The caller owns the clock's origin and the
//! meaning of every figure (see `docs/METRICS.md`).

use std::collections::VecDeque;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::kv::KvCache;
use crate::model::LogitsWanted;
use crate::sample::{Sampler, SamplerConfig};

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
}

impl ServeEvent {
    pub fn id(&self) -> RequestId {
        match self {
            ServeEvent::Enqueued { id, .. }
            | ServeEvent::Scheduled { id, .. }
            | ServeEvent::PrefillStart { id, .. }
            | ServeEvent::PrefillEnd { id, .. }
            | ServeEvent::Token { id, .. }
            | ServeEvent::Finished { id, .. } => *id,
        }
    }
    pub fn at(&self) -> Instant {
        match self {
            ServeEvent::Enqueued { at, .. }
            | ServeEvent::Scheduled { at, .. }
            | ServeEvent::PrefillStart { at, .. }
            | ServeEvent::PrefillEnd { at, .. }
            | ServeEvent::Token { at, .. }
            | ServeEvent::Finished { at, .. } => *at,
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
}

/// What a freshly sampled token means for its request: its text, and whether
/// it ends the request (end-of-generation token, or a stop string completed).
/// `text` is the request's output so far; the new piece is appended to it.
pub(crate) fn absorb_token(
    engine: &Engine,
    req: &ServeRequest,
    text: &mut String,
    tok: u32,
) -> (String, bool) {
    let eog = !req.ignore_eos && engine.tokenizer.is_eog(tok);
    let piece = if eog {
        String::new()
    } else {
        String::from_utf8_lossy(&engine.tokenizer.token_bytes(tok)).into_owned()
    };
    text.push_str(&piece);
    // Only the tail that the new piece can have completed needs searching.
    let longest = req.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut tail = text.len().saturating_sub(piece.len() + longest);
    while !text.is_char_boundary(tail) {
        tail -= 1;
    }
    let stop_hit = req
        .stop_strings
        .iter()
        .any(|s| !s.is_empty() && text[tail..].contains(s.as_str()));
    (piece, eog || stop_hit)
}

struct Active {
    req: ServeRequest,
    kv: KvCache,
    sampler: Sampler,
    history: Vec<u32>,
    n_out: usize,
    text: String,
    logits: Vec<f32>,
}

/// The simplest correct server: one request at a time, first come first served.
/// Prefill is one step; each decode token is one step.
pub struct SequentialServer<'e> {
    engine: &'e Engine,
    waiting: VecDeque<ServeRequest>,
    active: Option<Active>,
}

impl<'e> SequentialServer<'e> {
    pub fn new(engine: &'e Engine) -> Self {
        SequentialServer {
            engine,
            waiting: VecDeque::new(),
            active: None,
        }
    }

    fn finish(&mut self, out: &mut Vec<ServeEvent>, reason: FinishKind, error: Option<String>) {
        if let Some(a) = self.active.take() {
            out.push(ServeEvent::Finished {
                id: a.req.id,
                at: Instant::now(),
                reason,
                error,
            });
        }
    }
}

impl Server for SequentialServer<'_> {
    fn submit(&mut self, req: ServeRequest, out: &mut Vec<ServeEvent>) {
        out.push(ServeEvent::Enqueued {
            id: req.id,
            at: Instant::now(),
        });
        self.waiting.push_back(req);
    }

    fn has_work(&self) -> bool {
        self.active.is_some() || !self.waiting.is_empty()
    }

    fn stats(&self) -> ServerStats {
        let (used, reserved) = self
            .active
            .as_ref()
            .map(|a| (a.kv.bytes_used(), a.kv.bytes_reserved()))
            .unwrap_or((0, 0));
        // One allocator query for both figures.
        let dev = self.engine.model.device_memory();
        ServerStats {
            weights_bytes: self.engine.model.weight_bytes(),
            kv_bytes_used: used as u64,
            kv_bytes_reserved: reserved as u64,
            running: self.active.is_some() as usize,
            waiting: self.waiting.len(),
            device_bytes: dev.map_or(0, |m| m.reserved_bytes),
            device_bytes_peak: dev.map_or(0, |m| m.peak_bytes),
            ..Default::default()
        }
    }

    fn step(&mut self, out: &mut Vec<ServeEvent>) -> bool {
        let engine = self.engine;
        if self.active.is_none() {
            let Some(req) = self.waiting.pop_front() else {
                return false;
            };
            let id = req.id;
            out.push(ServeEvent::Scheduled {
                id,
                at: Instant::now(),
            });
            let n_ctx = engine.cfg.n_ctx;
            let err = if req.prompt_tokens.is_empty() {
                Some("empty prompt".to_string())
            } else if req.prompt_tokens.len() >= n_ctx {
                Some(format!(
                    "prompt of {} tokens does not fit the context of {n_ctx}",
                    req.prompt_tokens.len()
                ))
            } else {
                req.sampler.validate().err()
            };
            if let Some(e) = err {
                out.push(ServeEvent::Finished {
                    id,
                    at: Instant::now(),
                    reason: FinishKind::Error,
                    error: Some(e),
                });
                return true;
            }
            let mut a = Active {
                kv: engine.new_cache(),
                sampler: Sampler::new(req.sampler.clone()),
                history: req.prompt_tokens.clone(),
                n_out: 0,
                text: String::new(),
                logits: Vec::new(),
                req,
            };
            out.push(ServeEvent::PrefillStart {
                id,
                at: Instant::now(),
            });
            let chunk = engine.cfg.prefill_chunk.max(1);
            let n_chunks = a.req.prompt_tokens.len().div_ceil(chunk);
            for (i, c) in a.req.prompt_tokens.chunks(chunk).enumerate() {
                let wanted = if i + 1 == n_chunks {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                };
                if let Err(e) = engine.forward(c, &mut a.kv, wanted, &mut a.logits) {
                    self.active = Some(a);
                    self.finish(out, FinishKind::Error, Some(e.to_string()));
                    return true;
                }
            }
            let n = a.req.prompt_tokens.len();
            let cache = CacheUse {
                computed_prompt_tokens: n,
                ..Default::default()
            };
            out.push(ServeEvent::PrefillEnd {
                id,
                at: Instant::now(),
                cache,
            });
            self.active = Some(a);
            if self.active.as_ref().unwrap().req.max_tokens == 0 {
                self.finish(out, FinishKind::Length, None);
                return true;
            }
        } else {
            // Decode one token from the last logits.
            let a = self.active.as_mut().unwrap();
            let last = *a.history.last().unwrap();
            if let Err(e) = engine.forward(&[last], &mut a.kv, LogitsWanted::Last, &mut a.logits) {
                self.finish(out, FinishKind::Error, Some(e.to_string()));
                return true;
            }
        }
        // Sample the next token.
        let a = self.active.as_mut().unwrap();
        let tok = a.sampler.sample(&a.logits, &a.history);
        let at = Instant::now();
        a.history.push(tok);
        let index = a.n_out;
        a.n_out += 1;
        let (piece, stop) = absorb_token(engine, &a.req, &mut a.text, tok);
        out.push(ServeEvent::Token {
            id: a.req.id,
            at,
            index,
            token: tok,
            text: piece,
        });
        let full = a.kv.len() + 1 >= engine.cfg.n_ctx;
        if stop {
            self.finish(out, FinishKind::Stop, None);
        } else if a.n_out >= a.req.max_tokens || full {
            self.finish(out, FinishKind::Length, None);
        }
        true
    }
}
