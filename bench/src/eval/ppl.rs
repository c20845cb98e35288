//! Perplexity by `llama-perplexity`'s method: `exp` of the mean negative log-likelihood of the
//! scored tokens of every chunk, with its standard error.

use rayon::prelude::*;
use serde::Serialize;

use ember_runtime::engine::Engine;

use super::{Chunks, EvalError, chunk_logits, mean_and_stderr, row_softmax};

/// Negative log-likelihoods summed as they come.
#[derive(Clone, Copy, Debug, Default)]
pub struct NllSums {
    pub count: usize,
    pub sum: f64,
    pub sum2: f64,
}

impl NllSums {
    pub fn add(&mut self, nll: f64) {
        self.count += 1;
        self.sum += nll;
        self.sum2 += nll * nll;
    }
    pub fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }
    /// (ln ppl, its standard error).
    pub fn ln_ppl(&self) -> (f64, f64) {
        mean_and_stderr(self.sum, self.sum2, self.count)
    }
}

/// What `ember eval ppl` reports (and stores).
#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Standard error of `ppl` (`llama-perplexity`'s "+/-").
    pub ppl_stderr: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll_mean: f64,
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// Tokens in the whole text.
    pub text_tokens: usize,
    /// The running estimate after each chunk (`llama-perplexity`'s `[i]x` list).
    pub running_ppl: Vec<f64>,
    /// Each scored token's negative log-likelihood, in text order (stored, not printed).
    #[serde(skip)]
    pub token_nll: Vec<f64>,
}

/// Negative log-likelihood of each target under its row of `logits` (rows of `n_vocab`).
pub fn row_nlls(logits: &[f32], n_vocab: usize, targets: &[u32]) -> Vec<f64> {
    logits
        .par_chunks(n_vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let (max, _, shift) = row_softmax(row);
            max as f64 + shift - row[t as usize] as f64
        })
        .collect()
}

/// Score every chunk; `on_chunk(i, running ppl)` after each one (for progress).
pub fn perplexity(
    engine: &Engine,
    chunks: &Chunks,
    batch: usize,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<Perplexity, EvalError> {
    let n_vocab = engine.model.config().n_vocab;
    let mut sums = NllSums::default();
    let mut running = Vec::with_capacity(chunks.n_chunks);
    let mut logits = Vec::new();
    let mut token_nll = Vec::with_capacity(chunks.scored());
    for i in 0..chunks.n_chunks {
        chunk_logits(engine, chunks, i, batch, &mut logits)?;
        let nlls = engine.install(|| row_nlls(&logits, n_vocab, chunks.targets(i)));
        // Summed in position order, so the figure does not depend on the thread count.
        nlls.iter().for_each(|&v| sums.add(v));
        token_nll.extend(nlls);
        running.push(sums.ppl());
        on_chunk(i, sums.ppl());
    }
    let (ln_ppl, ln_err) = sums.ln_ppl();
    let ppl = ln_ppl.exp();
    Ok(Perplexity {
        ppl,
        ppl_stderr: ppl * ln_err,
        nll_mean: ln_ppl,
        ctx: chunks.ctx,
        chunks: chunks.n_chunks,
        tokens_scored: sums.count,
        text_tokens: chunks.text_tokens,
        running_ppl: running,
        token_nll,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_a_row_is_minus_its_log_softmax() {
        // Uniform over 4: every token has nll ln 4.
        let rows = [0.5f32; 8];
        let n = row_nlls(&rows, 4, &[0, 3]);
        assert!(n.iter().all(|&v| (v - 4f64.ln()).abs() < 1e-12), "{n:?}");
        // A peaked row: the peak's nll is small, another token's large.
        let row = [10.0f32, 0.0, 0.0];
        let n = row_nlls(&row, 3, &[0]);
        let want = (1.0 + 2.0 * (-10.0f64).exp()).ln();
        assert!((n[0] - want).abs() < 1e-9);
        let mut s = NllSums::default();
        [1.0, 2.0, 3.0].iter().for_each(|&v| s.add(v));
        assert!((s.ppl() - 2f64.exp()).abs() < 1e-12);
    }
}
