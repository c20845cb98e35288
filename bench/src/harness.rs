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
//! What a run reports while it goes (progress, each finished request's record)
//! is passed in [`Hooks`]; the RSS probe is a field of [`HarnessOptions`].

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
    /// Keep each request's output text even without `record_tokens` (`--score` judges it).
    pub keep_text: bool,
    /// Memory timer (samples are also taken at every step when `record_tokens`).
    pub memory_interval: Duration,
    /// How often RSS is re-read from /proc at most (reading it costs tens of µs).
    pub rss_interval: Duration,
    /// Progress callback period.
    pub progress_interval: Duration,
    /// Reads the process's RSS for the memory samples (None: the OS's figure, from /proc).
    /// Tests give a fixed value.
    pub rss_probe: Option<fn() -> u64>,
    /// Take memory samples at all. Off for a remote server (`ember bench --url`): this
    /// process's RSS is the client's, not the server's, and its stats are empty.
    pub sample_memory: bool,
    /// Read this power source with the timer's memory samples.
    pub power: Option<crate::power::PowerSource>,
    /// Mark each finished request with whether it met this SLO (its goodput share).
    pub slo: Option<Slo>,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            load: LoadSpec::Sync,
            limits: Limits::default(),
            record_tokens: true,
            keep_text: false,
            memory_interval: Duration::from_millis(50),
            rss_interval: Duration::from_millis(100),
            progress_interval: Duration::from_millis(100),
            rss_probe: None,
            sample_memory: true,
            power: None,
            slo: None,
        }
    }
}

/// What a run tells its caller while it goes, besides the [`RunOutput`] it returns. Both are
/// called on the driving thread.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Progress, at most every `progress_interval` and whenever a request finishes.
    pub progress: Option<&'a mut dyn FnMut(&Progress)>,
    /// Each request's record (warm-ups too) the moment it finishes, e.g. to commit it to the
    /// results store so that a crash loses at most the requests in flight.
    pub record: Option<&'a mut dyn FnMut(&RequestRecord)>,
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
    /// The power source read, and why it stopped being read (if it did).
    pub power_source: Option<String>,
    pub power_error: Option<String>,
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

