//! The shared decoder as burn tensor code on a burn device: wgpu on a GPU (or burn-flex on the
//! CPU, which the parity tests use to check this file against the CPU fast path).
//!
//! * Weights: every matrix is a [`QWeightHandle`] into the mapping; [`backend::prepare`] repacks
//!   and uploads it once at load, and the quantized matmul is the `QuantOps` backend extension.
//!   Norm vectors and biases are small f32 tensors on the device.
//! * KV: the same [`PagedKv`] does the bookkeeping (blocks, prefix index, refcounts, LRU); the
//!   K and V rows live in one device pool per layer and kind (`[slots, kv_dim]`, slot =
//!   `block · block_size + offset`), kept in `PagedKv::device_store`, grown by doubling.
//! * Token embeddings are dequantized on the host from the mapping (a few rows per step) and
//!   uploaded; logits come back as one read per forward pass.

use std::sync::{Arc, Mutex};

use ember_runtime::backend::{self, HandleError, QWeightHandle};
use ember_runtime::backend::{Device, Tensor, TensorData};
use ember_runtime::gguf::GgufFile;
use ember_runtime::kv::{KvLayout, PagedKv};
use ember_runtime::model::{BatchItem, DeviceMemory, LogitsWanted, Model, ModelConfig, ModelError};
use ember_runtime::ops::Rope;
use ember_runtime::quant;
use ember_runtime::tensor_ops as T;

use crate::transformer::{QWeight, Transformer};

struct DevLayer {
    attn_norm: Tensor<1>,
    wq: QWeightHandle,
    wk: QWeightHandle,
    wv: QWeightHandle,
    bq: Option<Tensor<1>>,
    bk: Option<Tensor<1>>,
    bv: Option<Tensor<1>>,
    wo: QWeightHandle,
    ffn_norm: Tensor<1>,
    w_gate: QWeightHandle,
    w_up: QWeightHandle,
    w_down: QWeightHandle,
}

pub struct DeviceTransformer {
    file: Arc<GgufFile>,
    cfg: ModelConfig,
    rope: Rope,
    device: Device,
    backend: &'static str,
    adapter: Option<(String, String)>,
    tok_embd: QWeight,
    output_norm: Tensor<1>,
    output: QWeightHandle,
    layers: Vec<DevLayer>,
    weight_bytes: u64,
    device_weight_bytes: u64,
    peak: Mutex<u64>,
}

/// Device K/V pools of one [`PagedKv`].
struct Pools {
    /// Slots per pool.
    cap: usize,
    k: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
}

