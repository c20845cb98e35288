//! The KV cache: fixed-size blocks allocated from a byte budget, shared between sequences
//! through a prefix index. Bookkeeping and storage are kept apart, as llama.cpp's
//! `llama_kv_cells` and mistral.rs's block pool keep them:
//!
//! * [`BlockManager`] (`kv/blocks.rs`): block tables, refcounts, the prefix index (a chain hash
//!   finds a candidate; its tokens and parent block are checked on every hit) and the LRU of
//!   cached blocks. It hands out block ids and never touches a K or V value.
//! * [`KvStorage`]: where the values of those blocks live, indexed by the same ids. [`HostKv`]
//!   (`kv/host.rs`) holds f16 rows in host memory for the CPU decoder; `DeviceKv`
//!   (`kv/device.rs`, with burn) holds one pool per layer on a burn device for the device
//!   decoder. [`KvStore`] is one or the other, so each decoder reaches its own without a
//!   downcast.
//! * [`PagedKv`]: a manager and its storage, as the models and the scheduler use them. The
//!   manager's methods are reached through it (it derefs to the manager); the ones that must
//!   keep storage in step ([`PagedKv::reserve`], [`PagedKv::truncate`]) are its own.
//! * [`KvCache`]: one sequence over a cache of its own (`Engine::generate`, tests, benchmarks).

mod blocks;
#[cfg(feature = "burn")]
mod device;
mod host;
#[cfg(test)]
mod tests;

pub use blocks::{BlockCopy, BlockManager, chain_hash};
#[cfg(feature = "burn")]
pub use device::DeviceKv;
/// The host cache's element type.
pub use half::f16;
pub use host::HostKv;

pub type SeqId = u64;
pub type BlockId = u32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("context full: {needed} positions needed, the context holds {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error(
        "KV budget exhausted: {needed} more blocks needed, {available} free or evictable of {total}"
    )]
    BudgetExhausted {
        needed: usize,
        available: usize,
        total: usize,
    },
    #[error("unknown sequence {0}")]
    UnknownSeq(SeqId),
}

/// Bytes per K/V element in the host cache: f16, llama.cpp's default cache type.
pub const HOST_KV_ELEM_BYTES: usize = std::mem::size_of::<f16>();

/// Shape of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub kv_dim: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Bytes per stored element: [`HOST_KV_ELEM_BYTES`] for the host cache; a backend that keeps
    /// its own pools says what its elements take (f32 pools on wgpu: 4), so a byte budget buys
    /// the blocks that really fit.
    pub elem_bytes: usize,
}

impl KvLayout {
    /// A host-cache layout (f16 elements).
    pub fn new(n_layers: usize, kv_dim: usize, block_size: usize) -> Self {
        KvLayout {
            n_layers,
            kv_dim,
            block_size,
            elem_bytes: HOST_KV_ELEM_BYTES,
        }
    }
    /// Values in one block (K and V, all layers).
    pub fn block_elems(&self) -> usize {
        2 * self.n_layers * self.block_size * self.kv_dim
    }
    pub fn block_bytes(&self) -> usize {
        self.block_elems() * self.elem_bytes
    }
    /// How many blocks fit a byte budget (at least one).
    pub fn blocks_for_budget(&self, bytes: usize) -> usize {
        (bytes / self.block_bytes()).max(1)
    }
}

/// Counters since the cache was made (a run takes differences).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvCounters {
    pub lookups: u64,
    pub hit_blocks: u64,
    pub evictions: u64,
}

/// Result of matching a prompt against the prefix index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// Blocks looked up.
    pub lookups: usize,
    /// Leading full blocks found and mapped.
    pub hit_blocks: usize,
    /// Prompt tokens that need no computation.
    pub cached_tokens: usize,
}

