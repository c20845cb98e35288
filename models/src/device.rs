//! The device executor of the decoder ([`crate::decoder`]) on a wgpu device, through the fused
//! kernels of [`ember_runtime::backend::gpu`]: ten launches per layer for a decode step.
//!
//! * Weights: every matrix is a [`QWeightHandle`] into the mapping, uploaded once at load
//!   ([`backend::prepare`]: repacked losslessly). Weights that read the same input are one
//!   [`Projection`] (q|k|v with their biases, gate|up), so each is one matmul launch.
//! * Each norm is fused into the activation rounding of the matmul after it, SiLU·mul into the
//!   rounding before Wdown, the residual adds into Wo and Wdown.
//! * KV: the same [`PagedKv`] does the bookkeeping (blocks, prefix index, refcounts, LRU); the
//!   K and V rows live in its device storage ([`ember_runtime::kv::DeviceKv`]: one pool per
//!   layer and kind, slot = `block · block_size + offset`, allocated whole from the KV budget
//!   when the cache first meets the device). RoPE writes k and
//!   v into the pools in place, and attention reads them through the block tables on the
//!   device: no gather, no copy.
//! * Token embeddings are dequantized on the host from the mapping (a few rows per step) and
//!   uploaded; logits come back as one read per forward pass.

use std::sync::{Arc, Mutex};

use ember_runtime::backend::gpu::{self, HeadShape, Input, PassTables, Projection};
use ember_runtime::backend::{self, HandleError, QWeightHandle};
use ember_runtime::backend::{Device, Tensor, TensorData};
use ember_runtime::gguf::GgufFile;
use ember_runtime::kv::{KvLayout, PagedKv};
use ember_runtime::model::{BatchItem, DeviceMemory, FfnAct, Model, ModelConfig, ModelError};
use ember_runtime::ops::Rope;
use ember_runtime::tensor_ops as T;

use crate::decoder::{self, BatchPlan, DecoderOps, Layer, Norm, QWeight};
use crate::transformer::Transformer;

/// A layer on the device: its norm weights, and its matrices as projections.
struct DevLayer {
    attn_norm: Tensor<1>,
    ffn_norm: Tensor<1>,
    /// Per-head q/k norms (Qwen3, Gemma 3).
    q_norm: Option<Tensor<1>>,
    k_norm: Option<Tensor<1>>,
    /// Norms of the attention and FFN outputs before their residual adds (Gemma 3).
    post_attn_norm: Option<Tensor<1>>,
    post_ffn_norm: Option<Tensor<1>>,
    /// q|k|v, with the biases (Qwen2) if any.
    qkv: Projection,
    wo: Projection,
    /// gate|up.
    gate_up: Projection,
    down: Projection,
}

pub struct DeviceTransformer {
    file: Arc<GgufFile>,
    cfg: ModelConfig,
    rope: Rope,
    /// The sliding-window layers' own RoPE (Gemma 3), if any.
    rope_local: Option<Rope>,
    rope_plan: crate::transformer::RopePlan,
    device: Device,
    backend: &'static str,
    adapter: Option<(String, String)>,
    tok_embd: QWeight,
    output_norm: Tensor<1>,
    output: Projection,
    layers: Vec<DevLayer>,
    heads: HeadShape,
    weight_bytes: u64,
    device_weight_bytes: u64,
    peak: Mutex<u64>,
    /// The adapter runs shaders on this machine's CPU (lavapipe).
    software: bool,
}

