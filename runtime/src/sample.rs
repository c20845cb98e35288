//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.
//!
//! The order of the chain follows llama.cpp's default: penalties → top-k →
//! top-p → min-p → temperature → draw. `temperature <= 0` is greedy (argmax of
//! the penalised logits).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(format!(
                "repeat penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, seedable, good enough for sampling.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: Rng,
    cand: Vec<(u32, f32)>,
}

/// Index of the largest value (first one on ties; NaN never wins; 0 when nothing beats −∞),
/// as llama.cpp's greedy does.
///
/// Runs per sequence and token over the whole vocabulary, so it is written to vectorize: one
/// pass finds the largest value with 16 independent lanes (compare and select, no branch),
/// a second finds the first chunk of 16 that holds it, and only that chunk is searched one
/// element at a time.
pub fn argmax(logits: &[f32]) -> u32 {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    for ch in logits.chunks_exact(L) {
        for i in 0..L {
            m[i] = if ch[i] > m[i] { ch[i] } else { m[i] };
        }
    }
    let mut mx = m
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for &v in logits.chunks_exact(L).remainder() {
        mx = if v > mx { v } else { mx };
    }
    if mx == f32::NEG_INFINITY {
        return 0; // NaN or −∞ everywhere: nothing beats the start value
    }
    let mut start = 0;
    for ch in logits.chunks_exact(L) {
        let mut hit = false;
        for &v in ch {
            hit |= v == mx;
        }
        if hit {
            break;
        }
        start += L;
    }
    let i = logits[start..]
        .iter()
        .position(|&v| v == mx)
        .expect("the largest value is present");
    (start + i) as u32
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = Rng::new(cfg.seed);
        Sampler {
            cfg,
            rng,
            cand: Vec::new(),
        }
    }

    /// Pick the next token from raw logits. `history` is every token so far
    /// (prompt and generated), used by the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        match self.chain(logits, history) {
            Chain::Token(t) => t,
            Chain::Weights(w) => self.draw(&w, None),
        }
    }

    /// Verify a proposed (draft) token against this distribution, the speculative-sampling
    /// rule for a deterministic proposal (a draft model's greedy choice, or an n-gram
    /// lookup: the proposal's distribution q is one-hot on `draft`). Returns the token to
    /// emit and whether it is the draft.
    ///
    /// Greedy: the draft is kept exactly when it is the argmax, so the output is the plain
    /// greedy output. At a temperature: the draft is kept with probability min(1, p/q) =
    /// p(draft); otherwise the token is drawn from the residual max(0, p − q), renormalized —
    /// p without the draft. Either way the emitted token is distributed exactly as p (Leviathan
    /// et al. 2023; Chen et al. 2023), whatever the proposal.
    pub fn verify(&mut self, logits: &[f32], history: &[u32], draft: u32) -> (u32, bool) {
        match self.chain(logits, history) {
            Chain::Token(t) => (t, t == draft),
            Chain::Weights(w) => {
                let z: f64 = w.iter().sum();
                let wd = self
                    .cand
                    .iter()
                    .zip(&w)
                    .find(|(c, _)| c.0 == draft)
                    .map_or(0.0, |(_, &x)| x);
                if self.rng.next_f64() * z < wd {
                    (draft, true)
                } else {
                    (self.draw(&w, Some(draft)), false)
                }
            }
        }
    }

    /// The sampling chain up to the draw: a token when the choice is deterministic (greedy),
    /// else the unnormalized weights of the candidates left in `self.cand`.
    fn chain(&mut self, logits: &[f32], history: &[u32]) -> Chain {
        let c = &self.cfg;
        let penalise = c.repeat_penalty != 1.0 && c.repeat_last_n > 0;
        if c.is_greedy() && !penalise {
            return Chain::Token(argmax(logits));
        }
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if penalise {
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t)
                    && let Some(e) = self.cand.get_mut(t as usize)
                {
                    // CTRL-style penalty as in llama.cpp: shrink positives, grow negatives.
                    e.1 = if e.1 > 0.0 {
                        e.1 / c.repeat_penalty
                    } else {
                        e.1 * c.repeat_penalty
                    };
                }
            }
        }
        if c.is_greedy() {
            let best =
                self.cand.iter().fold(
                    (0u32, f32::NEG_INFINITY),
                    |b, &x| if x.1 > b.1 { x } else { b },
                );
            return Chain::Token(best.0);
        }
        // Sort descending by logit (top-k first to keep this cheap for big vocabularies).
        let k = if c.top_k == 0 {
            self.cand.len()
        } else {
            c.top_k.min(self.cand.len())
        };
        if k < self.cand.len() {
            self.cand
                .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            self.cand.truncate(k);
        }
        self.cand
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Probabilities at temperature 1 for top-p/min-p, as llama.cpp's chain does.
        let m = self.cand[0].1;
        let mut p: Vec<f64> = self.cand.iter().map(|x| ((x.1 - m) as f64).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        let mut keep = p.len();
        if c.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, &pi) in p.iter().enumerate() {
                cum += pi;
                if cum >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if c.min_p > 0.0 {
            let thr = p[0] * c.min_p as f64;
            keep = keep.min(p.iter().take_while(|&&x| x >= thr).count().max(1));
        }
        self.cand.truncate(keep);
        let t = c.temperature as f64;
        Chain::Weights(
            self.cand
                .iter()
                .map(|x| (((x.1 - m) as f64) / t).exp())
                .collect(),
        )
    }

    /// Draw a candidate in proportion to `w` (one per `self.cand` entry), leaving out
    /// `except` (the residual distribution of a rejected draft).
    fn draw(&mut self, w: &[f64], except: Option<u32>) -> u32 {
        let skip = |i: usize| except == Some(self.cand[i].0);
        let z: f64 = w
            .iter()
            .enumerate()
            .filter(|&(i, _)| !skip(i))
            .map(|(_, x)| x)
            .sum();
        let mut r = self.rng.next_f64() * z;
        let mut last = None;
        for (i, &wi) in w.iter().enumerate() {
            if skip(i) {
                continue;
            }
            last = Some(i);
            r -= wi;
            if r <= 0.0 {
                return self.cand[i].0;
            }
        }
        // Rounding left a sliver: the last candidate drawn from takes it. (The residual is
        // never empty: a draft holding all the mass is always kept.)
        self.cand[last.unwrap_or(self.cand.len() - 1)].0
    }
}

