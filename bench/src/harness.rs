//! The driver: feeds a [`Server`] according to a load, turns its stamped
//! events into [`RequestRecord`]s and samples memory.
//!
//! One thread, one loop: submit every request that is due (arrival times are
//! the *intended* ones), run one `step()`, record its events, sample memory;
//! when the server is idle, sleep until the next arrival. Every timestamp that
//! becomes a figure is an engine event's `Instant` or an intended arrival,
//! both measured from the run's origin `t0`; the harness never stamps tokens.
//!
//! The clock is a trait so that tests can drive the harness on synthetic time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use ember_runtime::serve::{FinishKind, RequestId, ServeEvent, ServeRequest, Server, ServerStats};

use crate::load::{self, Limits, LoadSpec};
use crate::metrics;
use crate::record::{CacheUse, MemorySample, Ns, RequestRecord, SweepPoint, SweepResult};
use crate::slo::Slo;
use crate::workload::{WorkItem, Workload};

pub trait Clock {
    fn now(&self) -> Instant;
    /// Block until `t` (a fake clock jumps there).
    fn sleep_until(&self, t: Instant);
}

/// The real monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep_until(&self, t: Instant) {
        let now = Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    }
}

#[derive(Clone, Debug)]
pub struct HarnessOptions {
    pub load: LoadSpec,
    pub limits: Limits,
    /// Per-token recording: the token's text in `output_text` and a memory
    /// sample at every engine step. Off: memory on the timer only, no text.
    /// Token timestamps are always kept (they are the measurement).
    pub record_tokens: bool,
    /// Memory timer (samples are also taken at every step when `record_tokens`).
    pub memory_interval: Duration,
    /// How often RSS is re-read from /proc at most (reading it costs tens of µs).
    pub rss_interval: Duration,
    /// Progress callback period.
    pub progress_interval: Duration,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            load: LoadSpec::Sync,
            limits: Limits::default(),
            record_tokens: true,
            memory_interval: Duration::from_millis(50),
            rss_interval: Duration::from_millis(100),
            progress_interval: Duration::from_millis(100),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub warmup_done: usize,
    pub done: usize,
    /// Requests the run will send, when known (None: until the duration limit).
    pub planned: Option<usize>,
    pub output_tokens: u64,
    pub elapsed: Duration,
}

/// The harness's own cost, measured on the real clock: time in `step()` vs
/// time in the harness's bookkeeping between steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Overhead {
    pub steps: u64,
    pub step_ns: u64,
    pub harness_ns: u64,
    pub tokens: u64,
}

