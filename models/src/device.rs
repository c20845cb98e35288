//! The device executor of the decoder ([`crate::decoder`]): its ops as burn tensor code on a burn device: wgpu on a GPU (or burn-flex on the
//! CPU, which the parity tests use to check this file against the CPU fast path).
//!
//! * Weights: every matrix is a [`QWeightHandle`] into the mapping; [`backend::prepare`] repacks
//!   and uploads it once at load, and the quantized matmul is the `QuantOps` backend extension.
//!   Norm vectors and biases are small f32 tensors on the device.
//! * KV: the same [`PagedKv`] does the bookkeeping (blocks, prefix index, refcounts, LRU); the
//!   K and V rows live in its device storage ([`ember_runtime::kv::DeviceKv`]: one pool per
//!   layer and kind, slot = `block · block_size + offset`), grown by doubling.
//! * Token embeddings are dequantized on the host from the mapping (a few rows per step) and
//!   uploaded; logits come back as one read per forward pass.

use std::sync::{Arc, Mutex};

use ember_runtime::backend::{self, HandleError, QWeightHandle};
use ember_runtime::backend::{Device, Tensor, TensorData};
use ember_runtime::gguf::GgufFile;
use ember_runtime::kv::{KvLayout, PagedKv};
use ember_runtime::model::{BatchItem, DeviceMemory, Model, ModelConfig, ModelError};
use ember_runtime::ops::Rope;
use ember_runtime::tensor_ops as T;

use crate::decoder::{self, BatchPlan, DecoderOps, Layer, Norm, QWeight};
use crate::transformer::Transformer;

/// A layer on the device: matrices uploaded (handles), vectors as tensors.
type DevLayer = Layer<QWeightHandle, Tensor<1>>;

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
            .map_err(|e: HandleError| ModelError::Device {
                path: path.clone(),
                what: format!("upload: {e}"),
            })?;
            dev_bytes += h.1 as u64;
            Ok(h.0)
        };
        let mut layers = Vec::with_capacity(t.layers.len());
        for ly in &t.layers {
            layers.push(ly.try_map(&mut handle, |v| vec1(v, &device))?);
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
        let mut pass = DevicePass {
            m: self,
            slots: Vec::new(),
            cos: None,
            sin: None,
            x: None,
            xn: None,
            qkv: None,
            att: None,
        };
        decoder::forward(&mut pass, c.n_layers, c.n_vocab, items, kv, logits)
    }
}

/// One forward pass on the device: the pass's tensors, taken by each op and put back.
struct DevicePass<'m> {
    m: &'m DeviceTransformer,
    /// Per item, the pool slot of every cache position `0..end` (slot = block · block_size +
    /// offset).
    slots: Vec<Vec<usize>>,
    cos: Option<Tensor<2>>,
    sin: Option<Tensor<2>>,
    x: Option<Tensor<2>>,
    xn: Option<Tensor<2>>,
    qkv: Option<(Tensor<2>, Tensor<2>, Tensor<2>)>,
    att: Option<Tensor<2>>,
}

/// A pass's tensor, set by the op before (the decoder's order guarantees it).
fn take<X>(t: &mut Option<X>, what: &str) -> X {
    t.take()
        .unwrap_or_else(|| panic!("decoder op order: {what} is not set"))
}

