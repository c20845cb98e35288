//! The block manager's bookkeeping and the storages, through [`PagedKv`].

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

/// The device pools follow the same bookkeeping: a truncation inside a shared block copies it
/// on the device (burn-flex here), so the other sequence's values stay as they were.
#[cfg(feature = "burn")]
#[test]
fn truncating_into_a_shared_block_copies_it_on_the_device() {
    use crate::backend::{Device, Tensor, TensorData};
    let dev = crate::backend::cpu();
    let fill_dev = |kv: &mut PagedKv, seq: SeqId, tokens: &[u32], dev: &Device| {
        kv.reserve(seq, tokens.len()).unwrap();
        let (pos0, table) = (kv.seq_len(seq), kv.block_table(seq).to_vec());
        let store = kv.device_mut(dev);
        let slots = store.slots(&table, pos0 + tokens.len());
        store.ensure_slots(slots.iter().max().unwrap() + 1);
        for l in 0..2 {
            let rows: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| [t as f32, l as f32, 0.0])
                .collect();
            let k = Tensor::<2>::from_data(TensorData::new(rows, [tokens.len(), 3]), dev);
            store.write(l, &k, &k, 0, &slots[pos0..]);
        }
        kv.commit(seq, tokens);
    };
    let key = |kv: &PagedKv, seq: SeqId, pos: usize| {
        let slots = kv.device().slots(kv.block_table(seq), pos + 1);
        let (k, _) = kv.device().gather(0, &slots[pos..]);
        k.into_data().try_to_vec::<f32>().unwrap()[0]
    };
    let mut kv = PagedKv::new(layout(), 8, 64);
    let a = kv.new_seq();
    fill_dev(&mut kv, a, &[1, 2, 3, 4, 5], &dev);
    let b = kv.new_seq();
    kv.match_prefix(b, &[1, 2, 3, 4, 9]).unwrap();
    assert_eq!(kv.block_table(b)[0], kv.block_table(a)[0], "shared");
    kv.truncate(b, 2);
    assert_ne!(kv.block_table(b)[0], kv.block_table(a)[0], "copied");
    assert_eq!(key(&kv, b, 1), 2.0, "the copy holds the shared values");
    fill_dev(&mut kv, b, &[7, 7], &dev);
    assert_eq!(key(&kv, a, 2), 3.0, "a's block untouched");
    assert_eq!(key(&kv, b, 2), 7.0);
    // K and V, 2 layers, 8 blocks of 4 slots, 3 values of 4 bytes: the whole budget.
    assert_eq!(
        kv.bytes_reserved(),
        2 * 2 * 8 * 4 * 3 * 4,
        "the pools count"
    );
}

#[cfg(feature = "burn")]
#[test]
#[should_panic(expected = "a PagedKv is used by one backend")]
fn a_cache_with_host_values_refuses_device_pools() {
    let mut kv = PagedKv::new(layout(), 8, 64);
    let a = kv.new_seq();
    fill(&mut kv, a, &[1, 2]);
    kv.device_mut(&crate::backend::cpu());
}

/// `preallocate` claims the whole budget's storage at once; serving then never grows it, and the
/// values written land where reads find them.
#[test]
fn preallocated_storage_holds_the_budget_and_never_grows() {
    let mut kv = PagedKv::new(layout(), 8, 64);
    assert_eq!(kv.bytes_reserved(), 0, "storage grows lazily by default");
    kv.preallocate();
    let full = kv.bytes_reserved();
    assert!(
        full >= kv.bytes_budget() && full > 0,
        "{full} < {}",
        kv.bytes_budget()
    );
    let mut seqs = vec![];
    for i in 0..4u32 {
        let s = kv.new_seq();
        let toks: Vec<u32> = (100 * i..100 * i + 7).collect();
        fill(&mut kv, s, &toks);
        seqs.push(s);
        assert_eq!(kv.bytes_reserved(), full);
    }
    let (k, _) = kv.layer_blocks(seqs[3], 1);
    assert_eq!(k[0][0].to_f32(), 300.0);
    assert_eq!(k[0][1].to_f32(), 1.0);
    kv.preallocate();
    assert_eq!(kv.bytes_reserved(), full, "a second call changes nothing");
}

/// Device pools are made whole from the budget when the cache first meets the device: every
/// block's slots at once, and no growth (no copy of the cache) as sequences fill it.
#[cfg(feature = "burn")]
#[test]
fn device_pools_take_the_whole_budget_at_once() {
    let l = layout();
    let mut kv = PagedKv::new(l, 8, 64);
    kv.device_mut(&crate::backend::cpu());
    let whole = 2 * l.n_layers * 8 * l.block_size * l.kv_dim * 4;
    assert_eq!(kv.bytes_reserved(), whole);
    let a = kv.new_seq();
    kv.reserve(a, 8 * l.block_size).unwrap();
    let table = kv.block_table(a).to_vec();
    let slots = kv.device().slots(&table, 8 * l.block_size);
    kv.device_mut(&crate::backend::cpu())
        .ensure_slots(slots.iter().max().unwrap() + 1);
    assert_eq!(kv.bytes_reserved(), whole, "no growth");
}
