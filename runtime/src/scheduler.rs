//! Continuous batching over the paged, prefix-sharing KV cache.
//!
//! Each [`Server::step`] builds one batch: a decode row for every running
//! sequence, plus prefill chunks of admitted sequences up to a token budget,
//! and runs it as one forward pass (every weight matrix read once for all
//! rows). Requests are admitted first-come first-served when the KV budget can
//! hold their whole prompt and `max_tokens`, so a running sequence never runs
//! out of blocks mid-generation; a request that could never fit is finished
//! with a clear error instead of waiting forever.
//!
//! What happens to each request (validation, sampling, stop strings, its end) is its
//! [`RequestState`]'s business; the scheduler decides what runs in which pass and owns the
//! cache. [`Scheduler::sequential`] (the [`SequentialServer`], and `Engine::generate`) is the
//! same loop with one running sequence on a fresh cache of its own.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::Engine;
use crate::kv::{KvCache, KvCounters, PagedKv, SeqId};
use crate::model::{BatchItem, LogitsWanted, ModelError};
use crate::request::{RequestError, RequestOptions, RequestState};
use crate::serve::{
    CacheUse, FinishKind, RequestId, ServeEvent, ServeRequest, Server, ServerStats,
};

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

struct Running<'e> {
    state: RequestState<'e>,
    seq: SeqId,
    /// Prompt tokens already in the cache (cached or computed).
    prefilled: usize,
    cache: CacheUse,
    /// Blocks this sequence may still claim (admission reservation).
    reserved_blocks: usize,
    prefill_started: bool,
}

impl Running<'_> {
    fn prefilling(&self) -> bool {
        self.prefilled < self.state.prompt().len()
    }
}

/// One sequence's share of a pass: `n` tokens from `start` of its tokens.
struct Chunk {
    /// Index in `running`.
    i: usize,
    start: usize,
    n: usize,
    logits: LogitsWanted,
    /// Whether the sequence is past its prompt (one decode row).
    decode: bool,
}

pub struct Scheduler<'e> {
    engine: &'e Engine,
    pub cfg: SchedulerConfig,
    kv: PagedKv,
    waiting: VecDeque<RequestState<'e>>,
    running: Vec<Running<'e>>,
    /// Finished requests submitted with `RequestOptions::keep`.
    finished: Vec<RequestState<'e>>,
    logits: Vec<f32>,
    last_batch: BatchShape,
    forward_passes: u64,
    /// The one-at-a-time server: a prompt's chunks run in one step, and each request gets a
    /// fresh single-sequence cache (`Engine::new_cache`) that is dropped when it finishes.
    sequential: bool,
}

