//! K/V values on a burn device, for the device decoder: one pool per layer and kind
//! (`[slots, kv_dim]`, slot = `block · block_size + row`), f32 at f16 precision (lavapipe has no
//! f16 storage). [`super::PagedKv::device_mut`] allocates them whole, for every block of the
//! budget; [`DeviceKv::ensure_slots`] grows them by doubling only for a caller that made them
//! smaller.

use crate::backend::{Device, Tensor};

use super::{BlockCopy, BlockId, KvLayout, KvStorage};

/// Device pools for the blocks of one cache.
pub struct DeviceKv {
    device: Device,
    layout: KvLayout,
    /// Slots per pool.
    cap: usize,
    k: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
}

impl DeviceKv {
    pub fn new(device: Device, layout: KvLayout) -> Self {
        DeviceKv {
            device,
            layout,
            cap: 0,
            k: vec![],
            v: vec![],
        }
    }

    /// The slot of every position `0..end` of a sequence whose block table is `table`. (The
    /// device decoder computes slots as it uploads the block tables; this and [`Self::write`] /
    /// [`Self::gather`] let the tests reach the pools on burn-flex.)
    #[cfg(test)]
    pub fn slots(&self, table: &[BlockId], end: usize) -> Vec<usize> {
        let bs = self.layout.block_size;
        (0..end)
            .map(|p| table[p / bs] as usize * bs + p % bs)
            .collect()
    }

    /// Grow every pool to at least `slots` slots (exactly, the first time; doubling after).
    pub fn ensure_slots(&mut self, slots: usize) {
        if slots <= self.cap {
            return;
        }
        let (kv_dim, device) = (self.layout.kv_dim, &self.device);
        // The first allocation is exact (the whole budget); growth doubles.
        let new_cap = if self.cap == 0 {
            slots
        } else {
            slots.max(2 * self.cap)
        };
        let extra = new_cap - self.cap;
        let grow = |old: Option<Tensor<2>>| {
            let extra = Tensor::<2>::zeros([extra, kv_dim], device);
            match old {
                Some(o) => Tensor::cat(vec![o, extra], 0),
                None => extra,
            }
        };
        if self.k.is_empty() {
            let n = self.layout.n_layers;
            self.k = (0..n).map(|_| grow(None)).collect();
            self.v = (0..n).map(|_| grow(None)).collect();
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

    /// Store rows `row0..row0 + slots.len()` of `k` and `v` (`[rows, kv_dim]`) in `layer`'s
    /// pools at `slots`, one contiguous run of slots at a time.
    #[cfg(test)]
    pub fn write(
        &mut self,
        layer: usize,
        k: &Tensor<2>,
        v: &Tensor<2>,
        row0: usize,
        slots: &[usize],
    ) {
        let kv_dim = self.layout.kv_dim;
        let (mut kp, mut vp) = (self.k[layer].clone(), self.v[layer].clone());
        let mut i = 0;
        while i < slots.len() {
            let s0 = slots[i];
            let mut j = i + 1;
            while j < slots.len() && slots[j] == s0 + (j - i) {
                j += 1;
            }
            let rows = row0 + i..row0 + j;
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
        self.k[layer] = kp;
        self.v[layer] = vp;
    }

    /// `layer`'s K and V pools (`[slots, kv_dim]`, contiguous), for kernels that read the
    /// cache in place or write rows into it.
    pub fn pools(&self, layer: usize) -> (&Tensor<2>, &Tensor<2>) {
        (&self.k[layer], &self.v[layer])
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    /// `layer`'s K and V rows at `slots` (`[slots.len(), kv_dim]` each).
    #[cfg(test)]
    pub fn gather(&self, layer: usize, slots: &[usize]) -> (Tensor<2>, Tensor<2>) {
        use crate::tensor_ops::gather_rows;
        (
            gather_rows(self.k[layer].clone(), slots),
            gather_rows(self.v[layer].clone(), slots),
        )
    }
}

impl KvStorage for DeviceKv {
    /// Nothing: the decoder grows the pools once per forward pass for every slot it touches
    /// ([`DeviceKv::ensure_slots`]); growing block by block would copy them many times in one
    /// prefill.
    fn alloc(&mut self, _: &KvLayout, _: BlockId) {}
    fn copy_block(&mut self, l: &KvLayout, c: BlockCopy) {
        let (bs, kv_dim) = (l.block_size, l.kv_dim);
        let (src, dst) = (c.src as usize * bs, c.dst as usize * bs);
        self.ensure_slots(src.max(dst) + bs);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let rows = t.clone().slice([src..src + bs, 0..kv_dim]);
            *t = t.clone().slice_assign([dst..dst + bs, 0..kv_dim], rows);
        }
    }
    fn bytes_reserved(&self) -> usize {
        2 * self.k.len() * self.cap * self.layout.kv_dim * std::mem::size_of::<f32>()
    }
}
