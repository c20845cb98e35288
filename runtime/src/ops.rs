//! Dense f32 ops used by the decoder blocks on the CPU: RMSNorm, RoPE (both
//! styles), SiLU·mul, softmax and causal attention over the KV cache.
//! The quantized matmul lives in [`crate::quant`].

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// y = x / rms(x) * w, row by row (`x.len()` a multiple of `w.len()`).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let n = w.len();
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let ss = (xr.iter().map(|&v| (v * v) as f64).sum::<f64>() / n as f64) as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = a * inv * g;
        }
    }
}

/// In-place RMSNorm (x ← norm(x) · w).
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let ss = (xr.iter().map(|&v| (v * v) as f64).sum::<f64>() / n as f64) as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (a, &g) in xr.iter_mut().zip(w) {
            *a = *a * inv * g;
        }
    }
}

/// How rotary position embedding pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF llama (weights were permuted at conversion).
    Normal,
    /// Halves (i, i + d/2): GPT-NeoX, qwen2.
    Neox,
}

/// Precomputed inverse frequencies for one head dimension.
#[derive(Clone, Debug)]
pub struct Rope {
    pub style: RopeStyle,
    pub head_dim: usize,
    /// Rotated dims (≤ head_dim).
    pub n_rot: usize,
    inv_freq: Vec<f32>,
    /// Position scale (`1 / factor` of linear RoPE scaling; 1 without).
    freq_scale: f32,
    /// Per-pair frequency divisors (Llama 3.1+ `rope_freqs`, Phi-3 LongRoPE factors), one per
    /// rotated pair; empty when none.
    factors: Vec<f32>,
    /// Magnitude applied to cos and sin (LongRoPE's attention factor; 1 without).
    mscale: f32,
}

impl Rope {
    pub fn new(style: RopeStyle, head_dim: usize, n_rot: usize, base: f32) -> Self {
        // θ_i = p · scale^i, built by repeated f32 multiplication exactly as ggml's
        // rope cache does, so angles (and near-tie logits) agree with llama.cpp.
        let scale = base.powf(-2.0 / n_rot as f32);
        let mut inv_freq = Vec::with_capacity(n_rot / 2);
        let mut f = 1.0f32;
        for _ in 0..n_rot / 2 {
            inv_freq.push(f);
            f *= scale;
        }
        Rope {
            style,
            head_dim,
            n_rot,
            inv_freq,
            freq_scale: 1.0,
            factors: Vec::new(),
            mscale: 1.0,
        }
    }

    /// The same rotation with RoPE scaling, as ggml's `rope_ext` applies it (without YaRN
    /// extrapolation): pair `i` at position `p` turns by `θ = freq_scale · (p · base^(−2i/n_rot)
    /// / factors[i])`, and cos and sin are multiplied by `mscale`. `factors` is empty (none)
    /// or holds one divisor per rotated pair.
    ///
    /// # Panics
    /// If `factors` is neither empty nor `n_rot / 2` long (the loaders check lengths first).
    pub fn scaled(mut self, freq_scale: f32, factors: Vec<f32>, mscale: f32) -> Self {
        assert!(
            factors.is_empty() || factors.len() == self.n_rot / 2,
            "rope: {} frequency factors for {} rotated pairs",
            factors.len(),
            self.n_rot / 2
        );
        self.freq_scale = freq_scale;
        self.factors = factors;
        self.mscale = mscale;
        self
    }

    /// True when the rotation has no scaling (`freq_scale` 1, no factors, `mscale` 1).
    pub fn is_plain(&self) -> bool {
        self.freq_scale == 1.0 && self.factors.is_empty() && self.mscale == 1.0
    }

    /// `(cos θ_i, sin θ_i)` for the `n_rot / 2` rotated pairs at position `pos`: the angles
    /// [`Rope::apply`] uses, for backends that rotate elsewhere.
    pub fn angles(&self, pos: usize, cs: &mut [(f32, f32)]) {
        let mut theta = pos as f32;
        let scale = if self.n_rot / 2 > 1 {
            self.inv_freq[1]
        } else {
            1.0
        };
        if self.is_plain() {
            for c in cs.iter_mut() {
                *c = (theta.cos(), theta.sin());
                theta *= scale;
            }
            return;
        }
        // ggml's order: the base angle divided by the pair's factor, then times freq_scale.
        for (i, c) in cs.iter_mut().enumerate() {
            let ff = self.factors.get(i).copied().unwrap_or(1.0);
            let t = self.freq_scale * (theta / ff);
            *c = (t.cos() * self.mscale, t.sin() * self.mscale);
            theta *= scale;
        }
    }