impl DecoderOps for DevicePass<'_> {
    /// The cache's values live in device pools: set them up before blocks are reserved, which
    /// the host storage would otherwise make room for.
    fn bind_kv(&mut self, kv: &mut PagedKv) {
        kv.device_mut(&self.m.device);
    }

    fn begin(&mut self, plan: &BatchPlan, kv: &mut PagedKv) -> Result<(), ModelError> {
        let m = self.m;
        let mut max_slot = 0;
        for (it, s) in plan.iter() {
            let slots = kv.device().slots(kv.block_table(it.seq), s.pos0 + s.len);
            max_slot = max_slot.max(slots.iter().copied().max().unwrap_or(0));
            self.slots.push(slots);
        }
        kv.device_mut(&m.device).ensure_slots(max_slot + 1);
        let x = plan.embed(&m.file, &m.tok_embd);
        self.x = Some(Tensor::<2>::from_data(
            TensorData::new(x, [plan.n, m.cfg.n_embd]),
            &m.device,
        ));
        let (cos, sin) = T::rope_tables(&m.rope, &plan.positions(), &m.device);
        (self.cos, self.sin) = (Some(cos), Some(sin));
        Ok(())
    }

    fn norm(&mut self, l: usize, which: Norm) {
        let w = self.m.layers[l].norm(which);
        let x = self.x.as_ref().expect("decoder op order: x is not set");
        self.xn = Some(T::rmsnorm(x.clone(), w, self.m.cfg.rms_eps));
    }

    fn qkv(&mut self, l: usize) {
        let (m, ly) = (self.m, &self.m.layers[l]);
        let xn = take(&mut self.xn, "xn");
        let q = m.linear(xn.clone(), &ly.wq, ly.bq.as_ref());
        let k = m.linear(xn.clone(), &ly.wk, ly.bk.as_ref());
        let v = m.linear(xn, &ly.wv, ly.bv.as_ref());
        self.qkv = Some((q, k, v));
    }

    fn rope_store(&mut self, l: usize, plan: &BatchPlan, kv: &mut PagedKv) {
        let (m, c) = (self.m, &self.m.cfg);
        let (q, k, v) = take(&mut self.qkv, "q, k, v");
        let (cos, sin) = (self.cos.as_ref().unwrap(), self.sin.as_ref().unwrap());
        let q = T::rope(q, &m.rope, c.n_heads, cos, sin);
        // The cache holds f16 values (llama.cpp's default), as on the CPU path.
        let k = backend::round_f16(T::rope(k, &m.rope, c.n_kv_heads, cos, sin));
        let v = backend::round_f16(v);
        let pools = kv.device_mut(&m.device);
        for (s, slots) in plan.segs.iter().zip(&self.slots) {
            pools.write(l, &k, &v, s.r0, &slots[s.pos0..s.pos0 + s.len]);
        }
        self.qkv = Some((q, k, v));
    }

    fn attend(&mut self, l: usize, plan: &BatchPlan, kv: &PagedKv) {
        let c = &self.m.cfg;
        let q_dim = c.n_heads * c.head_dim;
        let (q, _, _) = take(&mut self.qkv, "q");
        let pools = kv.device();
        let mut outs = Vec::with_capacity(plan.segs.len());
        for (s, slots) in plan.segs.iter().zip(&self.slots) {
            let (kh, vh) = pools.gather(l, slots);
            let qi = q.clone().slice([s.r0..s.r0 + s.len, 0..q_dim]);
            let (heads, kv_heads) = (c.n_heads, c.n_kv_heads);
            outs.push(T::attention(
                qi, kh, vh, s.pos0, heads, kv_heads, c.head_dim,
            ));
        }
        self.att = Some(if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(outs, 0)
        });
    }

    fn attn_out(&mut self, l: usize) {
        let att = take(&mut self.att, "att");
        let x = take(&mut self.x, "x");
        self.x = Some(x + self.m.linear(att, &self.m.layers[l].wo, None));
    }

    fn ffn(&mut self, l: usize) {
        let (m, ly) = (self.m, &self.m.layers[l]);
        let xn = take(&mut self.xn, "xn");
        let gate = m.linear(xn.clone(), &ly.w_gate, None);
        let up = m.linear(xn, &ly.w_up, None);
        let x = take(&mut self.x, "x");
        self.x = Some(x + m.linear(T::silu_mul(gate, up), &ly.w_down, None));
    }

    fn logits(&mut self, rows: &[usize], logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let m = self.m;
        if rows.is_empty() {
            m.note_memory();
            return Ok(());
        }
        let h = T::gather_rows(take(&mut self.x, "x"), rows);
        let h = T::rmsnorm(h, &m.output_norm, m.cfg.rms_eps);
        let out = backend::qmatmul(h, &m.output);
        *logits = out
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| ModelError::Device {
                path: m.file.path().display().to_string(),
                what: format!("reading logits back: {e:?}"),
            })?;
        m.note_memory();
        Ok(())
    }
}