impl Overhead {
    /// Harness bookkeeping as a fraction of engine step time.
    pub fn fraction(&self) -> f64 {
        if self.step_ns == 0 {
            0.0
        } else {
            self.harness_ns as f64 / self.step_ns as f64
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RunOutput {
    pub records: Vec<RequestRecord>,
    pub memory: Vec<MemorySample>,
    /// Intended arrival offsets of rate loads (ns from the measured phase's start).
    pub schedule: Vec<Ns>,
    pub overhead: Overhead,
    /// Evictions during this run (run-scoped, not lifetime).
    pub cache_evictions: u64,
    /// Server stats at the end (weights bytes etc.).
    pub last_stats: ServerStats,
}

/// How many measured requests a load will send (None: until the duration limit).
pub fn planned_requests(load: &LoadSpec, limits: &Limits, n_items: usize) -> Option<usize> {
    match (limits.max_requests, limits.max_duration_ms, load) {
        (Some(n), _, _) => Some(n),
        (None, Some(d), LoadSpec::Rate { rps, .. }) => {
            Some(((rps * d as f64 / 1000.0).ceil() as usize).max(1))
        }
        (None, Some(_), _) => None,
        (None, None, _) => Some(n_items),
    }
}

/// The intended arrival schedule of a load (empty for closed loops).
pub fn arrival_schedule(load: &LoadSpec, limits: &Limits, n_items: usize) -> Vec<Ns> {
    match load {
        LoadSpec::Rate {
            rps,
            arrivals,
            seed,
        } => load::schedule(
            *rps,
            *arrivals,
            planned_requests(load, limits, n_items).unwrap_or(n_items),
            *seed,
        ),
        _ => vec![],
    }
}

struct Driver<'a> {
    t0: Instant,
    o: &'a HarnessOptions,
    w: &'a Workload,
    records: Vec<RequestRecord>,
    slot: HashMap<RequestId, usize>,
    next_id: u64,
    in_flight: usize,
    events: Vec<ServeEvent>,
    memory: Vec<MemorySample>,
    last_sample_at: Option<Instant>,
    last_rss_at: Option<Instant>,
    rss: u64,
    first_evictions: Option<u64>,
    last_stats: ServerStats,
    overhead: Overhead,
    done: usize,
    warmup_done: usize,
    output_tokens: u64,
    last_progress: Option<Instant>,
}

impl Driver<'_> {
    fn ns(&self, t: Instant) -> Ns {
        t.saturating_duration_since(self.t0).as_nanos() as Ns
    }

    fn submit(
        &mut self,
        server: &mut dyn Server,
        item: &WorkItem,
        arrival: Instant,
        warmup: bool,
    ) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        let arrival_ns = self.ns(arrival);
        self.slot.insert(id, self.records.len());
        self.records.push(RequestRecord {
            request_id: id,
            warmup,
            tags: item.tags.clone(),
            prompt_tokens: item.prompt_tokens.len(),
            arrival_ns,
            enqueue_ns: arrival_ns,
            schedule_ns: None,
            prefill_start_ns: None,
            prefill_end_ns: None,
            token_ns: Vec::with_capacity(item.max_tokens.min(1 << 16)),
            finish_ns: arrival_ns,
            finish_reason: FinishKind::Cancelled,
            error: None,
            cache: CacheUse::default(),
            output_text: self.o.record_tokens.then(String::new),
        });
        self.in_flight += 1;
        let req = ServeRequest {
            id,
            prompt_tokens: item.prompt_tokens.clone(),
            max_tokens: item.max_tokens,
            sampler: self.w.sampler.clone(),
            stop_strings: item.stop.clone(),
            ignore_eos: self.w.ignore_eos,
        };
        let mut ev = std::mem::take(&mut self.events);
        server.submit(req, &mut ev);
        self.events = ev;
        id
    }

    /// Record the pending events; returns the (id, finish instant) of finished requests.
    fn absorb(&mut self, finished: &mut Vec<(RequestId, Instant)>) {
        let t0 = self.t0;
        let ns = |t: Instant| t.saturating_duration_since(t0).as_nanos() as Ns;
        for ev in self.events.drain(..) {
            let Some(&i) = self.slot.get(&ev.id()) else {
                continue;
            };
            let r = &mut self.records[i];
            match ev {
                ServeEvent::Enqueued { at, .. } => r.enqueue_ns = ns(at),
                ServeEvent::Scheduled { at, .. } => {
                    r.schedule_ns.get_or_insert(ns(at));
                }
                ServeEvent::PrefillStart { at, .. } => {
                    r.prefill_start_ns.get_or_insert(ns(at));
                }
                ServeEvent::PrefillEnd { at, cache, .. } => {
                    r.prefill_end_ns = Some(ns(at));
                    r.cache.cached_prompt_tokens += cache.cached_prompt_tokens;
                    r.cache.computed_prompt_tokens += cache.computed_prompt_tokens;
                    r.cache.cache_lookups += cache.cache_lookups;
                    r.cache.cache_hit_blocks += cache.cache_hit_blocks;
                }
                ServeEvent::Token { at, text, .. } => {
                    r.token_ns.push(ns(at));
                    if let Some(t) = r.output_text.as_mut() {
                        t.push_str(&text);
                    }
                    self.output_tokens += 1;
                    self.overhead.tokens += 1;
                }
                ServeEvent::Finished {
                    id,
                    at,
                    reason,
                    error,
                } => {
                    r.finish_ns = ns(at);
                    r.finish_reason = reason;
                    r.error = error;
                    let warm = r.warmup;
                    self.slot.remove(&id);
                    self.in_flight -= 1;
                    if warm {
                        self.warmup_done += 1;
                    } else {
                        self.done += 1;
                    }
                    finished.push((id, at));
                    RECORD_SINK.with(|s| {
                        if let Some(f) = s.borrow_mut().as_mut() {
                            f(r)
                        }
                    });
                }
            }
        }
    }

