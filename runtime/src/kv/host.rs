//! K/V values in host memory, for the CPU decoder: f16, llama.cpp's default cache type.
//! Block `b` holds, for each layer, `block_size` rows of K then `block_size` rows of V.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{BlockCopy, BlockId, HOST_KV_ELEM_BYTES, KvLayout, KvStorage};

/// Host storage for the blocks of one cache, grown as blocks are first handed out.
#[derive(Default)]
pub struct HostKv {
    /// K and V at f16 (values arrive rounded to f16 precision, so storing them is exact).
    data: Vec<f16>,
    /// Whether any value was written (room made for blocks holds no values yet).
    written: bool,
}

fn offset(l: &KvLayout, b: BlockId, layer: usize, v: bool) -> usize {
    ((b as usize * l.n_layers + layer) * 2 + v as usize) * l.block_size * l.kv_dim
}

impl HostKv {
    /// Whether no value was ever written.
    pub fn is_empty(&self) -> bool {
        !self.written
    }

    /// Write K and V rows for positions `start..start + rows` of the sequence whose block table
    /// is `table`, in `layer`, as f16 (round to nearest even).
    pub fn write(
        &mut self,
        l: &KvLayout,
        table: &[BlockId],
        start: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let (kd, bs) = (l.kv_dim, l.block_size);
        self.written = true;
        for (r, (kr, vr)) in k.chunks_exact(kd).zip(v.chunks_exact(kd)).enumerate() {
            let p = start + r;
            let b = table[p / bs];
            let ko = offset(l, b, layer, false) + (p % bs) * kd;
            let vo = offset(l, b, layer, true) + (p % bs) * kd;
            self.data[ko..ko + kd].convert_from_f32_slice(kr);
            self.data[vo..vo + kd].convert_from_f32_slice(vr);
        }
    }

    /// Per-block K and V slices (`[block_size × kv_dim]` f16 each) of the blocks in `table`,
    /// in `layer`.
    pub fn layer_blocks(
        &self,
        l: &KvLayout,
        table: &[BlockId],
        layer: usize,
    ) -> (Vec<&[f16]>, Vec<&[f16]>) {
        let n = l.block_size * l.kv_dim;
        let slices = |v: bool| {
            table
                .iter()
                .map(|&b| &self.data[offset(l, b, layer, v)..][..n])
                .collect()
        };
        (slices(false), slices(true))
    }
}

impl KvStorage for HostKv {
    fn alloc(&mut self, l: &KvLayout, b: BlockId) {
        let need = (b as usize + 1) * l.block_elems();
        if self.data.len() < need {
            self.data.resize(need, f16::ZERO);
        }
    }
    fn copy_block(&mut self, l: &KvLayout, c: BlockCopy) {
        let n = l.block_elems();
        let (src, dst) = (c.src as usize * n, c.dst as usize * n);
        self.data.copy_within(src..src + n, dst);
    }
    fn bytes_reserved(&self) -> usize {
        self.data.capacity() * HOST_KV_ELEM_BYTES
    }
}
