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

/// Measured forward-pass time by the pass's rows (an exponentially weighted mean per row
/// count, so it follows the context growing), and an estimate for row counts not seen yet.
///
/// Measured, not modelled as a line: on a CPU a pass is near flat while reading the weights
/// dominates, then grows by a row's compute per row (Qwen2.5 0.5B on 2 Xeon cores: 25 ms at 1
/// row, 55 ms at 8, 355 ms at 55); a line fitted through large passes puts a wrong intercept
/// under the small ones, and draft sizing turns on that intercept.
#[derive(Clone, Debug, Default)]
pub struct PassTimes {
    /// Index: rows; 0.0 where never seen.
    secs: Vec<f64>,
}

impl PassTimes {
    /// Weight of the old mean when a pass of the same size is seen again.
    const KEEP: f64 = 0.7;

    /// A pass of `rows` rows took `secs`.
    pub fn observe(&mut self, rows: usize, secs: f64) {
        if rows == 0 || secs.is_nan() || secs <= 0.0 {
            return;
        }
        if self.secs.len() <= rows {
            self.secs.resize(rows + 1, 0.0);
        }
        let t = &mut self.secs[rows];
        *t = if *t > 0.0 {
            Self::KEEP * *t + (1.0 - Self::KEEP) * secs
        } else {
            secs
        };
    }

    /// A pass of `rows` rows, in seconds: as measured; else interpolated between the nearest
    /// sizes measured either side; past the largest, extended along the line from the smallest
    /// (rows cost at least what they did on average there); below the smallest, as the
    /// smallest. `None` while nothing was measured.
    pub fn estimate(&self, rows: usize) -> Option<f64> {
        let seen = |r: usize| self.secs.get(r).copied().filter(|&t| t > 0.0);
        if let Some(t) = seen(rows) {
            return Some(t);
        }
        let lo = (1..rows.min(self.secs.len()))
            .rev()
            .find_map(|r| seen(r).map(|t| (r, t)));
        let hi = (rows + 1..self.secs.len()).find_map(|r| seen(r).map(|t| (r, t)));
        match (lo, hi) {
            (Some((r0, t0)), Some((r1, t1))) => {
                Some(t0 + (t1 - t0) * (rows - r0) as f64 / (r1 - r0) as f64)
            }
            (Some((r1, t1)), None) => match (1..r1).find_map(|r| seen(r).map(|t| (r, t))) {
                Some((r0, t0)) => {
                    let slope = ((t1 - t0) / (r1 - r0) as f64).max(0.0);
                    Some(t1 + slope * (rows - r1) as f64)
                }
                // One size seen: assume larger passes cost no more, so they get tried.
                None => Some(t1),
            },
            (None, Some((_, t1))) => Some(t1),
            (None, None) => None,
        }
    }
}

/// The least gain in expected work per second, over a plain pass, a draft plan must promise.
const DRAFT_GAIN_MIN: f64 = 1.03;

/// How many drafts each sequence verifies this pass. `base_rows` are the pass's rows without
/// drafts (a row per decoding sequence, and prompt rows sharing the pass); `chances[i]` is
/// sequence i's chance of keeping each draft it could propose, by depth (non-increasing).
///
/// The drafts taken are those of highest chance, as many as maximize the pass's expected work
/// per second, (rows without drafts + expected kept drafts) / time(rows with drafts), by
/// `times`, if that beats the plain pass by [`DRAFT_GAIN_MIN`]. Where rows are nearly free (a
/// GPU, or one sequence on a CPU) that takes long drafts; where the batch is already
/// compute-bound (a CPU with 8 sequences) a draft row costs what a plain row does and only
/// near-certain drafts pay. Nothing is drafted while the time of the plain pass is unknown (the
/// pass then measures it).
pub fn plan_drafts(times: &PassTimes, base_rows: usize, chances: &[Vec<f64>]) -> Vec<usize> {
    let mut takes = vec![0; chances.len()];
    let Some(base) = times.estimate(base_rows) else {
        return takes;
    };
    // Every (chance, sequence, depth), best first; a sequence's depths stay in order.
    let mut offers: Vec<(f64, usize, usize)> = chances
        .iter()
        .enumerate()
        .flat_map(|(i, c)| c.iter().enumerate().map(move |(j, &p)| (p, i, j)))
        .collect();
    offers.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)));
    // Estimates are noisy (acceptance most of all): drafts must promise a clear gain.
    let (mut best, mut best_k) = (base_rows as f64 / base * DRAFT_GAIN_MIN, 0);
    let mut kept = 0.0;
    for (k, &(p, _, _)) in offers.iter().enumerate() {
        kept += p;
        let rows = base_rows + k + 1;
        let t = times.estimate(rows).unwrap_or(base).max(base);
        let v = (base_rows as f64 + kept) / t;
        if v > best {
            (best, best_k) = (v, k + 1);
        }
    }
    for &(_, i, _) in &offers[..best_k] {
        takes[i] += 1;
    }
    takes
}