/// A fresh single-sequence cache's pages, without its sequence.
fn single_request_pages(engine: &Engine) -> PagedKv {
    let KvCache { mut pages, seq } = engine.new_cache();
    pages.free_seq(seq);
    pages
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
        Self::with_cache(engine, cfg, kv, false)
    }

    /// Claim the whole KV budget's memory now: host memory on the CPU backend
    /// ([`PagedKv::preallocate`]), the device pools on a GPU ([`Model::bind_kv`], which fails
    /// for a budget the device cannot hold). Returns the bytes held.
    pub fn preallocate_kv(&mut self) -> Result<usize, ModelError> {
        if self.engine.model.backend() == "cpu" {
            self.kv.preallocate();
        } else {
            self.engine.model.bind_kv(&mut self.kv)?;
        }
        Ok(self.kv.bytes_reserved())
    }

    /// One request at a time, first come first served, each on a fresh cache of its own that
    /// holds the whole context (no prefix sharing) and is dropped when it finishes; a prompt
    /// is prefilled in `prefill_chunk` passes within one step. The simplest correct server,
    /// and what `Engine::generate` runs a request on.
    pub fn sequential(engine: &'e Engine) -> Self {
        let kv = single_request_pages(engine);
        let cfg = SchedulerConfig {
            kv_budget_bytes: kv.bytes_budget(),
            block_size: kv.layout.block_size,
            max_running: 1,
            max_batch_tokens: engine.cfg.prefill_chunk.max(1),
            prefix_caching: false,
        };
        Self::with_cache(engine, cfg, kv, true)
    }

    fn with_cache(engine: &'e Engine, cfg: SchedulerConfig, kv: PagedKv, sequential: bool) -> Self {
        Scheduler {
            engine,
            cfg,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            logits: Vec::new(),
            last_batch: BatchShape::default(),
            forward_passes: 0,
            sequential,
        }
    }

    pub fn kv_counters(&self) -> KvCounters {
        self.kv.counters
    }

    /// The composition of the last forward pass.
    pub fn last_batch(&self) -> BatchShape {
        self.last_batch
    }

    /// Forward passes run so far (one per step that had work; the sequential server's steps
    /// also run each prompt chunk).
    pub fn forward_passes(&self) -> u64 {
        self.forward_passes
    }

    /// [`Server::submit`] with options beyond the request (logprobs, keeping the result).
    pub fn submit_with(
        &mut self,
        req: ServeRequest,
        opts: RequestOptions,
        out: &mut Vec<ServeEvent>,
    ) {
        out.push(ServeEvent::Enqueued {
            id: req.id,
            at: Instant::now(),
        });
        let state = RequestState::new(req, opts, &self.engine.tokenizer, self.engine.cfg.n_ctx);
        self.waiting.push_back(state);
    }

    /// Cancel request `id` (its client went away): a waiting request leaves the queue, a
    /// running one leaves the batch and its KV blocks go back at once (a cached prefix stays
    /// cached, unreferenced). Emits `Finished` with [`FinishKind::Cancelled`]. Returns false
    /// when the request is neither waiting nor running (it has finished already).
    pub fn cancel(&mut self, id: RequestId, out: &mut Vec<ServeEvent>) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id() == id) {
            let mut state = self.waiting.remove(i).expect("index from position");
            state.finish(FinishKind::Cancelled);
            self.report_finished(state, out);
            return true;
        }
        let Some(i) = self.running.iter().position(|r| r.state.id() == id) else {
            return false;
        };
        self.running[i].state.finish(FinishKind::Cancelled);
        self.retire(i, out);
        if self.running.is_empty() {
            self.release_idle_cache();
        }
        true
    }

    /// KV blocks referenced by a sequence now, and the whole budget in blocks.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.kv.used_blocks(), self.kv.n_blocks())
    }

    /// Request `id`'s state while it runs, or once finished if it was submitted with
    /// `RequestOptions::keep` and not taken yet (a server reads each token's logprobs here).
    pub fn request(&self, id: RequestId) -> Option<&RequestState<'e>> {
        self.running
            .iter()
            .map(|r| &r.state)
            .chain(&self.finished)
            .find(|s| s.id() == id)
    }

    /// The finished state of request `id`, if it was submitted with `RequestOptions::keep`.
    pub fn take_finished(&mut self, id: u64) -> Option<RequestState<'e>> {
        let i = self.finished.iter().position(|s| s.id() == id)?;
        Some(self.finished.swap_remove(i))
    }

    /// Blocks promised to running sequences but not yet allocated.
    fn outstanding_reservations(&self) -> usize {
        self.running
            .iter()
            .map(|r| {
                let have = self.kv.blocks_needed(self.kv.seq_len(r.seq));
                r.reserved_blocks.saturating_sub(have)
            })
            .sum()
    }

    /// Report a request's end (its state holds the outcome) and keep it if asked.
    fn report_finished(&mut self, state: RequestState<'e>, out: &mut Vec<ServeEvent>) {
        let (reason, error) = match state.outcome() {
            Some(Ok(reason)) => (*reason, None),
            Some(Err(e)) => (FinishKind::Error, Some(e.to_string())),
            None => unreachable!("request {} reported before it finished", state.id()),
        };
        out.push(ServeEvent::Finished {
            id: state.id(),
            at: Instant::now(),
            reason,
            error,
        });
        if state.keep() {
            self.finished.push(state);
        }
    }

    /// Retire running sequence `i`, whose state has finished.
    fn retire(&mut self, i: usize, out: &mut Vec<ServeEvent>) {
        let r = self.running.swap_remove(i);
        self.kv.free_seq(r.seq);
        self.report_finished(r.state, out);
    }

    /// Why a request can never be admitted: the state's own checks, then the KV budget.
    fn check(
        &self,
        state: &RequestState<'_>,
        need: usize,
        positions: usize,
    ) -> Result<(), RequestError> {
        state.validate()?;
        if need > self.kv.n_blocks() {
            return Err(RequestError::KvBudget {
                need,
                need_bytes: need * self.kv.layout.block_bytes(),
                positions,
                budget_blocks: self.kv.n_blocks(),
                budget_bytes: self.kv.bytes_budget(),
            });
        }
        Ok(())
    }

    /// Admit waiting requests while the budget allows (FCFS: stop at the first that does not fit).
    fn admit(&mut self, out: &mut Vec<ServeEvent>) {
        while self.running.len() < self.cfg.max_running {
            let Some(state) = self.waiting.front() else {
                break;
            };
            let total = state.prompt().len() + state.max_tokens();
            let need = self.kv.blocks_needed(total.min(self.engine.cfg.n_ctx));
            if let Err(e) = self.check(state, need, total) {
                let mut state = self.waiting.pop_front().unwrap();
                out.push(ServeEvent::Scheduled {
                    id: state.id(),
                    at: Instant::now(),
                });
                state.fail(e);
                self.report_finished(state, out);
                continue;
            }
            // Shared prefix blocks may cut the need; count it after matching.
            let seq = self.kv.new_seq();
            let hit = self
                .kv
                .match_prefix(seq, state.prompt())
                .expect("fresh sequence");
            let need_new = need - hit.hit_blocks;
            if need_new + self.outstanding_reservations() > self.kv.available_blocks() {
                // Does not fit now: undo the match and wait.
                self.kv.free_seq(seq);
                break;
            }
            let state = self.waiting.pop_front().unwrap();
            let cache = CacheUse {
                cached_prompt_tokens: hit.cached_tokens,
                computed_prompt_tokens: state.prompt().len() - hit.cached_tokens,
                cache_lookups: hit.lookups,
                cache_hit_blocks: hit.hit_blocks,
            };
            out.push(ServeEvent::Scheduled {
                id: state.id(),
                at: Instant::now(),
            });
            self.running.push(Running {
                state,
                seq,
                prefilled: hit.cached_tokens,
                cache,
                reserved_blocks: need,
                prefill_started: false,
            });
        }
    }

    /// The next pass: decode rows first (they are latency-critical), then prefill chunks, up
    /// to `max_batch_tokens`.
    fn plan(&self) -> Vec<Chunk> {
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut plan = vec![];
        for (i, r) in self.running.iter().enumerate() {
            if !r.prefilling() && r.state.n_out() > 0 && budget > 0 {
                let start = r.state.tokens().len() - 1;
                plan.push(Chunk {
                    i,
                    start,
                    n: 1,
                    logits: r.state.logits_wanted(start, 1),
                    decode: true,
                });
                budget -= 1;
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            let left = r.state.prompt().len() - r.prefilled;
            if left > 0 && budget > 0 {
                let n = left.min(budget);
                plan.push(Chunk {
                    i,
                    start: r.prefilled,
                    n,
                    logits: r.state.logits_wanted(r.prefilled, n),
                    decode: false,
                });
                budget -= n;
            }
        }
        plan
    }

    /// Run the planned chunks as one forward pass; the logits land in `self.logits`.
    fn forward(&mut self, plan: &[Chunk]) -> Result<(), ModelError> {
        let items: Vec<BatchItem> = plan
            .iter()
            .map(|c| BatchItem {
                seq: self.running[c.i].seq,
                tokens: &self.running[c.i].state.tokens()[c.start..c.start + c.n],
                logits: c.logits,
            })
            .collect();
        self.last_batch = BatchShape {
            seqs: plan.len(),
            decode_rows: plan.iter().filter(|c| c.decode).count(),
            prefill_tokens: plan.iter().filter(|c| !c.decode).map(|c| c.n).sum(),
        };
        self.forward_passes += 1;
        let engine = self.engine;
        engine.install(|| {
            engine
                .model
                .forward_batch(&items, &mut self.kv, &mut self.logits)
        })
    }

    /// One forward pass over the next plan, and what its logits mean for each sequence in it.
    fn pass(&mut self, out: &mut Vec<ServeEvent>) {
        let plan = self.plan();
        let now = Instant::now();
        for c in &plan {
            let r = &mut self.running[c.i];
            if !r.prefill_started {
                r.prefill_started = true;
                out.push(ServeEvent::PrefillStart {
                    id: r.state.id(),
                    at: now,
                });
            }
        }
        if let Err(e) = self.forward(&plan) {
            // Never leave a half-done batch behind: fail the sequences in it.
            let e = Arc::new(e);
            let mut idx: Vec<usize> = plan.iter().map(|c| c.i).collect();
            idx.sort_unstable_by(|a, b| b.cmp(a));
            for i in idx {
                self.running[i].state.fail(RequestError::Model(e.clone()));
                self.retire(i, out);
            }
            return;
        }
        let mut done = self.absorb(&plan, out);
        done.sort_unstable_by(|a, b| b.cmp(a));
        for i in done {
            self.retire(i, out);
        }
    }

    /// Hand each chunk its logits rows, in plan order: prompt progress, then a sampled token
    /// for every sequence whose prompt is in. Returns the sequences that finished.
    fn absorb(&mut self, plan: &[Chunk], out: &mut Vec<ServeEvent>) -> Vec<usize> {
        let n_vocab = self.engine.model.config().n_vocab;
        let mut row = 0;
        let mut done = vec![];
        for c in plan {
            let n_rows = match c.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => c.n,
            };
            let rows = &self.logits[row * n_vocab..(row + n_rows) * n_vocab];
            row += n_rows;
            let r = &mut self.running[c.i];
            if !c.decode {
                r.state.on_prompt_logits(c.start, rows, n_vocab);
                r.prefilled = c.start + c.n;
                if r.prefilling() {
                    continue;
                }
                out.push(ServeEvent::PrefillEnd {
                    id: r.state.id(),
                    at: Instant::now(),
                    cache: r.cache,
                });
                if r.state.max_tokens() == 0 {
                    r.state.finish(FinishKind::Length);
                    done.push(c.i);
                    continue;
                }
            }
            let s = r.state.on_logits(&rows[rows.len() - n_vocab..]);
            out.push(ServeEvent::Token {
                id: r.state.id(),
                at: s.at,
                index: s.index,
                token: s.token,
                text: s.text,
            });
            if s.finish.is_some() {
                done.push(c.i);
            }
        }
        done
    }

    /// The sequential server drops an idle cache, as a request's own cache used to be dropped
    /// with it: no KV memory held between requests.
    fn release_idle_cache(&mut self) {
        if self.sequential && self.running.is_empty() {
            let counters = self.kv.counters;
            self.kv = single_request_pages(self.engine);
            self.kv.counters = counters;
        }
    }
}

