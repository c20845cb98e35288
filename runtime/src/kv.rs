//! KV cache for one sequence: per layer, keys and values as
//! `[position × n_kv_heads·head_dim]` f32 rows, grown on demand up to `n_ctx`.
//!
//! This is the contiguous cache that the paged prefix cache will sit beside;
//! models only see [`KvCache::append`] and the per-layer views.

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("context full: {needed} positions needed, the context holds {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
}

#[derive(Clone, Debug)]
pub struct KvCache {
    pub n_layers: usize,
    pub kv_dim: usize,
    pub n_ctx: usize,
    /// Committed positions (all layers agree once a forward pass finishes).
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize, n_ctx: usize) -> Self {
        KvCache { n_layers, kv_dim, n_ctx, len: 0, k: vec![Vec::new(); n_layers], v: vec![Vec::new(); n_layers] }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Check that `n` more positions fit, before any work is done.
    pub fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        let needed = self.len + n;
        if needed > self.n_ctx {
            return Err(KvError::ContextFull { needed, n_ctx: self.n_ctx });
        }
        for l in 0..self.n_layers {
            self.k[l].reserve(n * self.kv_dim);
            self.v[l].reserve(n * self.kv_dim);
        }
        Ok(())
    }
    /// Store new rows for `layer` at positions `len..len + n` (not yet committed).
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(self.k[layer].len(), self.len * self.kv_dim);
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
    }
    /// Keys and values of `layer` for all stored positions, including uncommitted ones.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
    /// Mark `n` appended positions as part of the sequence.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.k.iter().all(|k| k.len() == self.len * self.kv_dim));
    }
    /// Drop everything from position `pos` on (for rewinding, e.g. speculative decoding).
    pub fn truncate(&mut self, pos: usize) {
        let pos = pos.min(self.len);
        for l in 0..self.n_layers {
            self.k[l].truncate(pos * self.kv_dim);
            self.v[l].truncate(pos * self.kv_dim);
        }
        self.len = pos;
    }
    pub fn clear(&mut self) {
        self.truncate(0)
    }
    /// Bytes holding cached positions.
    pub fn bytes_used(&self) -> usize {
        2 * self.n_layers * self.len * self.kv_dim * 4
    }
    /// Bytes allocated.
    pub fn bytes_reserved(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.capacity() * 4).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn append_commit_truncate_and_full() {
        let mut kv = KvCache::new(2, 3, 4);
        kv.reserve(2).unwrap();
        for l in 0..2 {
            kv.append(l, &[1.0; 6], &[2.0; 6]);
        }
        kv.commit(2);
        assert_eq!(kv.len(), 2);
        assert_eq!(kv.layer(1).0.len(), 6);
        assert_eq!(kv.bytes_used(), 2 * 2 * 2 * 3 * 4);
        assert!(matches!(kv.reserve(3), Err(KvError::ContextFull { needed: 5, n_ctx: 4 })));
        kv.truncate(1);
        assert_eq!(kv.layer(0).1, &[2.0; 3]);
    }
}
