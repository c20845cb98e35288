//! Continuous batching over the paged, prefix-sharing KV cache.
//!
//! Each [`Server::step`] builds one batch: a decode row for every running
//! sequence, plus prefill chunks of admitted sequences up to a token budget,
//! and runs it as one forward pass (every weight matrix read once for all
//! rows). Requests are admitted first-come first-served when the KV budget can
//! hold their whole prompt and `max_tokens`, so a running sequence never runs
//! out of blocks mid-generation; a request that could never fit is finished
//! with a clear error instead of waiting forever.

use std::collections::VecDeque;
use std::time::Instant;

use crate::engine::Engine;
use crate::kv::{KvCounters, PagedKv, SeqId};
use crate::model::{BatchItem, LogitsWanted};
use crate::sample::Sampler;
use crate::serve::{CacheUse, FinishKind, ServeEvent, ServeRequest, Server, ServerStats};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// KV cache budget in bytes.
    pub kv_budget_bytes: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Most sequences decoding at once.
    pub max_running: usize,
    /// Most tokens (prefill + decode rows) in one forward pass.
    pub max_batch_tokens: usize,
    /// Reuse cached prefix blocks across requests.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            kv_budget_bytes: 512 << 20,
            block_size: crate::kv::DEFAULT_BLOCK_SIZE,
            max_running: 16,
            max_batch_tokens: 512,
            prefix_caching: true,
        }
    }
}

/// What one forward pass held: for tests and diagnostics that must see batch composition, not
/// only its results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchShape {
    /// Sequences in the pass.
    pub seqs: usize,
    /// Of those, sequences decoding one token.
    pub decode_rows: usize,
    /// Prompt tokens computed in the pass.
    pub prefill_tokens: usize,
}

struct Running {
    req: ServeRequest,
    seq: SeqId,
    /// Prompt tokens already in the cache (cached or computed).
    prefilled: usize,
    cache: CacheUse,
    /// Blocks this sequence may still claim (admission reservation).
    reserved_blocks: usize,
    sampler: Sampler,
    history: Vec<u32>,
    n_out: usize,
    text: String,
    prefill_started: bool,
}

pub struct Scheduler<'e> {
    engine: &'e Engine,
    pub cfg: SchedulerConfig,
    kv: PagedKv,
    waiting: VecDeque<ServeRequest>,
    running: Vec<Running>,
    logits: Vec<f32>,
    last_batch: BatchShape,
    forward_passes: u64,
}

impl<'e> Scheduler<'e> {
    pub fn new(engine: &'e Engine, cfg: SchedulerConfig) -> Self {
        let layout = engine.model.kv_layout(cfg.block_size.max(1));
        let mut kv = PagedKv::new(
            layout,
            layout.blocks_for_budget(cfg.kv_budget_bytes),
            engine.cfg.n_ctx,
        );
        kv.prefix_caching = cfg.prefix_caching;
        Scheduler {
            engine,
            cfg,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            logits: Vec::new(),
            last_batch: BatchShape::default(),
            forward_passes: 0,
        }
    }

    pub fn kv_counters(&self) -> KvCounters {
        self.kv.counters
    }

    /// The composition of the last forward pass.
    pub fn last_batch(&self) -> BatchShape {
        self.last_batch
    }

    /// Forward passes run so far (one per step that had work).
    pub fn forward_passes(&self) -> u64 {
        self.forward_passes
    }

    /// Blocks promised to running sequences but not yet allocated.
    fn outstanding_reservations(&self) -> usize {
        self.running
            .iter()
            .map(|r| r.reserved_blocks.saturating_sub(self.kv_blocks_of(r)))
            .sum()
    }

    fn kv_blocks_of(&self, r: &Running) -> usize {
        self.kv.blocks_needed(self.kv.seq_len(r.seq))
    }

