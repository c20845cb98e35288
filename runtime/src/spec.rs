//! Speculative decoding: cheap proposals of the next few tokens, verified by the target model
//! in one batched forward pass.
//!
//! A decoding sequence normally runs one row per pass. With speculation the
//! [`Scheduler`](crate::scheduler::Scheduler) first asks for up to `draft_max` proposed tokens
//! d₁…d_K, then runs the row of the last token and the K draft rows in the same pass (every
//! weight read once for all of them) and asks for every row's logits. Row j gives the target's
//! distribution after d₁…d_j; [`RequestState::on_logits_verify`] keeps d_{j+1} or replaces it
//! (the speculative-sampling rule in [`Sampler::verify`]), and the first replaced token ends
//! the step. Rows after it were computed on a wrong prefix: their KV positions are dropped
//! ([`PagedKv::truncate`]; a block already entered in the prefix index keeps its entry, whose
//! key is the tokens it holds). So a step emits between one and K + 1 tokens, and the output
//! is the target's: token for token under greedy sampling, in distribution at a temperature.
//!
//! Two proposers:
//! - **prompt lookup** ([`lookup`], `--lookup N`): the continuation of the most recent earlier
//!   occurrence of the last n tokens (n = N down to 1) in the prompt and output so far. Free to
//!   compute; it pays where the output copies the input (code edits, quoting a context).
//! - **a draft model** (`--draft FILE`): a smaller model with the same vocabulary proposes its
//!   greedy tokens while its top probability is at least `draft_p_min`. It keeps a KV cache of
//!   its own, rolled back with the target's.
//!
//! [`RequestState::on_logits_verify`]: crate::request::RequestState::on_logits_verify
//! [`Sampler::verify`]: crate::sample::Sampler::verify
//! [`PagedKv::truncate`]: crate::kv::PagedKv::truncate

use crate::engine::Engine;

/// How a server speculates (llama.cpp's flag names and meanings).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpecConfig {
    /// Prompt lookup: the longest n-gram matched (0: no lookup; a draft model then proposes).
    pub lookup: usize,
    /// Most tokens proposed per step (`--draft-max`).
    pub draft_max: usize,
    /// Fewer proposed tokens than this are not worth a verify pass: the step decodes plainly
    /// (`--draft-min`).
    pub draft_min: usize,
    /// A draft model stops proposing at a token whose probability is below this
    /// (`--draft-p-min`).
    pub draft_p_min: f32,
}

impl SpecConfig {
    /// llama.cpp's defaults (`--draft-max 16 --draft-min 0 --draft-p-min 0.8`).
    pub const DRAFT_MAX: usize = 16;
    pub const DRAFT_MIN: usize = 0;
    pub const DRAFT_P_MIN: f32 = 0.8;

    /// Prompt lookup over n-grams of up to `n` tokens, with the default draft limits.
    pub fn lookup(n: usize) -> Self {
        SpecConfig {
            lookup: n,
            ..Self::draft()
        }
    }

    /// A draft model, with the default limits.
    pub fn draft() -> Self {
        SpecConfig {
            lookup: 0,
            draft_max: Self::DRAFT_MAX,
            draft_min: Self::DRAFT_MIN,
            draft_p_min: Self::DRAFT_P_MIN,
        }
    }

    /// The limits make sense, and there is exactly one proposer (`has_draft`: a draft model
    /// was given).
    pub fn validate(&self, has_draft: bool) -> Result<(), SpecError> {
        if self.draft_max == 0 {
            return Err(SpecError::DraftMaxZero);
        }
        if self.draft_min > self.draft_max {
            return Err(SpecError::MinOverMax {
                min: self.draft_min,
                max: self.draft_max,
            });
        }
        if !(0.0..=1.0).contains(&self.draft_p_min) {
            return Err(SpecError::PMin(self.draft_p_min));
        }
        match (self.lookup > 0, has_draft) {
            (true, true) => Err(SpecError::Both),
            (false, false) => Err(SpecError::Nothing),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("--draft-max must be at least 1 (the most tokens proposed per step)")]
    DraftMaxZero,
    #[error("--draft-min {min} is larger than --draft-max {max}")]
    MinOverMax { min: usize, max: usize },
    #[error("--draft-p-min must be in [0, 1], got {0}")]
    PMin(f32),
    #[error(
        "--lookup and --draft together: choose one (prompt lookup proposes from the text itself and needs no draft model)"
    )]
    Both,
    #[error("speculation needs a proposer: --lookup N or --draft FILE")]
    Nothing,
    #[error(
        "the draft model has a vocabulary of {draft} tokens and the target {target}: draft and target must share one vocabulary"
    )]
    VocabSize { draft: usize, target: usize },
    #[error(
        "the draft model's token {id} is {draft:?} where the target's is {target:?}: draft and target must share one vocabulary"
    )]
    VocabToken {
        id: u32,
        draft: String,
        target: String,
    },
    #[error(
        "the draft model's KV budget holds {positions} positions, fewer than one sequence of the context ({n_ctx}): raise the KV budget or lower the context"
    )]
    DraftKv { positions: usize, n_ctx: usize },
}