/// Where the sampling chain ends: a fixed token, or weights to draw from.
enum Chain {
    Token(u32),
    Weights(Vec<f64>),
}

/// `log_softmax` value of one entry: logit − logsumexp.
pub fn logsumexp(logits: &[f32]) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
    m + s.ln() as f32
}

/// The `k` largest logits as (id, logit), sorted by logit descending, ties by id.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(v.len());
    if k == 0 {
        return vec![];
    }
    if k < v.len() {
        v.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(k);
    }
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &[]), 1);
    }

    /// The first index of the largest value, one element at a time (`argmax`'s definition).
    fn argmax_scalar(x: &[f32]) -> u32 {
        let (mut best, mut bv) = (0, f32::NEG_INFINITY);
        for (i, &v) in x.iter().enumerate() {
            if v > bv {
                (best, bv) = (i, v);
            }
        }
        best as u32
    }

    #[test]
    fn argmax_is_the_first_largest_whatever_the_lane() {
        let mut rng = Rng::new(17);
        for n in [0usize, 1, 5, 15, 16, 17, 31, 32, 33, 100, 49152, 49155] {
            for case in 0..12 {
                // Few distinct values, so ties across lanes and chunks are common.
                let mut x: Vec<f32> = (0..n).map(|_| (rng.next_u64() % 7) as f32 - 3.0).collect();
                match case {
                    1 if n > 0 => x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                    2 if n > 0 => x.iter_mut().for_each(|v| *v = f32::NAN),
                    3 if n > 3 => (x[0], x[n - 1]) = (f32::NAN, 9.0),
                    4 if n > 3 => (x[n / 2], x[n - 1]) = (9.0, 9.0),
                    5 if n > 0 => x[n - 1] = f32::INFINITY,
                    6 if n > 20 => (x[3], x[19]) = (9.0, 9.0),
                    7 if n > 20 => (x[19], x[3]) = (f32::NAN, 9.0),
                    8 => x.iter_mut().for_each(|v| *v = -*v * 1e30),
                    _ => {}
                }
                assert_eq!(argmax(&x), argmax_scalar(&x), "n {n} case {case}");
            }
        }
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let cfg = SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::greedy()
        };
        let mut s = Sampler::new(cfg);
        // Token 1 (3.0) was just used: 3.0/2 = 1.5 < 2.9.
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &[1]), 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let draw = |n| {
            let mut s = Sampler::new(cfg.clone());
            (0..n).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(4000);
        assert_eq!(a, draw(4000));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "P(1) = {ones}, want 0.75");
        assert!(!a.contains(&2));
    }

    /// Pearson's chi-square of `counts` against probabilities `p`.
    fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &pi)| {
                let e = n as f64 * pi;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// Verifying a draft emits tokens distributed exactly as plain sampling, whichever token
    /// is proposed (likely, unlikely, or cut by top-k): a chi-square over 40 000 draws per
    /// draft, with a fixed seed, below the 0.1 % critical value (df 3: 16.27). Breaking the
    /// rule (drawing the rejected case from p instead of the residual without the draft gives
    /// the draft p + (1 − p)·p) puts it in the thousands.
    #[test]
    fn verifying_a_draft_keeps_the_target_distribution() {
        let logits = [0.0f32, 3f32.ln(), 2f32.ln(), -1.0, -9.0];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 4,
            top_p: 1.0,
            min_p: 0.0,
            seed: 11,
            ..Default::default()
        };
        let w: Vec<f64> = logits[..4].iter().map(|&l| (l as f64).exp()).collect();
        let z: f64 = w.iter().sum();
        let p: Vec<f64> = w.iter().map(|x| x / z).collect();
        for draft in [1u32, 0, 3, 4] {
            let mut s = Sampler::new(SamplerConfig {
                seed: 11 + draft as u64,
                ..cfg.clone()
            });
            let mut counts = [0usize; 4];
            let mut kept = 0;
            for _ in 0..40_000 {
                let (t, ok) = s.verify(&logits, &[], draft);
                assert_eq!(ok, t == draft);
                kept += ok as usize;
                counts[t as usize] += 1;
            }
            let x2 = chi_square(&counts, &p);
            assert!(
                x2 < 16.27,
                "draft {draft}: chi-square {x2:.1}, counts {counts:?}, p {p:?}"
            );
            // The draft is kept with probability p(draft): 0 for the token top-k cut.
            let want = p.get(draft as usize).copied().unwrap_or(0.0);
            assert!(
                (kept as f64 / 40_000.0 - want).abs() < 0.01,
                "draft {draft} kept {kept}"
            );
        }
        // Greedy: kept exactly when it is the argmax.
        let mut g = Sampler::new(SamplerConfig::greedy());
        assert_eq!(g.verify(&logits, &[], 1), (1, true));
        assert_eq!(g.verify(&logits, &[], 2), (1, false));
    }

    #[test]
    fn top_k_one_and_min_p_are_greedy() {
        let logits = [1.0f32, 5.0, 4.9];
        for cfg in [
            SamplerConfig {
                temperature: 1.0,
                top_k: 1,
                ..Default::default()
            },
            SamplerConfig {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.99,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(cfg);
            assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p ≈ [0.665, 0.245, 0.09]; top-p 0.8 keeps two.
        let logits = [2.0f32, 1.0, 0.0];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.8,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        assert!((0..500).all(|_| s.sample(&logits, &[]) != 2));
    }

    #[test]
    fn top_k_sorted() {
        assert_eq!(
            top_k(&[1.0, 3.0, 2.0, 3.0], 3),
            vec![(1, 3.0), (3, 3.0), (2, 2.0)]
        );
        let l = logsumexp(&[0.0, 0.0]);
        assert!((l - 2f32.ln()).abs() < 1e-6);
    }
}