    fn sample_memory(&mut self, server: &dyn Server, now: Instant, force: bool) {
        if self
            .last_rss_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.o.rss_interval)
        {
            self.rss = ember_rss();
            self.last_rss_at = Some(now);
        }
        let s = server.stats();
        self.first_evictions.get_or_insert(s.cache_evictions);
        self.last_stats = s;
        let m = MemorySample {
            t_ns: self.ns(now),
            rss_bytes: self.rss,
            device_bytes: s.device_bytes,
            kv_bytes_used: s.kv_bytes_used,
            kv_bytes_reserved: s.kv_bytes_reserved,
        };
        let timer = self
            .last_sample_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.o.memory_interval);
        let changed = self.memory.last().is_none_or(|l| {
            (
                l.rss_bytes,
                l.device_bytes,
                l.kv_bytes_used,
                l.kv_bytes_reserved,
            ) != (
                m.rss_bytes,
                m.device_bytes,
                m.kv_bytes_used,
                m.kv_bytes_reserved,
            )
        });
        if force || timer || changed {
            self.memory.push(m);
            if timer || force {
                self.last_sample_at = Some(now);
            }
        }
    }

    fn progress(
        &mut self,
        now: Instant,
        planned: Option<usize>,
        force: bool,
        cb: &mut dyn FnMut(&Progress),
    ) {
        if force
            || self
                .last_progress
                .is_none_or(|t| now.saturating_duration_since(t) >= self.o.progress_interval)
        {
            self.last_progress = Some(now);
            cb(&Progress {
                warmup_done: self.warmup_done,
                done: self.done,
                planned,
                output_tokens: self.output_tokens,
                elapsed: now.saturating_duration_since(self.t0),
            });
        }
    }

    /// One engine step plus bookkeeping; returns finished requests.
    fn step(
        &mut self,
        server: &mut dyn Server,
        clock: &dyn Clock,
        planned: Option<usize>,
        cb: &mut dyn FnMut(&Progress),
    ) -> Vec<(RequestId, Instant)> {
        let t = Instant::now();
        let mut ev = std::mem::take(&mut self.events);
        server.step(&mut ev);
        self.events = ev;
        let h = Instant::now();
        self.overhead.steps += 1;
        self.overhead.step_ns += (h - t).as_nanos() as u64;
        let mut finished = vec![];
        self.absorb(&mut finished);
        let now = clock.now();
        if self.o.record_tokens {
            self.sample_memory(server, now, false);
        } else if self
            .last_sample_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.o.memory_interval)
        {
            self.sample_memory(server, now, true);
        }
        self.progress(now, planned, !finished.is_empty(), cb);
        self.overhead.harness_ns += h.elapsed().as_nanos() as u64;
        finished
    }
}

thread_local! {
    static RSS_PROBE: std::cell::RefCell<Option<Box<dyn FnMut() -> u64>>> = const { std::cell::RefCell::new(None) };
}

fn ember_rss() -> u64 {
    RSS_PROBE.with(|p| match p.borrow_mut().as_mut() {
        Some(f) => f(),
        None => ember_runtime::sys::memory().rss_bytes,
    })
}

/// Called with each request's record as it finishes (see [`set_record_sink`]).
pub type RecordSink = Box<dyn FnMut(&RequestRecord)>;

thread_local! {
    static RECORD_SINK: std::cell::RefCell<Option<RecordSink>> = const { std::cell::RefCell::new(None) };
}

/// Called with each request's record the moment it finishes (on the driving
/// thread), e.g. to commit it to the results store so a crash loses at most the
/// requests in flight. `None` removes the sink.
pub fn set_record_sink(f: Option<RecordSink>) {
    RECORD_SINK.with(|s| *s.borrow_mut() = f);
}

/// Replace the RSS probe on this thread (tests use a fixed value).
pub fn set_rss_probe(f: Option<Box<dyn FnMut() -> u64>>) {
    RSS_PROBE.with(|p| *p.borrow_mut() = f);
}

