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
        let c = &self.cfg;
        let penalise = c.repeat_penalty != 1.0 && c.repeat_last_n > 0;
        if c.is_greedy() && !penalise {
            return argmax(logits);
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
            return best.0;
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
        let w: Vec<f64> = self
            .cand
            .iter()
            .map(|x| (((x.1 - m) as f64) / t).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut r = self.rng.next_f64() * z;
        for (i, &wi) in w.iter().enumerate() {
            r -= wi;
            if r <= 0.0 {
                return self.cand[i].0;
            }
        }
        self.cand[self.cand.len() - 1].0
    }
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
