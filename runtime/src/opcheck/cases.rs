//! The table of op cases, and each op's inputs, f64 reference, host and device runs.
//!
//! Shapes: the self-test's original ones (SmolLM2-like: head_dim 64, GQA) and the GPU parity
//! suite's (odd sizes, a partial rotation, the 9/3 head grouping), so that each backend meets both.

use half::f16;

use super::{Budget, OpCase, OpCheckError, OpInputs, OpSpec, Tolerance, matmul_f64, randn};
use crate::ops::{self, AttnShape, Rope, RopeStyle};
use crate::quant::{self, GgmlType, QMatRef};
use crate::sample::Rng;

#[cfg(feature = "burn")]
use crate::backend::{self, Device, Tensor, TensorData};
#[cfg(feature = "burn")]
use crate::tensor_ops as T;

/// Dense ops: the same math in a different summation order.
const DENSE: Budget = Budget::Nmse(1e-10);
/// RoPE against f64 angles: the f32 angle tables (`θ = p·scale^i`, built as ggml does) drift.
const ROPE_REF: Budget = Budget::Nmse(1e-8);
/// Attention: q and the probabilities are rounded to f16 (as llama.cpp's f16 KV path does);
/// the f64 reference rounds nothing (~1e-7 measured).
const ATTN: Budget = Budget::Nmse(1e-5);
/// Quantized matmul vs f64 on the dequantized weights: the kernels round the activations first
/// (8-bit blocks, or f16/bf16 for half weights), as llama.cpp does.
const QMM_REF: Budget = Budget::Nmse(1e-4);
/// Quantized matmul, device vs host kernels: both round the activations the same way and
/// multiply by the exact weights, so only f32 summation order differs.
const QMM_HOST: Budget = Budget::Nmse(1e-9);

/// Every case, in the order the self-test reports them.
pub fn cases() -> Vec<OpCase> {
    let dense = Tolerance {
        vs_reference: DENSE,
        vs_host: DENSE,
    };
    let mut t = vec![
        OpCase::new(
            "rmsnorm",
            "4 rows of 256",
            dense,
            RmsNorm {
                rows: 4,
                dim: 256,
                x_std: 2.0,
            },
        ),
        OpCase::new(
            "rmsnorm",
            "5 rows of 576",
            dense,
            RmsNorm {
                rows: 5,
                dim: 576,
                x_std: 1.0,
            },
        ),
    ];
    t.extend(rope_cases());
    t.push(OpCase::new(
        "softmax",
        "1000 logits, sd 8",
        dense,
        Softmax {
            rows: 1,
            len: 1000,
            std: 8.0,
        },
    ));
    t.push(OpCase::new(
        "softmax",
        "5 rows of 300, sd 6",
        dense,
        Softmax {
            rows: 5,
            len: 300,
            std: 6.0,
        },
    ));
    let attn = Tolerance {
        vs_reference: ATTN,
        vs_host: ATTN,
    };
    for (heads, kv_heads, past, new, k_std) in [(8, 2, 40, 2, 1.0), (9, 3, 20, 4, 1.2)] {
        let a = Attention {
            shape: AttnShape {
                n_heads: heads,
                n_kv_heads: kv_heads,
                head_dim: 64,
            },
            past,
            new,
            block: 16,
            k_std,
        };
        t.push(OpCase::new("attention", a.describe(), attn, a));
    }
    t.push(OpCase::new(
        "silu_mul",
        "5 rows of 1536, gate sd 4",
        dense,
        SiluMul { rows: 5, dim: 1536 },
    ));
    let exact = Tolerance {
        vs_reference: Budget::Exact,
        vs_host: Budget::Exact,
    };
    t.push(OpCase::new(
        "round_f16",
        "4096 values over 13 decades, f16 subnormals, overflow, signed zeros, ties",
        exact,
        RoundF16 { n: 4096 },
    ));
    t.extend(qmatmul_cases());
    t
}

