//! The KV cache: fixed-size blocks allocated from a byte budget, shared between
//! sequences through a prefix index.
//!
//! * A **block** holds `block_size` positions of K and V for every layer.
//! * A **sequence** owns a block table; position `p` lives in block
//!   `table[p / block_size]` at row `p % block_size`.
//! * A block that is full of known tokens gets a **chain hash**
//!   (hash of the parent block's hash and its own token ids) and is entered in
//!   the prefix index, so a later request with the same prefix maps the same
//!   block instead of recomputing it.
//! * The hash only *finds* a candidate. A hit is taken only when the block's own
//!   token ids equal the prompt's and its parent is the block just matched (the
//!   same block id, not reallocated since), so by induction the whole prefix is
//!   the same and a hash collision can never hand out another prompt's K/V.
//! * Blocks are reference-counted. When the last sequence lets go of a hashed
//!   block it stays in the index as evictable, in LRU order; allocation takes a
//!   free block first, then evicts the least recently used cached one, and
//!   fails with [`KvError::BudgetExhausted`] only when neither exists.
//!
//! Writers only ever append to positions at or beyond a sequence's length, and
//! shared blocks are always full, so a shared block is never written.

/// The host cache's element type.
pub use half::f16;
use half::slice::HalfFloatSliceExt;
use std::collections::{BTreeMap, HashMap};

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