/// Whether `draft` can propose tokens for `target`: the same vocabulary, token for token.
pub fn check_vocab(target: &Engine, draft: &Engine) -> Result<(), SpecError> {
    let (t, d) = (&target.tokenizer, &draft.tokenizer);
    let (nt, nd) = (target.model.config().n_vocab, draft.model.config().n_vocab);
    if nt != nd || t.vocab_size() != d.vocab_size() {
        return Err(SpecError::VocabSize {
            draft: nd,
            target: nt,
        });
    }
    for id in 0..t.vocab_size() as u32 {
        if t.token_text(id) != d.token_text(id) {
            return Err(SpecError::VocabToken {
                id,
                draft: d.token_text(id).to_string(),
                target: t.token_text(id).to_string(),
            });
        }
    }
    Ok(())
}

/// Prompt lookup: the tokens that followed the most recent earlier occurrence of the last `n`
/// tokens of `tokens`, for n from `max_ngram` down to 1 (the longest match wins), at most
/// `max_draft` of them. Empty when nothing matches.
pub fn lookup(tokens: &[u32], max_ngram: usize, max_draft: usize) -> &[u32] {
    let len = tokens.len();
    if max_draft == 0 {
        return &[];
    }
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let pattern = &tokens[len - n..];
        // Earlier occurrences only (start < len − n), the most recent first.
        if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == pattern) {
            let from = i + n;
            return &tokens[from..(from + max_draft).min(len)];
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_takes_the_longest_most_recent_match() {
        // "a b c d | x b c e | b c" : the last two tokens "b c" occur at 1 and 5; the most
        // recent (5) is followed by "e b c".
        let t = [1, 2, 3, 4, 9, 2, 3, 5, 2, 3];
        assert_eq!(lookup(&t, 2, 8), &[5, 2, 3]);
        assert_eq!(lookup(&t, 2, 1), &[5]);
        // A 3-gram "x b c"? No: "5 2 3" is new; the 2-gram decides.
        assert_eq!(lookup(&t, 3, 8), &[5, 2, 3]);
        // The longest match wins over a more recent shorter one: "1 2 3" ... "1 2 3"
        let t = [1, 2, 3, 7, 8, 3, 6, 1, 2, 3];
        assert_eq!(lookup(&t, 3, 2), &[7, 8]);
        assert_eq!(lookup(&t, 1, 2), &[6, 1]);
        // Nothing to match, or nothing asked.
        assert!(lookup(&[1, 2, 3], 3, 4).is_empty());
        assert!(lookup(&[1], 3, 4).is_empty());
        assert!(lookup(&t, 3, 0).is_empty());
    }

    #[test]
    fn bad_limits_are_refused_with_the_flag_named() {
        let ok = SpecConfig::lookup(3);
        assert!(ok.validate(false).is_ok());
        let e = |c: SpecConfig, d: bool| c.validate(d).unwrap_err().to_string();
        assert!(
            e(
                SpecConfig {
                    draft_max: 0,
                    ..ok.clone()
                },
                false
            )
            .contains("--draft-max")
        );
        assert!(
            e(
                SpecConfig {
                    draft_min: 20,
                    ..ok.clone()
                },
                false
            )
            .contains("--draft-min 20 is larger than --draft-max 16")
        );
        assert!(e(ok.clone(), true).contains("choose one"));
        assert!(e(SpecConfig::draft(), false).contains("needs a proposer"));
        assert!(SpecConfig::draft().validate(true).is_ok());
    }
}
