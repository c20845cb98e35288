//! The engine thread: the one owner of the [`Scheduler`]. HTTP handlers send it requests over a
//! channel and each gets its tokens back on a channel of its own. While the scheduler has work
//! the thread steps it, taking new requests between steps; when idle it blocks on the channel.
//!
//! It also keeps the books: every request's events become a [`RequestRecord`] (timestamps on
//! the run's clock, as `ember bench` records them) sent to the results store's thread, and the
//! `/metrics` histograms, counters and gauges are updated as things happen.
//!
//! A client that goes away drops its receiver; the thread sees the closed channel before the
//! next step and cancels the request, which frees its KV blocks at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use ember_bench::record::{MemorySample, RequestRecord};
use ember_runtime::engine::Engine;
use ember_runtime::model::ModelError;
use ember_runtime::request::{RequestOptions, TopEntry};
use ember_runtime::scheduler::{Scheduler, SchedulerConfig};
use ember_runtime::serve::{CacheUse, FinishKind, RequestId, ServeEvent, ServeRequest, Server};
use ember_runtime::spec::SpecConfig;

use super::metrics::{FINISH_REASONS, Metrics};
use super::openai::LogprobData;

pub enum Command {
    Submit(Box<Submit>),
    /// Cancel every request (a second Ctrl-C while draining).
    CancelAll,
    /// Finish what is in flight, then return.
    Shutdown,
}

pub struct Submit {
    pub req: ServeRequest,
    pub opts: RequestOptions,
    /// When the HTTP request arrived (TTFT and e2e start here).
    pub arrived: Instant,
    /// `chat` or `completions`: the stored request's tag.
    pub tag: &'static str,
    pub tx: mpsc::UnboundedSender<Update>,
}

/// What a request's handler hears from the engine.
pub enum Update {
    /// Text that became visible with a token (may be empty), and the token's logprobs when the
    /// request asked for them.
    Token(String, Option<Box<TokenLogprobs>>),
    Done(Box<Done>),
}

pub struct Done {
    pub reason: FinishKind,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub text: String,
    pub cached_tokens: usize,
    /// With `top_logprobs` in the request options.
    pub logprobs: Option<LogprobData>,
}

/// One sampled token's logprob and its position's top entries (streamed logprobs).
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<TopEntry>,
}

struct Track {
    tx: mpsc::UnboundedSender<Update>,
    arrived: Instant,
    last_token: Option<Instant>,
    record: RequestRecord,
    logprobs: bool,
}

/// Memory samples at most this often while serving (METRICS.md, Memory).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// A long-running server keeps at most this many samples (a day at one a second).
const MAX_SAMPLES: usize = 86_400;

pub struct Worker<'e> {
    sched: Scheduler<'e>,
    tracks: HashMap<RequestId, Track>,
    metrics: Arc<Metrics>,
    origin: Instant,
    records: Option<std::sync::mpsc::Sender<RequestRecord>>,
    events: Vec<ServeEvent>,
    memory: Vec<MemorySample>,
    last_sample: Option<Instant>,
    /// The power sensor read with each memory sample, and why it stopped (if it did).
    meter: Option<ember_bench::power::Meter>,
    power_error: Option<String>,
}

/// What the engine thread measured while serving, for the run's record.
pub struct Served {
    pub memory: Vec<MemorySample>,
    pub power_source: Option<String>,
    pub power_error: Option<String>,
}