fn vec1(v: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

impl DeviceTransformer {
    /// Move a loaded model's weights to `device` (`backend` names it for records).
    /// `software`: the adapter runs shaders on the CPU (lavapipe); see [`Projection::new`].
    pub fn new(
        t: Transformer,
        device: Device,
        backend: &'static str,
        adapter: Option<(String, String)>,
        software: bool,
    ) -> Result<Self, ModelError> {
        let path = t.file.path().display().to_string();
        let up_err = |e: HandleError| ModelError::Device {
            path: path.clone(),
            what: format!("upload: {e}"),
        };
        let mut dev_bytes = 0u64;
        let mut handle = |w: &QWeight| -> Result<QWeightHandle, ModelError> {
            let h = QWeightHandle::new(
                t.file.clone(),
                w.ty,
                w.rows,
                w.cols,
                w.start..w.start + w.len,
            )
            .and_then(|h| backend::prepare(&h, &device).map(|b| (h, b)))
            .map_err(up_err)?;
            dev_bytes += h.1 as u64;
            Ok(h.0)
        };
        let mut layers = Vec::with_capacity(t.layers.len());
        for ly in &t.layers {
            // The matrices uploaded; the vectors are the norms' (uploaded below) and the biases
            // (part of the q|k|v projection).
            let h: Layer<QWeightHandle, ()> = ly.try_map(&mut handle, |_| ())?;
            let proj = |ws: &[&QWeightHandle], bias: Option<&[f32]>| {
                Projection::new(ws, bias, &device, software).map_err(up_err)
            };
            layers.push(DevLayer {
                qkv: proj(&[&h.wq, &h.wk, &h.wv], qkv_bias(ly).as_deref())?,
                wo: proj(&[&h.wo], None)?,
                gate_up: proj(&[&h.w_gate, &h.w_up], None)?,
                down: proj(&[&h.w_down], None)?,
                attn_norm: vec1(&ly.attn_norm, &device),
                ffn_norm: vec1(&ly.ffn_norm, &device),
                q_norm: ly.q_norm.as_deref().map(|w| vec1(w, &device)),
                k_norm: ly.k_norm.as_deref().map(|w| vec1(w, &device)),
                post_attn_norm: ly.post_attn_norm.as_deref().map(|w| vec1(w, &device)),
                post_ffn_norm: ly.post_ffn_norm.as_deref().map(|w| vec1(w, &device)),
            });
        }
        let output = handle(&t.output)?;
        let output = Projection::new(&[&output], None, &device, software).map_err(up_err)?;
        let c = &t.cfg;
        let heads = HeadShape {
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            n_rot: t.rope.n_rot,
            neox: t.rope.style == ember_runtime::ops::RopeStyle::Neox,
        };
        let m = DeviceTransformer {
            output_norm: vec1(&t.output_norm, &device),
            output,
            layers,
            heads,
            tok_embd: t.tok_embd,
            rope: t.rope,
            rope_local: t.rope_local,
            rope_plan: t.rope_plan,
            cfg: t.cfg,
            file: t.file,
            weight_bytes: t.weight_bytes,
            device_weight_bytes: dev_bytes,
            device,
            backend,
            adapter,
            peak: Mutex::new(0),
            software,
        };
        m.note_memory();
        Ok(m)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn note_memory(&self) -> Option<DeviceMemory> {
        let u = self.device.memory_pool_usage()?;
        let mut p = self.peak.lock().unwrap_or_else(|e| e.into_inner());
        *p = (*p).max(u.bytes_reserved);
        Some(DeviceMemory {
            weights_bytes: self.device_weight_bytes,
            in_use_bytes: u.bytes_in_use,
            reserved_bytes: u.bytes_reserved,
            peak_bytes: *p,
        })
    }
}

/// q|k|v's biases as one vector over the projection's columns (zeros for a weight without
/// one); `None` when no weight has one.
fn qkv_bias(ly: &crate::transformer::Layer) -> Option<Vec<f32>> {
    if ly.bq.is_none() && ly.bk.is_none() && ly.bv.is_none() {
        return None;
    }
    let mut b = Vec::with_capacity(ly.wq.rows + ly.wk.rows + ly.wv.rows);
    for (bias, rows) in [
        (&ly.bq, ly.wq.rows),
        (&ly.bk, ly.wk.rows),
        (&ly.bv, ly.wv.rows),
    ] {
        match bias {
            Some(v) => b.extend_from_slice(v),
            None => b.resize(b.len() + rows, 0.0),
        }
    }
    Some(b)
}

impl Model for DeviceTransformer {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device pools hold f32 (K/V at f16 precision; lavapipe has no f16 storage), so a
    /// block costs twice the host cache's bytes against the budget.
    fn kv_layout(&self, block_size: usize) -> KvLayout {
        let c = self.config();
        KvLayout {
            elem_bytes: 4,
            ..KvLayout::new(c.n_layers, c.kv_dim(), block_size)
        }
    }
    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn set_context(&mut self, n_ctx: usize) {
        (self.rope, self.rope_local) = self.rope_plan.build(n_ctx);
    }

    fn backend(&self) -> &'static str {
        self.backend
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        self.note_memory()
    }

    fn adapter(&self) -> Option<(String, String)> {
        self.adapter.clone()
    }

    /// The pools take the whole KV budget at once; a budget whose per-layer pool exceeds the
    /// adapter's largest buffer is refused here, with what to do, before anything is
    /// allocated.
    fn bind_kv(&self, kv: &mut PagedKv) -> Result<(), ModelError> {
        if let Some(max) = gpu::max_buffer_bytes(&self.device) {
            let l = kv.layout;
            let pool = (kv.n_blocks() * l.block_size * l.kv_dim * l.elem_bytes) as u64;
            if pool > max {
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                return Err(ModelError::Device {
                    path: self.file.path().display().to_string(),
                    what: format!(
                        "a KV budget of {:.0} MiB needs {:.0} MiB per layer and kind on the \
                         device, over the adapter's largest buffer ({:.0} MiB): lower the KV \
                         budget (--kv-budget-mib) or the context (--ctx)",
                        mib(2 * l.n_layers as u64 * pool),
                        mib(pool),
                        mib(max)
                    ),
                });
            }
        }
        kv.device_mut(&self.device);
        Ok(())
    }

    fn forward_batch(
        &self,
        items: &[BatchItem<'_>],
        kv: &mut PagedKv,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let mut pass = DevicePass {
            m: self,
            tables: None,
            cos: None,
            sin: None,
            local: None,
            x: None,
            norm: None,
            qkv: None,
            att: None,
        };
        decoder::forward(&mut pass, c.n_layers, c.n_vocab, items, kv, logits)
    }
}

/// One forward pass on the device: the pass's tensors, taken by each op and put back.
struct DevicePass<'m> {
    m: &'m DeviceTransformer,
    /// The block tables and each row's slot, on the device.
    tables: Option<PassTables>,
    cos: Option<Tensor<2>>,
    sin: Option<Tensor<2>>,
    /// (cos, sin) of the sliding-window layers' RoPE, where it differs.
    local: Option<(Tensor<2>, Tensor<2>)>,
    x: Option<Tensor<2>>,
    /// The norm the next projection applies (fused into its activation rounding).
    norm: Option<Norm>,
    /// q|k|v (before `rope_store`), then q (after).
    qkv: Option<Tensor<2>>,
    att: Option<Tensor<2>>,
}

/// A pass's tensor, set by the op before (the decoder's order guarantees it).
fn take<X>(t: &mut Option<X>, what: &str) -> X {
    t.take()
        .unwrap_or_else(|| panic!("decoder op order: {what} is not set"))
}

impl DevicePass<'_> {
    fn x(&self) -> &Tensor<2> {
        self.x.as_ref().expect("decoder op order: x is not set")
    }
    /// The pending norm of layer `l`, applied to x, as a projection input.
    fn normed(&mut self, l: usize) -> Input<'_> {
        let m = self.m;
        let w = match take(&mut self.norm, "norm") {
            Norm::Attn => &m.layers[l].attn_norm,
            Norm::Ffn => &m.layers[l].ffn_norm,
        };
        Input::Norm(self.x(), w, m.cfg.rms_eps)
    }
}