/// RoPE: both styles at the self-test's shape (4 heads, 3 tokens) and the GPU suite's (3 heads,
/// 6 tokens), and a partial rotation.
fn rope_cases() -> Vec<OpCase> {
    let mut t = vec![];
    let rope_tol = Tolerance {
        vs_reference: ROPE_REF,
        vs_host: DENSE,
    };
    for (style, hd, n_rot, heads, tokens) in [
        (RopeStyle::Normal, 64, 64, 4, 3),
        (RopeStyle::Neox, 64, 64, 4, 3),
        (RopeStyle::Normal, 64, 64, 3, 6),
        (RopeStyle::Neox, 64, 64, 3, 6),
        (RopeStyle::Neox, 128, 96, 3, 6),
    ] {
        let r = RopeCase {
            style,
            head_dim: hd,
            n_rot,
            heads,
            tokens,
            pos0: 37,
            base: 10_000.0,
        };
        t.push(OpCase::new("rope", r.describe(), rope_tol, r));
    }
    t
}

/// The quantized matmul: every block format at m = 1 (decode), 3 and 9 (prefill tiles).
fn qmatmul_cases() -> Vec<OpCase> {
    let mut t = vec![];
    let qmm = Tolerance {
        vs_reference: QMM_REF,
        vs_host: QMM_HOST,
    };
    for ty in GgmlType::SUPPORTED {
        for m in [1, 3, 9] {
            let q = QMatmul {
                ty,
                rows: 80,
                cols: 512,
                m,
            };
            t.push(OpCase::new(
                "qmatmul",
                format!("{} 80x512, m={m}", ty.name()),
                qmm,
                q,
            ));
        }
    }
    t
}

/// Uniform values in [−0.5, 0.5).
fn uniform(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect()
}

#[cfg(feature = "burn")]
fn to_dev<const D: usize>(v: &[f32], shape: [usize; D], d: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), d)
}

#[cfg(feature = "burn")]
fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, OpCheckError> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| OpCheckError::ReadBack(format!("{e:?}")))
}

// ------------------------------------------------------------------ rmsnorm

const EPS: f32 = 1e-5;

struct RmsNorm {
    rows: usize,
    dim: usize,
    x_std: f32,
}

struct RmsNormIn {
    rows: usize,
    dim: usize,
    x: Vec<f32>,
    w: Vec<f32>,
}

impl OpSpec for RmsNorm {
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError> {
        let x = randn(rng, self.rows * self.dim, self.x_std);
        let w = randn(rng, self.dim, 1.0);
        Ok(Box::new(RmsNormIn {
            rows: self.rows,
            dim: self.dim,
            x,
            w,
        }))
    }
}

impl OpInputs for RmsNormIn {
    fn reference(&self) -> Vec<f64> {
        let n = self.dim;
        let mut want = vec![0f64; n * self.rows];
        for (xr, yr) in self.x.chunks_exact(n).zip(want.chunks_exact_mut(n)) {
            let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + EPS as f64).sqrt();
            for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(&self.w) {
                *o = a as f64 * inv * g as f64;
            }
        }
        want
    }
    fn host(&self) -> Vec<f32> {
        let mut y = vec![0f32; self.x.len()];
        ops::rmsnorm(&self.x, &self.w, EPS, &mut y);
        y
    }
    #[cfg(feature = "burn")]
    fn device(&self, d: &Device) -> Result<Vec<f32>, OpCheckError> {
        let w = to_dev(&self.w, [self.dim], d);
        read(T::rmsnorm(
            to_dev(&self.x, [self.rows, self.dim], d),
            &w,
            EPS,
        ))
    }
}

// ------------------------------------------------------------------ rope

#[derive(Clone, Copy)]
struct RopeCase {
    style: RopeStyle,
    head_dim: usize,
    n_rot: usize,
    heads: usize,
    tokens: usize,
    pos0: usize,
    base: f32,
}

impl RopeCase {
    fn describe(&self) -> String {
        let rot = if self.n_rot < self.head_dim {
            format!(" ({} rotated)", self.n_rot)
        } else {
            String::new()
        };
        format!(
            "{}, head_dim {}{rot}, {} heads, positions {}..{}",
            match self.style {
                RopeStyle::Normal => "normal",
                RopeStyle::Neox => "neox",
            },
            self.head_dim,
            self.heads,
            self.pos0,
            self.pos0 + self.tokens
        )
    }
    fn rope(&self) -> Rope {
        Rope::new(self.style, self.head_dim, self.n_rot, self.base)
    }
}