fn vec1(v: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

impl DeviceTransformer {
    /// Move a loaded model's weights to `device` (`backend` names it for records).
    pub fn new(
        t: Transformer,
        device: Device,
        backend: &'static str,
        adapter: Option<(String, String)>,
    ) -> Result<Self, ModelError> {
        let path = t.file.path().display().to_string();
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
            .map_err(|e: HandleError| ModelError::BadHparams {
                path: path.clone(),
                what: format!("device upload: {e}"),
            })?;
            dev_bytes += h.1 as u64;
            Ok(h.0)
        };
        let mut layers = Vec::with_capacity(t.layers.len());
        for ly in &t.layers {
            layers.push(DevLayer {
                attn_norm: vec1(&ly.attn_norm, &device),
                wq: handle(&ly.wq)?,
                wk: handle(&ly.wk)?,
                wv: handle(&ly.wv)?,
                bq: ly.bq.as_deref().map(|b| vec1(b, &device)),
                bk: ly.bk.as_deref().map(|b| vec1(b, &device)),
                bv: ly.bv.as_deref().map(|b| vec1(b, &device)),
                wo: handle(&ly.wo)?,
                ffn_norm: vec1(&ly.ffn_norm, &device),
                w_gate: handle(&ly.w_gate)?,
                w_up: handle(&ly.w_up)?,
                w_down: handle(&ly.w_down)?,
            });
        }
        let output = handle(&t.output)?;
        let m = DeviceTransformer {
            output_norm: vec1(&t.output_norm, &device),
            output,
            layers,
            tok_embd: t.tok_embd,
            rope: t.rope,
            cfg: t.cfg,
            file: t.file,
            weight_bytes: t.weight_bytes,
            device_weight_bytes: dev_bytes,
            device,
            backend,
            adapter,
            peak: Mutex::new(0),
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

    fn linear(&self, x: Tensor<2>, w: &QWeightHandle, b: Option<&Tensor<1>>) -> Tensor<2> {
        let y = backend::qmatmul(x, w);
        match b {
            Some(b) => y + b.clone().unsqueeze_dim::<2>(0),
            None => y,
        }
    }
}

impl Pools {
    fn ensure(&mut self, slots: usize, n_layers: usize, kv_dim: usize, device: &Device) {
        if slots <= self.cap {
            return;
        }
        let new_cap = slots.max(2 * self.cap).max(64);
        let grow = |old: Option<Tensor<2>>| {
            let extra = Tensor::<2>::zeros([new_cap - self.cap, kv_dim], device);
            match old {
                Some(o) => Tensor::cat(vec![o, extra], 0),
                None => extra,
            }
        };
        if self.k.is_empty() {
            self.k = (0..n_layers).map(|_| grow(None)).collect();
            self.v = (0..n_layers).map(|_| grow(None)).collect();
        } else {
            self.k = std::mem::take(&mut self.k)
                .into_iter()
                .map(|t| grow(Some(t)))
                .collect();
            self.v = std::mem::take(&mut self.v)
                .into_iter()
                .map(|t| grow(Some(t)))
                .collect();
        }
        self.cap = new_cap;
    }
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

    fn backend(&self) -> &'static str {
        self.backend
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        self.note_memory()
    }

    fn adapter(&self) -> Option<(String, String)> {
        self.adapter.clone()
    }

    fn forward_batch(
        &self,
        items: &[BatchItem<'_>],
        kv: &mut PagedKv,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let items = ember_runtime::model::batch_items(items, c.n_vocab, logits)?;
        if items.is_empty() {
            return Ok(());
        }
        if kv.device_store.is_none() {
            kv.device_store = Some(Box::new(Pools {
                cap: 0,
                k: vec![],
                v: vec![],
            }));
        }
        for it in &items {
            kv.reserve(it.seq, it.tokens.len())?;
        }
        let bs = kv.layout.block_size;
        let kv_dim = c.kv_dim();
        // Per item: (first row, rows, first position, slot of every position 0..end).
        let mut segs = Vec::with_capacity(items.len());
        let mut n = 0;
        let mut max_slot = 0;
        for it in &items {
            let pos0 = kv.seq_len(it.seq);
            let table = kv.block_table(it.seq);
            let slots: Vec<usize> = (0..pos0 + it.tokens.len())
                .map(|p| table[p / bs] as usize * bs + p % bs)
                .collect();
            max_slot = max_slot.max(slots.iter().copied().max().unwrap_or(0));
            segs.push((n, it.tokens.len(), pos0, slots));
            n += it.tokens.len();
        }
        let device = &self.device;
        let mut pools_box = kv.device_store.take().expect("set above");
        let pools = pools_box
            .downcast_mut::<Pools>()
            .expect("a PagedKv is used by one backend");
        pools.ensure(max_slot + 1, c.n_layers, kv_dim, device);

        let d = c.n_embd;
        let mut x_host = vec![0f32; n * d];
        let embd = quant::QMatRef {
            ty: self.tok_embd.ty,
            rows: self.tok_embd.rows,
            cols: self.tok_embd.cols,
            data: &self.file.bytes()[self.tok_embd.start..self.tok_embd.start + self.tok_embd.len],
        };
        for (row, &t) in x_host
            .chunks_exact_mut(d)
            .zip(items.iter().flat_map(|it| it.tokens.iter()))
        {
            quant::dequantize_row(embd, t as usize, row);
        }
        let mut x = Tensor::<2>::from_data(TensorData::new(x_host, [n, d]), device);
        let positions: Vec<usize> = segs
            .iter()
            .flat_map(|(_, len, pos0, _)| *pos0..*pos0 + *len)
            .collect();
        let (cos, sin) = T::rope_tables(&self.rope, &positions, device);
        let q_dim = c.n_heads * c.head_dim;

        for (l, ly) in self.layers.iter().enumerate() {
            let xn = T::rmsnorm(x.clone(), &ly.attn_norm, c.rms_eps);
            let q = self.linear(xn.clone(), &ly.wq, ly.bq.as_ref());
            let k = self.linear(xn.clone(), &ly.wk, ly.bk.as_ref());
            let v = self.linear(xn, &ly.wv, ly.bv.as_ref());
            let q = T::rope(q, &self.rope, c.n_heads, &cos, &sin);
            // The cache holds f16 values (llama.cpp's default), as on the CPU path.
            let k = backend::round_f16(T::rope(k, &self.rope, c.n_kv_heads, &cos, &sin));
            let v = backend::round_f16(v);
            // Store the new rows, one contiguous slot run at a time.
            let (mut kp, mut vp) = (pools.k[l].clone(), pools.v[l].clone());
            for (r0, len, pos0, slots) in &segs {
                let mut i = 0;
                while i < *len {
                    let s0 = slots[pos0 + i];
                    let mut j = i + 1;
                    while j < *len && slots[pos0 + j] == s0 + (j - i) {
                        j += 1;
                    }
                    let rows = r0 + i..r0 + j;
                    kp = kp.slice_assign(
                        [s0..s0 + (j - i), 0..kv_dim],
                        k.clone().slice([rows.clone(), 0..kv_dim]),
                    );
                    vp = vp.slice_assign(
                        [s0..s0 + (j - i), 0..kv_dim],
                        v.clone().slice([rows, 0..kv_dim]),
                    );
                    i = j;
                }
            }
            pools.k[l] = kp.clone();
            pools.v[l] = vp.clone();
            let mut outs = Vec::with_capacity(segs.len());
            for (r0, len, pos0, slots) in &segs {
                let kh = T::gather_rows(kp.clone(), slots);
                let vh = T::gather_rows(vp.clone(), slots);
                let qi = q.clone().slice([*r0..r0 + len, 0..q_dim]);
                outs.push(T::attention(
                    qi,
                    kh,
                    vh,
                    *pos0,
                    c.n_heads,
                    c.n_kv_heads,
                    c.head_dim,
                ));
            }
            let att = if outs.len() == 1 {
                outs.pop().unwrap()
            } else {
                Tensor::cat(outs, 0)
            };
            x = x + self.linear(att, &ly.wo, None);
            let xn = T::rmsnorm(x.clone(), &ly.ffn_norm, c.rms_eps);
            let gate = self.linear(xn.clone(), &ly.w_gate, None);
            let up = self.linear(xn, &ly.w_up, None);
            x = x + self.linear(T::silu_mul(gate, up), &ly.w_down, None);
        }
        kv.device_bytes = 2 * c.n_layers * pools.cap * kv_dim * 4;
        kv.device_store = Some(pools_box);
        for it in &items {
            kv.commit(it.seq, it.tokens);
        }
        let mut rows = Vec::new();
        for (it, (r0, len, _, _)) in items.iter().zip(&segs) {
            match it.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push(r0 + len - 1),
                LogitsWanted::All => rows.extend(*r0..r0 + len),
            }
        }
        if rows.is_empty() {
            self.note_memory();
            return Ok(());
        }
        let h = T::gather_rows(x, &rows);
        let h = T::rmsnorm(h, &self.output_norm, c.rms_eps);
        let out = backend::qmatmul(h, &self.output);
        *logits = out
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| ModelError::BadHparams {
                path: self.file.path().display().to_string(),
                what: format!("reading logits back from the device: {e:?}"),
            })?;
        self.note_memory();
        Ok(())
    }
}
