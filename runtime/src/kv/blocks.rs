//! The block manager: which block holds which positions of which sequence, and which blocks
//! are shared. Bookkeeping only; the K/V values live in a [`super::KvStorage`], indexed by the
//! block ids handed out here.
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

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::{BlockId, KvCounters, KvError, KvLayout, PrefixHit, SeqId};

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

/// What a block in the prefix index was computed from, checked on every hit.
#[derive(Clone, Debug)]
struct BlockKey {
    hash: u64,
    /// The block before it in the sequence that computed it, with that block's generation then
    /// (a block's K/V depend on every earlier position, not only on its own tokens).
    parent: Option<(BlockId, u64)>,
    tokens: Box<[u32]>,
}

/// Blocks, block tables, refcounts, the prefix index and the LRU of cached blocks, for one
/// cache. It never touches a K or V value: [`super::PagedKv`] pairs it with the storage and
/// applies what [`BlockManager::allocate`] and [`BlockManager::truncate_table`] report.
pub struct BlockManager {
    pub layout: KvLayout,
    /// Longest sequence allowed.
    pub n_ctx: usize,
    /// Whether full blocks are entered in (and looked up from) the prefix index.
    pub prefix_caching: bool,
    n_blocks: usize,
    refcount: Vec<u32>,
    /// Set while a block is in the prefix index.
    block_key: Vec<Option<BlockKey>>,
    /// Bumped each time a block is handed out anew, so a stale parent reference never matches.
    block_gen: Vec<u64>,
    /// The chain hash ([`chain_hash`]; tests swap in a degenerate one to force collisions).
    pub(super) hash_fn: fn(u64, &[u32]) -> u64,
    pub(super) free: Vec<BlockId>,
    /// Unreferenced hashed blocks: stamp → block (oldest first).
    pub(super) lru: BTreeMap<u64, BlockId>,
    lru_stamp: Vec<u64>,
    clock: u64,
    index: HashMap<u64, BlockId>,
    seqs: HashMap<SeqId, Seq>,
    next_seq: SeqId,
    pub counters: KvCounters,
}

/// A block copy the storage must make (copy-on-write, see [`BlockManager::truncate_table`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the storage must copy the block's values"]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
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

impl BlockManager {
    /// `n_blocks` blocks (at least one), all free.
    pub fn new(layout: KvLayout, n_blocks: usize, n_ctx: usize) -> Self {
        let n_blocks = n_blocks.max(1);
        BlockManager {
            layout,
            n_ctx,
            prefix_caching: true,
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

    /// Make room for `n` more positions of `seq`, allocating blocks; returns the entries of its
    /// block table that got a new block (the storage must make room for them). On failure
    /// nothing changes.
    #[must_use = "the storage must make room for the new blocks"]
    pub fn allocate(&mut self, seq: SeqId, n: usize) -> Result<Range<usize>, KvError> {
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
            return Ok(have..have);
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
        Ok(have..want)
    }

    /// The block ids holding `seq`'s positions, in order (position `p` is in `table[p / block_size]`).
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        &self.seqs[&seq].blocks
    }

    /// How many sequences hold block `b`.
    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refcount[b as usize]
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

    /// Drop positions from `pos` on (e.g. rejected speculative tokens). A block cut in the
    /// middle that others share gets replaced by a private one, which the storage must fill
    /// with the shared block's values (the [`BlockCopy`] returned) before anything else is
    /// allocated: the shared block may have gone back to the LRU.
    pub fn truncate_table(&mut self, seq: SeqId, pos: usize) -> Option<BlockCopy> {
        let bs = self.layout.block_size;
        let s = self.seqs.get_mut(&seq)?;
        if pos >= s.len {
            return None;
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
                self.seqs.get_mut(&seq).unwrap().blocks[i] = nb;
                self.release_block(b);
                return Some(BlockCopy { src: b, dst: nb });
            }
            // No block to copy into: a block only this sequence holds leaves the prefix index
            // instead (it is about to be overwritten, so no lookup may find it).
            if self.refcount[b as usize] == 1 {
                self.unindex(b);
            }
        }
        None
    }
}
