//! The CPU executor of the decoder ([`crate::decoder`]): activations in host buffers reused
//! across layers, the quantized matmuls reading the mmapped GGUF blocks in place, attention
//! over the paged host KV cache, one sequence per rayon task.

use rayon::prelude::*;

use ember_runtime::backend::{self, QWeightHandle};
use ember_runtime::kv::PagedKv;
use ember_runtime::model::{FfnAct, ModelError};
use ember_runtime::ops::{self, AttnShape};

use crate::decoder::{BatchPlan, DecoderOps, Norm, QWeight};
use crate::transformer::{DecoderFault, Transformer};

impl Transformer {
    /// The weight as a [`QWeightHandle`] on the mapping (no copy).
    fn handle(&self, w: &QWeight) -> QWeightHandle {
        QWeightHandle::new(
            self.file.clone(),
            w.ty,
            w.rows,
            w.cols,
            w.start..w.start + w.len,
        )
        .expect("weight ranges are checked at load")
    }

    /// y[m × rows] = x[m × cols] · Wᵀ (+ bias) for several projections of the same input
    /// (q/k/v, gate/up) in one fused call: one activation quantization and one parallel section
    /// on the mmapped GGUF blocks (`backend::qmatmul_many_host`, the host-buffer form of the
    /// `QuantOps` burn extension's CPU kernel). Outputs reuse the callers' buffers: no allocation
    /// per call once they have grown (a fresh 1.5 MiB lm-head buffer per step cost page faults).
    fn linear_many<const N: usize>(
        &self,
        ws: [(&QWeight, Option<&[f32]>); N],
        x: &[f32],
        m: usize,
        ys: [&mut Vec<f32>; N],
    ) {
        let hs: Vec<QWeightHandle> = ws.iter().map(|(w, _)| self.handle(w)).collect();
        let hr: Vec<&QWeightHandle> = hs.iter().collect();
        let mut bufs: Vec<Vec<f32>> = Vec::with_capacity(N);
        let mut ys = ys;
        for y in ys.iter_mut() {
            bufs.push(std::mem::take(*y));
        }
        backend::qmatmul_many_host(x, m, &hr, &mut bufs);
        for ((y, buf), (w, bias)) in ys.into_iter().zip(bufs).zip(ws) {
            *y = buf;
            add_bias(y, w.rows, bias);
        }
    }

    fn linear(&self, w: &QWeight, bias: Option<&[f32]>, x: &[f32], m: usize, y: &mut Vec<f32>) {
        self.linear_many([(w, bias)], x, m, [y]);
    }
}

/// Add `bias` (one value per output feature) to every `rows`-wide row of `y`.
fn add_bias(y: &mut [f32], rows: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(rows) {
            row.iter_mut().zip(b).for_each(|(o, &bb)| *o += bb);
        }
    }
}

/// The (cos, sin) table of every row of `plan` for `rope`.
fn rope_table(rope: &ember_runtime::ops::Rope, plan: &BatchPlan) -> Vec<(f32, f32)> {
    let mut t = Vec::with_capacity(plan.n * rope.n_rot / 2);
    for s in &plan.segs {
        rope.table(s.pos0, s.len, &mut t);
    }
    t
}

/// One forward pass on the host: the activations, grown once and reused by every layer.
pub(crate) struct HostPass<'m> {
    m: &'m Transformer,
    /// Rows in the batch.
    n: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// RoPE (cos, sin) of every row, computed once and shared by all layers' q and k.
    angles: Vec<(f32, f32)>,
    /// The same for the sliding-window layers' own RoPE (Gemma 3), if the model has one.
    angles_local: Vec<(f32, f32)>,
}

impl<'m> HostPass<'m> {
    pub(crate) fn new(m: &'m Transformer) -> Self {
        HostPass {
            m,
            n: 0,
            x: Vec::new(),
            xn: Vec::new(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            att: Vec::new(),
            proj: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
            angles: Vec::new(),
            angles_local: Vec::new(),
        }
    }

    /// `x += proj`, RMS-normed by `post` first if given (Gemma's post-norms).
    fn add_proj(&mut self, post: Option<&[f32]>) {
        if let Some(w) = post {
            ops::rmsnorm_inplace(&mut self.proj, w, self.m.cfg.rms_eps);
        }
        self.x
            .iter_mut()
            .zip(&self.proj)
            .for_each(|(a, &b)| *a += b);
    }
}

impl DecoderOps for HostPass<'_> {
    fn begin(&mut self, plan: &BatchPlan, _kv: &mut PagedKv) -> Result<(), ModelError> {
        self.n = plan.n;
        self.x = plan.embed(&self.m.file, &self.m.tok_embd);
        let scale = self.m.cfg.embd_scale;
        if scale != 1.0 {
            self.x.iter_mut().for_each(|v| *v *= scale);
        }
        self.angles = rope_table(&self.m.rope, plan);
        self.angles_local = self
            .m
            .rope_local
            .as_ref()
            .map(|r| rope_table(r, plan))
            .unwrap_or_default();
        Ok(())
    }

    fn norm(&mut self, l: usize, which: Norm) {
        let w = self.m.layers[l].norm(which);
        self.xn.resize(self.x.len(), 0.0);
        ops::rmsnorm(&self.x, w, self.m.cfg.rms_eps, &mut self.xn);
    }

    fn qkv(&mut self, l: usize) {
        let ly = &self.m.layers[l];
        self.m.linear_many(
            [
                (&ly.wq, ly.bq.as_deref()),
                (&ly.wk, ly.bk.as_deref()),
                (&ly.wv, ly.bv.as_deref()),
            ],
            &self.xn,
            self.n,
            [&mut self.q, &mut self.k, &mut self.v],
        );
    }