    /// The `(cos, sin)` table for `n` tokens at positions `pos0..pos0 + n`, appended to `out`
    /// (`n_rot / 2` pairs per token): computed once per forward pass and shared by every layer's
    /// q and k (see [`Rope::apply_table`]).
    pub fn table(&self, pos0: usize, n: usize, out: &mut Vec<(f32, f32)>) {
        let half = self.n_rot / 2;
        let start = out.len();
        out.resize(start + n * half, (0.0, 0.0));
        for (t, cs) in out[start..]
            .chunks_exact_mut(half.max(1))
            .enumerate()
            .take(n)
        {
            self.angles(pos0 + t, cs);
        }
    }

    /// Rotate every head of `x` (`[n_tokens × n_heads·head_dim]`), token t at position `pos0 + t`.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, pos0: usize) {
        let n = x.len() / (n_heads * self.head_dim).max(1);
        let mut cs = Vec::new();
        self.table(pos0, n, &mut cs);
        self.apply_table(x, n_heads, &cs);
    }

    /// [`Rope::apply`] with the angles of [`Rope::table`] (token t's pairs at `t · n_rot / 2`).
    pub fn apply_table(&self, x: &mut [f32], n_heads: usize, table: &[(f32, f32)]) {
        let hd = self.head_dim;
        let row = n_heads * hd;
        let half = self.n_rot / 2;
        if half == 0 {
            return;
        }
        assert_eq!(
            table.len(),
            x.len() / row * half,
            "rope: one table row per token"
        );
        for (xr, cs) in x.chunks_exact_mut(row).zip(table.chunks_exact(half)) {
            for h in xr.chunks_exact_mut(hd) {
                match self.style {
                    RopeStyle::Normal => {
                        for (i, &(c, s)) in cs.iter().enumerate() {
                            let (a, b) = (h[2 * i], h[2 * i + 1]);
                            h[2 * i] = a * c - b * s;
                            h[2 * i + 1] = a * s + b * c;
                        }
                    }
                    RopeStyle::Neox => {
                        for (i, &(c, s)) in cs.iter().enumerate() {
                            let (a, b) = (h[i], h[i + half]);
                            h[i] = a * c - b * s;
                            h[i + half] = a * s + b * c;
                        }
                    }
                }
            }
        }
    }
}

/// e^x in f32 without a libm call, so loops over it vectorise: n = round(x·log₂e), r = x − n·ln 2
/// (in two parts, Cody–Waite), e^r by a degree-6 polynomial, times 2ⁿ built in the exponent
/// bits. Within 2 ulp of the true value for normal results (`exp_f32_is_within_2_ulp`); x is
/// clamped to [−87, 88], so large negative x gives ~1e-38 instead of a subnormal or 0 and large
/// positive x gives ~1.7e38 instead of infinity. Plain multiplies and adds (no FMA), so every
/// ISA and vector width computes the same bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5·2²³: adding it rounds to an integer (to nearest even), held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // few mantissa bits: n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let v = x * LOG2E + MAGIC;
    let n = v - MAGIC;
    let ni = v.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((ni + 127) << 23) as u32)
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_f32(-*g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_body(gate, up)
}

/// gate ← silu(gate) · up, with silu(g) = g / (1 + e^−g) ([`exp_f32`]); the same bits on every
/// ISA (the AVX2 build only widens the vectors).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was detected at run time.
        unsafe { silu_mul_avx2(gate, up) };
        return;
    }
    silu_mul_body(gate, up)
}

/// gate ← gelu(gate) · up with GELU's tanh approximation (Gemma's FFN), as llama.cpp's CPU
/// backend computes it: through a table over f16 inputs, so `x` is rounded to f16, GELU taken
/// in f32 ([`gelu_tanh`]) and rounded to f16 again; below −10 the result is 0 and from 10 up it
/// is `x` itself.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "gelu_tanh_mul: gate and up differ in length"
    );
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            round_f16(gelu_tanh(round_f16(x)))
        };
        *g = y * u;
    }
}

/// GELU, tanh approximation (see [`gelu_tanh_mul`]).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// Numerically stable in-place softmax ([`exp_f32`], then a sum in order).
#[inline]
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    x.iter_mut().for_each(|v| *v = exp_f32(*v - m));
    let sum: f32 = x.iter().fold(0.0, |a, &v| a + v);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Round to the nearest f16 value (kept in f32). The KV cache holds values at
