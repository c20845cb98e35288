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
    CacheUse, FinishKind, RequestId, ServeEvent, ServeRequest, Server, ServerStats, SpecUse,
};
use crate::spec::{self, SpecConfig, SpecError};

/// A sequence whose drafts are not worth a row proposes one every this many steps, so its
/// acceptance keeps being measured (the text may turn to copying later).
const EXPLORE_EVERY: usize = 8;

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
    /// Rows of proposed (draft) tokens verified in the pass, beyond the decode rows.
    pub draft_rows: usize,
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
    /// Speculation state (unused when the scheduler does not speculate).
    spec: SpecRun,
}

/// One sequence's speculation.
#[derive(Default)]
struct SpecRun {
    /// This step's decode input: the last token, then the proposed ones.
    window: Vec<u32>,
    /// Its sequence in the draft model's cache, once it has one.
    draft_seq: Option<SeqId>,
    /// Positions of the draft's cache known to hold this sequence's tokens (past them: drafts
    /// not verified yet, or rejected).
    draft_valid: usize,
    /// The totals reported with the request's end.
    totals: SpecUse,
    /// How often its drafts are kept, by kind of proposal (a prompt lookup's match length
    /// less one; 0 for a draft model): sizes its next proposals.
    acceptance: Vec<spec::Acceptance>,
    /// The kind of the window's proposal.
    kind: usize,
    /// Steps since it last proposed, while no draft looked worth a row.
    idle: usize,
}

impl SpecRun {
    fn drafts(&self) -> &[u32] {
        self.window.get(1..).unwrap_or(&[])
    }

    /// This sequence's chances of keeping each of `avail` drafts of proposal kind `kind`,
    /// starting from the scheduler's pooled measure `shared`.
    fn chances(
        &mut self,
        kind: usize,
        avail: usize,
        shared: &mut Vec<spec::Acceptance>,
    ) -> Vec<f64> {
        if self.acceptance.len() <= kind {
            self.acceptance.resize_with(kind + 1, Default::default);
        }
        if shared.len() <= kind {
            shared.resize_with(kind + 1, spec::Acceptance::shared);
        }
        self.kind = kind;
        self.acceptance[kind]
            .chances_from(&shared[kind])
            .take(avail)
            .collect()
    }

    /// `take` drafts were judged worth their rows; when none were (and some were on offer),
    /// one every [`EXPLORE_EVERY`] steps, so the chance keeps being measured.
    fn explore(&mut self, take: usize) -> usize {
        if take > 0 {
            self.idle = 0;
            return take;
        }
        self.idle += 1;
        if self.idle < EXPLORE_EVERY {
            return 0;
        }
        self.idle = 0;
        1
    }
}

/// A draft model and its own KV cache (one sequence per speculating request).
struct DraftModel<'e> {
    engine: &'e Engine,
    kv: PagedKv,
    logits: Vec<f32>,
}