/// Where the K and V values of a [`BlockManager`]'s blocks live. The manager says which block
/// ids are handed out and which must be copied; how values are written and read differs by
/// storage (host slices, device tensors), so those are each implementation's own methods.
pub trait KvStorage {
    /// Block `b` was just handed out (new, or reused after a free or an eviction).
    fn alloc(&mut self, layout: &KvLayout, b: BlockId);
    /// Copy every layer's K and V of block `c.src` into block `c.dst`.
    fn copy_block(&mut self, layout: &KvLayout, c: BlockCopy);
    /// Bytes this storage holds now.
    fn bytes_reserved(&self) -> usize;
}

/// The storage of one [`PagedKv`]. An enum rather than a boxed trait object so that each
/// decoder reaches its own storage type without a downcast.
pub enum KvStore {
    Host(HostKv),
    #[cfg(feature = "burn")]
    Device(DeviceKv),
}

impl KvStorage for KvStore {
    fn alloc(&mut self, layout: &KvLayout, b: BlockId) {
        match self {
            KvStore::Host(h) => h.alloc(layout, b),
            #[cfg(feature = "burn")]
            KvStore::Device(d) => d.alloc(layout, b),
        }
    }
    fn copy_block(&mut self, layout: &KvLayout, c: BlockCopy) {
        match self {
            KvStore::Host(h) => h.copy_block(layout, c),
            #[cfg(feature = "burn")]
            KvStore::Device(d) => d.copy_block(layout, c),
        }
    }
    fn bytes_reserved(&self) -> usize {
        match self {
            KvStore::Host(h) => h.bytes_reserved(),
            #[cfg(feature = "burn")]
            KvStore::Device(d) => d.bytes_reserved(),
        }
    }
}

/// A block manager and the storage of its blocks. It starts with an empty host storage; a
/// device decoder swaps in its pools on first use ([`PagedKv::device_mut`]). One cache serves
/// one backend.
pub struct PagedKv {
    blocks: BlockManager,
    store: KvStore,
}

impl std::ops::Deref for PagedKv {
    type Target = BlockManager;
    fn deref(&self) -> &BlockManager {
        &self.blocks
    }
}

impl std::ops::DerefMut for PagedKv {
    fn deref_mut(&mut self) -> &mut BlockManager {
        &mut self.blocks
    }
}

impl PagedKv {
    /// A cache of `n_blocks` blocks. Storage grows as blocks are first used, so
    /// a large budget costs nothing until it is needed.
    pub fn new(layout: KvLayout, n_blocks: usize, n_ctx: usize) -> Self {
        PagedKv {
            blocks: BlockManager::new(layout, n_blocks, n_ctx),
            store: KvStore::Host(HostKv::default()),
        }
    }

    pub fn bytes_reserved(&self) -> usize {
        self.store.bytes_reserved()
    }

    /// Claim host storage for every block of the budget now (written, so the pages are
    /// resident), instead of growing it as blocks are first used: a long-running server's
    /// memory then stays where it started (`ember serve`), as llama.cpp's context is
    /// allocated whole. Nothing to do for a device storage, or once some storage exists.
    pub fn preallocate(&mut self) {
        if let KvStore::Host(h) = &mut self.store
            && h.bytes_reserved() == 0
        {
            let last = (self.blocks.n_blocks() - 1) as BlockId;
            h.alloc(&self.blocks.layout, last);
        }
    }

