//! Quality of a model on a text, measured from its logits: perplexity by llama.cpp's
//! `llama-perplexity` method ([`ppl`]) and KL divergence against a higher-precision base model
//! of the same family ([`kld`]).
//!
//! Both cut the tokenized text into non-overlapping chunks of `ctx` tokens (a chunk is a fresh
//! sequence; its first token becomes BOS when the model adds one), run each chunk through the
//! model in one prefill, and score the second half of each chunk: the logits at position `j`
//! predict token `j + 1`, for `j` in `ctx/2 .. ctx-1`, so the model always has at least half a
//! chunk of context. That is `llama-perplexity`'s default (non-strided) method, so the same
//! text, context and model give the same figure.

pub mod kld;
pub mod ppl;

use ember_runtime::engine::Engine;
use ember_runtime::model::{LogitsWanted, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "the text tokenizes to {tokens} tokens, fewer than one chunk of --ctx {ctx}: give a longer text or a smaller --ctx"
    )]
    TooShort { tokens: usize, ctx: usize },
    #[error("--ctx {0} is too small: a chunk needs at least 4 tokens (half of it is scored)")]
    CtxTooSmall(usize),
    #[error("--ctx {ctx} is more than the model's context ({n_ctx})")]
    CtxTooLarge { ctx: usize, n_ctx: usize },
    #[error("--chunks must be at least 1")]
    NoChunks,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Base(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A tokenized text cut into the chunks that are scored.
#[derive(Clone, Debug)]
pub struct Chunks {
    pub ctx: usize,
    pub n_chunks: usize,
    /// The text's tokens that the chunks cover (`n_chunks * ctx`), as tokenized.
    pub tokens: Vec<u32>,
    /// The model's BOS when it adds one: each chunk then starts with it.
    pub bos: Option<u32>,
    /// Tokens in the whole text (the chunks may cover fewer).
    pub text_tokens: usize,
}

impl Chunks {
    /// `tokens` (the whole text, tokenized as `llama-perplexity` does: with BOS when the model
    /// adds one, special-token text as plain text) cut into at most `max_chunks` chunks of
    /// `ctx`; the tail that does not fill a chunk is not scored.
    pub fn new(
        mut tokens: Vec<u32>,
        ctx: usize,
        max_chunks: Option<usize>,
        bos: Option<u32>,
    ) -> Result<Chunks, EvalError> {
        if ctx < 4 {
            return Err(EvalError::CtxTooSmall(ctx));
        }
        if max_chunks == Some(0) {
            return Err(EvalError::NoChunks);
        }
        let text_tokens = tokens.len();
        let available = text_tokens / ctx;
        if available == 0 {
            return Err(EvalError::TooShort {
                tokens: text_tokens,
                ctx,
            });
        }
        let n_chunks = max_chunks.map_or(available, |m| m.min(available));
        tokens.truncate(n_chunks * ctx);
        Ok(Chunks {
            ctx,
            n_chunks,
            tokens,
            bos,
            text_tokens,
        })
    }

    /// Rebuild from a saved base file's tokens.
    pub fn from_saved(tokens: Vec<u32>, ctx: usize, bos: Option<u32>) -> Result<Chunks, EvalError> {
        let n = tokens.len();
        if ctx < 4 || n == 0 || !n.is_multiple_of(ctx) {
            return Err(EvalError::Base(format!(
                "the base file's {n} tokens are not whole chunks of {ctx}"
            )));
        }
        Chunks::new(tokens, ctx, None, bos)
    }

    /// The first scored position of a chunk: the model always sees at least this many tokens.
    pub fn first(&self) -> usize {
        self.ctx / 2
    }

    /// Tokens scored per chunk.
    pub fn scored_per_chunk(&self) -> usize {
        self.ctx - 1 - self.first()
    }

    /// Tokens scored over all chunks.
    pub fn scored(&self) -> usize {
        self.n_chunks * self.scored_per_chunk()
    }

    fn span(&self, i: usize) -> &[u32] {
        &self.tokens[i * self.ctx..(i + 1) * self.ctx]
    }

    /// What the model reads for chunk `i`: its tokens, the first replaced by BOS when the
    /// model adds one, without the last (which is only ever a target).
    pub fn input(&self, i: usize) -> Vec<u32> {
        let mut t = self.span(i)[..self.ctx - 1].to_vec();
        if let Some(bos) = self.bos {
            t[0] = bos;
        }
        t
    }

    /// The tokens chunk `i`'s scored positions predict, in order.
    pub fn targets(&self, i: usize) -> &[u32] {
        &self.span(i)[self.first() + 1..]
    }
}

/// Run chunk `i` through the engine on a fresh cache, `batch` tokens per pass, and leave the
/// logits of its scored positions in `out` (`scored_per_chunk` rows of `n_vocab`).
pub fn chunk_logits(
    engine: &Engine,
    chunks: &Chunks,
    i: usize,
    batch: usize,
    out: &mut Vec<f32>,
) -> Result<(), EvalError> {
    if chunks.ctx > engine.cfg.n_ctx {
        return Err(EvalError::CtxTooLarge {
            ctx: chunks.ctx,
            n_ctx: engine.cfg.n_ctx,
        });
    }
    let input = chunks.input(i);
    let first = chunks.first();
    let n_vocab = engine.model.config().n_vocab;
    let mut kv = engine.new_cache();
    let mut rows = Vec::new();
    out.clear();
    // Passes of at most `batch` tokens, split where scoring starts: the first half needs no
    // logits (the output projection is the largest matmul of a small model).
    let mut pos = 0;
    while pos < input.len() {
        let end = if pos < first {
            (pos + batch).min(first)
        } else {
            (pos + batch).min(input.len())
        };
        let wanted = if pos < first {
            LogitsWanted::None
        } else {
            LogitsWanted::All
        };
        engine.forward(&input[pos..end], &mut kv, wanted, &mut rows)?;
        if wanted == LogitsWanted::All {
            out.extend_from_slice(&rows);
        }
        pos = end;
    }
    debug_assert_eq!(out.len(), chunks.scored_per_chunk() * n_vocab);
    Ok(())
}

/// A logits row's maximum, the position of its first maximum, and `ln Σ exp(x - max)`
/// (summed in f64 as `llama-perplexity` does): `max + lse_shift` is the row's logsumexp.
pub fn row_softmax(row: &[f32]) -> (f32, usize, f64) {
    let (mut max, mut arg) = (row[0], 0);
    for (i, &x) in row.iter().enumerate().skip(1) {
        if x > max {
            max = x;
            arg = i;
        }
    }
    let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
    (max, arg, sum.ln())
}

/// Mean of `sum` over `count` values and its standard error from `sum2` (the sum of squares),
/// as `llama-perplexity` computes them.
pub fn mean_and_stderr(sum: f64, sum2: f64, count: usize) -> (f64, f64) {
    if count == 0 {
        return (0.0, 0.0);
    }
    let n = count as f64;
    let mean = sum / n;
    let var = sum2 / n - mean * mean;
    let err = if var > 0.0 && count > 1 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, err)
}

