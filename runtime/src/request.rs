//! One request's life, whoever serves it: validation, sampling, stop strings and the text a
//! client may see so far, logprobs, and the decision that it ends.
//!
//! The [`Scheduler`](crate::scheduler::Scheduler) runs every request through a
//! [`RequestState`] — batched serving, the one-at-a-time server and `Engine::generate` alike —
//! so a new front end (an HTTP server) or a new way to produce tokens (speculative decoding)
//! plugs in here once. The state never touches the KV cache or the model: the scheduler
//! decides what runs in a forward pass and hands each request the logits rows it asked for.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::model::{LogitsWanted, ModelError};
use crate::sample::{self, Sampler};
use crate::serve::{FinishKind, RequestId, ServeRequest};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Why a request could not run, or stopped running. The wording is what a served request
/// reports in `ServeEvent::Finished`; `Engine::generate` keeps its own (see `EngineError`).
#[derive(Clone, Debug, thiserror::Error)]
pub enum RequestError {
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens does not fit the context of {n_ctx}")]
    PromptTooLong {
        prompt: usize,
        max_new: usize,
        n_ctx: usize,
    },
    #[error("{0}")]
    Sampling(String),
    /// Larger than the scheduler's whole KV budget: it could never be admitted.
    #[error(
        "needs {need} KV blocks ({need_bytes} bytes) for {positions} positions, the whole budget is {budget_blocks} blocks ({budget_bytes} bytes)"
    )]
    KvBudget {
        need: usize,
        need_bytes: usize,
        positions: usize,
        budget_blocks: usize,
        budget_bytes: usize,
    },
    /// The forward pass failed (every request in that pass gets the same error).
    #[error(transparent)]
    Model(Arc<ModelError>),
}

/// What a request asks for beyond [`ServeRequest`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// Record the top-k logits per position (0 = off).
    pub top_logprobs: usize,
    /// Also record positions inside the prompt (with `top_logprobs`).
    pub echo: bool,
    /// Keep the finished state for `Scheduler::take_finished` (its text and positions).
    pub keep: bool,
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