    /// Make room for `n` more positions of `seq`, allocating blocks. On failure
    /// nothing changes.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<(), KvError> {
        let new = self.blocks.allocate(seq, n)?;
        for &b in &self.blocks.block_table(seq)[new] {
            self.store.alloc(&self.blocks.layout, b);
        }
        Ok(())
    }

    /// Drop positions from `pos` on (e.g. rejected speculative tokens).
    pub fn truncate(&mut self, seq: SeqId, pos: usize) {
        if let Some(c) = self.blocks.truncate_table(seq, pos) {
            self.store.alloc(&self.blocks.layout, c.dst);
            self.store.copy_block(&self.blocks.layout, c);
        }
    }

    /// Write K and V rows for positions `len..len + rows` of `seq` in `layer` to the host
    /// storage, as f16 (round to nearest even; exact for values already at f16 precision, as
    /// the model's are). The positions must be reserved. Not committed until
    /// [`BlockManager::commit`].
    pub fn write(&mut self, seq: SeqId, layer: usize, k: &[f32], v: &[f32]) {
        let m = &self.blocks;
        let start = m.seq_len(seq);
        let table = m.block_table(seq);
        debug_assert!(
            (start..start + k.len() / m.layout.kv_dim)
                .all(|p| m.refcount(table[p / m.layout.block_size]) == 1),
            "writing a shared block"
        );
        self.store
            .host_mut()
            .write(&m.layout, table, start, layer, k, v);
    }

    /// Per-block K and V slices (`[block_size × kv_dim]` f16 each) of `seq` in `layer`, from
    /// the host storage.
    pub fn layer_blocks(&self, seq: SeqId, layer: usize) -> (Vec<&[f16]>, Vec<&[f16]>) {
        self.store
            .host()
            .layer_blocks(&self.blocks.layout, self.blocks.block_table(seq), layer)
    }

    /// The device pools, made on `device` on first use, whole: every block of the budget
    /// (`n_blocks`) gets its slots at once, so the pools never grow (and never copy) while
    /// sequences run. The cache must not hold host values (room the host storage made for
    /// blocks reserved so far is dropped).
    #[cfg(feature = "burn")]
    pub fn device_mut(&mut self, device: &crate::backend::Device) -> &mut DeviceKv {
        if let KvStore::Host(h) = &self.store {
            assert!(h.is_empty(), "a PagedKv is used by one backend");
            let layout = self.blocks.layout;
            let mut d = DeviceKv::new(device.clone(), layout);
            d.ensure_slots(self.blocks.n_blocks() * layout.block_size);
            self.store = KvStore::Device(d);
        }
        match &mut self.store {
            KvStore::Device(d) => d,
            KvStore::Host(_) => unreachable!("set above"),
        }
    }

    /// The device pools ([`PagedKv::device_mut`] made them).
    #[cfg(feature = "burn")]
    pub fn device(&self) -> &DeviceKv {
        match &self.store {
            KvStore::Device(d) => d,
            KvStore::Host(_) => panic!("this cache holds host values, not device pools"),
        }
    }
}

impl KvStore {
    fn host(&self) -> &HostKv {
        match self {
            KvStore::Host(h) => h,
            #[cfg(feature = "burn")]
            KvStore::Device(_) => panic!("this cache holds device pools, not host values"),
        }
    }
    fn host_mut(&mut self) -> &mut HostKv {
        match self {
            KvStore::Host(h) => h,
            #[cfg(feature = "burn")]
            KvStore::Device(_) => panic!("this cache holds device pools, not host values"),
        }
    }
}

/// A single sequence over its own paged cache: the simple case (one request,
/// no sharing) used by `Engine::generate`, tests and benchmarks.
pub struct KvCache {
    pub pages: PagedKv,
    pub seq: SeqId,
}

/// Positions per block for single-sequence caches and the default server.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize, n_ctx: usize) -> Self {
        let layout = KvLayout::new(n_layers, kv_dim, DEFAULT_BLOCK_SIZE);
        let mut pages = PagedKv::new(layout, n_ctx.div_ceil(DEFAULT_BLOCK_SIZE), n_ctx);
        pages.prefix_caching = false;
        let seq = pages.new_seq();
        KvCache { pages, seq }
    }
    pub fn len(&self) -> usize {
        self.pages.seq_len(self.seq)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn n_ctx(&self) -> usize {
        self.pages.n_ctx
    }
    pub fn truncate(&mut self, pos: usize) {
        self.pages.truncate(self.seq, pos)
    }
    pub fn clear(&mut self) {
        self.truncate(0)
    }
    pub fn bytes_used(&self) -> usize {
        self.pages.bytes_used()
    }
    pub fn bytes_reserved(&self) -> usize {
        self.pages.bytes_reserved()
    }
}