/// Run a workload against a server: warm-up requests one at a time, then the
/// measured requests under `o.load`.
pub fn run(
    server: &mut dyn Server,
    clock: &dyn Clock,
    w: &Workload,
    o: &HarnessOptions,
    progress: &mut dyn FnMut(&Progress),
) -> RunOutput {
    assert!(!w.items.is_empty(), "a workload needs at least one request");
    let t0 = clock.now();
    let mut d = Driver {
        t0,
        o,
        w,
        records: vec![],
        slot: HashMap::new(),
        next_id: 0,
        in_flight: 0,
        events: Vec::with_capacity(64),
        memory: vec![],
        last_sample_at: None,
        last_rss_at: None,
        rss: 0,
        first_evictions: None,
        last_stats: ServerStats::default(),
        overhead: Overhead::default(),
        done: 0,
        warmup_done: 0,
        output_tokens: 0,
        last_progress: None,
    };
    d.sample_memory(server, t0, true);
    let planned = planned_requests(&o.load, &o.limits, w.items.len());

    // Warm-up: one at a time, before the measured phase; recorded and flagged.
    for item in &w.warmup {
        let now = clock.now();
        d.submit(server, item, now, true);
        d.absorb(&mut vec![]);
        while d.in_flight > 0 && server.has_work() {
            d.step(server, clock, planned, progress);
        }
    }

    let tm = clock.now();
    let deadline = o
        .limits
        .max_duration_ms
        .map(|ms| tm + Duration::from_millis(ms));
    let schedule = arrival_schedule(&o.load, &o.limits, w.items.len());
    let (users, think) = match o.load {
        LoadSpec::Sync => (1, Duration::ZERO),
        LoadSpec::Concurrency { users, think_ms } => {
            (users.max(1), Duration::from_millis(think_ms))
        }
        LoadSpec::Rate { .. } => (0, Duration::ZERO),
    };
    // Closed loop: when each user sends next (None while its request runs).
    let mut ready: Vec<Option<Instant>> = vec![Some(tm); users];
    let mut user_of: HashMap<RequestId, usize> = HashMap::new();
    let mut sent = 0usize;
    let may_send = |sent: usize, at: Instant| {
        planned.is_none_or(|p| sent < p) && deadline.is_none_or(|dl| at < dl)
    };
    loop {
        let now = clock.now();
        // Submit everything that is due, stamped with its intended arrival.
        if users > 0 {
            for (u, slot) in ready.iter_mut().enumerate() {
                if let Some(r) = *slot
                    && r <= now
                    && may_send(sent, r)
                {
                    let item = &w.items[sent % w.items.len()];
                    let id = d.submit(server, item, r, false);
                    user_of.insert(id, u);
                    *slot = None;
                    sent += 1;
                }
            }
        } else {
            while sent < schedule.len() {
                let due = tm + Duration::from_nanos(schedule[sent]);
                if due > now || !may_send(sent, due) {
                    break;
                }
                let item = &w.items[sent % w.items.len()];
                d.submit(server, item, due, false);
                sent += 1;
            }
        }
        d.absorb(&mut vec![]);

        if server.has_work() {
            for (id, at) in d.step(server, clock, planned, progress) {
                if let Some(u) = user_of.remove(&id) {
                    ready[u] = Some(at + think);
                }
            }
            continue;
        }
        // Idle: wait for the next arrival, or stop.
        let next_due = if users > 0 {
            ready
                .iter()
                .flatten()
                .copied()
                .filter(|&r| may_send(sent, r))
                .min()
        } else if sent < schedule.len() {
            let due = tm + Duration::from_nanos(schedule[sent]);
            may_send(sent, due).then_some(due)
        } else {
            None
        };
        match next_due {
            Some(due) => {
                // Sleep in timer-sized slices so memory is still sampled.
                let now = clock.now();
                let until = due.min(now + o.memory_interval);
                clock.sleep_until(until);
                let now = clock.now();
                if d.last_sample_at
                    .is_none_or(|t| now.saturating_duration_since(t) >= o.memory_interval)
                {
                    d.sample_memory(server, now, true);
                }
                d.progress(now, planned, false, progress);
            }
            None => break,
        }
    }
    // A server that went idle with requests outstanding dropped them.
    if d.in_flight > 0 {
        let end = d.ns(clock.now());
        for &i in d.slot.values() {
            let r = &mut d.records[i];
            r.finish_ns = end;
            r.finish_reason = FinishKind::Cancelled;
            r.error = Some("the server went idle without finishing the request".into());
        }
        d.slot.clear();
        d.in_flight = 0;
    }
    let end = clock.now();
    d.sample_memory(server, end, true);
    d.progress(end, planned, true, progress);
    let evictions = d
        .last_stats
        .cache_evictions
        .saturating_sub(d.first_evictions.unwrap_or(0));
    RunOutput {
        records: d.records,
        memory: d.memory,
        schedule,
        overhead: d.overhead,
        cache_evictions: evictions,
        last_stats: d.last_stats,
    }
}

/// Sweep settings: bounded in points and in time.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub requests_per_point: usize,
    pub max_points: usize,
    pub budget: Duration,
    pub arrivals: load::Arrivals,
    pub seed: u64,
}