    fn finish(
        &mut self,
        i: usize,
        reason: FinishKind,
        error: Option<String>,
        out: &mut Vec<ServeEvent>,
    ) {
        let r = self.running.swap_remove(i);
        self.kv.free_seq(r.seq);
        out.push(ServeEvent::Finished {
            id: r.req.id,
            at: Instant::now(),
            reason,
            error,
        });
    }

    /// Admit waiting requests while the budget allows (FCFS: stop at the first that does not fit).
    fn admit(&mut self, out: &mut Vec<ServeEvent>) {
        while self.running.len() < self.cfg.max_running {
            let Some(req) = self.waiting.front() else {
                break;
            };
            let n_ctx = self.engine.cfg.n_ctx;
            let total = req.prompt_tokens.len() + req.max_tokens;
            let need = self.kv.blocks_needed(total.min(n_ctx));
            let err = if req.prompt_tokens.is_empty() {
                Some("empty prompt".to_string())
            } else if req.prompt_tokens.len() >= n_ctx {
                Some(format!(
                    "prompt of {} tokens does not fit the context of {n_ctx}",
                    req.prompt_tokens.len()
                ))
            } else if need > self.kv.n_blocks() {
                Some(format!(
                    "needs {need} KV blocks ({} bytes) for {total} positions, the whole budget is {} blocks ({} bytes)",
                    need * self.kv.layout.block_bytes(),
                    self.kv.n_blocks(),
                    self.kv.bytes_budget()
                ))
            } else {
                req.sampler.validate().err()
            };
            if let Some(e) = err {
                let req = self.waiting.pop_front().unwrap();
                out.push(ServeEvent::Scheduled {
                    id: req.id,
                    at: Instant::now(),
                });
                out.push(ServeEvent::Finished {
                    id: req.id,
                    at: Instant::now(),
                    reason: FinishKind::Error,
                    error: Some(e),
                });
                continue;
            }
            // Shared prefix blocks may cut the need; count it after matching.
            let seq = self.kv.new_seq();
            let hit = self
                .kv
                .match_prefix(seq, &req.prompt_tokens)
                .expect("fresh sequence");
            let need_new = need - hit.hit_blocks;
            if need_new + self.outstanding_reservations() > self.kv.available_blocks() {
                // Does not fit now: undo the match and wait.
                self.kv.free_seq(seq);
                break;
            }
            let req = self.waiting.pop_front().unwrap();
            let cache = CacheUse {
                cached_prompt_tokens: hit.cached_tokens,
                computed_prompt_tokens: req.prompt_tokens.len() - hit.cached_tokens,
                cache_lookups: hit.lookups,
                cache_hit_blocks: hit.hit_blocks,
            };
            out.push(ServeEvent::Scheduled {
                id: req.id,
                at: Instant::now(),
            });
            self.running.push(Running {
                sampler: Sampler::new(req.sampler.clone()),
                history: req.prompt_tokens.clone(),
                prefilled: hit.cached_tokens,
                cache,
                reserved_blocks: need,
                seq,
                n_out: 0,
                text: String::new(),
                prefill_started: false,
                req,
            });
        }
    }
}