struct RopeIn {
    c: RopeCase,
    x: Vec<f32>,
}

impl OpSpec for RopeCase {
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError> {
        let x = randn(rng, self.tokens * self.heads * self.head_dim, 1.0);
        Ok(Box::new(RopeIn { c: *self, x }))
    }
}

impl OpInputs for RopeIn {
    /// Pairs `(2i, 2i+1)` (normal) or `(i, i + n_rot/2)` (neox) turned by
    /// `θ = pos · base^(−2i/n_rot)`; the dims past `n_rot` pass through.
    fn reference(&self) -> Vec<f64> {
        let c = &self.c;
        let (hd, half) = (c.head_dim, c.n_rot / 2);
        let mut want: Vec<f64> = self.x.iter().map(|&v| v as f64).collect();
        for t in 0..c.tokens {
            for h in 0..c.heads {
                let o = (t * c.heads + h) * hd;
                for i in 0..half {
                    let theta = (c.pos0 + t) as f64
                        * (c.base as f64).powf(-2.0 * i as f64 / c.n_rot as f64);
                    let (cs, sn) = (theta.cos(), theta.sin());
                    let (ia, ib) = match c.style {
                        RopeStyle::Normal => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (a, b) = (self.x[o + ia] as f64, self.x[o + ib] as f64);
                    want[o + ia] = a * cs - b * sn;
                    want[o + ib] = a * sn + b * cs;
                }
            }
        }
        want
    }
    fn host(&self) -> Vec<f32> {
        let mut y = self.x.clone();
        self.c.rope().apply(&mut y, self.c.heads, self.c.pos0);
        y
    }
    #[cfg(feature = "burn")]
    fn device(&self, d: &Device) -> Result<Vec<f32>, OpCheckError> {
        let c = &self.c;
        let rope = c.rope();
        let positions: Vec<usize> = (c.pos0..c.pos0 + c.tokens).collect();
        let (cos, sin) = T::rope_tables(&rope, &positions, d);
        let x = to_dev(&self.x, [c.tokens, c.heads * c.head_dim], d);
        read(T::rope(x, &rope, c.heads, &cos, &sin))
    }
}

// ------------------------------------------------------------------ softmax

struct Softmax {
    rows: usize,
    len: usize,
    std: f32,
}

struct SoftmaxIn {
    len: usize,
    x: Vec<f32>,
}

impl OpSpec for Softmax {
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError> {
        let x = randn(rng, self.rows * self.len, self.std);
        Ok(Box::new(SoftmaxIn { len: self.len, x }))
    }
}

impl OpInputs for SoftmaxIn {
    fn reference(&self) -> Vec<f64> {
        let mut want = Vec::with_capacity(self.x.len());
        for row in self.x.chunks_exact(self.len) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            want.extend(row.iter().map(|&v| (v as f64 - m).exp() / z));
        }
        want
    }
    fn host(&self) -> Vec<f32> {
        let mut y = self.x.clone();
        y.chunks_exact_mut(self.len).for_each(ops::softmax);
        y
    }
    #[cfg(feature = "burn")]
    fn device(&self, d: &Device) -> Result<Vec<f32>, OpCheckError> {
        let rows = self.x.len() / self.len;
        read(T::softmax(to_dev(&self.x, [rows, self.len], d)))
    }
}

// ------------------------------------------------------------------ attention

#[derive(Clone, Copy)]
struct Attention {
    shape: AttnShape,
    past: usize,
    new: usize,
    block: usize,
    k_std: f32,
}

impl Attention {
    fn describe(&self) -> String {
        let s = self.shape;
        format!(
            "{} heads / {} kv heads (GQA), head_dim {}, {} past + {} new, paged by {}",
            s.n_heads, s.n_kv_heads, s.head_dim, self.past, self.new, self.block
        )
    }
}