/// f16 precision, matching llama.cpp's default f16 cache numerically.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// [`round_f16`] on every element; 8 at a time with F16C where the CPU has it (the same
/// round-to-nearest-even conversion, without a call per element).
pub fn round_f16_slice(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the features were detected at run time.
        unsafe { round_f16_slice_f16c(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = round_f16(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn round_f16_slice_f16c(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let (chunks, rest) = x.as_chunks_mut::<8>();
    for c in chunks {
        // SAFETY: `c` is 8 readable and writable f32s.
        unsafe {
            let v = _mm256_loadu_ps(c.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    rest.iter_mut().for_each(|v| *v = round_f16(*v));
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators so the compiler vectorises without reassociation flags.
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot`] of `a` with four rows at once, each with exactly `dot`'s operations.
#[inline(always)]
fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a.len();
    assert!(b.iter().all(|r| r.len() == n));
    let mut acc = [[0f32; 8]; 4];
    let (ca, ra) = a.as_chunks::<8>();
    for (k, x) in ca.iter().enumerate() {
        for (r, row) in b.iter().enumerate() {
            let y: &[f32; 8] = row[8 * k..8 * k + 8].try_into().unwrap();
            for i in 0..8 {
                acc[r][i] += x[i] * y[i];
            }
        }
    }
    std::array::from_fn(|r| {
        let mut s: f32 = acc[r].iter().sum();
        for (x, y) in ra.iter().zip(&b[r][8 * ca.len()..]) {
            s += x * y;
        }
        s
    })
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// What one query sees of one kv head: the sequence's cache blocks for the layer (f16,
/// `[block_size × kvrow]` each), where the head's rows sit in them, how many positions the
/// query attends to, and the score scale.
#[derive(Clone, Copy)]
struct HeadCache<'a> {
    k: &'a [&'a [f16]],
    v: &'a [&'a [f16]],
    block_size: usize,
    kvrow: usize,
    off: usize,
    hd: usize,
    /// First position the query sees (0 but under a sliding window).
    start: usize,
    n_ctx: usize,
    scale: f32,
}

impl<'a> HeadCache<'a> {
    /// Row `r` of one block.
    #[inline(always)]
    fn row(&self, block: &'a [f16], r: usize) -> &'a [f16] {
        &block[r * self.kvrow + self.off..][..self.hd]
    }

    /// The blocks of `blocks` (`self.k` or `self.v`) the query sees, each with the position of
    /// its first row, the first row that counts (0 but where a sliding window starts) and how
    /// many of its rows count (`block_size`, fewer in the last).
    #[inline(always)]
    fn spans(
        &self,
        blocks: &'a [&'a [f16]],
    ) -> impl Iterator<Item = (usize, &'a [f16], usize, usize)> + 'a {
        let (bs, n, start) = (self.block_size, self.n_ctx, self.start);
        blocks
            .iter()
            .enumerate()
            .skip(start / bs)
            .map(move |(b, &blk)| {
                let j = b * bs;
                (j, blk, start.saturating_sub(j), bs.min(n.saturating_sub(j)))
            })
            .take_while(|&(_, _, _, take)| take > 0)
    }
}

/// `dst` ← `src` widened to f32 (exact).
#[inline(always)]
fn widen(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}

/// One query head against its kv head: scaled scores, softmax, probabilities at
/// f16 precision (llama.cpp multiplies f16 V by f16-converted probabilities),
/// then the weighted sum of V rows into `o`. K and V are the cache's f16 values, widened to f32
/// exactly before use.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend(qh: &[f32], c: &HeadCache<'_>, scores: &mut Vec<f32>, o: &mut [f32]) {
    // Plain loops block by block (not `extend(map(..))`, not a division per row).
    // Four rows at a time keep four independent dependency chains in flight; each row's
    // arithmetic is exactly `dot`'s.
    let (hd, n_ctx, scale) = (c.hd, c.n_ctx, c.scale);
    // Four widened rows; on the stack for the usual head sizes (this runs per head and token).
    let mut stack = [0f32; 4 * 256];
    let mut heap = Vec::new();
    let rows: &mut [f32] = if hd <= 256 {
        &mut stack[..4 * hd]
    } else {
        heap.resize(4 * hd, 0.0);
        &mut heap
    };
    scores.resize(n_ctx, 0.0);
    for (j, kb, lo, take) in c.spans(c.k) {
        let mut r = lo;
        while r + 4 <= take {
            for i in 0..4 {
                widen(c.row(kb, r + i), &mut rows[i * hd..(i + 1) * hd]);
            }
            let (r0, rest) = rows.split_at(hd);
            let (r1, rest) = rest.split_at(hd);
            let (r2, r3) = rest.split_at(hd);
            let d = dot4(qh, [r0, r1, r2, r3]);
            for i in 0..4 {
                scores[j + r + i] = d[i] * scale;
            }
            r += 4;
        }
        for r in r..take {
            widen(c.row(kb, r), &mut rows[..hd]);
            scores[j + r] = dot(qh, &rows[..hd]) * scale;
        }
    }
    softmax(&mut scores[c.start..]);
    round_f16_slice(&mut scores[c.start..]);
    // The weighted sum of V rows, 64 output elements at a time held in registers over all
    // rows (each element still sums its rows in order, as `axpy` row by row would).
    let mut col = 0;
    while col + 64 <= hd {
        let mut acc = [0f32; 64];
        for (j, vb, lo, take) in c.spans(c.v) {
            for (r, &p) in scores[j..j + take].iter().enumerate().skip(lo) {
                let v: &mut [f32; 64] = (&mut rows[..64]).try_into().unwrap();
                widen(&c.row(vb, r)[col..col + 64], v);
                for i in 0..64 {
                    acc[i] += p * v[i];
                }
            }
        }
        o[col..col + 64].copy_from_slice(&acc);
        col += 64;
    }
    if col < hd {
        let o = &mut o[col..];
        o.fill(0.0);
        for (j, vb, lo, take) in c.spans(c.v) {
            for (r, &p) in scores[j..j + take].iter().enumerate().skip(lo) {
                let v = &mut rows[..hd - col];
                widen(&c.row(vb, r)[col..], v);
                axpy(o, p, v);
            }
        }
    }
}

/// [`attend`] with AVX2 intrinsics, K and V widened by F16C as they are loaded: the same
/// operations in the same order on wider vectors (no FMA contraction), so results are
/// bit-identical to the baseline; head sizes that are not a multiple of 8 (or above 256) take
/// [`attend`] itself.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[allow(clippy::too_many_arguments)]
fn attend_avx2(qh: &[f32], c: &HeadCache<'_>, scores: &mut Vec<f32>, o: &mut [f32]) {
    if !c.hd.is_multiple_of(8) || c.hd > 256 {
        return attend(qh, c, scores, o);
    }
    use std::arch::x86_64::*;
    let (hd, n_ctx, scale) = (c.hd, c.n_ctx, c.scale);
    let nv = hd / 8;
    // 8 cache values from `row` at element 8·k, widened (SAFETY: rows are `hd` elements, sliced
    // with bounds checks by `row`, and k < nv = hd / 8).
    let ld8 = |row: &[f16], k: usize| unsafe {
        _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(8 * k) as *const __m128i))
    };
    // SAFETY (loads and stores below): `q`/`acc` are local arrays of nv ≤ 32 vectors.
    let mut q = [_mm256_setzero_ps(); 32];
    for (k, qv) in q.iter_mut().enumerate().take(nv) {
        *qv = unsafe { _mm256_loadu_ps(qh.as_ptr().add(8 * k)) };
    }
    // Scores, 8 rows at a time: each row's 8 lane sums are formed exactly as `dot` forms them
    // (lane i accumulates x[8k + i]·y[8k + i] over k, no FMA), then an 8×8 transpose lets one
    // vector add the lanes of 8 rows in `dot`'s order: ((0 + a0) + a1) + … + a7.
    scores.resize(n_ctx, 0.0);
    let lanes_dot = |row: &[f16]| {
        let mut a = _mm256_setzero_ps();
        for (k, qv) in q.iter().enumerate().take(nv) {
            a = _mm256_add_ps(a, _mm256_mul_ps(*qv, ld8(row, k)));
        }
        a
    };
    let scale_v = _mm256_set1_ps(scale);
    for (j, kb, lo, take) in c.spans(c.k) {
        let mut r = lo;
        while r + 8 <= take {
            let a: [__m256; 8] = std::array::from_fn(|i| lanes_dot(c.row(kb, r + i)));
            let t = transpose8(a);
            let mut sum = _mm256_setzero_ps();
            for ti in t {
                sum = _mm256_add_ps(sum, ti);
            }
            unsafe {
                _mm256_storeu_ps(scores.as_mut_ptr().add(j + r), _mm256_mul_ps(sum, scale_v))
            };
            r += 8;
        }
        for r in r..take {
            let mut l = [0f32; 8];
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), lanes_dot(c.row(kb, r))) };
            scores[j + r] = l.iter().sum::<f32>() * scale;
        }
    }
    softmax(&mut scores[c.start..]);
    round_f16_slice(&mut scores[c.start..]);
    // o = Σ_j p_j·v_j, all of `o` in registers, rows in order (as `axpy` row by row).
    let mut acc = [_mm256_setzero_ps(); 32];
    for (j, vb, lo, take) in c.spans(c.v) {
        for (r, &p) in scores[j..j + take].iter().enumerate().skip(lo) {
            let row = c.row(vb, r);
            let pv = _mm256_set1_ps(p);
            for (k, a) in acc.iter_mut().enumerate().take(nv) {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, ld8(row, k)));
            }
        }
    }
    for (k, a) in acc.iter().enumerate().take(nv) {
        unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * k), *a) };
    }
}

/// 8×8 transpose of f32 lanes: output i holds lane i of inputs 0..8 (in order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn transpose8(a: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(a[0], a[1]);
    let t1 = _mm256_unpackhi_ps(a[0], a[1]);
    let t2 = _mm256_unpacklo_ps(a[2], a[3]);
    let t3 = _mm256_unpackhi_ps(a[2], a[3]);
    let t4 = _mm256_unpacklo_ps(a[4], a[5]);
    let t5 = _mm256_unpackhi_ps(a[4], a[5]);
    let t6 = _mm256_unpacklo_ps(a[6], a[7]);
    let t7 = _mm256_unpackhi_ps(a[6], a[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Causal attention for `n_q` new query rows against a paged KV history.
///
/// * `q`: `[n_q × n_heads·head_dim]`, query t sits at absolute position `pos0 + t`.
/// * `k_blocks`, `v_blocks`: the sequence's cache for this layer (f16, as llama.cpp's default
///   cache), block by block, each `[block_size × n_kv_heads·head_dim]`; they hold at least
///   `pos0 + n_q` positions (the new tokens are already stored).
/// * `out`: `[n_q × n_heads·head_dim]`.
///
/// Grouped-query attention maps query head h to kv head `h / (n_heads / n_kv_heads)`.
/// Work is split over (token, head) pairs on the current rayon pool.
pub fn attention(
    q: &[f32],
    k_blocks: &[&[f16]],
    v_blocks: &[&[f16]],
    block_size: usize,
    pos0: usize,
    s: AttnShape,
    out: &mut [f32],
) {
    attention_windowed(q, k_blocks, v_blocks, block_size, pos0, s, None, out, true)
}

/// [`attention`] on the calling thread only, for callers that already run several sequences'
/// attention in parallel (a split inside each would only add fork/join overhead).
/// Results are identical to [`attention`]'s.
pub fn attention_serial(
    q: &[f32],
    k_blocks: &[&[f16]],
    v_blocks: &[&[f16]],
    block_size: usize,
    pos0: usize,
    s: AttnShape,
    out: &mut [f32],
) {
    attention_windowed(q, k_blocks, v_blocks, block_size, pos0, s, None, out, false)
}

/// [`attention`] (or [`attention_serial`] when `split` is false) with a sliding window: with
/// `Some(w)`, the query at position `p` sees only positions `p − w + 1 ..= p` (llama.cpp's
/// standard SWA mask: key `j` is hidden when `p − j ≥ w`); `None` is plain causal attention.
#[allow(clippy::too_many_arguments)]
pub fn attention_windowed(
    q: &[f32],
    k_blocks: &[&[f16]],
    v_blocks: &[&[f16]],
    block_size: usize,
    pos0: usize,
    s: AttnShape,
    window: Option<usize>,
    out: &mut [f32],
    split: bool,
) {
    let hd = s.head_dim;
    let qrow = s.n_heads * hd;
    let kvrow = s.n_kv_heads * hd;
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_q = q.len() / qrow;
    #[cfg(target_arch = "x86_64")]
    let avx2 =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c");
    // The query is rounded to f16 like the cached keys (see `round_f16`), as llama.cpp's f16
    // K·Q product does.
    let rounded_q = |t: usize, h: usize, buf: &mut Vec<f32>| {
        buf.clear();
        buf.extend_from_slice(&q[t * qrow + h * hd..][..hd]);
        round_f16_slice(buf);
    };
    let cache = |kvh: usize, t: usize| HeadCache {
        k: k_blocks,
        v: v_blocks,
        block_size,
        kvrow,
        off: kvh * hd,
        hd,
        start: window.map_or(0, |w| (pos0 + t + 1).saturating_sub(w)),
        n_ctx: pos0 + t + 1,
        scale,
    };
    let total_work = n_q * s.n_heads * (pos0 + n_q) * hd;
    let work = |idx: usize, o: &mut [f32], (scores, qb): &mut (Vec<f32>, Vec<f32>)| {
        let (t, h) = (idx / s.n_heads, idx % s.n_heads);
        rounded_q(t, h, qb);
        scores.clear();
        let c = cache(h / group, t);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and F16C support was detected at run time.
            unsafe { attend_avx2(qb, &c, scores, o) };
            return;
        }
        attend(qb, &c, scores, o);
    };
    if !split || total_work < 1 << 16 {
        let mut st = (Vec::new(), Vec::new());
        for (idx, o) in out.chunks_exact_mut(hd).enumerate() {
            work(idx, o, &mut st);
        }
    } else {
        out.par_chunks_exact_mut(hd)
            .enumerate()
            .for_each_init(|| (Vec::new(), Vec::new()), |st, (idx, o)| work(idx, o, st));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform values in [−0.5, 0.5) from a xorshift32 sequence.
    fn xorshift(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) - 0.5
        }
    }

    /// The second of two kv heads (rows of 2·hd) in blocks of `bs` positions.
    fn second_head<'a>(
        kb: &'a [&'a [f16]],
        vb: &'a [&'a [f16]],
        bs: usize,
        hd: usize,
        n_ctx: usize,
    ) -> HeadCache<'a> {
        HeadCache {
            k: kb,
            v: vb,
            block_size: bs,
            kvrow: 2 * hd,
            off: hd,
            hd,
            start: 0,
            n_ctx,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }

    /// `n` random K and V cache values (V three times wider).
    fn random_cache(rnd: &mut impl FnMut() -> f32, n: usize) -> (Vec<f16>, Vec<f16>) {
        let k = (0..n).map(|_| f16::from_f32(rnd())).collect();
        let v = (0..n).map(|_| f16::from_f32(rnd() * 3.0)).collect();
        (k, v)
    }

    /// Distance in units in the last place between two positive normal f32s.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_2_ulp() {
        let mut worst = (0u32, 0f32);
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp() as f32;
            let u = ulps(exp_f32(x), want);
            if u > worst.0 {
                worst = (u, x);
            }
            x += 1.0 / 1024.0 + x.abs() * 1e-6;
        }
        assert!(
            worst.0 <= 2,
            "exp_f32 is {} ulp off at x = {}",
            worst.0,
            worst.1
        );
        assert_eq!(exp_f32(0.0), 1.0);
        // Clamped ends: finite and tiny / huge, never NaN or infinite.
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 1e-37);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(1000.0).is_finite() && exp_f32(1000.0) > 1e38);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn silu_mul_is_the_same_on_every_path_and_close_to_libm() {
        let mut seed = 3u32;
        let gate: Vec<f32> = (0..4099)
            .map(|i| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 10f32.powi(i % 5 - 1)
            })
            .collect();
        let up: Vec<f32> = gate.iter().rev().map(|g| g * 0.5 + 0.25).collect();
        let mut simd = gate.clone();
        silu_mul(&mut simd, &up);
        let mut scalar = gate.clone();
        silu_mul_body(&mut scalar, &up);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&simd), bits(&scalar));
        for ((&g, &u), &y) in gate.iter().zip(&up).zip(&simd) {
            let want = (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32;
            assert!(
                (y - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "silu({g})·{u}: {y} vs {want}"
            );
        }
    }

    #[test]
    fn round_f16_slice_matches_the_scalar_rounding() {
        let mut seed = 1u32;
        let mut v: Vec<f32> = (0..10_000)
            .map(|i| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                let m = (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                m * 10f32.powi(i % 14 - 8)
            })
            .collect();
        // Ties, f16 subnormals, overflow to infinity, signed zero.
        v.extend([
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            6.0e-8,
            -3.0e-8,
            1.0e-5,
            65520.0,
            -70000.0,
            -0.0,
            0.0,
        ]);
        let want: Vec<u32> = v.iter().map(|&x| round_f16(x).to_bits()).collect();
        round_f16_slice(&mut v);
        let got: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn rmsnorm_unit() {
        let x = [3.0, 4.0];
        let mut y = [0.0; 2];
        rmsnorm(&x, &[1.0, 2.0], 0.0, &mut y);
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_styles_rotate_the_right_pairs() {
        // head_dim 4, position 1: Normal rotates (0,1) by θ0=1 rad and (2,3) by θ1=base^-0.5.
        let r = Rope::new(RopeStyle::Normal, 4, 4, 100.0);
        let mut x = [1.0, 0.0, 1.0, 0.0];
        r.apply(&mut x, 1, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        assert!((x[2] - 0.1f32.cos()).abs() < 1e-6 && (x[3] - 0.1f32.sin()).abs() < 1e-6);
        let r = Rope::new(RopeStyle::Neox, 4, 4, 100.0);
        let mut x = [1.0, 1.0, 0.0, 0.0];
        r.apply(&mut x, 1, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert!((x[1] - 0.1f32.cos()).abs() < 1e-6 && (x[3] - 0.1f32.sin()).abs() < 1e-6);
        // Position 0 is the identity.
        let mut y = [0.3, -0.2, 0.5, 0.9];
        r.apply(&mut y, 1, 0);
        assert_eq!(y, [0.3, -0.2, 0.5, 0.9]);
    }

    #[test]
    fn attention_matches_naive_with_gqa() {
        let s = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let n_past = 5;
        let mut rnd = xorshift(1);
        // The cache holds f16: the reference reads the same (widened) values.
        let k16: Vec<f16> = (0..n_past * 16).map(|_| f16::from_f32(rnd())).collect();
        let v16: Vec<f16> = (0..n_past * 16).map(|_| f16::from_f32(rnd())).collect();
        let (k, v): (Vec<f32>, Vec<f32>) = (
            k16.iter().map(|x| x.to_f32()).collect(),
            v16.iter().map(|x| x.to_f32()).collect(),
        );
        let q: Vec<f32> = (0..2 * 32).map(|_| rnd()).collect(); // two queries at positions 3 and 4
        let mut out = vec![0.0; 64];
        // Blocks of 2 positions (the last one partly filled).
        let kb: Vec<&[f16]> = k16.chunks(32).collect();
        let vb: Vec<&[f16]> = v16.chunks(32).collect();
        attention(&q, &kb, &vb, 2, 3, s, &mut out);
        for t in 0..2 {
            for h in 0..4 {
                let kvh = h / 2;
                let qh = &q[t * 32 + h * 8..][..8];
                let n = 3 + t + 1;
                let mut w: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..8)
                            .map(|d| round_f16(qh[d]) as f64 * k[j * 16 + kvh * 8 + d] as f64)
                            .sum::<f64>()
                            / 8f64.sqrt()
                    })
                    .collect();
                let m = w.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = w.iter().map(|x| (x - m).exp()).sum();
                // Probabilities at f16 precision, as in `attention`.
                w.iter_mut()
                    .for_each(|x| *x = round_f16(((*x - m).exp() / z) as f32) as f64);
                for d in 0..8 {
                    let want: f64 = (0..n).map(|j| w[j] * v[j * 16 + kvh * 8 + d] as f64).sum();
                    let got = out[t * 32 + h * 8 + d] as f64;
                    assert!((want - got).abs() < 1e-5, "t{t} h{h} d{d}: {want} vs {got}");
                }
            }
        }
    }

    /// A sliding window hides exactly the positions `p − j ≥ w`: the result equals a naive
    /// softmax over the visible positions only, for windows that start inside a block, on a
    /// block boundary, and before position 0 (nothing hidden).
    #[test]
    fn windowed_attention_sees_only_the_window() {
        let s = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 16,
        };
        let (bs, pos0, n_q) = (4usize, 9usize, 4usize);
        let n_ctx = pos0 + n_q;
        let mut rnd = xorshift(11);
        let (k16, v16) = random_cache(&mut rnd, n_ctx.div_ceil(bs) * bs * 16);
        let kb: Vec<&[f16]> = k16.chunks(bs * 16).collect();
        let vb: Vec<&[f16]> = v16.chunks(bs * 16).collect();
        let q: Vec<f32> = (0..n_q * 32).map(|_| rnd() * 4.0).collect();
        for w in [3usize, 6, 8, 64] {
            for split in [false, true] {
                let mut out = vec![0f32; q.len()];
                attention_windowed(&q, &kb, &vb, bs, pos0, s, Some(w), &mut out, split);
                for t in 0..n_q {
                    let p = pos0 + t;
                    let lo = (p + 1).saturating_sub(w);
                    for h in 0..2 {
                        let qh = &q[t * 32 + h * 16..][..16];
                        let sc: Vec<f64> = (lo..=p)
                            .map(|j| {
                                (0..16)
                                    .map(|d| {
                                        round_f16(qh[d]) as f64 * k16[j * 16 + d].to_f32() as f64
                                    })
                                    .sum::<f64>()
                                    / 4.0
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                        for d in 0..16 {
                            let want: f64 = sc
                                .iter()
                                .zip(lo..=p)
                                .map(|(x, j)| {
                                    round_f16(((x - m).exp() / z) as f32) as f64
                                        * v16[j * 16 + d].to_f32() as f64
                                })
                                .sum();
                            let got = out[t * 32 + h * 16 + d] as f64;
                            assert!(
                                (want - got).abs() < 1e-4,
                                "w {w} t {t} h {h} d {d}: {want} vs {got}"
                            );
                        }
                    }
                }
            }
        }
        // A window wider than the context is plain causal attention, bit for bit.
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        attention_windowed(&q, &kb, &vb, bs, pos0, s, Some(1000), &mut a, false);
        attention_serial(&q, &kb, &vb, bs, pos0, s, &mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// Scaled RoPE turns pair i by `freq_scale · θ_i / factor_i` and scales cos and sin.
    #[test]
    fn scaled_rope_divides_by_the_factors() {
        let r = Rope::new(RopeStyle::Neox, 4, 4, 100.0).scaled(0.5, vec![2.0, 4.0], 1.25);
        let mut cs = [(0f32, 0f32); 2];
        r.angles(3, &mut cs);
        for (i, &(c, s)) in cs.iter().enumerate() {
            let theta = 0.5 * (3.0 * 100f32.powf(-(i as f32) / 2.0) / [2.0, 4.0][i]);
            assert!((c - 1.25 * theta.cos()).abs() < 1e-6, "pair {i}: cos {c}");
            assert!((s - 1.25 * theta.sin()).abs() < 1e-6, "pair {i}: sin {s}");
        }
        assert!(!r.is_plain() && Rope::new(RopeStyle::Neox, 4, 4, 100.0).is_plain());
    }

    /// GELU (tanh) against its formula in f64 at the f16-rounded input (llama.cpp's table is
    /// indexed by the f16 input), within the f16 rounding of the result; ±10 and beyond are
    /// 0 and `x` as in llama.cpp.
    #[test]
    fn gelu_tanh_mul_follows_the_formula() {
        let xs: Vec<f32> = (-60..=60).map(|i| i as f32 * 0.2 + 0.013).collect();
        let mut g = xs.clone();
        gelu_tanh_mul(&mut g, &vec![2.0; xs.len()]);
        for (&x, &y) in xs.iter().zip(&g) {
            let x64 = round_f16(x) as f64;
            let want = 2.0
                * if x <= -10.0 {
                    0.0
                } else if x >= 10.0 {
                    x as f64
                } else {
                    0.5 * x64
                        * (1.0
                            + ((2.0 / std::f64::consts::PI).sqrt()
                                * x64
                                * (1.0 + 0.044715 * x64 * x64))
                                .tanh())
                };
            assert!(
                (want - y as f64).abs() <= 1e-3 * want.abs() + 1e-6,
                "x {x}: {y} vs {want}"
            );
        }
    }

    #[test]
    fn attention_serial_equals_the_split_attention() {
        // 4 queries × 8 heads × 300 positions × 64: above the size where `attention` splits
        // its (token, head) pairs over the pool.
        let s = AttnShape {
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
        };
        let (bs, n_q, pos0) = (16usize, 4usize, 296usize);
        let kvrow = s.n_kv_heads * s.head_dim;
        let mut rnd = xorshift(3);
        let (k16, v16) = random_cache(&mut rnd, (pos0 + n_q).div_ceil(bs) * bs * kvrow);
        let kb: Vec<&[f16]> = k16.chunks(bs * kvrow).collect();
        let vb: Vec<&[f16]> = v16.chunks(bs * kvrow).collect();
        let q: Vec<f32> = (0..n_q * s.n_heads * s.head_dim).map(|_| rnd()).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        pool.install(|| attention(&q, &kb, &vb, bs, pos0, s, &mut a));
        pool.install(|| attention_serial(&q, &kb, &vb, bs, pos0, s, &mut b));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(a.iter().any(|&x| x != 0.0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn attend_avx2_is_bit_identical_to_attend() {
        if !std::arch::is_x86_feature_detected!("avx2")
            || !std::arch::is_x86_feature_detected!("f16c")
        {
            return; // nothing to compare on this CPU
        }
        let mut rnd = xorshift(7);
        // hd 64 (the register path), 80 (64 + a remainder) and 8 (remainder only); contexts
        // that are and are not multiples of the block size and of 4.
        for (hd, n_ctx) in [(64usize, 37usize), (64, 48), (80, 19), (8, 5), (128, 3)] {
            let (bs, kvrow) = (16, 2 * hd);
            let (k16, v16) = random_cache(&mut rnd, n_ctx.div_ceil(bs) * bs * kvrow);
            let (k, v): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            let q: Vec<f32> = (0..hd).map(|_| round_f16(rnd() * 4.0)).collect();
            let kb: Vec<&[f16]> = k16.chunks(bs * kvrow).collect();
            let vb: Vec<&[f16]> = v16.chunks(bs * kvrow).collect();
            let c = second_head(&kb, &vb, bs, hd, n_ctx);
            let (mut s1, mut s2) = (Vec::new(), Vec::new());
            let (mut o1, mut o2) = (vec![0f32; hd], vec![0f32; hd]);
            attend(&q, &c, &mut s1, &mut o1);
            // SAFETY: AVX2 and F16C were detected above.
            unsafe { attend_avx2(&q, &c, &mut s2, &mut o2) };
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o1), bits(&o2), "hd {hd} n_ctx {n_ctx}");
            // And against a plain row-by-row evaluation of the same formula.
            let mut sc: Vec<f32> = (0..n_ctx)
                .map(|j| {
                    dot(
                        &q,
                        &k[(j / bs) * bs * kvrow + (j % bs) * kvrow + hd..][..hd],
                    ) * c.scale
                })
                .collect();
            softmax(&mut sc);
            sc.iter_mut().for_each(|p| *p = round_f16(*p));
            let mut o3 = vec![0f32; hd];
            for (j, &p) in sc.iter().enumerate() {
                axpy(
                    &mut o3,
                    p,
                    &v[(j / bs) * bs * kvrow + (j % bs) * kvrow + hd..][..hd],
                );
            }
            assert_eq!(bits(&o1), bits(&o3), "hd {hd} n_ctx {n_ctx} vs row by row");
        }
    }
}
