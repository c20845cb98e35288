//! The decoder's dense ops as burn tensor code, for any burn device (wgpu, or burn-flex on the
//! CPU). They mirror [`crate::ops`] (the CPU fast path) op for op, and the parity suite
//! (`tests/gpu_parity.rs`) holds each to it with an NMSE budget.
//!
//! Shapes: activations are `[rows, features]`; heads are split as `[rows, heads, head_dim]`.

use burn::tensor::activation;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::ops::{Rope, RopeStyle};

/// `x / rms(x) · w`, row by row: one fused kernel on the GPU ([`crate::backend::rmsnorm`]).
pub fn rmsnorm(x: Tensor<2>, w: &Tensor<1>, eps: f32) -> Tensor<2> {
    crate::backend::rmsnorm(x, w, eps)
}

/// `silu(gate) · up`: one kernel on the GPU ([`crate::backend::silu_mul`]).
pub fn silu_mul(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    crate::backend::silu_mul(gate, up)
}

/// Softmax over the last dimension.
pub fn softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::softmax(x, D - 1)
}

/// Host-side angle tables for rows at positions `positions`: `(cos, sin)`, each `[n, n_rot/2]`.
pub fn rope_tables(rope: &Rope, positions: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
    let half = rope.n_rot / 2;
    let mut cs = vec![(0f32, 0f32); half];
    let (mut c, mut s) = (
        Vec::with_capacity(positions.len() * half),
        Vec::with_capacity(positions.len() * half),
    );
    for &p in positions {
        rope.angles(p, &mut cs);
        c.extend(cs.iter().map(|v| v.0));
        s.extend(cs.iter().map(|v| v.1));
    }
    let n = positions.len();
    (
        Tensor::from_data(TensorData::new(c, [n, half]), device),
        Tensor::from_data(TensorData::new(s, [n, half]), device),
    )
}

/// Rotate `x` (`[n, heads·head_dim]`) with tables from [`rope_tables`]: one kernel on the GPU
/// ([`crate::backend::rope`]).
pub fn rope(
    x: Tensor<2>,
    rope: &Rope,
    n_heads: usize,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
) -> Tensor<2> {
    let shape = crate::backend::RopeShape {
        heads: n_heads,
        head_dim: rope.head_dim,
        n_rot: rope.n_rot,
        neox: rope.style == RopeStyle::Neox,
    };
    crate::backend::rope(x, cos, sin, shape)
}

/// Causal attention of `q` (`[n_q, n_heads·head_dim]`, query t at position `pos0 + t`) against
/// `k`, `v` (`[n_ctx, n_kv_heads·head_dim]`, positions `0..n_ctx`, `n_ctx ≥ pos0 + n_q`), with
/// grouped-query heads (query head h reads kv head `h / (n_heads / n_kv_heads)`). `k` and `v`
/// are expected at f16 precision (the cache's); `q` and the probabilities are rounded to it here,
/// as [`crate::ops::attention`] does.
pub fn attention(
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    pos0: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Tensor<2> {
    let [n_q, _] = q.dims();
    let [n_ctx, _] = k.dims();
    let device = q.device();
    let g = n_heads / n_kv_heads;
    // q at f16 precision like the cached keys, as llama.cpp's f16 K·Q product has it.
    let q = crate::backend::round_f16(q)
        .reshape([n_q, n_heads, head_dim])
        .swap_dims(0, 1); // [H, n_q, hd]
    let expand = |t: Tensor<2>| {
        t.reshape([n_ctx, n_kv_heads, head_dim])
            .swap_dims(0, 1) // [KV, n_ctx, hd]
            .unsqueeze_dim::<4>(1)
            .expand([n_kv_heads, g, n_ctx, head_dim])
            .reshape([n_heads, n_ctx, head_dim])
    };
    let (k, v) = (expand(k), expand(v));
    let scale = 1.0 / (head_dim as f32).sqrt();
    let scores = q.matmul(k.swap_dims(1, 2)) * scale; // [H, n_q, n_ctx]
    // Additive causal mask; a large finite negative keeps every backend's softmax NaN-free.
    let mut mask = vec![0f32; n_q * n_ctx];
    for t in 0..n_q {
        for j in pos0 + t + 1..n_ctx {
            mask[t * n_ctx + j] = -1e30;
        }
    }
    let mask =
        Tensor::<2>::from_data(TensorData::new(mask, [n_q, n_ctx]), &device).unsqueeze_dim::<3>(0);
    // Probabilities at f16 precision: llama.cpp multiplies the f16 V by f16-converted ones.
    let probs = crate::backend::round_f16(softmax(scores + mask));
    probs
        .matmul(v)
        .swap_dims(0, 1)
        .reshape([n_q, n_heads * head_dim])
}

/// Rows `idx` of `t` (`[rows, cols]`).
pub fn gather_rows(t: Tensor<2>, idx: &[usize]) -> Tensor<2> {
    let device = t.device();
    let ids: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [idx.len()]), &device);
    t.select(0, ids)
}
