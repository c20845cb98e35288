//! The engine: a loaded model, its tokenizer and a thread pool, and the
//! generation loop. It stamps events on one monotonic clock and hands them
//! to the caller; it never prints and never decides what a metric means.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::gguf::GgufFile;
use crate::kv::KvCache;
use crate::model::{LogitsWanted, Model, ModelError};
use crate::sample::{self, Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

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
    #[error("cannot build the thread pool: {0}")]
    Threads(String),
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
pub struct TopEntry {
    pub id: u32,
    pub logit: f32,
    pub logprob: f32,
}

/// The next-token distribution after `consumed` tokens of prompt+generated.
#[derive(Clone, Debug, Serialize)]
pub struct Position {
    pub consumed: usize,
    pub top: Vec<TopEntry>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub generated_tokens: Vec<u32>,
    pub text: String,
    pub positions: Vec<Position>,
    pub finish_reason: FinishReason,
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

fn positions_from(
    logits: &[f32],
    n_vocab: usize,
    first_consumed: usize,
    k: usize,
) -> Vec<Position> {
    logits
        .chunks_exact(n_vocab)
        .enumerate()
        .map(|(i, row)| {
            let lse = sample::logsumexp(row);
            Position {
                consumed: first_consumed + i,
                top: sample::top_k(row, k)
                    .into_iter()
                    .map(|(id, logit)| TopEntry {
                        id,
                        logit,
                        logprob: logit - lse,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Text that may be emitted now: everything except a tail that could still
/// become the start of a stop string, cut at a char boundary.
fn safe_emit_len(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for k in (1..s.len()).rev() {
            if k <= text.len()
                && text.is_char_boundary(text.len() - k)
                && s.is_char_boundary(k)
                && text.ends_with(&s[..k])
            {
                hold = hold.max(k);
                break;
            }
        }
    }
    text.len() - hold
}

impl Engine {
    pub fn new(
        file: Arc<GgufFile>,
        model: Box<dyn Model>,
        tokenizer: Tokenizer,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
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

    /// Prefill in chunks of `prefill_chunk`; returns the logits wanted.
    fn prefill(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        all: bool,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let chunk = self.cfg.prefill_chunk.max(1);
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(chunk);
        for (i, c) in tokens.chunks(chunk).enumerate() {
            let last = i + 1 == n_chunks;
            let wanted = if all {
                LogitsWanted::All
            } else if last {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            self.forward(c, kv, wanted, logits)?;
            if all {
                out.extend_from_slice(logits);
            }
        }
        if all {
            *logits = out;
        }
        Ok(())
    }

    /// Generate for one request on a fresh cache, reporting events as they happen.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Generation, EngineError> {
        req.sampler.validate().map_err(EngineError::Sampling)?;
        let n_prompt = req.prompt_tokens.len();
        if n_prompt == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        let n_ctx = self.cfg.n_ctx;
        if n_prompt > n_ctx || (req.max_tokens > 0 && n_prompt + 1 > n_ctx) {
            return Err(EngineError::PromptTooLong {
                prompt: n_prompt,
                max_new: req.max_tokens,
                n_ctx,
            });
        }
        let n_vocab = self.model.config().n_vocab;
        let mut kv = self.new_cache();
        let mut logits = Vec::new();
        let mut positions = Vec::new();
        on_event(Event::PrefillStart {
            at: Instant::now(),
            n_prompt,
        });
        let want_all = req.echo && req.top_logprobs > 0;
        self.prefill(&req.prompt_tokens, &mut kv, want_all, &mut logits)?;
        on_event(Event::PrefillEnd {
            at: Instant::now(),
            n_computed: n_prompt,
        });
        if want_all {
            positions = positions_from(&logits, n_vocab, 1, req.top_logprobs);
            logits.drain(..(n_prompt - 1) * n_vocab);
        }

        let mut sampler = Sampler::new(req.sampler.clone());
        let mut history = req.prompt_tokens.clone();
        let mut generated = Vec::new();
        let mut decoder = StreamDecoder::new(&self.tokenizer);
        let mut text = String::new();
        let mut emitted = 0usize;
        let mut finish = FinishReason::Length;
        let max_new = req.max_tokens.min(n_ctx - n_prompt + 1);
        while generated.len() < max_new {
            // With echo, the distribution after the last prompt token came from prefill.
            if req.top_logprobs > 0 && !(want_all && generated.is_empty()) {
                positions.extend(positions_from(
                    &logits,
                    n_vocab,
                    history.len(),
                    req.top_logprobs,
                ));
            }
            let id = sampler.sample(&logits, &history);
            let at = Instant::now();
            generated.push(id);
            history.push(id);
            let eog = !req.ignore_eos && self.tokenizer.is_eog(id);
            if !eog {
                text.push_str(&decoder.push(id));
            }
            // Stop strings: search only the region new text could complete.
            let mut stopped = eog;
            if !req.stop_strings.is_empty() {
                let max_stop = req.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
                let mut from = emitted.saturating_sub(max_stop);
                while !text.is_char_boundary(from) {
                    from -= 1;
                }
                if let Some(p) = req
                    .stop_strings
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| text[from..].find(s.as_str()))
                    .min()
                {
                    text.truncate(from + p);
                    stopped = true;
                }
            }
            let upto = if stopped {
                text.len()
            } else {
                safe_emit_len(&text, &req.stop_strings)
            }
            .max(emitted);
            on_event(Event::Token {
                at,
                index: generated.len() - 1,
                id,
                text: &text[emitted..upto],
            });
            emitted = upto;
            if stopped {
                finish = FinishReason::Stop;
                break;
            }
            if generated.len() >= max_new || kv.len() >= n_ctx {
                break;
            }
            self.forward(&[id], &mut kv, LogitsWanted::Last, &mut logits)?;
        }
        if finish == FinishReason::Length {
            text.push_str(&decoder.finish());
        }
        on_event(Event::Finish {
            at: Instant::now(),
            reason: finish,
            text: &text[emitted.min(text.len())..],
        });
        Ok(Generation {
            prompt_tokens: req.prompt_tokens.clone(),
            generated_tokens: generated,
            text,
            positions,
            finish_reason: finish,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn holds_back_possible_stop_prefix() {
        let stops = vec!["</s>".to_string()];
        assert_eq!(safe_emit_len("hello </", &stops), 6);
        assert_eq!(safe_emit_len("hello", &stops), 5);
        assert_eq!(safe_emit_len("a<", &stops), 1);
    }
}