/// One sequence's recent acceptance, by depth: for each j, how often the j-th draft of a
/// verify pass was kept (with all before it) among the passes that proposed at least j,
/// exponentially weighted over its verify passes. Drafts are not kept token by token
/// independently: a lookup continuation is right until the text departs from it, then wrong to
/// its end, so the chance is measured per depth, not derived from one per-token rate.
///
/// A sequence's own measure starts from what the scheduler's other sequences showed for the
/// same kind of proposal ([`Acceptance::shared`], slower to forget), so a new request does not
/// start from an optimistic guess.
#[derive(Clone, Debug, Default)]
pub struct Acceptance {
    /// Index j − 1: passes that proposed a j-th draft, and those that kept it.
    tested: Vec<f64>,
    kept: Vec<f64>,
    /// Pooled over sequences: forgets slowly.
    pooled: bool,
}

impl Acceptance {
    const DECAY: f64 = 0.8;
    const POOLED_DECAY: f64 = 0.98;
    /// The chance assumed at a depth never tried (optimistic, so it gets tried).
    const PRIOR: f64 = 0.8;

    /// A measure pooled over all sequences.
    pub fn shared() -> Self {
        Acceptance {
            pooled: true,
            ..Self::default()
        }
    }

    /// A verify pass that checked `drafted` tokens and kept the first `accepted`.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        if self.tested.len() < drafted {
            self.tested.resize(drafted, 0.0);
            self.kept.resize(drafted, 0.0);
        }
        let d = if self.pooled {
            Self::POOLED_DECAY
        } else {
            Self::DECAY
        };
        for (j, (t, k)) in self.tested.iter_mut().zip(&mut self.kept).enumerate() {
            *t *= d;
            *k *= d;
            if j < drafted {
                *t += 1.0;
                *k += f64::from(u8::from(j < accepted));
            }
        }
    }

    /// The chance that a j-th draft is kept (j ≥ 1), with one pseudo-pass at the chance of
    /// the depth before it ([`Self::PRIOR`] for the first): a depth never tried is assumed as
    /// good as the one before (so it gets tried), and no depth is more likely kept than the one
    /// before (a j-th draft is kept only with all before it).
    pub fn at(&self, j: usize) -> f64 {
        self.chances().nth(j - 1).unwrap_or(0.0)
    }

    /// [`Self::at`] for j = 1, 2, … without end.
    pub fn chances(&self) -> impl Iterator<Item = f64> + '_ {
        self.chain(|prev| prev.unwrap_or(Self::PRIOR))
    }

    /// As [`Self::chances`], with the pseudo-pass at each depth at `prior`'s chance there
    /// instead.
    pub fn chances_from<'a>(&'a self, prior: &'a Acceptance) -> impl Iterator<Item = f64> + 'a {
        let mut prior = prior.chances();
        self.chain(move |_| prior.next().unwrap_or(Self::PRIOR))
    }

    /// Each depth's kept share with one pseudo-pass at `pseudo(chance of the depth before)`,
    /// never above the depth before.
    fn chain<'a>(
        &'a self,
        mut pseudo: impl FnMut(Option<f64>) -> f64 + 'a,
    ) -> impl Iterator<Item = f64> + 'a {
        let mut prev: Option<f64> = None;
        (0..).map(move |i| {
            let t = self.tested.get(i).copied().unwrap_or(0.0);
            let k = self.kept.get(i).copied().unwrap_or(0.0);
            let p = (k + pseudo(prev)) / (t + 1.0);
            let p = prev.map_or(p, |prev| p.min(prev));
            prev = Some(p);
            p
        })
    }
}