impl Server for Scheduler<'_> {
    fn submit(&mut self, req: ServeRequest, out: &mut Vec<ServeEvent>) {
        self.submit_with(req, RequestOptions::default(), out);
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
        self.pass(out);
        while self.sequential && self.running.first().is_some_and(Running::prefilling) {
            self.pass(out);
        }
        if self.running.is_empty() {
            self.release_idle_cache();
        }
        true
    }
}

/// The simplest correct server: one request at a time, first come first served; prefill is
/// one step, each decode token one step. A [`Scheduler::sequential`] under the name the
/// harness and `ember bench --no-batching` know.
pub struct SequentialServer<'e>(Scheduler<'e>);

impl<'e> SequentialServer<'e> {
    pub fn new(engine: &'e Engine) -> Self {
        SequentialServer(Scheduler::sequential(engine))
    }
}

impl<'e> Deref for SequentialServer<'e> {
    type Target = Scheduler<'e>;
    fn deref(&self) -> &Scheduler<'e> {
        &self.0
    }
}

impl Server for SequentialServer<'_> {
    fn submit(&mut self, req: ServeRequest, out: &mut Vec<ServeEvent>) {
        self.0.submit(req, out)
    }
    fn step(&mut self, out: &mut Vec<ServeEvent>) -> bool {
        self.0.step(out)
    }
    fn has_work(&self) -> bool {
        self.0.has_work()
    }
    fn stats(&self) -> ServerStats {
        self.0.stats()
    }
}