struct Driver<'a, 'h> {
    t0: Instant,
    o: &'a HarnessOptions,
    w: &'a Workload,
    hooks: Hooks<'h>,
    records: Vec<RequestRecord>,
    slot: HashMap<RequestId, usize>,
    meter: Option<crate::power::Meter>,
    power_error: Option<String>,
    /// How each scored request in flight is judged when it finishes.
    scores: HashMap<RequestId, crate::score::Score>,
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

impl<'a, 'h> Driver<'a, 'h> {
    fn new(t0: Instant, o: &'a HarnessOptions, w: &'a Workload, hooks: Hooks<'h>) -> Self {
        Driver {
            t0,
            o,
            w,
            hooks,
            records: vec![],
            slot: HashMap::new(),
            meter: o.power.clone().map(crate::power::Meter::new),
            power_error: None,
            scores: HashMap::new(),
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
        }
    }

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
            output_text: (self.o.record_tokens || self.o.keep_text).then(String::new),
            counted: Default::default(),
            correct: None,
            slo_attained: None,
            spec: None,
        });
        if let Some(s) = &item.score {
            self.scores.insert(id, s.clone());
        }
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
                // A remote server's chunk is stamped like a token; `Usage` corrects the count.
                ServeEvent::Token { at, text, .. } | ServeEvent::Chunk { at, text, .. } => {
                    r.token_ns.push(ns(at));
                    if let Some(t) = r.output_text.as_mut() {
                        t.push_str(&text);
                    }
                    self.output_tokens += 1;
                    self.overhead.tokens += 1;
                }
                ServeEvent::Usage {
                    prompt_tokens,
                    output_tokens,
                    cached_prompt_tokens,
                    local_output_tokens,
                    ..
                } => {
                    r.counted.prompt_tokens = prompt_tokens;
                    r.counted.output_tokens = output_tokens;
                    r.counted.local_output_tokens = local_output_tokens;
                    if let Some(c) = cached_prompt_tokens {
                        r.cache.cached_prompt_tokens = c;
                    }
                    // Progress counted a token per chunk: correct it to the count.
                    self.output_tokens = (self.output_tokens + r.output_tokens() as u64)
                        .saturating_sub(r.token_ns.len() as u64);
                }
                // The request's speculation totals (sent once, just before `Finished`); its
                // tokens were stamped one by one above, each as it was released.
                ServeEvent::Speculation { spec, .. } => r.spec = Some(spec),
                ServeEvent::Finished {
                    id,
                    at,
                    reason,
                    error,
                } => {
                    r.finish_ns = ns(at);
                    r.finish_reason = reason;
                    r.error = error;
                    // A failed request has no answer to judge: it counts in the error rate.
                    if let Some(s) = self.scores.remove(&id)
                        && !r.failed()
                    {
                        r.correct = Some(s.judge(r.output_text.as_deref().unwrap_or("")));
                    }
                    if let Some(slo) = &self.o.slo {
                        r.slo_attained = Some(crate::metrics::attains(r, slo));
                    }
                    let warm = r.warmup;
                    self.slot.remove(&id);
                    self.in_flight -= 1;
                    if warm {
                        self.warmup_done += 1;
                    } else {
                        self.done += 1;
                    }
                    finished.push((id, at));
                    if let Some(f) = self.hooks.record.as_mut() {
                        f(r)
                    }
                }
            }
        }
    }

    fn sample_memory(&mut self, server: &dyn Server, now: Instant, force: bool) {
        if !self.o.sample_memory {
            return;
        }
        if self
            .last_rss_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.o.rss_interval)
        {
            self.rss = match self.o.rss_probe {
                Some(f) => f(),
                None => ember_runtime::sys::memory().rss_bytes,
            };
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
            power_w: None,
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
            let mut m = m;
            // Power on the timer only: a PMIC is read through a subprocess.
            if (timer || force)
                && let Some(meter) = self.meter.as_mut()
            {
                match meter.read(now) {
                    Ok(w) => m.power_w = w,
                    Err(e) => {
                        if self.power_error.is_none() {
                            self.power_error = Some(format!(
                                "{} at {:.2} s: {e}",
                                meter.source.name,
                                m.t_ns as f64 / 1e9
                            ));
                        }
                    }
                }
            }
            self.memory.push(m);
            if timer || force {
                self.last_sample_at = Some(now);
            }
        }
    }

    fn progress(&mut self, now: Instant, planned: Option<usize>, force: bool) {
        if force
            || self
                .last_progress
                .is_none_or(|t| now.saturating_duration_since(t) >= self.o.progress_interval)
        {
            self.last_progress = Some(now);
            let Some(cb) = self.hooks.progress.as_mut() else {
                return;
            };
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
        self.progress(now, planned, !finished.is_empty());
        self.overhead.harness_ns += h.elapsed().as_nanos() as u64;
        finished
    }

    /// Idle: sleep towards `due` in timer-sized slices, so memory is still sampled.
    fn idle_until(
        &mut self,
        server: &dyn Server,
        clock: &dyn Clock,
        due: Instant,
        planned: Option<usize>,
    ) {
        let now = clock.now();
        clock.sleep_until(due.min(now + self.o.memory_interval));
        let now = clock.now();
        if self
            .last_sample_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.o.memory_interval)
        {
            self.sample_memory(server, now, true);
        }
        self.progress(now, planned, false);
    }

    /// A server that went idle with requests outstanding dropped them.
    fn cancel_outstanding(&mut self, clock: &dyn Clock) {
        if self.in_flight == 0 {
            return;
        }
        let end = self.ns(clock.now());
        for &i in self.slot.values() {
            let r = &mut self.records[i];
            r.finish_ns = end;
            r.finish_reason = FinishKind::Cancelled;
            r.error = Some("the server went idle without finishing the request".into());
        }
        self.slot.clear();
        self.in_flight = 0;
    }

    fn into_output(self, schedule: Vec<Ns>) -> RunOutput {
        let evictions = self
            .last_stats
            .cache_evictions
            .saturating_sub(self.first_evictions.unwrap_or(0));
        RunOutput {
            records: self.records,
            memory: self.memory,
            schedule,
            overhead: self.overhead,
            cache_evictions: evictions,
            last_stats: self.last_stats,
            power_source: self.meter.as_ref().map(|m| m.source.name.clone()),
            power_error: self.power_error,
        }
    }
}

/// When the measured phase stops sending: after `planned` requests or at `deadline`.
#[derive(Clone, Copy)]
struct Budget {
    planned: Option<usize>,
    deadline: Option<Instant>,
}

impl Budget {
    /// May the request after `sent` others go out at `at`?
    fn allows(&self, sent: usize, at: Instant) -> bool {
        self.planned.is_none_or(|p| sent < p) && self.deadline.is_none_or(|dl| at < dl)
    }
}

/// Who sends the measured requests, and when: closed-loop users (sync is one user) that send
/// again `think` after their last request finished, or an open loop's intended schedule.
struct Senders<'s> {
    /// The start of the measured phase.
    tm: Instant,
    budget: Budget,
    /// Open loop: intended arrival offsets from `tm` (empty for a closed loop).
    schedule: &'s [Ns],
    /// Closed loop: when each user sends next (None while its request runs); empty for an
    /// open loop.
    ready: Vec<Option<Instant>>,
    think: Duration,
    user_of: HashMap<RequestId, usize>,
    sent: usize,
}