impl<'e> Worker<'e> {
    pub fn new(
        engine: &'e Engine,
        cfg: SchedulerConfig,
        spec: Option<(SpecConfig, Option<&'e Engine>)>,
        metrics: Arc<Metrics>,
        origin: Instant,
        records: Option<std::sync::mpsc::Sender<RequestRecord>>,
        power: Option<ember_bench::power::PowerSource>,
    ) -> Result<Self, String> {
        let mut sched = Scheduler::new(engine, cfg);
        if let Some((spec, draft)) = spec {
            sched = sched
                .with_speculation(spec, draft)
                .map_err(|e| e.to_string())?;
        }
        // The server's memory is claimed at start (host memory, or the device's pools) and
        // does not grow under load; a budget the device cannot hold stops the server here.
        let held = sched
            .preallocate_kv()
            .map_err(|e: ModelError| format!("the KV cache: {e}"))?;
        eprintln!(
            "ember serve: KV cache {} MiB held for the budget (--kv-budget-mib)",
            held >> 20
        );
        Ok(Worker {
            sched,
            tracks: HashMap::new(),
            metrics,
            origin,
            records,
            events: Vec::new(),
            memory: Vec::new(),
            last_sample: None,
            meter: power.map(ember_bench::power::Meter::new),
            power_error: None,
        })
    }

    /// Serve until [`Command::Shutdown`] (or every sender is gone) and nothing is in flight.
    /// Returns the memory (and power) samples taken.
    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) -> Served {
        let mut shutdown = false;
        self.publish();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(c) => shutdown |= self.command(c),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        shutdown = true;
                        break;
                    }
                }
            }
            self.cancel_abandoned();
            if self.sched.has_work() {
                self.sched.step(&mut self.events);
                self.dispatch();
                self.publish();
                continue;
            }
            self.publish();
            if shutdown {
                break;
            }
            match rx.blocking_recv() {
                Some(c) => shutdown |= self.command(c),
                None => shutdown = true,
            }
        }
        self.sample(true);
        Served {
            memory: self.memory,
            power_source: self.meter.map(|m| m.source.name),
            power_error: self.power_error,
        }
    }

    /// Returns whether the command asks to shut down.
    fn command(&mut self, c: Command) -> bool {
        match c {
            Command::Submit(s) => {
                let Submit {
                    req,
                    mut opts,
                    arrived,
                    tag,
                    tx,
                } = *s;
                opts.keep = true;
                let record = RequestRecord {
                    request_id: req.id,
                    warmup: false,
                    tags: vec![tag.to_string()],
                    prompt_tokens: req.prompt_tokens.len(),
                    arrival_ns: self.ns(arrived),
                    enqueue_ns: 0,
                    schedule_ns: None,
                    prefill_start_ns: None,
                    prefill_end_ns: None,
                    token_ns: vec![],
                    counted: Default::default(),
                    correct: None,
                    slo_attained: None,
                    finish_ns: 0,
                    finish_reason: FinishKind::Error,
                    error: None,
                    cache: CacheUse::default(),
                    output_text: None,
                    spec: None,
                };
                self.tracks.insert(
                    req.id,
                    Track {
                        tx,
                        arrived,
                        last_token: None,
                        record,
                        logprobs: opts.top_logprobs > 0,
                    },
                );
                self.sched.submit_with(req, opts, &mut self.events);
                self.dispatch();
                false
            }
            Command::CancelAll => {
                let ids: Vec<RequestId> = self.tracks.keys().copied().collect();
                for id in ids {
                    self.sched.cancel(id, &mut self.events);
                }
                self.dispatch();
                false
            }
            Command::Shutdown => true,
        }
    }

    /// Cancel the requests whose client went away (their receiver is dropped).
    fn cancel_abandoned(&mut self) {
        let gone: Vec<RequestId> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.sched.cancel(id, &mut self.events);
        }
        self.dispatch();
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// Route the events of the last call to their requests, the store and the metrics.
    fn dispatch(&mut self) {
        if self.events.is_empty() {
            return;
        }
        // The gauges first: a client that reads /metrics right after its answer must see the
        // scheduler as it is after the step that answered it.
        self.gauges();
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            let id = ev.id();
            let at_ns = self.ns(ev.at());
            let Some(t) = self.tracks.get_mut(&id) else {
                continue;
            };
            match ev {
                ServeEvent::Enqueued { .. } => t.record.enqueue_ns = at_ns,
                ServeEvent::Scheduled { .. } => t.record.schedule_ns = Some(at_ns),
                ServeEvent::PrefillStart { .. } => t.record.prefill_start_ns = Some(at_ns),
                ServeEvent::PrefillEnd { cache, .. } => {
                    t.record.prefill_end_ns = Some(at_ns);
                    t.record.cache = *cache;
                    let m = &self.metrics;
                    Metrics::add(&m.prompt_tokens, t.record.prompt_tokens as u64);
                    Metrics::add(&m.prefix_cache_queries, t.record.prompt_tokens as u64);
                    Metrics::add(&m.prefix_cache_hits, cache.cached_prompt_tokens as u64);
                }
                ServeEvent::Token {
                    at,
                    text,
                    index,
                    token,
                    ..
                } => {
                    t.record.token_ns.push(at_ns);
                    let m = &self.metrics;
                    match t.last_token {
                        None => m.observe_ttft(at.duration_since(t.arrived).as_secs_f64()),
                        Some(last) => m.observe_itl(at.duration_since(last).as_secs_f64()),
                    }
                    t.last_token = Some(*at);
                    Metrics::add(&m.generation_tokens, 1);
                    // A send fails only when the client is gone: cancelled before the next step.
                    let lp = t.logprobs.then(|| {
                        let st = self.sched.request(id);
                        let consumed = t.record.prompt_tokens + index;
                        Box::new(TokenLogprobs {
                            token: *token,
                            logprob: st.and_then(|s| s.sampled_logprobs().get(*index).copied()),
                            top: st
                                .and_then(|s| {
                                    s.positions().iter().rev().find(|p| p.consumed == consumed)
                                })
                                .map(|p| p.top.clone())
                                .unwrap_or_default(),
                        })
                    });
                    let _ = t.tx.send(Update::Token(text.clone(), lp));
                }
                // Only a remote server (`ember bench --url`) emits these two.
                ServeEvent::Chunk { .. } | ServeEvent::Usage { .. } => {}
                ServeEvent::Speculation { spec, .. } => {
                    t.record.spec = Some(*spec);
                    Metrics::add(&self.metrics.spec_drafted, spec.drafted as u64);
                    Metrics::add(&self.metrics.spec_accepted, spec.accepted as u64);
                }
                ServeEvent::Finished {
                    at, reason, error, ..
                } => {
                    let mut t = self.tracks.remove(&id).expect("tracked above");
                    t.record.finish_ns = at_ns;
                    t.record.finish_reason = *reason;
                    t.record.error = error.clone();
                    let m = &self.metrics;
                    m.observe_e2e(at.duration_since(t.arrived).as_secs_f64());
                    let i = FINISH_REASONS
                        .iter()
                        .position(|r| *r == reason.as_str())
                        .expect("every finish reason has a label");
                    Metrics::add(&m.finished[i], 1);
                    let state = self.sched.take_finished(id);
                    let (text, generated, logprobs) = match state {
                        Some(s) => {
                            let lp = t.logprobs.then(|| LogprobData {
                                positions: s.positions().to_vec(),
                                sampled: s.sampled_logprobs().to_vec(),
                            });
                            let out = s.into_output();
                            (out.text, out.generated_tokens, lp)
                        }
                        None => (String::new(), vec![], None),
                    };
                    t.record.output_text = Some(text.clone());
                    let done = Done {
                        reason: *reason,
                        error: error.clone(),
                        prompt_tokens: t.record.prompt_tokens,
                        generated,
                        text,
                        cached_tokens: t.record.cache.cached_prompt_tokens,
                        logprobs,
                    };
                    let _ = t.tx.send(Update::Done(Box::new(done)));
                    if let Some(r) = &self.records {
                        // The store's thread outlives this one; a send fails only if it died,
                        // and it reports that itself.
                        let _ = r.send(t.record);
                    }
                }
            }
        }
        self.events = events;
        self.events.clear();
    }

    /// The gauges, and a memory sample now and then.
    fn publish(&mut self) {
        self.gauges();
        self.sample(false);
    }

    fn gauges(&self) {
        let st = self.sched.stats();
        let (used, total) = self.sched.kv_blocks();
        let m = &self.metrics;
        Metrics::set(&m.running, st.running as u64);
        Metrics::set(&m.waiting, st.waiting as u64);
        Metrics::set(&m.kv_blocks_used, used as u64);
        Metrics::set(&m.kv_blocks_total, total as u64);
        Metrics::set(&m.kv_bytes_used, st.kv_bytes_used);
    }

    fn sample(&mut self, force: bool) {
        let now = Instant::now();
        if !force && self.last_sample.is_some_and(|t| now - t < SAMPLE_EVERY) {
            return;
        }
        if self.memory.len() >= MAX_SAMPLES {
            return;
        }
        self.last_sample = Some(now);
        let st = self.sched.stats();
        let t_ns = self.ns(now);
        let power_w = match self
            .meter
            .as_mut()
            .map(|m| (m.read(now), m.source.name.clone()))
        {
            Some((Ok(w), _)) => w,
            Some((Err(e), name)) => {
                if self.power_error.is_none() {
                    self.power_error = Some(format!("{name} at {:.2} s: {e}", t_ns as f64 / 1e9));
                }
                None
            }
            None => None,
        };
        self.memory.push(MemorySample {
            t_ns,
            rss_bytes: ember_runtime::sys::memory().rss_bytes,
            device_bytes: st.device_bytes,
            kv_bytes_used: st.kv_bytes_used,
            kv_bytes_reserved: st.kv_bytes_reserved,
            power_w,
        });
    }
}
