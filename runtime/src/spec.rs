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
//! How many drafts a sequence gets is sized to pay ([`PassCost`], [`Acceptance`]): the
//! scheduler fits each pass's time as a + b·rows, and a draft row is worth it when its chance
//! of being kept, measured per sequence and per depth, beats b·n / (a + b·n) with n sequences
//! decoding (what a kept draft saves against what its row costs). One sequence on a CPU takes
//! long drafts; a CPU batch already compute-bound takes only the likely ones; a GPU, where a
//! row costs next to nothing, takes them all.
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

/// What a forward pass costs by its rows: a line t = a + b·rows fitted by least squares over
/// the recent passes (exponentially weighted, so it follows the context growing and the batch
/// changing). `a` is what every pass pays (the weights read once), `b` each row's share.
#[derive(Clone, Debug, Default)]
pub struct PassCost {
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

impl PassCost {
    const DECAY: f64 = 0.97;

    pub fn observe(&mut self, rows: usize, secs: f64) {
        let (x, y) = (rows as f64, secs);
        let d = Self::DECAY;
        self.w = self.w * d + 1.0;
        self.sx = self.sx * d + x;
        self.sy = self.sy * d + y;
        self.sxx = self.sxx * d + x * x;
        self.sxy = self.sxy * d + x * y;
    }

    /// (a, b) in seconds, once passes of different sizes were seen; `b` ≥ 0, `a` > 0.
    pub fn line(&self) -> Option<(f64, f64)> {
        if self.w < 2.0 {
            return None;
        }
        let (mx, my) = (self.sx / self.w, self.sy / self.w);
        let var = self.sxx / self.w - mx * mx;
        if var < 0.25 {
            return None;
        }
        let b = ((self.sxy / self.w - mx * my) / var).max(0.0);
        let a = my - b * mx;
        (a > 0.0).then_some((a, b))
    }

    /// The chance of acceptance below which a draft row costs more than it is expected to
    /// save, with `n` sequences decoding: a kept draft saves a plain step's time per token,
    /// (a + n·b) / n, and its row costs b. 0 (draft freely) while the cost is unknown; near 0
    /// where rows are nearly free (a GPU), higher as a CPU's batch becomes compute-bound.
    pub fn threshold(&self, n: usize) -> f64 {
        match self.line() {
            Some((a, b)) => {
                let n = n.max(1) as f64;
                (b * n / (a + b * n)).min(0.95)
            }
            None => 0.0,
        }
    }
}

/// One sequence's recent acceptance, by depth: for each j, how often the j-th draft of a
/// verify pass was kept (with all before it) among the passes that proposed at least j,
/// exponentially weighted over its verify passes. Drafts are not kept token by token
/// independently: a lookup continuation is right until the text departs from it, then wrong to
/// its end, so the chance is measured per depth, not derived from one per-token rate.
#[derive(Clone, Debug, Default)]
pub struct Acceptance {
    /// Index j − 1: passes that proposed a j-th draft, and those that kept it.
    tested: Vec<f64>,
    kept: Vec<f64>,
}

impl Acceptance {
    const DECAY: f64 = 0.8;
    /// The chance assumed at a depth never tried (optimistic, so it gets tried).
    const PRIOR: f64 = 0.8;

    /// A verify pass that checked `drafted` tokens and kept the first `accepted`.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        if self.tested.len() < drafted {
            self.tested.resize(drafted, 0.0);
            self.kept.resize(drafted, 0.0);
        }
        for (j, (t, k)) in self.tested.iter_mut().zip(&mut self.kept).enumerate() {
            *t *= Self::DECAY;
            *k *= Self::DECAY;
            if j < drafted {
                *t += 1.0;
                *k += f64::from(u8::from(j < accepted));
            }
        }
    }

    /// The chance that a j-th draft is kept (j ≥ 1), with one pseudo-pass at [`Self::PRIOR`].
    pub fn at(&self, j: usize) -> f64 {
        let (t, k) = (
            self.tested.get(j - 1).copied().unwrap_or(0.0),
            self.kept.get(j - 1).copied().unwrap_or(0.0),
        );
        (k + Self::PRIOR) / (t + 1.0)
    }

    /// How many drafts are worth a row: up to the first depth whose chance of being kept is
    /// below `threshold`; at least 1 (so the chance keeps being measured), at most `cap`.
    pub fn worth(&self, threshold: f64, cap: usize) -> usize {
        if threshold <= 0.0 {
            return cap;
        }
        let j = (1..=cap)
            .find(|&j| self.at(j) < threshold)
            .map_or(cap, |j| j - 1);
        j.max(1).min(cap)
    }
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
    fn pass_cost_and_acceptance_size_the_drafts() {
        // Passes of 20 ms plus 6 ms a row (a CPU): a draft row is worth it at one sequence
        // when kept with a chance above 6/26, at eight above 48/68.
        let mut c = PassCost::default();
        assert_eq!(c.threshold(1), 0.0, "unknown cost: draft freely");
        for rows in [1, 17, 8, 300, 1, 40] {
            c.observe(rows, 0.020 + 0.006 * rows as f64);
        }
        let (a, b) = c.line().unwrap();
        assert!(
            (a - 0.020).abs() < 1e-9 && (b - 0.006).abs() < 1e-9,
            "{a} {b}"
        );
        assert!((c.threshold(1) - 6.0 / 26.0).abs() < 1e-9);
        assert!((c.threshold(8) - 48.0 / 68.0).abs() < 1e-9);
        // Rows that cost nothing: every draft is worth it.
        let mut free = PassCost::default();
        for rows in [1, 17, 8] {
            free.observe(rows, 0.010);
        }
        assert_eq!(free.threshold(8), 0.0);

        let mut q = Acceptance::default();
        assert!((q.at(1) - 0.8).abs() < 1e-12 && (q.at(9) - 0.8).abs() < 1e-12);
        // Untried: every depth at the prior 0.8, above both thresholds: draft them all.
        assert_eq!(q.worth(c.threshold(1), 16), 16);
        assert_eq!(q.worth(0.0, 16), 16);
        // Lookup in an edit: the continuation holds for 4 tokens, then the text departs.
        for _ in 0..8 {
            q.observe(16, 4);
        }
        assert!(q.at(4) > 0.95 && q.at(5) < 0.2, "{} {}", q.at(4), q.at(5));
        assert_eq!(q.worth(c.threshold(8), 16), 4);
        assert_eq!(q.worth(c.threshold(1), 16), 4);
        // Half the passes keep all 16: past depth 4 the chance is about one half, worth a row
        // at one sequence (above 0.23), not at eight (below 0.71).
        for _ in 0..8 {
            q.observe(16, 16);
            q.observe(16, 4);
        }
        assert!((q.at(10) - 0.5).abs() < 0.15, "{}", q.at(10));
        assert_eq!(q.worth(c.threshold(1), 16), 16);
        assert_eq!(q.worth(c.threshold(8), 16), 4);
        // Every first draft replaced: one draft, to keep measuring.
        for _ in 0..12 {
            q.observe(8, 0);
        }
        assert_eq!(q.worth(c.threshold(1), 16), 1);
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