/// One position per `n_vocab`-wide row of `logits`, the first after `first_consumed` tokens.
fn positions_from(
    logits: &[f32],
    n_vocab: usize,
    first_consumed: usize,
    k: usize,
) -> impl Iterator<Item = Position> + '_ {
    logits
        .chunks_exact(n_vocab)
        .enumerate()
        .map(move |(i, row)| {
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

/// What sampling one token did.
#[derive(Clone, Debug)]
pub struct Sampled {
    pub token: u32,
    /// 0-based among the request's output tokens.
    pub index: usize,
    /// When the token was sampled.
    pub at: Instant,
    /// Text that became visible with this token: none of a possible stop string's start, none
    /// of an incomplete UTF-8 sequence. When the token ends the request it also carries what
    /// was held back until then ([`RequestState::tail`]), so the pieces add up to the output.
    pub text: String,
    /// Set when this token ends the request.
    pub finish: Option<FinishKind>,
}

/// Everything a finished request produced.
#[derive(Clone, Debug)]
pub struct RequestOutput {
    pub prompt_tokens: Vec<u32>,
    pub generated_tokens: Vec<u32>,
    /// The output text, cut before a stop string.
    pub text: String,
    pub positions: Vec<Position>,
    /// `None` while the request has not finished.
    pub outcome: Option<Result<FinishKind, RequestError>>,
}

/// One request from validation to its end.
pub struct RequestState<'t> {
    req: ServeRequest,
    opts: RequestOptions,
    n_ctx: usize,
    tokenizer: &'t Tokenizer,
    sampler: Sampler,
    /// Prompt then generated tokens (the repetition penalty's history and the decode input);
    /// `req.prompt_tokens` is moved here.
    tokens: Vec<u32>,
    n_prompt: usize,
    decoder: StreamDecoder<'t>,
    text: String,
    /// Bytes of `text` handed out by [`Sampled::text`] before the request's end.
    emitted: usize,
    positions: Vec<Position>,
    /// With `top_logprobs`: the log-probability of each sampled token (it need not be among
    /// the top entries when sampling at a temperature).
    sampled_logprobs: Vec<f32>,
    outcome: Option<Result<FinishKind, RequestError>>,
}

impl<'t> RequestState<'t> {
    /// A request for a model with a context of `n_ctx` positions. Nothing is checked yet:
    /// see [`RequestState::validate`].
    pub fn new(
        mut req: ServeRequest,
        opts: RequestOptions,
        tokenizer: &'t Tokenizer,
        n_ctx: usize,
    ) -> Self {
        let tokens = std::mem::take(&mut req.prompt_tokens);
        RequestState {
            sampler: Sampler::new(req.sampler.clone()),
            n_prompt: tokens.len(),
            tokens,
            req,
            opts,
            n_ctx,
            tokenizer,
            decoder: StreamDecoder::new(tokenizer),
            text: String::new(),
            emitted: 0,
            positions: Vec::new(),
            sampled_logprobs: Vec::new(),
            outcome: None,
        }
    }

    /// Whether the request can run at all: a prompt, room for it (and for one more position
    /// when a token is wanted), sane sampling parameters.
    pub fn validate(&self) -> Result<(), RequestError> {
        let (prompt, max_new, n_ctx) = (self.n_prompt, self.req.max_tokens, self.n_ctx);
        if prompt == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        if prompt > n_ctx || (max_new > 0 && prompt + 1 > n_ctx) {
            return Err(RequestError::PromptTooLong {
                prompt,
                max_new,
                n_ctx,
            });
        }
        self.req.sampler.validate().map_err(RequestError::Sampling)
    }

    pub fn id(&self) -> RequestId {
        self.req.id
    }
    pub fn max_tokens(&self) -> usize {
        self.req.max_tokens
    }
    pub fn keep(&self) -> bool {
        self.opts.keep
    }
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.n_prompt]
    }
    /// Prompt then generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn n_out(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }
    /// The output text so far (cut before a stop string once one is seen).
    pub fn text(&self) -> &str {
        &self.text
    }
    /// What was held back until the end (a possible stop string's start, the flushed end of
    /// an incomplete UTF-8 sequence); empty before the request finishes.
    pub fn tail(&self) -> &str {
        &self.text[self.emitted.min(self.text.len())..]
    }
    /// The positions recorded so far (with `top_logprobs`).
    pub fn positions(&self) -> &[Position] {
        &self.positions
    }
    /// The log-probability of each sampled token (with `top_logprobs`; empty without).
    pub fn sampled_logprobs(&self) -> &[f32] {
        &self.sampled_logprobs
    }
    pub fn outcome(&self) -> Option<&Result<FinishKind, RequestError>> {
        self.outcome.as_ref()
    }

    fn echo_all(&self) -> bool {
        self.opts.echo && self.opts.top_logprobs > 0
    }

    /// Which logits a forward pass over `tokens()[start..start + n]` must return: the last row
    /// once the prompt is in (to sample from), every row of the prompt for echoed logprobs.
    pub fn logits_wanted(&self, start: usize, n: usize) -> LogitsWanted {
        if self.n_out() > 0 {
            LogitsWanted::Last
        } else if self.echo_all() {
            LogitsWanted::All
        } else if start + n == self.n_prompt {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        }
    }

    /// The rows a prompt chunk starting at `start` produced: kept as positions when the
    /// prompt's logprobs are echoed.
    pub fn on_prompt_logits(&mut self, start: usize, rows: &[f32], n_vocab: usize) {
        if self.echo_all() {
            let k = self.opts.top_logprobs;
            self.positions
                .extend(positions_from(rows, n_vocab, start + 1, k));
        }
    }

    /// Sample the next token from `logits` (one row, after every token so far), work out the
    /// text it makes visible, and decide whether the request ends: an end-of-generation token
    /// or a stop string (`Stop`), `max_tokens` reached or the context full (`Length`).
    pub fn on_logits(&mut self, logits: &[f32]) -> Sampled {
        self.on_logits_verify(logits, None).0
    }

    /// [`RequestState::on_logits`] for a row that came with a proposed next token (speculative
    /// decoding): the token is chosen by [`Sampler::verify`], so the output is distributed as
    /// without the proposal. Returns whether the emitted token is the proposal (false without
    /// one); the caller goes on to the next row only then.
    pub fn on_logits_verify(&mut self, logits: &[f32], draft: Option<u32>) -> (Sampled, bool) {
        let k = self.opts.top_logprobs;
        // With echo, the distribution after the last prompt token came with the prompt's rows.
        if k > 0 && !(self.echo_all() && self.n_out() == 0) {
            let consumed = self.tokens.len();
            self.positions
                .extend(positions_from(logits, logits.len(), consumed, k));
        }
        let (token, accepted) = match draft {
            Some(d) => self.sampler.verify(logits, &self.tokens, d),
            None => (self.sampler.sample(logits, &self.tokens), false),
        };
        let at = Instant::now();
        if k > 0 {
            self.sampled_logprobs
                .push(logits[token as usize] - sample::logsumexp(logits));
        }
        let index = self.n_out();
        self.tokens.push(token);
        let stopped = self.absorb_text(token);
        let upto = if stopped {
            self.text.len()
        } else {
            safe_emit_len(&self.text, &self.req.stop_strings)
        }
        .max(self.emitted);
        let mut text = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        // All but the newest token are in the cache: the context is full when they fill it.
        let cached = self.tokens.len() - 1;
        let finish = if stopped {
            Some(FinishKind::Stop)
        } else if self.n_out() >= self.req.max_tokens || cached >= self.n_ctx {
            Some(FinishKind::Length)
        } else {
            None
        };
        if let Some(f) = finish {
            self.finish(f);
            // What was held back (a possible stop string's start, the incomplete UTF-8 end that
            // `finish` flushed) goes out with the last token; `tail()` still names it.
            text.push_str(self.tail());
        }
        let s = Sampled {
            token,
            index,
            at,
            text,
            finish,
        };
        (s, accepted)
    }

    /// Append the token's text; returns whether it ends the request (an end-of-generation
    /// token, or a stop string completed, the text then cut before it).
    fn absorb_text(&mut self, token: u32) -> bool {
        let eog = !self.req.ignore_eos && self.tokenizer.is_eog(token);
        if !eog {
            self.text.push_str(&self.decoder.push(token));
        }
        let stops = &self.req.stop_strings;
        if stops.is_empty() {
            return eog;
        }
        // Search only the region new text could complete.
        let max_stop = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(max_stop);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        if let Some(p) = hit {
            self.text.truncate(from + p);
            return true;
        }
        eog
    }

    /// End the request; a `Length` end flushes an incomplete UTF-8 sequence into the text.
    pub fn finish(&mut self, reason: FinishKind) {
        if reason == FinishKind::Length {
            self.text.push_str(&self.decoder.finish());
        }
        self.outcome = Some(Ok(reason));
    }

    /// End the request with an error.
    pub fn fail(&mut self, e: RequestError) {
        self.outcome = Some(Err(e));
    }

    pub fn into_output(mut self) -> RequestOutput {
        let generated_tokens = self.tokens.split_off(self.n_prompt);
        RequestOutput {
            prompt_tokens: self.tokens,
            generated_tokens,
            text: self.text,
            positions: self.positions,
            outcome: self.outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::{EOS_ID, N_VOCAB};
    use crate::sample::SamplerConfig;

    fn tokenizer() -> Tokenizer {
        let g = crate::gguf::parse_bytes(&crate::embedded::build()).unwrap();
        Tokenizer::from_gguf(&g.metadata).unwrap()
    }

    /// A greedy request on the embedded vocabulary (token id = byte value).
    fn state<'t>(
        t: &'t Tokenizer,
        prompt: &[u8],
        max_tokens: usize,
        stops: &[&str],
        n_ctx: usize,
    ) -> RequestState<'t> {
        let req = ServeRequest {
            id: 7,
            prompt_tokens: prompt.iter().map(|&b| b as u32).collect(),
            max_tokens,
            sampler: SamplerConfig::greedy(),
            stop_strings: stops.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
        };
        RequestState::new(req, RequestOptions::default(), t, n_ctx)
    }

    /// Logits whose argmax is `id`.
    fn pick(id: u32) -> Vec<f32> {
        let mut v = vec![0.0; N_VOCAB];
        v[id as usize] = 1.0;
        v
    }

    /// Feed `ids` until the request ends; the texts handed out and the end.
    fn run(s: &mut RequestState<'_>, ids: &[u32]) -> (Vec<String>, Option<FinishKind>) {
        let mut texts = vec![];
        for &id in ids {
            let out = s.on_logits(&pick(id));
            assert_eq!(out.token, id);
            texts.push(out.text);
            if out.finish.is_some() {
                return (texts, out.finish);
            }
        }
        (texts, None)
    }

    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    #[test]
    fn holds_back_possible_stop_prefix() {
        let stops = vec!["</s>".to_string()];
        assert_eq!(safe_emit_len("hello </", &stops), 6);
        assert_eq!(safe_emit_len("hello", &stops), 5);
        assert_eq!(safe_emit_len("a<", &stops), 1);
    }

    #[test]
    fn a_stop_string_is_held_back_then_cut() {
        let t = tokenizer();
        let mut s = state(&t, b"a", 20, &["fg"], 64);
        let (texts, end) = run(&mut s, &bytes("efgh"));
        assert_eq!(texts, ["e", "", ""]);
        assert_eq!(end, Some(FinishKind::Stop));
        assert_eq!((s.text(), s.tail(), s.n_out()), ("e", "", 3));
    }

    #[test]
    fn a_length_end_hands_out_what_was_held_back() {
        let t = tokenizer();
        let mut s = state(&t, b"a", 2, &["fg"], 64);
        let (texts, end) = run(&mut s, &bytes("ef"));
        // "f" may start "fg": held back, then handed out with the last token.
        assert_eq!(texts, ["e", "f"]);
        assert_eq!(end, Some(FinishKind::Length));
        assert_eq!((s.text(), s.tail()), ("ef", "f"));
        // An incomplete UTF-8 sequence waits for its end, and is flushed at a length end.
        let mut s = state(&t, b"a", 2, &[], 64);
        assert_eq!(run(&mut s, &[0xC3, 0xA9]).0, ["", "é"]);
        let mut s = state(&t, b"a", 1, &[], 64);
        assert_eq!(run(&mut s, &[0xC3]).0, ["\u{FFFD}"]);
        assert_eq!(s.tail(), "\u{FFFD}");
    }

    #[test]
    fn end_of_generation_stops_without_text_unless_ignored() {
        let t = tokenizer();
        let mut s = state(&t, b"a", 5, &[], 64);
        assert_eq!(
            run(&mut s, &[b'b' as u32, EOS_ID]),
            (vec!["b".into(), "".into()], Some(FinishKind::Stop))
        );
        let mut s = state(&t, b"a", 3, &[], 64);
        s.req.ignore_eos = true;
        let (_, end) = run(&mut s, &[EOS_ID, EOS_ID, EOS_ID]);
        assert_eq!((end, s.n_out()), (Some(FinishKind::Length), 3));
    }

    #[test]
    fn a_full_context_ends_the_request() {
        let t = tokenizer();
        // 3 prompt tokens in a context of 5: the 3rd token is sampled with 5 positions cached.
        let mut s = state(&t, b"abc", 100, &[], 5);
        let (texts, end) = run(&mut s, &bytes("defg"));
        assert_eq!((texts.len(), end), (3, Some(FinishKind::Length)));
    }

    #[test]
    fn validation_says_what_is_wrong() {
        let t = tokenizer();
        let err = |s: RequestState<'_>| s.validate().unwrap_err().to_string();
        assert_eq!(err(state(&t, b"", 4, &[], 8)), "empty prompt");
        assert_eq!(
            err(state(&t, b"abcd", 1, &[], 4)),
            "prompt of 4 tokens does not fit the context of 4"
        );
        assert_eq!(
            err(state(&t, b"abcde", 0, &[], 4)),
            "prompt of 5 tokens does not fit the context of 4"
        );
        // A whole-context prompt fits when no token is wanted (logprobs of the prompt alone).
        assert!(state(&t, b"abcd", 0, &[], 4).validate().is_ok());
        let mut s = state(&t, b"a", 1, &[], 4);
        s.req.sampler.temperature = -1.0;
        assert!(matches!(s.validate(), Err(RequestError::Sampling(_))));
    }

    #[test]
    fn the_sampled_tokens_logprob_is_recorded_with_top_logprobs() {
        let t = tokenizer();
        let mut s = state(&t, b"a", 2, &[], 64);
        run(&mut s, &bytes("bc"));
        assert!(s.sampled_logprobs().is_empty());
        let mut s = state(&t, b"a", 2, &[], 64);
        s.opts.top_logprobs = 1;
        run(&mut s, &bytes("bc"));
        let want = 1.0 - sample::logsumexp(&pick(b'b' as u32));
        assert_eq!(s.sampled_logprobs().len(), 2);
        assert!((s.sampled_logprobs()[0] - want).abs() < 1e-6);
        assert_eq!(s.positions()[0].top[0].id, b'b' as u32);
    }

    #[test]
    fn echoed_logprobs_count_the_tokens_consumed() {
        let t = tokenizer();
        let mut s = state(&t, b"abc", 2, &[], 64);
        s.opts = RequestOptions {
            top_logprobs: 2,
            echo: true,
            keep: false,
        };
        assert_eq!(s.logits_wanted(0, 2), LogitsWanted::All);
        let rows: Vec<f32> = [pick(b'b' as u32), pick(b'c' as u32)].concat();
        s.on_prompt_logits(0, &rows, N_VOCAB);
        s.on_prompt_logits(2, &pick(b'd' as u32), N_VOCAB);
        run(&mut s, &bytes("de"));
        let consumed: Vec<usize> = s.positions.iter().map(|p| p.consumed).collect();
        assert_eq!(consumed, [1, 2, 3, 4]);
        assert_eq!(s.positions[2].top[0].id, b'd' as u32);
        assert_eq!(s.logits_wanted(4, 1), LogitsWanted::Last);
        // Without echo: only the last prompt chunk's last row, and a position per token.
        let mut s = state(&t, b"abc", 2, &[], 64);
        s.opts.top_logprobs = 2;
        assert_eq!(s.logits_wanted(0, 2), LogitsWanted::None);
        assert_eq!(s.logits_wanted(2, 1), LogitsWanted::Last);
        run(&mut s, &bytes("de"));
        let consumed: Vec<usize> = s.positions.iter().map(|p| p.consumed).collect();
        assert_eq!(consumed, [3, 4]);
    }
}