impl<'s> Senders<'s> {
    fn new(
        load: &LoadSpec,
        limits: &Limits,
        tm: Instant,
        planned: Option<usize>,
        schedule: &'s [Ns],
    ) -> Self {
        let (users, think) = match *load {
            LoadSpec::Sync => (1, Duration::ZERO),
            LoadSpec::Concurrency { users, think_ms } => {
                (users.max(1), Duration::from_millis(think_ms))
            }
            LoadSpec::Rate { .. } => (0, Duration::ZERO),
        };
        Senders {
            tm,
            budget: Budget {
                planned,
                deadline: limits
                    .max_duration_ms
                    .map(|ms| tm + Duration::from_millis(ms)),
            },
            schedule,
            ready: vec![Some(tm); users],
            think,
            user_of: HashMap::new(),
            sent: 0,
        }
    }

    fn may_send(&self, at: Instant) -> bool {
        self.budget.allows(self.sent, at)
    }

    /// The intended arrival of the open loop's next request, if there is one.
    fn next_scheduled(&self) -> Option<Instant> {
        (self.sent < self.schedule.len())
            .then(|| self.tm + Duration::from_nanos(self.schedule[self.sent]))
    }

    /// Submit every request that is due by `now`, stamped with its intended arrival.
    fn submit_due(&mut self, d: &mut Driver, server: &mut dyn Server, now: Instant) {
        let w = d.w;
        let items = &w.items;
        if self.ready.is_empty() {
            while let Some(due) = self.next_scheduled() {
                if due > now || !self.may_send(due) {
                    break;
                }
                d.submit(server, &items[self.sent % items.len()], due, false);
                self.sent += 1;
            }
            return;
        }
        let budget = self.budget;
        for (u, slot) in self.ready.iter_mut().enumerate() {
            if let Some(r) = *slot
                && r <= now
                && budget.allows(self.sent, r)
            {
                let id = d.submit(server, &items[self.sent % items.len()], r, false);
                self.user_of.insert(id, u);
                *slot = None;
                self.sent += 1;
            }
        }
    }

    /// A request finished at `at`: its user (if a closed loop's) sends again after thinking.
    fn finished(&mut self, id: RequestId, at: Instant) {
        if let Some(u) = self.user_of.remove(&id) {
            self.ready[u] = Some(at + self.think);
        }
    }

    /// When the next request is due (None: nothing more will be sent).
    fn next_due(&self) -> Option<Instant> {
        if self.ready.is_empty() {
            return self.next_scheduled().filter(|&due| self.may_send(due));
        }
        self.ready
            .iter()
            .flatten()
            .copied()
            .filter(|&r| self.may_send(r))
            .min()
    }
}

/// Run a workload against a server: warm-up requests one at a time, then the
/// measured requests under `o.load`, telling `hooks` as it goes.
pub fn run(
    server: &mut dyn Server,
    clock: &dyn Clock,
    w: &Workload,
    o: &HarnessOptions,
    hooks: Hooks<'_>,
) -> RunOutput {
    assert!(!w.items.is_empty(), "a workload needs at least one request");
    let t0 = clock.now();
    let mut d = Driver::new(t0, o, w, hooks);
    d.sample_memory(server, t0, true);
    let planned = planned_requests(&o.load, &o.limits, w.items.len());

    // Warm-up: one at a time, before the measured phase; recorded and flagged.
    for item in &w.warmup {
        let now = clock.now();
        d.submit(server, item, now, true);
        d.absorb(&mut vec![]);
        while d.in_flight > 0 && server.has_work() {
            server.wait(None);
            d.step(server, clock, planned);
        }
    }

    let schedule = arrival_schedule(&o.load, &o.limits, w.items.len());
    let mut senders = Senders::new(&o.load, &o.limits, clock.now(), planned, &schedule);
    loop {
        senders.submit_due(&mut d, server, clock.now());
        d.absorb(&mut vec![]);
        if server.has_work() {
            server.wait(senders.next_due());
            for (id, at) in d.step(server, clock, planned) {
                senders.finished(id, at);
            }
            continue;
        }
        // Idle: wait for the next arrival, or stop.
        let Some(due) = senders.next_due() else {
            break;
        };
        d.idle_until(server, clock, due, planned);
    }
    d.cancel_outstanding(clock);
    let end = clock.now();
    d.sample_memory(server, end, true);
    d.progress(end, planned, true);
    d.into_output(schedule)
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
/// rate) as it starts, as each of its requests finishes and as it ends, e.g. to store each
/// step as a run of its own while the sweep goes on.
pub trait SweepObserver {
    /// `w` and `limits` are what the step sends under `load`.
    fn step_start(&mut self, w: &Workload, load: &LoadSpec, limits: &Limits);
    /// A request of the current step finished (the step's [`Hooks::record`]).
    fn record(&mut self, _r: &RequestRecord) {}
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
        let mut record = |r: &RequestRecord| observer.record(r);
        let hooks = Hooks {
            progress: Some(&mut *progress),
            record: Some(&mut record),
        };
        let out = run(server, clock, w, o, hooks);
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