/// What the scheduler speculates with.
struct Speculation<'e> {
    cfg: SpecConfig,
    draft: Option<DraftModel<'e>>,
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
    /// Whether the sequence is past its prompt (one decode row, or its speculation window).
    decode: bool,
    /// The rows are the sequence's speculation window (the last token and its drafts).
    spec: bool,
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
    spec: Option<Speculation<'e>>,
    /// What a pass costs by its rows (sizes speculation's drafts).
    times: spec::PassTimes,
    /// Acceptance by proposal kind, pooled over sequences: where each one's measure starts.
    shared: Vec<spec::Acceptance>,
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
            spec: None,
            times: spec::PassTimes::default(),
            shared: vec![],
        }
    }

    /// Speculate from now on (module [`spec`](crate::spec)): prompt lookup, or the `draft`
    /// model proposing. The draft must share the target's vocabulary; its KV cache is sized
    /// like the target's (the same byte budget; a sequential scheduler's holds one context).
    pub fn with_speculation(
        mut self,
        cfg: SpecConfig,
        draft: Option<&'e Engine>,
    ) -> Result<Self, SpecError> {
        cfg.validate(draft.is_some())?;
        let draft = match draft {
            None => None,
            Some(d) => {
                spec::check_vocab(self.engine, d)?;
                let n_ctx = self.engine.cfg.n_ctx;
                let kv = if self.sequential {
                    single_request_pages(d)
                } else {
                    let layout = d.model.kv_layout(self.cfg.block_size.max(1));
                    let mut kv = PagedKv::new(
                        layout,
                        layout.blocks_for_budget(self.cfg.kv_budget_bytes),
                        n_ctx,
                    );
                    kv.prefix_caching = false;
                    kv
                };
                let positions = kv.n_blocks() * kv.layout.block_size;
                if positions < n_ctx.min(d.cfg.n_ctx) {
                    return Err(SpecError::DraftKv { positions, n_ctx });
                }
                Some(DraftModel {
                    engine: d,
                    kv,
                    logits: Vec::new(),
                })
            }
        };
        self.spec = Some(Speculation { cfg, draft });
        Ok(self)
    }

    /// Whether this scheduler speculates.
    pub fn speculates(&self) -> bool {
        self.spec.is_some()
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
        if let Some(sp) = &mut self.spec {
            if let (Some(d), Some(seq)) = (&mut sp.draft, r.spec.draft_seq) {
                d.kv.free_seq(seq);
            }
            out.push(ServeEvent::Speculation {
                id: r.state.id(),
                at: Instant::now(),
                spec: r.spec.totals,
            });
        }
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
                spec: SpecRun::default(),
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
                let drafts = r.spec.drafts().len();
                if drafts > 0 && drafts < budget {
                    plan.push(Chunk {
                        i,
                        start,
                        n: 1 + drafts,
                        logits: LogitsWanted::All,
                        decode: true,
                        spec: true,
                    });
                    budget -= 1 + drafts;
                    continue;
                }
                plan.push(Chunk {
                    i,
                    start,
                    n: 1,
                    logits: r.state.logits_wanted(start, 1),
                    decode: true,
                    spec: false,
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
                    spec: false,
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
            .map(|c| {
                let r = &self.running[c.i];
                BatchItem {
                    seq: r.seq,
                    tokens: if c.spec {
                        &r.spec.window
                    } else {
                        &r.state.tokens()[c.start..c.start + c.n]
                    },
                    logits: c.logits,
                }
            })
            .collect();
        self.last_batch = BatchShape {
            seqs: plan.len(),
            decode_rows: plan.iter().filter(|c| c.decode).count(),
            draft_rows: plan.iter().filter(|c| c.spec).map(|c| c.n - 1).sum(),
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
        self.propose();
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
        let t0 = Instant::now();
        let result = self.forward(&plan);
        let verify_ns = t0.elapsed().as_nanos() as u64;
        // Decode passes only (plain rows and speculation windows): every row of those asks for
        // logits, a prompt chunk's rows do not (on Qwen2.5 0.5B the output matrix is a quarter
        // of a row's work), so prompt passes would make draft rows look cheaper than they are.
        if result.is_ok() && plan.iter().all(|c| c.decode) {
            let rows: usize = plan.iter().map(|c| c.n).sum();
            log::trace!(
                "pass: {} sequences, {rows} rows, {verify_ns} ns",
                plan.len()
            );
            self.times.observe(rows, verify_ns as f64 * 1e-9);
        }
        for c in plan.iter().filter(|c| c.spec) {
            let t = &mut self.running[c.i].spec.totals;
            t.verify_ns += verify_ns;
            t.verify_steps += 1;
            t.drafted += c.n - 1;
        }
        if let Err(e) = result {
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
        // Out of `self` while rows are handed out (`verify` needs the scheduler), then back.
        let logits = std::mem::take(&mut self.logits);
        for c in plan {
            let n_rows = match c.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => c.n,
            };
            let rows = &logits[row * n_vocab..(row + n_rows) * n_vocab];
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
            if c.spec {
                if self.verify(c.i, rows, n_vocab, out) {
                    done.push(c.i);
                }
                continue;
            }
            let s = r.state.on_logits(&rows[rows.len() - n_vocab..]);
            if push_token(r.state.id(), s, out) {
                done.push(c.i);
            }
        }
        self.logits = logits;
        done
    }

    /// Sequence `i`'s speculation window came back with a logits row per token: emit the
    /// target's tokens row by row while it keeps the drafts, then drop the KV positions of the
    /// rows past the first replaced draft (here and in the draft model's cache). Returns
    /// whether the request finished.
    fn verify(
        &mut self,
        i: usize,
        rows: &[f32],
        n_vocab: usize,
        out: &mut Vec<ServeEvent>,
    ) -> bool {
        let r = &mut self.running[i];
        let drafts = std::mem::take(&mut r.spec.window);
        let mut accepted = 0;
        let mut finished = false;
        for (j, row) in rows.chunks_exact(n_vocab).enumerate() {
            let draft = drafts.get(j + 1).copied();
            let (s, kept) = r.state.on_logits_verify(row, draft);
            finished = push_token(r.state.id(), s, out);
            if finished || !kept {
                break;
            }
            accepted += 1;
        }
        r.spec.totals.accepted += accepted;
        r.spec.acceptance[r.spec.kind].observe(drafts.len() - 1, accepted);
        self.shared[r.spec.kind].observe(drafts.len() - 1, accepted);
        r.spec.window = drafts;
        r.spec.window.clear();
        if finished {
            return true;
        }
        // Every token but the newest is in the cache.
        let keep = r.state.tokens().len() - 1;
        self.kv.truncate(r.seq, keep);
        if let (Some(d), Some(seq)) = (
            self.spec.as_mut().and_then(|s| s.draft.as_mut()),
            r.spec.draft_seq,
        ) {
            // The draft's cache holds the window's first tokens it was fed; those past the
            // kept drafts go.
            d.kv.truncate(seq, keep);
            r.spec.draft_valid = d.kv.seq_len(seq).min(keep);
        }
        false
    }

    /// Propose this step's drafts for every decoding sequence (clearing last step's), within
    /// the pass's token budget, each sequence's `max_tokens` and the context.
    fn propose(&mut self) {
        let Some(sp) = &self.spec else {
            return;
        };
        let cfg = sp.cfg.clone();
        let decoding: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let r = &self.running[i];
                !r.prefilling() && r.state.n_out() > 0
            })
            .collect();
        let mut spare = self
            .cfg
            .max_batch_tokens
            .max(1)
            .saturating_sub(decoding.len());
        let n_ctx = self.engine.cfg.n_ctx;
        // What each decoding sequence could propose: a lookup's continuation, or up to `cap`
        // tokens of the draft model, with its chance of keeping each.
        let mut offers: Vec<(usize, Vec<u32>)> = vec![];
        let mut chances = vec![];
        for &i in &decoding {
            let r = &mut self.running[i];
            r.spec.window.clear();
            let tokens = r.state.tokens();
            // Emitting K + 1 tokens must stay within max_tokens; the K + 1 rows in the cache.
            let cap = cfg
                .draft_max
                .min(r.state.max_tokens().saturating_sub(r.state.n_out() + 1))
                .min(n_ctx.saturating_sub(tokens.len()))
                .min(spare);
            if cap == 0 {
                continue;
            }
            if cfg.lookup > 0 {
                let t0 = Instant::now();
                let (n, found) = spec::lookup(tokens, cfg.lookup, cap);
                if n > 0 && !found.is_empty() {
                    let found = found.to_vec();
                    chances.push(r.spec.chances(n - 1, found.len(), &mut self.shared));
                    offers.push((i, found));
                }
                r.spec.totals.draft_ns += t0.elapsed().as_nanos() as u64;
            } else {
                chances.push(r.spec.chances(0, cap, &mut self.shared));
                offers.push((i, vec![]));
            }
        }
        // Prompt rows that would share the pass count with the decode rows: drafts lengthen
        // the pass for them too (and take budget from them).
        let prompt_rows: usize = self
            .running
            .iter()
            .map(|r| r.state.prompt().len() - r.prefilled)
            .sum();
        let base = decoding.len() + prompt_rows.min(spare);
        let takes = spec::plan_drafts(&self.times, base, &chances);
        log::debug!(
            "speculation: {} decoding, {base} rows without drafts ({:?} s), drafts {takes:?}",
            decoding.len(),
            self.times.estimate(base),
        );
        let mut caps = vec![];
        for ((i, found), take) in offers.into_iter().zip(takes) {
            let r = &mut self.running[i];
            let take = r.spec.explore(take).min(spare);
            if take == 0 || take < cfg.draft_min {
                continue;
            }
            spare -= take;
            if cfg.lookup > 0 {
                let tokens = r.state.tokens();
                r.spec.window.push(tokens[tokens.len() - 1]);
                r.spec
                    .window
                    .extend_from_slice(&found[..take.min(found.len())]);
            } else {
                caps.push((i, take));
            }
        }
        if !caps.is_empty() {
            self.draft_rounds(&caps, &cfg);
        }
    }

    /// The draft model proposes for the sequences in `caps` (index, most drafts), batched:
    /// first each sequence's cache catches up with its tokens (the prompt, the tokens the
    /// target emitted since), then one greedy token per round while its probability is at
    /// least `draft_p_min`.
    fn draft_rounds(&mut self, caps: &[(usize, usize)], cfg: &SpecConfig) {
        let chunk = self.cfg.max_batch_tokens.max(1);
        let Some(d) = self.spec.as_mut().and_then(|s| s.draft.as_mut()) else {
            return;
        };
        let n_vocab = d.engine.model.config().n_vocab;
        // Catch up: everything but the last token, in prompt-sized chunks, one sequence at
        // a time (a draft's prompt pass is the rare case); a sequence the draft's cache cannot
        // hold goes without drafts this step.
        let mut live: Vec<(usize, usize)> = vec![];
        for &(i, cap) in caps {
            let r = &mut self.running[i];
            let seq = *r.spec.draft_seq.get_or_insert_with(|| d.kv.new_seq());
            let tokens = r.state.tokens();
            let upto = tokens.len() - 1;
            let have = d.kv.seq_len(seq).min(r.spec.draft_valid).min(upto);
            d.kv.truncate(seq, have);
            let need = d.kv.blocks_needed(upto + cap) - d.kv.block_table(seq).len();
            if need > d.kv.available_blocks() {
                continue;
            }
            let t0 = Instant::now();
            let mut ok = true;
            for from in (have..upto).step_by(chunk) {
                let item = BatchItem {
                    seq,
                    tokens: &tokens[from..(from + chunk).min(upto)],
                    logits: LogitsWanted::None,
                };
                let de = d.engine;
                if de
                    .install(|| de.model.forward_batch(&[item], &mut d.kv, &mut d.logits))
                    .is_err()
                {
                    ok = false;
                    break;
                }
            }
            r.spec.totals.draft_ns += t0.elapsed().as_nanos() as u64;
            if ok {
                r.spec.draft_valid = upto;
                r.spec.window.push(tokens[upto]);
                live.push((i, cap));
            } else {
                d.kv.truncate(seq, have);
                r.spec.draft_valid = have;
            }
        }
        // Rounds: feed each live sequence its newest window token, take the draft's argmax.
        while !live.is_empty() {
            let items: Vec<BatchItem> = live
                .iter()
                .map(|&(i, _)| {
                    let r = &self.running[i];
                    BatchItem {
                        seq: r.spec.draft_seq.expect("set in catch-up"),
                        tokens: std::slice::from_ref(r.spec.window.last().expect("last token")),
                        logits: LogitsWanted::Last,
                    }
                })
                .collect();
            let t0 = Instant::now();
            let de = d.engine;
            let res = de.install(|| de.model.forward_batch(&items, &mut d.kv, &mut d.logits));
            let ns = t0.elapsed().as_nanos() as u64;
            if res.is_err() {
                // No drafts this step; the caches are rolled back at the next proposal.
                for &(i, _) in &live {
                    self.running[i].spec.window.clear();
                }
                break;
            }
            let mut next = vec![];
            for (k, &(i, cap)) in live.iter().enumerate() {
                let row = &d.logits[k * n_vocab..(k + 1) * n_vocab];
                let r = &mut self.running[i];
                r.spec.totals.draft_ns += ns;
                let t = crate::sample::argmax(row);
                let p = 1.0
                    / row
                        .iter()
                        .map(|&l| (l - row[t as usize]).exp())
                        .sum::<f32>();
                if p < cfg.draft_p_min {
                    continue;
                }
                r.spec.window.push(t);
                if r.spec.window.len() - 1 < cap {
                    next.push((i, cap));
                }
            }
            live = next;
        }
        for &(i, _) in caps {
            let r = &mut self.running[i];
            if r.spec.drafts().len() < cfg.draft_min.max(1) {
                r.spec.window.clear();
            }
        }
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

/// Report a sampled token; returns whether it ended the request.
fn push_token(id: RequestId, s: crate::request::Sampled, out: &mut Vec<ServeEvent>) -> bool {
    out.push(ServeEvent::Token {
        id,
        at: s.at,
        index: s.index,
        token: s.token,
        text: s.text,
    });
    s.finish.is_some()
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