/// The `fraction` quantile of sorted `values`, interpolated linearly between neighbours
/// (`llama-perplexity`'s rule for its KLD and Δp percentiles).
pub fn quantile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let i = p as usize;
    let f = p - i as f64;
    (1.0 - f) * sorted[i] + f * sorted[(i + 1).min(sorted.len() - 1)]
}

/// sha256 of a model's vocabulary (every token's bytes, length-prefixed, in id order): two
/// models that tokenize alike have the same one.
pub fn vocab_sha256(tok: &ember_runtime::tokenizer::Tokenizer) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for id in 0..tok.vocab_size() as u32 {
        let b = tok.token_bytes(id);
        h.update((b.len() as u32).to_le_bytes());
        h.update(&b);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_whole_contexts_and_score_the_second_half() {
        let tokens: Vec<u32> = (10..10 + 37).collect();
        let c = Chunks::new(tokens, 8, None, Some(1)).unwrap();
        assert_eq!((c.n_chunks, c.text_tokens, c.tokens.len()), (4, 37, 32));
        assert_eq!((c.first(), c.scored_per_chunk(), c.scored()), (4, 3, 12));
        // Chunk 1 is tokens 18..26: BOS replaces the first, the last is only a target.
        assert_eq!(c.input(1), vec![1, 19, 20, 21, 22, 23, 24]);
        // Positions 4, 5, 6 predict tokens 5, 6, 7 of the chunk.
        assert_eq!(c.targets(1), &[23, 24, 25]);
        let no_bos = Chunks::new((0..16).collect(), 8, Some(1), None).unwrap();
        assert_eq!(no_bos.n_chunks, 1);
        assert_eq!(no_bos.input(0)[0], 0);
    }

    #[test]
    fn a_text_shorter_than_a_chunk_is_an_error() {
        let e = Chunks::new((0..7).collect(), 8, None, None).unwrap_err();
        assert!(
            matches!(e, EvalError::TooShort { tokens: 7, ctx: 8 }),
            "{e}"
        );
        assert!(e.to_string().contains("7 tokens"));
        assert!(matches!(
            Chunks::new((0..64).collect(), 3, None, None),
            Err(EvalError::CtxTooSmall(3))
        ));
        assert!(matches!(
            Chunks::new((0..64).collect(), 8, Some(0), None),
            Err(EvalError::NoChunks)
        ));
    }

    #[test]
    fn softmax_and_statistics() {
        let (max, arg, shift) = row_softmax(&[0.0, 2.0, 2.0, -1.0]);
        assert_eq!((max, arg), (2.0, 1));
        let want = (1.0f64 + 1.0 + (-2.0f64).exp() + (-3.0f64).exp()).ln();
        assert!((shift - want).abs() < 1e-7);
        let (m, e) = mean_and_stderr(6.0, 14.0, 3); // values 1, 2, 3
        assert!((m - 2.0).abs() < 1e-12);
        assert!((e - (1.0f64 / 3.0).sqrt()).abs() < 1e-12, "{e}");
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.0);
        assert!((quantile(&v, 0.99) - 3.96).abs() < 1e-12);
        assert_eq!(quantile(&v, 1.0), 4.0);
    }
}