    fn rope_store(&mut self, l: usize, plan: &BatchPlan, kv: &mut PagedKv) {
        let (m, c) = (self.m, &self.m.cfg);
        let (q_dim, kv_dim) = (c.n_heads * c.head_dim, c.kv_dim());
        let ly = &m.layers[l];
        let rope = m.rope_of(l);
        let angles = if std::ptr::eq(rope, &m.rope) {
            &self.angles
        } else {
            &self.angles_local
        };
        let half = rope.n_rot / 2;
        // Per-head q/k norms (each head's head_dim values normed with the same weight).
        if let Some(w) = &ly.q_norm {
            ops::rmsnorm_inplace(&mut self.q[..self.n * q_dim], w, c.rms_eps);
        }
        if let Some(w) = &ly.k_norm {
            ops::rmsnorm_inplace(&mut self.k[..self.n * kv_dim], w, c.rms_eps);
        }
        // A score scale other than 1/√head_dim is folded into q (attention applies 1/√hd).
        let q_scale = c.attn_scale * (c.head_dim as f32).sqrt();
        for (it, s) in plan.iter() {
            let (r0, len) = (s.r0, s.len);
            let q = &mut self.q[r0 * q_dim..(r0 + len) * q_dim];
            let k = &mut self.k[r0 * kv_dim..(r0 + len) * kv_dim];
            let cs = &angles[r0 * half..(r0 + len) * half];
            if m.fault != Some(DecoderFault::Rope) {
                rope.apply_table(q, c.n_heads, cs);
                rope.apply_table(k, c.n_kv_heads, cs);
            }
            if q_scale != 1.0 {
                q.iter_mut().for_each(|v| *v *= q_scale);
            }
            if m.fault == Some(DecoderFault::Attention) {
                q.fill(0.0);
            }
            // The cache holds f16 (llama.cpp's default): K is rounded after RoPE, as
            // llama.cpp copies the rotated f32 K into its f16 cache.
            ops::round_f16_slice(k);
            let v = &mut self.v[r0 * kv_dim..(r0 + len) * kv_dim];
            ops::round_f16_slice(v);
            kv.write(it.seq, l, k, v);
        }
    }

    fn attend(&mut self, l: usize, plan: &BatchPlan, kv: &PagedKv) {
        let c = &self.m.cfg;
        let q_dim = c.n_heads * c.head_dim;
        let bs = kv.layout.block_size;
        let window = c.window(l);
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        self.att.resize(self.n * q_dim, 0.0);
        // Each sequence attends over its own cache: the sequences run in parallel (a decode
        // step has one query row per sequence, too little work to split alone).
        let mut jobs = Vec::with_capacity(plan.items.len());
        let mut att_rest = &mut self.att[..];
        for (it, s) in plan.iter() {
            let (out, rest) = std::mem::take(&mut att_rest).split_at_mut(s.len * q_dim);
            att_rest = rest;
            let (kb, vb) = kv.layer_blocks(it.seq, l);
            let q = &self.q[s.r0 * q_dim..(s.r0 + s.len) * q_dim];
            jobs.push((q, kb, vb, s.pos0, out));
        }
        if jobs.len() > 1 {
            // One task per sequence; no second split inside each (nested fork/join measured
            // ~1.6% slower at 8 sequences).
            jobs.into_par_iter().for_each(|(q, kb, vb, pos0, out)| {
                ops::attention_windowed(q, &kb, &vb, bs, pos0, shape, window, out, false)
            });
        } else {
            for (q, kb, vb, pos0, out) in jobs {
                ops::attention_windowed(q, &kb, &vb, bs, pos0, shape, window, out, true);
            }
        }
    }

    fn attn_out(&mut self, l: usize) {
        let m = self.m;
        m.linear(&m.layers[l].wo, None, &self.att, self.n, &mut self.proj);
        self.add_proj(m.layers[l].post_attn_norm.as_deref());
    }

    fn ffn(&mut self, l: usize) {
        let m = self.m;
        let ly = &m.layers[l];
        m.linear_many(
            [(&ly.w_gate, None), (&ly.w_up, None)],
            &self.xn,
            self.n,
            [&mut self.gate, &mut self.up],
        );
        if m.fault == Some(DecoderFault::Ffn) {
            self.gate
                .iter_mut()
                .zip(&self.up)
                .for_each(|(g, &u)| *g *= u);
        } else {
            match m.cfg.ffn_act {
                FfnAct::Silu => ops::silu_mul(&mut self.gate, &self.up),
                FfnAct::GeluTanh => ops::gelu_tanh_mul(&mut self.gate, &self.up),
            }
        }
        m.linear(&ly.w_down, None, &self.gate, self.n, &mut self.proj);
        self.add_proj(ly.post_ffn_norm.as_deref());
    }

    fn logits(&mut self, rows: &[usize], logits: &mut Vec<f32>) -> Result<(), ModelError> {
        if rows.is_empty() {
            return Ok(());
        }
        let m = self.m;
        let d = m.cfg.n_embd;
        let mut h = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            h.extend_from_slice(&self.x[r * d..(r + 1) * d]);
        }
        ops::rmsnorm_inplace(&mut h, &m.output_norm, m.cfg.rms_eps);
        m.linear(&m.output, None, &h, rows.len(), logits);
        if let Some(cap) = m.cfg.final_logit_softcap {
            logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        Ok(())
    }
}