#[derive(Clone, Debug, Default)]
struct Seq {
    blocks: Vec<BlockId>,
    len: usize,
    /// Token ids at every position (for chain hashes).
    tokens: Vec<u32>,
    /// Chain hash of each full block so far.
    hashes: Vec<u64>,
    /// For each full block, the block (id, generation) that the prefix index holds for the same
    /// prefix: the block itself, or an identical one computed by another sequence. A block's key
    /// names its parent this way, so what this sequence adds hangs off the chain a lookup walks.
    canon: Vec<(BlockId, u64)>,
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

/// What a block in the prefix index was computed from, checked on every hit.
#[derive(Clone, Debug)]
struct BlockKey {
    hash: u64,
    /// The block before it in the sequence that computed it, with that block's generation then
    /// (a block's K/V depend on every earlier position, not only on its own tokens).
    parent: Option<(BlockId, u64)>,
    tokens: Box<[u32]>,
}

pub struct PagedKv {
    pub layout: KvLayout,
    /// Longest sequence allowed.
    pub n_ctx: usize,
    /// Whether full blocks are entered in (and looked up from) the prefix index.
    pub prefix_caching: bool,
    /// K and V at f16 (values arrive rounded to f16 precision, so storing them is exact).
    storage: Vec<f16>,
    n_blocks: usize,
    refcount: Vec<u32>,
    /// Set while a block is in the prefix index.
    block_key: Vec<Option<BlockKey>>,
    /// Bumped each time a block is handed out anew, so a stale parent reference never matches.
    block_gen: Vec<u64>,
    /// The chain hash ([`chain_hash`]; tests swap in a degenerate one to force collisions).
    hash_fn: fn(u64, &[u32]) -> u64,
    free: Vec<BlockId>,
    /// Unreferenced hashed blocks: stamp → block (oldest first).
    lru: BTreeMap<u64, BlockId>,
    lru_stamp: Vec<u64>,
    clock: u64,
    index: HashMap<u64, BlockId>,
    seqs: HashMap<SeqId, Seq>,
    next_seq: SeqId,
    pub counters: KvCounters,
    /// K/V storage kept by a backend outside host memory (a GPU model's device pools, indexed by
    /// the same block ids). While it is set, host storage is never allocated: this struct does the
    /// bookkeeping (blocks, prefix index, refcounts, LRU) for both.
    pub device_store: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Bytes the device pools hold (set by the backend that owns `device_store`).
    pub device_bytes: usize,
}

const HASH_SEED: u64 = 0x6a09_e667_f3bc_c909;

/// FNV-1a over the parent hash and the block's token ids.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ parent.rotate_left(17);
    for b in parent
        .to_le_bytes()
        .into_iter()
        .chain(tokens.iter().flat_map(|t| t.to_le_bytes()))
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl PagedKv {
    /// A cache of `n_blocks` blocks. Storage grows as blocks are first used, so
    /// a large budget costs nothing until it is needed.
    pub fn new(layout: KvLayout, n_blocks: usize, n_ctx: usize) -> Self {
        let n_blocks = n_blocks.max(1);
        PagedKv {
            layout,
            n_ctx,
            prefix_caching: true,
            storage: Vec::new(),
            n_blocks,
            refcount: vec![0; n_blocks],
            block_key: vec![None; n_blocks],
            block_gen: vec![0; n_blocks],
            hash_fn: chain_hash,
            free: (0..n_blocks as BlockId).rev().collect(),
            lru: BTreeMap::new(),
            lru_stamp: vec![0; n_blocks],
            clock: 0,
            index: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            counters: KvCounters::default(),
            device_store: None,
            device_bytes: 0,
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    /// Blocks that an allocation could get now (free + evictable).
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.lru.len()
    }
    /// Blocks referenced by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.n_blocks - self.available_blocks()
    }
    pub fn bytes_used(&self) -> usize {
        self.used_blocks() * self.layout.block_bytes()
    }
    pub fn bytes_reserved(&self) -> usize {
        if self.device_store.is_some() {
            self.device_bytes
        } else {
            self.storage.capacity() * HOST_KV_ELEM_BYTES
        }
    }
    pub fn bytes_budget(&self) -> usize {
        self.n_blocks * self.layout.block_bytes()
    }
    pub fn blocks_needed(&self, positions: usize) -> usize {
        positions.div_ceil(self.layout.block_size)
    }

    pub fn new_seq(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(id, Seq::default());
        id
    }
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map(|s| s.len).unwrap_or(0)
    }
    pub fn has_seq(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    fn take_block(&mut self) -> Option<BlockId> {
        let b = if let Some(b) = self.free.pop() {
            b
        } else {
            let (&stamp, &b) = self.lru.iter().next()?;
            self.lru.remove(&stamp);
            if let Some(k) = self.block_key[b as usize].take() {
                self.index.remove(&k.hash);
            }
            self.counters.evictions += 1;
            b
        };
        self.block_gen[b as usize] += 1;
        let need = (b as usize + 1) * self.layout.block_elems();
        if self.device_store.is_none() && self.storage.len() < need {
            self.storage.resize(need, f16::ZERO);
        }
        self.refcount[b as usize] = 1;
        Some(b)
    }

    fn release_block(&mut self, b: BlockId) {
        let rc = &mut self.refcount[b as usize];
        debug_assert!(*rc > 0);
        *rc -= 1;
        if *rc == 0 {
            if self.block_key[b as usize].is_some() {
                self.clock += 1;
                self.lru_stamp[b as usize] = self.clock;
                self.lru.insert(self.clock, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Map the longest run of cached full blocks that prefixes `prompt` into an
    /// empty sequence. At least one prompt token is always left to compute (the
    /// model must see it to produce logits).
    pub fn match_prefix(&mut self, seq: SeqId, prompt: &[u32]) -> Result<PrefixHit, KvError> {
        let bs = self.layout.block_size;
        let mut hit = PrefixHit::default();
        if !self.prefix_caching {
            return Ok(hit);
        }
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSeq(seq))?;
        assert_eq!(s.len, 0, "match_prefix on a non-empty sequence");
        let max_blocks = prompt.len().saturating_sub(1) / bs;
        let mut parent = HASH_SEED;
        let mut mapped: Vec<(BlockId, u64)> = vec![];
        for i in 0..max_blocks {
            let tokens = &prompt[i * bs..(i + 1) * bs];
            let h = (self.hash_fn)(parent, tokens);
            hit.lookups += 1;
            let Some(&b) = self.index.get(&h) else {
                break;
            };
            // The hash is 64 bits and not collision-resistant: take the block only if it holds
            // exactly these tokens after exactly the blocks matched so far.
            let want_parent = mapped.last().map(|&(p, _)| (p, self.block_gen[p as usize]));
            let same = self.block_key[b as usize]
                .as_ref()
                .is_some_and(|k| k.parent == want_parent && *k.tokens == *tokens);
            if !same {
                break;
            }
            mapped.push((b, h));
            parent = h;
        }
        for &(b, _) in &mapped {
            if self.refcount[b as usize] == 0 {
                self.lru.remove(&self.lru_stamp[b as usize]);
            }
            self.refcount[b as usize] += 1;
        }
        let s = self.seqs.get_mut(&seq).unwrap();
        for &(b, h) in &mapped {
            s.blocks.push(b);
            s.hashes.push(h);
            s.canon.push((b, self.block_gen[b as usize]));
        }
        hit.hit_blocks = mapped.len();
        hit.cached_tokens = mapped.len() * bs;
        s.len = hit.cached_tokens;
        s.tokens.extend_from_slice(&prompt[..hit.cached_tokens]);
        self.counters.lookups += hit.lookups as u64;
        self.counters.hit_blocks += hit.hit_blocks as u64;
        Ok(hit)
    }

    /// Make room for `n` more positions of `seq`, allocating blocks. On failure
    /// nothing changes.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<(), KvError> {
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSeq(seq))?;
        let needed_pos = s.len + n;
        if needed_pos > self.n_ctx {
            return Err(KvError::ContextFull {
                needed: needed_pos,
                n_ctx: self.n_ctx,
            });
        }
        let have = s.blocks.len();
        let want = self.blocks_needed(needed_pos);
        if want <= have {
            return Ok(());
        }
        let extra = want - have;
        if extra > self.available_blocks() {
            return Err(KvError::BudgetExhausted {
                needed: extra,
                available: self.available_blocks(),
                total: self.n_blocks,
            });
        }
        for _ in 0..extra {
            let b = self.take_block().expect("checked availability");
            self.seqs.get_mut(&seq).unwrap().blocks.push(b);
        }
        Ok(())
    }

    fn offset(&self, b: BlockId, layer: usize, v: bool) -> usize {
        let l = self.layout;
        ((b as usize * l.n_layers + layer) * 2 + v as usize) * l.block_size * l.kv_dim
    }

    /// Write K and V rows for positions `len..len + rows` of `seq` in `layer`, stored as f16
    /// (round to nearest even; exact for values already at f16 precision, as the model's are).
    /// The positions must be reserved. Not committed until [`PagedKv::commit`].
    pub fn write(&mut self, seq: SeqId, layer: usize, k: &[f32], v: &[f32]) {
        let kd = self.layout.kv_dim;
        let bs = self.layout.block_size;
        let s = &self.seqs[&seq];
        let start = s.len;
        let blocks = s.blocks.clone();
        for (r, (kr, vr)) in k.chunks_exact(kd).zip(v.chunks_exact(kd)).enumerate() {
            let p = start + r;
            let b = blocks[p / bs];
            debug_assert_eq!(self.refcount[b as usize], 1, "writing a shared block");
            let ko = self.offset(b, layer, false) + (p % bs) * kd;
            let vo = self.offset(b, layer, true) + (p % bs) * kd;
            self.storage[ko..ko + kd].convert_from_f32_slice(kr);
            self.storage[vo..vo + kd].convert_from_f32_slice(vr);
        }
    }

    /// The block ids holding `seq`'s positions, in order (position `p` is in `table[p / block_size]`).
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        &self.seqs[&seq].blocks
    }

    /// Per-block K and V slices (`[block_size × kv_dim]` f16 each) of `seq` in `layer`.
    pub fn layer_blocks(&self, seq: SeqId, layer: usize) -> (Vec<&[f16]>, Vec<&[f16]>) {
        let n = self.layout.block_size * self.layout.kv_dim;
        let s = &self.seqs[&seq];
        let k = s
            .blocks
            .iter()
            .map(|&b| &self.storage[self.offset(b, layer, false)..][..n])
            .collect();
        let v = s
            .blocks
            .iter()
            .map(|&b| &self.storage[self.offset(b, layer, true)..][..n])
            .collect();
        (k, v)
    }

    /// Mark `tokens` (just written) as part of `seq`, and enter newly full
    /// blocks in the prefix index.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) {
        let bs = self.layout.block_size;
        let s = self.seqs.get_mut(&seq).expect("commit on unknown sequence");
        s.len += tokens.len();
        s.tokens.extend_from_slice(tokens);
        if !self.prefix_caching {
            return;
        }
        loop {
            let s = &self.seqs[&seq];
            let i = s.hashes.len();
            if i >= s.len / bs {
                break;
            }
            let parent_hash = if i == 0 { HASH_SEED } else { s.hashes[i - 1] };
            let own: Box<[u32]> = s.tokens[i * bs..(i + 1) * bs].into();
            let h = (self.hash_fn)(parent_hash, &own);
            let b = s.blocks[i];
            let parent = (i > 0).then(|| s.canon[i - 1]);
            let mine = (b, self.block_gen[b as usize]);
            let key = BlockKey {
                hash: h,
                parent,
                tokens: own,
            };
            let canon = match self.index.get(&h).copied() {
                None => {
                    self.block_key[b as usize] = Some(key);
                    self.index.insert(h, b);
                    mine
                }
                Some(old) => {
                    let old_key = self.block_key[old as usize]
                        .as_ref()
                        .expect("indexed blocks have a key");
                    if old_key.parent == parent && old_key.tokens == key.tokens {
                        // The same prefix computed by another sequence: that block stays the
                        // shared one and this copy stays private.
                        (old, self.block_gen[old as usize])
                    } else if !self.live(old_key.parent) && self.live(parent) {
                        // The entry hangs off an evicted parent, so no lookup reaches it: this
                        // block, which one can reach, takes its place.
                        self.unindex(old);
                        self.block_key[b as usize] = Some(key);
                        self.index.insert(h, b);
                        mine
                    } else {
                        // A hash collision with a live block: this one stays private.
                        mine
                    }
                }
            };
            let s = self.seqs.get_mut(&seq).unwrap();
            s.hashes.push(h);
            s.canon.push(canon);
        }
    }