/// `k` and `v` at f16 precision (the cache's), `[past + new, kv heads · head_dim]`.
struct AttentionIn {
    a: Attention,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl OpSpec for Attention {
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError> {
        let s = self.shape;
        let total = self.past + self.new;
        let kvrow = s.n_kv_heads * s.head_dim;
        let k: Vec<f32> = randn(rng, total * kvrow, self.k_std)
            .into_iter()
            .map(ops::round_f16)
            .collect();
        let v: Vec<f32> = randn(rng, total * kvrow, 1.0)
            .into_iter()
            .map(ops::round_f16)
            .collect();
        let q = randn(rng, self.new * s.n_heads * s.head_dim, 1.0);
        Ok(Box::new(AttentionIn { a: *self, q, k, v }))
    }
}

impl OpInputs for AttentionIn {
    /// Causal softmax(q·kᵀ/√d)·v in f64, query head h reading kv head `h / group`.
    fn reference(&self) -> Vec<f64> {
        let (s, n_past) = (self.a.shape, self.a.past);
        let (hd, kvrow, qrow) = (
            s.head_dim,
            s.n_kv_heads * s.head_dim,
            s.n_heads * s.head_dim,
        );
        let group = s.n_heads / s.n_kv_heads;
        let mut want = vec![0f64; self.a.new * qrow];
        for t in 0..self.a.new {
            for h in 0..s.n_heads {
                let kvh = h / group;
                let qh = &self.q[t * qrow + h * hd..][..hd];
                let n = n_past + t + 1;
                let mut sc: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qh[d] as f64 * self.k[j * kvrow + kvh * hd + d] as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                sc.iter_mut().for_each(|x| *x = (*x - mx).exp() / z);
                for d in 0..hd {
                    want[t * qrow + h * hd + d] = (0..n)
                        .map(|j| sc[j] * self.v[j * kvrow + kvh * hd + d] as f64)
                        .sum();
                }
            }
        }
        want
    }
    /// The paged f16 cache, block by block (the last block partly filled).
    fn host(&self) -> Vec<f32> {
        let s = self.a.shape;
        let kvrow = s.n_kv_heads * s.head_dim;
        // The cache stores f16 (exact for these already-rounded values).
        let k16: Vec<f16> = self.k.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = self.v.iter().map(|&x| f16::from_f32(x)).collect();
        let kb: Vec<&[f16]> = k16.chunks(self.a.block * kvrow).collect();
        let vb: Vec<&[f16]> = v16.chunks(self.a.block * kvrow).collect();
        let mut y = vec![0f32; self.q.len()];
        ops::attention(&self.q, &kb, &vb, self.a.block, self.a.past, s, &mut y);
        y
    }
    #[cfg(feature = "burn")]
    fn device(&self, d: &Device) -> Result<Vec<f32>, OpCheckError> {
        let s = self.a.shape;
        let total = self.a.past + self.a.new;
        let kvrow = s.n_kv_heads * s.head_dim;
        read(T::attention(
            to_dev(&self.q, [self.a.new, s.n_heads * s.head_dim], d),
            to_dev(&self.k, [total, kvrow], d),
            to_dev(&self.v, [total, kvrow], d),
            self.a.past,
            s.n_heads,
            s.n_kv_heads,
            s.head_dim,
        ))
    }
}

// ------------------------------------------------------------------ silu_mul

struct SiluMul {
    rows: usize,
    dim: usize,
}

/// `dim`: the row width the device sees.
#[cfg_attr(not(feature = "burn"), allow(dead_code))]
struct SiluMulIn {
    dim: usize,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl OpSpec for SiluMul {
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError> {
        let n = self.rows * self.dim;
        let gate = randn(rng, n, 4.0);
        let up = randn(rng, n, 1.0);
        Ok(Box::new(SiluMulIn {
            dim: self.dim,
            gate,
            up,
        }))
    }
}

impl OpInputs for SiluMulIn {
    fn reference(&self) -> Vec<f64> {
        self.gate
            .iter()
            .zip(&self.up)
            .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
            .collect()
    }
    fn host(&self) -> Vec<f32> {
        let mut y = self.gate.clone();
        ops::silu_mul(&mut y, &self.up);
        y
    }
    #[cfg(feature = "burn")]
    fn device(&self, d: &Device) -> Result<Vec<f32>, OpCheckError> {
        let shape = [self.gate.len() / self.dim, self.dim];
        read(T::silu_mul(
            to_dev(&self.gate, shape, d),
            to_dev(&self.up, shape, d),
        ))
    }
}

// ------------------------------------------------------------------ round_f16

struct RoundF16 {
    n: usize,
}

struct RoundF16In {
    x: Vec<f32>,
}

impl OpSpec for RoundF16 {
    /// Normal values at 13 scales (down into f16 subnormals and below), then overflow, signed
    /// zeros and exact ties.
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError> {
        let mut x: Vec<f32> = uniform(rng, self.n)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 10f32.powi((i % 13) as i32 - 8))
            .collect();
        x.extend([
            0.0,
            -0.0,
            65504.0,
            65519.0,
            65520.0,
            -70000.0,
            1e-8,
            -3e-6,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
        ]);
        Ok(Box::new(RoundF16In { x }))
    }
}

impl OpInputs for RoundF16In {
    /// The `half` crate's conversion: round to nearest even, overflow to infinity.
    fn reference(&self) -> Vec<f64> {
        self.x
            .iter()
            .map(|&v| f16::from_f32(v).to_f32() as f64)
            .collect()
    }
    fn host(&self) -> Vec<f32> {
        let mut y = self.x.clone();
        ops::round_f16_slice(&mut y);
        y
    }
    #[cfg(feature = "burn")]
    fn device(&self, d: &Device) -> Result<Vec<f32>, OpCheckError> {
        read(backend::round_f16(to_dev(&self.x, [self.x.len()], d)))
    }
}

// ------------------------------------------------------------------ qmatmul

#[derive(Clone, Copy)]
struct QMatmul {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    m: usize,
}

struct QMatmulIn {
    c: QMatmul,
    /// The encoded weight blocks.
    q: Vec<u8>,
    /// The weights as the blocks decode.
    wd: Vec<f32>,
    x: Vec<f32>,
}

impl OpSpec for QMatmul {
    fn build(&self, rng: &mut Rng) -> Result<Box<dyn OpInputs>, OpCheckError> {
        let (rows, cols) = (self.rows, self.cols);
        let w = uniform(rng, rows * cols);
        let q = quant::quantize(self.ty, &w)?;
        let mut wd = vec![0f32; rows * cols];
        quant::dequantize(self.ty, &q, &mut wd)?;
        let x = uniform(rng, self.m * cols);
        Ok(Box::new(QMatmulIn { c: *self, q, wd, x }))
    }
}

impl OpInputs for QMatmulIn {
    /// `x · Wᵀ` in f64 on the dequantized weights and the unrounded activations.
    fn reference(&self) -> Vec<f64> {
        let QMatmul { rows, cols, m, .. } = self.c;
        matmul_f64(&self.wd, rows, cols, &self.x, m)
    }
    fn host(&self) -> Vec<f32> {
        let QMatmul { ty, rows, cols, m } = self.c;
        let w = QMatRef {
            ty,
            rows,
            cols,
            data: &self.q,
        };
        let mut y = vec![0f32; m * rows];
        quant::matmul(w, &self.x, m, &mut y);
        y
    }
    /// The weight goes through a GGUF mapping and [`backend::prepare`], as a model's do.
    #[cfg(feature = "burn")]
    fn device(&self, d: &Device) -> Result<Vec<f32>, OpCheckError> {
        use crate::gguf::{GgufWriter, parse_bytes};
        let QMatmul { ty, rows, cols, m } = self.c;
        let mut w = GgufWriter::new();
        w.tensor("w", &[cols as u64, rows as u64], ty, self.q.clone());
        let file = std::sync::Arc::new(parse_bytes(&w.to_bytes())?);
        let h = backend::QWeightHandle::from_tensor(&file, file.require_tensor("w")?)?;
        backend::prepare(&h, d)?;
        read(backend::qmatmul(to_dev(&self.x, [m, cols], d), &h))
    }
}