impl DecoderOps for DevicePass<'_> {
    /// The cache's values live in device pools: set them up before blocks are reserved, which
    /// the host storage would otherwise make room for ([`Model::bind_kv`]).
    fn bind_kv(&mut self, kv: &mut PagedKv) -> Result<(), ModelError> {
        self.m.bind_kv(kv)
    }

    fn begin(&mut self, plan: &BatchPlan, kv: &mut PagedKv) -> Result<(), ModelError> {
        let m = self.m;
        let bs = kv.device().block_size();
        // The pools already hold every block of the budget (`bind_kv`).
        let (mut tables, mut rows) = (Vec::new(), Vec::with_capacity(plan.n));
        for (it, s) in plan.iter() {
            let end = s.pos0 + s.len;
            let table = &kv.block_table(it.seq)[..end.div_ceil(bs)];
            let off = tables.len() as u32;
            tables.extend_from_slice(table);
            for p in s.pos0..end {
                let slot = table[p / bs] as usize * bs + p % bs;
                rows.push((off, (p + 1) as u32, slot as u32));
            }
        }
        let dev_err = |e: HandleError| ModelError::Device {
            path: m.file.path().display().to_string(),
            what: e.to_string(),
        };
        self.tables = Some(PassTables::new(&m.device, &tables, &rows, bs).map_err(dev_err)?);
        let mut x = plan.embed(&m.file, &m.tok_embd);
        if m.cfg.embd_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= m.cfg.embd_scale);
        }
        self.x = Some(Tensor::<2>::from_data(
            TensorData::new(x, [plan.n, m.cfg.n_embd]),
            &m.device,
        ));
        let positions = plan.positions();
        let (cos, sin) = T::rope_tables(&m.rope, &positions, &m.device);
        (self.cos, self.sin) = (Some(cos), Some(sin));
        self.local = m
            .rope_local
            .as_ref()
            .map(|r| T::rope_tables(r, &positions, &m.device));
        Ok(())
    }

    /// Recorded only: the norm is fused into the next projection's activation rounding.
    fn norm(&mut self, _l: usize, which: Norm) {
        self.norm = Some(which);
    }

    fn qkv(&mut self, l: usize) {
        let m = self.m;
        let input = self.normed(l);
        let mut qkv = gpu::project(&m.layers[l].qkv, input, None);
        let ly = &m.layers[l];
        let c = &m.cfg;
        let q_scale = c.attn_scale * (c.head_dim as f32).sqrt();
        if ly.q_norm.is_some() || ly.k_norm.is_some() || q_scale != 1.0 {
            // Per-head norms of q and k (and a score scale other than 1/√head_dim, folded into
            // q as the CPU does) with tensor ops: a few launches, only for the architectures
            // that have them.
            let [n, _] = qkv.dims();
            let (q_dim, kv_dim, hd) = (c.n_heads * c.head_dim, c.kv_dim(), c.head_dim);
            let per_head = |t: Tensor<2>, heads: usize, w: &Option<Tensor<1>>| match w {
                Some(w) => {
                    T::rmsnorm(t.reshape([n * heads, hd]), w, c.rms_eps).reshape([n, heads * hd])
                }
                None => t,
            };
            let mut q = per_head(qkv.clone().slice([0..n, 0..q_dim]), c.n_heads, &ly.q_norm);
            if q_scale != 1.0 {
                q = q.mul_scalar(q_scale);
            }
            let k = per_head(
                qkv.clone().slice([0..n, q_dim..q_dim + kv_dim]),
                c.n_kv_heads,
                &ly.k_norm,
            );
            let v = qkv.slice([0..n, q_dim + kv_dim..q_dim + 2 * kv_dim]);
            qkv = Tensor::cat(vec![q, k, v], 1);
        }
        self.qkv = Some(qkv);
    }

    fn rope_store(&mut self, l: usize, _plan: &BatchPlan, kv: &mut PagedKv) {
        let qkv = take(&mut self.qkv, "q, k, v");
        let (cos, sin) = match &self.local {
            Some((c, s)) if self.m.cfg.window(l).is_some() => (c, s),
            _ => (self.cos.as_ref().unwrap(), self.sin.as_ref().unwrap()),
        };
        let tables = self.tables.as_ref().expect("decoder op order: begin");
        let (kp, vp) = kv.device().pools(l);
        let q = gpu::rope_store(&qkv, cos, sin, tables, kp, vp, self.m.heads);
        self.qkv = Some(q);
    }

    fn attend(&mut self, l: usize, _plan: &BatchPlan, kv: &PagedKv) {
        let q = take(&mut self.qkv, "q");
        let tables = self.tables.as_ref().expect("decoder op order: begin");
        let (kp, vp) = kv.device().pools(l);
        let window = self.m.cfg.window(l);
        self.att = Some(gpu::attention(&q, kp, vp, tables, self.m.heads, window));
    }

    fn attn_out(&mut self, l: usize) {
        let att = take(&mut self.att, "att");
        let ly = &self.m.layers[l];
        let x = match &ly.post_attn_norm {
            None => gpu::project(&ly.wo, Input::Plain(&att), Some(self.x())),
            Some(w) => {
                let y = gpu::project(&ly.wo, Input::Plain(&att), None);
                take(&mut self.x, "x") + T::rmsnorm(y, w, self.m.cfg.rms_eps)
            }
        };
        if self.m.software {
            // Sleep while the adapter's threads work, rather than spin (see `gpu::hand_over`).
            gpu::hand_over(&x);
        }
        self.x = Some(x);
    }

    fn ffn(&mut self, l: usize) {
        let m = self.m;
        let input = self.normed(l);
        let ly = &m.layers[l];
        let gu = gpu::project(&ly.gate_up, input, None);
        let act;
        let input = match m.cfg.ffn_act {
            FfnAct::Silu => Input::SiluMul(&gu),
            FfnAct::GeluTanh => {
                act = gelu_tanh_mul(gu, m.cfg.n_ff);
                Input::Plain(&act)
            }
        };
        let x = match &ly.post_ffn_norm {
            None => gpu::project(&ly.down, input, Some(self.x())),
            Some(w) => {
                let y = gpu::project(&ly.down, input, None);
                take(&mut self.x, "x") + T::rmsnorm(y, w, m.cfg.rms_eps)
            }
        };
        if m.software {
            gpu::hand_over(&x);
        }
        self.x = Some(x);
    }

    fn logits(&mut self, rows: &[usize], logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let m = self.m;
        if rows.is_empty() {
            m.note_memory();
            return Ok(());
        }
        let x = take(&mut self.x, "x");
        // Logits come back in slices of at most 256 MiB (and the adapter's largest buffer): all
        // the logits of a long prompt over a 262k vocabulary (Gemma 3) would otherwise ask for
        // one buffer of ~1 GiB, which lavapipe and small GPUs refuse.
        let limit = gpu::max_buffer_bytes(&m.device)
            .unwrap_or(u64::MAX)
            .min(256 << 20) as usize;
        let per = (limit / (4 * m.cfg.n_vocab)).max(1);
        let whole = rows.len() == x.dims()[0] && rows.iter().enumerate().all(|(i, &r)| i == r);
        logits.clear();
        logits.reserve(rows.len() * m.cfg.n_vocab);
        for part in rows.chunks(per) {
            // Every row wanted in one slice (a single decode step, or all logits): no gather.
            let h = if whole && part.len() == rows.len() {
                x.clone()
            } else {
                T::gather_rows(x.clone(), part)
            };
            let input = Input::Norm(&h, &m.output_norm, m.cfg.rms_eps);
            let mut out = gpu::project(&m.output, input, None);
            if let Some(cap) = m.cfg.final_logit_softcap {
                out = out.div_scalar(cap).tanh().mul_scalar(cap);
            }
            // A device that ran out of memory or was lost fails here: an error for the
            // request, not a panic.
            let part = out
                .try_into_data()
                .map_err(|e| ModelError::Device {
                    path: m.file.path().display().to_string(),
                    what: format!("the device failed: {e:?}"),
                })?
                .try_to_vec::<f32>()
                .map_err(|e| ModelError::Device {
                    path: m.file.path().display().to_string(),
                    what: format!("reading logits back: {e:?}"),
                })?;
            logits.extend_from_slice(&part);
        }
        m.note_memory();
        Ok(())
    }
}

/// `gelu(gate) · up` of a `[rows, 2·ff]` gate|up output with GELU's tanh approximation, in
/// tensor ops (the CPU's formula, `ember_runtime::ops::gelu_tanh`, without the f16 table
/// rounding llama.cpp's CPU backend applies; the difference is within the GPU's own).
fn gelu_tanh_mul(gu: Tensor<2>, ff: usize) -> Tensor<2> {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    let [n, _] = gu.dims();
    let g = gu.clone().slice([0..n, 0..ff]);
    let u = gu.slice([0..n, ff..2 * ff]);
    let inner = g
        .clone()
        .mul(g.clone().powi_scalar(2).mul_scalar(COEF_A).add_scalar(1.0))
        .mul_scalar(SQRT_2_OVER_PI);
    g.mul(inner.tanh().add_scalar(1.0)).mul_scalar(0.5).mul(u)
}