/// Told about each step of a [`sweep`] (the calibration's sync run first, then one run per
/// rate) as it starts and as it ends, e.g. to store each step as a run of its own while the
/// sweep goes on.
pub trait SweepObserver {
    /// `w` and `limits` are what the step sends under `load`.
    fn step_start(&mut self, w: &Workload, load: &LoadSpec, limits: &Limits);
    fn step_end(&mut self, out: &RunOutput);
}

/// Observes nothing.
impl SweepObserver for () {
    fn step_start(&mut self, _: &Workload, _: &LoadSpec, _: &Limits) {}
    fn step_end(&mut self, _: &RunOutput) {}
}

/// Find `max_goodput_rate`: the highest Poisson (or constant) arrival rate at
/// which `slo_attainment` ≥ the SLO's target. Calibrates the service rate μ
/// with a few sync requests, then bisects between passing and failing rates,
/// starting at 0.8 μ, for at most `max_points` rates or `budget` time.
/// Returns the sweep and the run at the best passing rate (or the last run).
// Eight arguments: the run's seven plus the observer; a struct for them would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    server: &mut dyn Server,
    clock: &dyn Clock,
    w: &Workload,
    base: &HarnessOptions,
    slo: &Slo,
    cfg: &SweepConfig,
    progress: &mut dyn FnMut(&Progress),
    observer: &mut dyn SweepObserver,
) -> (SweepResult, RunOutput) {
    let start = clock.now();
    let calib_n = w.items.len().clamp(1, 4);
    let mut step = |w: &Workload, o: &HarnessOptions| {
        observer.step_start(w, &o.load, &o.limits);
        let out = run(server, clock, w, o, progress);
        observer.step_end(&out);
        out
    };
    let calib = step(
        w,
        &HarnessOptions {
            load: LoadSpec::Sync,
            limits: Limits {
                max_requests: Some(calib_n),
                max_duration_ms: None,
            },
            ..base.clone()
        },
    );
    let busy_s: f64 = calib
        .records
        .iter()
        .filter(|r| !r.warmup)
        .map(|r| metrics::e2e_ns(r) as f64 / 1e9)
        .sum();
    let capacity = if busy_s > 0.0 {
        calib_n as f64 / busy_s
    } else {
        1.0
    };
    let no_warm = Workload {
        warmup: vec![],
        ..w.clone()
    };
    let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = 0.8 * capacity;
    let mut points = vec![];
    let mut best: Option<RunOutput> = None;
    let mut last: Option<RunOutput> = None;
    for i in 0..cfg.max_points {
        let elapsed = clock.now().saturating_duration_since(start);
        if elapsed >= cfg.budget {
            break;
        }
        let left_ms = (cfg.budget - elapsed).as_millis() as u64;
        let o = HarnessOptions {
            load: LoadSpec::Rate {
                rps: rate,
                arrivals: cfg.arrivals,
                seed: cfg.seed.wrapping_add(i as u64),
            },
            limits: Limits {
                max_requests: Some(cfg.requests_per_point),
                max_duration_ms: Some(left_ms.max(1)),
            },
            ..base.clone()
        };
        let out = step(&no_warm, &o);
        let s = metrics::summarize(&out.records, &out.memory, Some(slo));
        let rep = s.slo.clone().unwrap_or_default();
        let pass = s.n_measured > 0 && rep.slo_attainment >= slo.target;
        points.push(SweepPoint {
            rate_rps: rate,
            n: s.n_measured,
            slo_attainment: rep.slo_attainment,
            goodput_rps: rep.goodput_rps,
            pass,
        });
        if pass {
            lo = Some(lo.map_or(rate, |l: f64| l.max(rate)));
            best = Some(out);
        } else {
            hi = Some(hi.map_or(rate, |h: f64| h.min(rate)));
            last = Some(out);
        }
        rate = match (lo, hi) {
            (Some(l), Some(h)) => {
                if (h - l) / h < 0.05 {
                    break;
                }
                (l + h) / 2.0
            }
            (Some(l), None) => l * 2.0,
            (None, Some(h)) => h / 2.0,
            (None, None) => unreachable!(),
        };
    }
    let result = SweepResult {
        capacity_rps: capacity,
        target: slo.target,
        points,
        max_goodput_rate: lo,
    };
    (result, best.or(last).unwrap_or(calib))
}