impl Server for Scheduler<'_> {
    fn submit(&mut self, req: ServeRequest, out: &mut Vec<ServeEvent>) {
        out.push(ServeEvent::Enqueued {
            id: req.id,
            at: Instant::now(),
        });
        self.waiting.push_back(req);
    }

    fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    fn stats(&self) -> ServerStats {
        // One allocator query for both figures.
        let dev = self.engine.model.device_memory();
        ServerStats {
            weights_bytes: self.engine.model.weight_bytes(),
            kv_bytes_used: self.kv.bytes_used() as u64,
            kv_bytes_reserved: self.kv.bytes_reserved() as u64,
            device_bytes: dev.map_or(0, |m| m.reserved_bytes),
            device_bytes_peak: dev.map_or(0, |m| m.peak_bytes),
            cache_evictions: self.kv.counters.evictions,
            running: self.running.len(),
            waiting: self.waiting.len(),
        }
    }

    fn step(&mut self, out: &mut Vec<ServeEvent>) -> bool {
        self.admit(out);
        if self.running.is_empty() {
            return false;
        }
        // Decode rows first (they are latency-critical), then prefill chunks.
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut plan: Vec<(usize, usize, usize)> = vec![]; // (running index, start, len) in history
        for (i, r) in self.running.iter().enumerate() {
            if r.prefilled == r.req.prompt_tokens.len() && r.n_out > 0 && budget > 0 {
                plan.push((i, r.history.len() - 1, 1));
                budget -= 1;
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            let left = r.req.prompt_tokens.len() - r.prefilled;
            if left > 0 && budget > 0 {
                let n = left.min(budget);
                plan.push((i, r.prefilled, n));
                budget -= n;
            }
        }
        let now = Instant::now();
        for &(i, _, _) in &plan {
            let r = &mut self.running[i];
            if !r.prefill_started {
                r.prefill_started = true;
                out.push(ServeEvent::PrefillStart {
                    id: r.req.id,
                    at: now,
                });
            }
        }
        let items: Vec<BatchItem> = plan
            .iter()
            .map(|&(i, start, n)| {
                let r = &self.running[i];
                let ends_prompt = r.n_out > 0 || start + n == r.req.prompt_tokens.len();
                BatchItem {
                    seq: r.seq,
                    tokens: &r.history[start..start + n],
                    logits: if ends_prompt {
                        LogitsWanted::Last
                    } else {
                        LogitsWanted::None
                    },
                }
            })
            .collect();
        self.last_batch = BatchShape {
            seqs: plan.len(),
            decode_rows: plan.iter().filter(|p| self.running[p.0].n_out > 0).count(),
            prefill_tokens: plan
                .iter()
                .filter(|p| self.running[p.0].n_out == 0)
                .map(|p| p.2)
                .sum(),
        };
        self.forward_passes += 1;
        let engine = self.engine;
        let result = engine.install(|| {
            engine
                .model
                .forward_batch(&items, &mut self.kv, &mut self.logits)
        });
        drop(items);
        if let Err(e) = result {
            // Never leave a half-done batch behind: fail the sequences in it.
            let msg = e.to_string();
            let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
            idx.sort_unstable_by(|a, b| b.cmp(a));
            for i in idx {
                self.finish(i, FinishKind::Error, Some(msg.clone()), out);
            }
            return true;
        }
        // Sample for every item that produced logits, in plan order.
        let n_vocab = engine.model.config().n_vocab;
        let mut row = 0;
        let mut done: Vec<(usize, FinishKind)> = vec![];
        for &(i, start, n) in &plan {
            let r = &mut self.running[i];
            let decoding = r.n_out > 0;
            if !decoding {
                r.prefilled = start + n;
                if r.prefilled < r.req.prompt_tokens.len() {
                    continue;
                }
                out.push(ServeEvent::PrefillEnd {
                    id: r.req.id,
                    at: Instant::now(),
                    cache: r.cache,
                });
                if r.req.max_tokens == 0 {
                    done.push((i, FinishKind::Length));
                    row += 1;
                    continue;
                }
            }
            let logits = &self.logits[row * n_vocab..(row + 1) * n_vocab];
            row += 1;
            let tok = r.sampler.sample(logits, &r.history);
            let at = Instant::now();
            r.history.push(tok);
            let index = r.n_out;
            r.n_out += 1;
            let (piece, stop) = crate::serve::absorb_token(engine, &r.req, &mut r.text, tok);
            out.push(ServeEvent::Token {
                id: r.req.id,
                at,
                index,
                token: tok,
                text: piece,
            });
            if stop {
                done.push((i, FinishKind::Stop));
            } else if r.n_out >= r.req.max_tokens || self.kv.seq_len(r.seq) + 1 >= engine.cfg.n_ctx
            {
                done.push((i, FinishKind::Length));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            self.finish(i, reason, None, out);
        }
        true
    }
}