    /// Whether a parent reference still names an indexed block as it was (None: the first block).
    fn live(&self, parent: Option<(BlockId, u64)>) -> bool {
        parent.is_none_or(|(p, g)| {
            self.block_gen[p as usize] == g && self.block_key[p as usize].is_some()
        })
    }

    /// Take a block out of the prefix index; unreferenced, it goes straight to the free list.
    fn unindex(&mut self, b: BlockId) {
        if let Some(k) = self.block_key[b as usize].take() {
            self.index.remove(&k.hash);
            if self.refcount[b as usize] == 0 {
                self.lru.remove(&self.lru_stamp[b as usize]);
                self.free.push(b);
            }
        }
    }

    /// Drop a sequence, releasing its blocks (hashed ones stay cached).
    pub fn free_seq(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for b in s.blocks {
                self.release_block(b);
            }
        }
    }

    /// Drop positions from `pos` on (e.g. rejected speculative tokens).
    pub fn truncate(&mut self, seq: SeqId, pos: usize) {
        let bs = self.layout.block_size;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        if pos >= s.len {
            return;
        }
        s.len = pos;
        s.tokens.truncate(pos);
        s.hashes.truncate(pos / bs);
        s.canon.truncate(pos / bs);
        let keep = pos.div_ceil(bs);
        let dropped: Vec<BlockId> = s.blocks.drain(keep..).collect();
        for b in dropped {
            self.release_block(b);
        }
        // A partially kept block that was shared must not be written: give this
        // sequence a private copy before it appends again.
        if !pos.is_multiple_of(bs) {
            let i = keep - 1;
            let b = self.seqs[&seq].blocks[i];
            if (self.refcount[b as usize] > 1 || self.block_key[b as usize].is_some())
                && let Some(nb) = self.take_block()
            {
                let n = self.layout.block_elems();
                let (src, dst) = (b as usize * n, nb as usize * n);
                self.storage.copy_within(src..src + n, dst);
                self.seqs.get_mut(&seq).unwrap().blocks[i] = nb;
                self.release_block(b);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout::new(2, 3, 4)
    }

    fn fill(kv: &mut PagedKv, seq: SeqId, tokens: &[u32]) {
        kv.reserve(seq, tokens.len()).unwrap();
        for l in 0..2 {
            let k: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| [t as f32, l as f32, 0.0])
                .collect();
            kv.write(seq, l, &k, &k);
        }
        kv.commit(seq, tokens);
    }

    #[test]
    fn prefix_blocks_are_shared_and_leave_one_token() {
        let mut kv = PagedKv::new(layout(), 8, 64);
        let a = kv.new_seq();
        let prompt: Vec<u32> = (0..10).collect();
        fill(&mut kv, a, &prompt);
        assert_eq!(kv.used_blocks(), 3);
        let b = kv.new_seq();
        let hit = kv.match_prefix(b, &prompt).unwrap();
        assert_eq!(
            hit,
            PrefixHit {
                lookups: 2,
                hit_blocks: 2,
                cached_tokens: 8
            }
        );
        assert_eq!(kv.used_blocks(), 3, "shared, not copied");
        // Same values visible through b's table.
        let (ka, _) = kv.layer_blocks(a, 1);
        let (kb, _) = kv.layer_blocks(b, 1);
        assert_eq!(ka[1], kb[1]);
        // A prompt of exactly two blocks reuses only one: the last token must be computed.
        let c = kv.new_seq();
        assert_eq!(kv.match_prefix(c, &prompt[..8]).unwrap().cached_tokens, 4);
        // A different first block misses everything.
        let d = kv.new_seq();
        let other: Vec<u32> = (100..110).collect();
        assert_eq!(kv.match_prefix(d, &other).unwrap().hit_blocks, 0);
    }

    #[test]
    fn released_blocks_stay_cached_until_evicted_lru() {
        let mut kv = PagedKv::new(layout(), 4, 64);
        let a = kv.new_seq();
        fill(&mut kv, a, &[1, 2, 3, 4, 5, 6, 7, 8]);
        kv.free_seq(a);
        assert_eq!(kv.available_blocks(), 4);
        let b = kv.new_seq();
        assert_eq!(
            kv.match_prefix(b, &[1, 2, 3, 4, 5, 6, 7, 8, 9])
                .unwrap()
                .hit_blocks,
            2
        );
        kv.free_seq(b);
        // Fill the whole budget with new tokens: both cached blocks get evicted.
        let c = kv.new_seq();
        fill(&mut kv, c, &(50..66).collect::<Vec<_>>());
        assert_eq!(kv.counters.evictions, 2);
        let d = kv.new_seq();
        assert!(matches!(
            kv.reserve(d, 1),
            Err(KvError::BudgetExhausted {
                needed: 1,
                available: 0,
                total: 4
            })
        ));
        kv.free_seq(c);
        assert_eq!(
            kv.match_prefix(d, &[1, 2, 3, 4, 5]).unwrap().hit_blocks,
            0,
            "evicted"
        );
    }

    #[test]
    fn context_limit_and_truncate() {
        let mut kv = PagedKv::new(layout(), 8, 6);
        let a = kv.new_seq();
        assert!(matches!(
            kv.reserve(a, 7),
            Err(KvError::ContextFull {
                needed: 7,
                n_ctx: 6
            })
        ));
        fill(&mut kv, a, &[1, 2, 3, 4, 5]);
        kv.truncate(a, 2);
        assert_eq!(kv.seq_len(a), 2);
        assert_eq!(kv.used_blocks(), 1);
    }

    /// Every block hashes alike: every lookup finds some block.
    fn constant_hash(_: u64, _: &[u32]) -> u64 {
        7
    }

    /// The block's own tokens only: equal blocks after different prefixes collide.
    fn tokens_only_hash(_: u64, tokens: &[u32]) -> u64 {
        chain_hash(0, tokens)
    }

    #[test]
    fn a_hash_collision_never_maps_another_prompts_block() {
        let mut kv = PagedKv::new(layout(), 8, 64);
        kv.hash_fn = constant_hash;
        let a = kv.new_seq();
        fill(&mut kv, a, &[1, 2, 3, 4, 5]);
        kv.free_seq(a);
        // Same hash, other tokens: a miss, not a's K/V.
        let b = kv.new_seq();
        let hit = kv.match_prefix(b, &[9, 9, 9, 9, 9]).unwrap();
        assert_eq!((hit.hit_blocks, hit.cached_tokens), (0, 0), "{hit:?}");
        assert_eq!(kv.seq_len(b), 0);
        assert!(kv.block_table(b).is_empty());
        // The true prefix still hits.
        let c = kv.new_seq();
        assert_eq!(kv.match_prefix(c, &[1, 2, 3, 4, 5]).unwrap().hit_blocks, 1);
    }

    #[test]
    fn equal_tokens_after_another_prefix_are_a_miss() {
        let mut kv = PagedKv::new(layout(), 8, 64);
        kv.hash_fn = tokens_only_hash;
        let a = kv.new_seq();
        fill(&mut kv, a, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let c = kv.new_seq();
        fill(&mut kv, c, &[9, 9, 9, 9]);
        // d's second block has a's second-block tokens (and hash) but follows c's first block:
        // a's second block was computed after other tokens, so only the first block is shared.
        let d = kv.new_seq();
        let hit = kv.match_prefix(d, &[9, 9, 9, 9, 5, 6, 7, 8, 0]).unwrap();
        assert_eq!((hit.hit_blocks, hit.cached_tokens), (1, 4), "{hit:?}");
        assert_eq!(kv.block_table(d), &kv.block_table(c)[..1]);
    }

    #[test]
    fn a_prefix_computed_twice_stays_one_reachable_chain() {
        // a and b compute the same first block side by side (neither found it cached); b goes on.
        let mut kv = PagedKv::new(layout(), 8, 64);
        let a = kv.new_seq();
        let b = kv.new_seq();
        fill(&mut kv, a, &[1, 2, 3, 4]);
        fill(&mut kv, b, &[1, 2, 3, 4, 5, 6, 7, 8]);
        // b's second block hangs off a's copy of the first (the indexed one), so it is found.
        let c = kv.new_seq();
        let hit = kv.match_prefix(c, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        assert_eq!(hit.hit_blocks, 2, "{hit:?}");
        assert_eq!(
            kv.block_table(c),
            [kv.block_table(a)[0], kv.block_table(b)[1]]
        );
    }

    #[test]
    fn an_entry_orphaned_by_eviction_gives_way() {
        let mut kv = PagedKv::new(layout(), 3, 64);
        let a = kv.new_seq();
        fill(&mut kv, a, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let x = kv.new_seq();
        fill(&mut kv, x, &[50]);
        kv.free_seq(a);
        // y evicts a's first block only (the oldest); a's second stays cached, unreachable.
        let y = kv.new_seq();
        fill(&mut kv, y, &[60]);
        assert_eq!(kv.counters.evictions, 1);
        kv.free_seq(x);
        kv.free_seq(y);
        let c = kv.new_seq();
        assert_eq!(
            kv.match_prefix(c, &[1, 2, 3, 4, 5, 6, 7, 8, 9])
                .unwrap()
                .hit_blocks,
            0
        );
        fill(&mut kv, c, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(kv.counters.evictions, 1, "c took free blocks");
        // c's second block replaced the orphan in the index: the whole prefix is found again.
        let d = kv.new_seq();
        let hit = kv.match_prefix(d, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        assert_eq!(hit.hit_blocks, 2, "{hit:?}");
        assert_eq!(kv.block_table(d), kv.block_table(c));
        assert_eq!(
            (kv.free.len(), kv.lru.len()),
            (1, 0),
            "the orphan went to the free list"
        );
    }

    #[test]
    fn truncating_into_a_shared_block_copies_it() {
        let mut kv = PagedKv::new(layout(), 8, 64);
        let a = kv.new_seq();
        fill(&mut kv, a, &[1, 2, 3, 4, 5]);
        let b = kv.new_seq();
        kv.match_prefix(b, &[1, 2, 3, 4, 9]).unwrap();
        kv.truncate(b, 2);
        fill(&mut kv, b, &[7, 7]);
        let (ka, _) = kv.layer_blocks(a, 0);
        assert_eq!(ka[0][2 * 3].to_f32(), 3.0, "a's block untouched");
        let (kb, _) = kv.layer_blocks(b, 0);
        assert_eq!(kb[0][2 * 3].to_f32(), 7.0);
    }
}