/// Prompt lookup: the tokens that followed the most recent earlier occurrence of the last `n`
/// tokens of `tokens`, for n from `max_ngram` down to 1 (the longest match wins), at most
/// `max_draft` of them, with the n that matched. `(0, [])` when nothing matches.
///
/// The match's length says much about the continuation: on `ember bench -w edit` (Qwen2.5
/// 0.5B) a first draft after a 3-token match was kept 91% of the time, after a 1-token match
/// 30%, so the scheduler measures acceptance per match length.
pub fn lookup(tokens: &[u32], max_ngram: usize, max_draft: usize) -> (usize, &[u32]) {
    let len = tokens.len();
    if max_draft == 0 {
        return (0, &[]);
    }
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let pattern = &tokens[len - n..];
        // Earlier occurrences only (start < len − n), the most recent first.
        if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == pattern) {
            let from = i + n;
            return (n, &tokens[from..(from + max_draft).min(len)]);
        }
    }
    (0, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_takes_the_longest_most_recent_match() {
        // "a b c d | x b c e | b c" : the last two tokens "b c" occur at 1 and 5; the most
        // recent (5) is followed by "e b c".
        let t = [1, 2, 3, 4, 9, 2, 3, 5, 2, 3];
        assert_eq!(lookup(&t, 2, 8), (2, &[5, 2, 3][..]));
        assert_eq!(lookup(&t, 2, 1), (2, &[5][..]));
        assert_eq!(lookup(&t, 3, 8), (2, &[5, 2, 3][..]));
        let t = [1, 2, 3, 7, 8, 3, 6, 1, 2, 3];
        assert_eq!(lookup(&t, 3, 2), (3, &[7, 8][..]));
        assert_eq!(lookup(&t, 1, 2), (1, &[6, 1][..]));
        assert_eq!(lookup(&[1, 2, 3], 3, 4), (0, &[][..]));
        assert_eq!(lookup(&[1], 3, 4), (0, &[][..]));
        assert_eq!(lookup(&t, 3, 0), (0, &[][..]));
    }

    #[test]
    fn pass_times_are_measured_and_estimated_between() {
        let mut t = PassTimes::default();
        assert_eq!(t.estimate(8), None);
        t.observe(8, 0.055);
        // One size seen: larger passes assumed no dearer (so they get tried), smaller as it.
        assert_eq!(t.estimate(8), Some(0.055));
        assert_eq!(t.estimate(40), Some(0.055));
        assert_eq!(t.estimate(2), Some(0.055));
        t.observe(1, 0.025);
        t.observe(136, 0.055 + 0.0065 * 128.0);
        let near =
            |t: &PassTimes, r: usize, ms: f64| (t.estimate(r).unwrap() - ms * 1e-3).abs() < 1e-9;
        assert!(
            near(&t, 72, 55.0 + 6.5 * 64.0),
            "between: a line between the neighbours"
        );
        assert!(near(&t, 4, 25.0 + 30.0 * 3.0 / 7.0));
        let slope = (887.0 - 25.0) / 135.0;
        assert!(
            near(&t, 200, 887.0 + slope * 64.0),
            "past the largest: the line from the smallest"
        );
        // A size seen again moves its mean part way.
        t.observe(8, 0.065);
        assert!(near(&t, 8, 58.0));
    }

    #[test]
    fn drafts_are_sized_by_pass_times_and_acceptance() {
        // Unknown times: nothing drafted (the plain pass is measured first).
        let none = PassTimes::default();
        assert_eq!(plan_drafts(&none, 8, &vec![vec![0.99; 4]; 8]), vec![0; 8]);
        // A CPU (Qwen2.5 0.5B on 2 cores): 25 ms at 1 row, 55 ms at 8, then 6.5 ms a row.
        let mut cpu = PassTimes::default();
        for (rows, ms) in [(1, 25.0), (8, 55.0), (136, 55.0 + 6.5 * 128.0)] {
            cpu.observe(rows, ms * 1e-3);
        }
        // One sequence copying: rows are cheap next to the pass, all 16 drafts pay.
        assert_eq!(plan_drafts(&cpu, 1, &[vec![0.9; 16]]), vec![16]);
        // Eight sequences: compute-bound, a draft row costs what a plain row does; drafts kept
        // 80% of the time cost more than they save...
        assert_eq!(plan_drafts(&cpu, 8, &vec![vec![0.8; 16]; 8]), vec![0; 8]);
        // ...near-certain ones still pay (a plain pass is 7 ms a row, a draft row 6.5)...
        assert_eq!(plan_drafts(&cpu, 8, &vec![vec![0.99; 16]; 8]), vec![16; 8]);
        // The best go first: one sequence's two likely drafts and another's fair one, not the
        // long shots (25 ms for a row, 55 ms for 8).
        let two = [vec![0.9, 0.9, 0.05], vec![0.6, 0.1]];
        assert_eq!(plan_drafts(&cpu, 2, &two), vec![2, 1]);
        assert_eq!(plan_drafts(&cpu, 1, &two[..1]), vec![2]);
        // Prompt rows in the pass (8 decoding + 200 prompt rows) make drafts dearer still.
        assert_eq!(plan_drafts(&cpu, 208, &[vec![0.9; 4]]), vec![0]);
        // A GPU: rows nearly free, even drafts kept 30% of the time pay.
        let mut gpu = PassTimes::default();
        gpu.observe(1, 0.010);
        gpu.observe(64, 0.011);
        assert_eq!(plan_drafts(&gpu, 1, &[vec![0.3; 16]]), vec![16]);
    }

    #[test]
    fn acceptance_is_measured_by_depth() {
        let mut q = Acceptance::default();
        assert!((q.at(1) - 0.8).abs() < 1e-12 && (q.at(9) - 0.8).abs() < 1e-12);
        // Lookup in an edit: the continuation holds for 4 tokens, then the text departs.
        for _ in 0..8 {
            q.observe(16, 4);
        }
        assert!(q.at(4) > 0.95 && q.at(5) < 0.2, "{} {}", q.at(4), q.at(5));
        // Half the passes keep all 16: past depth 4 the chance is about one half.
        for _ in 0..8 {
            q.observe(16, 16);
            q.observe(16, 4);
        }
        assert!((q.at(10) - 0.5).abs() < 0.15, "{}", q.at(10));
        // Every first draft replaced.
        for _ in 0..12 {
            q.observe(8, 0);
        }
        assert!(q.at(1) < 0.25, "{}", q.at(1));
        // Depths never tried inherit the chance before them; none exceeds it.
        let mut r = Acceptance::default();
        for _ in 0..6 {
            r.observe(1, 1);
        }
        assert!(r.at(1) > 0.95 && (r.at(2) - r.at(1)).abs() < 1e-12);
        r.observe(2, 1);
        assert!(r.at(2) < r.at(1) && r.at(3) <= r.at(2));
        let c: Vec<f64> = r.chances().take(6).collect();
        assert!(c.windows(2).all(|w| w[1] <= w[0]), "{c:?}");
        // A new sequence starts from the pooled measure: here, first drafts mostly replaced.
        let mut pooled = Acceptance::shared();
        for _ in 0..20 {
            pooled.observe(4, 0);
            pooled.observe(4, 4);
            pooled.observe(4, 0);
        }
        let fresh = Acceptance::default();
        let c: Vec<f64> = fresh.chances_from(&pooled).take(4).collect();
        assert!((c[0] - pooled.at(1)).abs() < 1e-12 && c[0] < 0.4, "{c:?}");
        assert!((fresh.at(1) - 0.8).abs() < 1e-12);
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
