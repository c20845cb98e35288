//! Writing benchmark runs to the results store while they run.
//!
//! A [`LiveRun`] stores the run's row first, then each request the moment it finishes (pass
//! [`LiveRun::record`] as the harness's [`Hooks::record`](crate::harness::Hooks); one
//! transaction per request on a second connection), then the memory samples and the figures.
//! A `kill -9` therefore loses only the requests in flight. A request that cannot be written
//! (disk full, a locked or read-only file) is counted, and [`LiveRun::finish`] fails with
//! [`StoreError::Lost`], naming how many, once everything else has been stored: a run that
//! could not record what it measured must not look complete.
//!
//! A sweep is a series of runs, one per rate it tries (the calibration's sync run first);
//! [`SweepRecorder`] stores each as its own live run, so a sweep killed midway keeps every
//! request of every step that finished.

use crate::harness::{self, RunOutput, SweepObserver};
use crate::load::{Limits, LoadSpec};
use crate::metrics::{self, Summary};
use crate::record::{RequestRecord, RunResult, WorkloadInfo};
use crate::slo::Slo;
use crate::store::{RunId, Store, StoreError};
use crate::workload::{self, Workload};

#[derive(Default)]
struct Tally {
    saved: usize,
    lost: usize,
    first_error: Option<String>,
}

/// A run being written to the store as it happens.
pub struct LiveRun {
    run: RunId,
    /// A second connection for the requests: each finished request is its own transaction.
    sink: Store,
    tally: Tally,
}

impl LiveRun {
    /// Stores `head`'s run row (provenance, workload, SLO; its records are ignored) and opens
    /// the connection that [`LiveRun::record`] commits each request on.
    pub fn begin(store: &mut Store, head: &RunResult) -> Result<LiveRun, StoreError> {
        let run = store.begin_run(head)?;
        let sink = Store::open(store.path())?.with_options(store.opts.clone());
        Ok(LiveRun {
            run,
            sink,
            tally: Tally::default(),
        })
    }

    pub fn id(&self) -> RunId {
        self.run
    }

    /// Commits one finished request. A request that cannot be written is counted (and logged),
    /// and [`LiveRun::finish`] reports it: the run goes on.
    pub fn record(&mut self, r: &RequestRecord) {
        match self.sink.add_request(self.run, r) {
            Ok(()) => self.tally.saved += 1,
            Err(e) => {
                log::error!("results store: request {} not saved: {e}", r.request_id);
                self.tally.lost += 1;
                self.tally.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Closes the requests' connection, stores `result`'s memory samples and figures, and marks
    /// the run finished. Fails with [`StoreError::Lost`] when any request could not be written.
    pub fn finish(self, store: &mut Store, result: &RunResult) -> Result<RunId, StoreError> {
        let LiveRun { run, sink, tally } = self;
        drop(sink);
        store.add_memory_samples(run, &result.memory)?;
        store.finish_run(run, result)?;
        if tally.lost > 0 {
            return Err(StoreError::Lost {
                path: store.path().to_path_buf(),
                run: run.0,
                lost: tally.lost,
                total: tally.lost + tally.saved,
                first_error: tally.first_error.unwrap_or_default(),
            });
        }
        Ok(run)
    }
}

/// The stored result of one harness run: `head`'s provenance, workload and SLO with the
/// figures of `out` (SLO verdicts, attainment, goodput, summary). Also returns the summary.
pub fn run_result(head: &RunResult, out: &RunOutput, slo: &Slo) -> (RunResult, Summary) {
    let mut summary = metrics::summarize(&out.records, &out.memory, Some(slo));
    if let Some(source) = &out.power_source {
        let measured: Vec<&crate::record::RequestRecord> =
            out.records.iter().filter(|r| !r.warmup).collect();
        let from = measured.iter().map(|r| r.arrival_ns).min().unwrap_or(0);
        let to = measured.iter().map(|r| r.finish_ns).max().unwrap_or(0);
        match (
            &out.power_error,
            crate::power::measured_energy(&out.memory, from, to),
        ) {
            (Some(e), _) => {
                summary.energy_gap = Some(format!(
                    "the power sensor failed mid-run ({e}); no energy reported for this run"
                ))
            }
            (None, Some(j)) => {
                summary.energy = Some(crate::power::Energy::new(
                    "measured",
                    source,
                    j,
                    summary.window_s,
                    summary.output_tokens,
                ))
            }
            (None, None) => {
                summary.energy_gap = Some(format!(
                    "{source}: its readings do not span the measured window; no energy reported"
                ))
            }
        }
    }
    let rep = summary.slo.clone().unwrap_or_default();
    let mut workload = head.workload.clone();
    workload.n_requests = summary.n_measured;
    workload.n_warmup = summary.n_warmup;
    summary.cost = head
        .price
        .as_ref()
        .map(|p| match (p.usd_per_mtok, p.usd_per_hour) {
            (Some(m), _) => metrics::Cost::per_mtok(m, &summary),
            (None, h) => metrics::Cost::per_hour(&p.source, h.unwrap_or(0.0), &summary),
        });
    let result = RunResult {
        started_at: head.started_at.clone(),
        provenance: head.provenance.clone(),
        workload,
        slo_name: head.slo_name.clone(),
        slo: head.slo.clone(),
        slo_verdicts: rep.verdicts,
        slo_attainment: rep.slo_attainment,
        goodput_rps: rep.goodput_rps,
        records: out.records.clone(),
        memory: out.memory.clone(),
        cache_evictions: out.cache_evictions,
        power_source: out.power_source.clone(),
        power_error: out.power_error.clone(),
        price: head.price.clone(),
        summary_json: serde_json::to_string(&summary).unwrap_or_default(),
    };
    (result, summary)
}

/// Stores every step of a sweep as its own live run.
pub struct SweepRecorder<'a> {
    store: &'a mut Store,
    /// Provenance, SLO, workload name, seed and parameters shared by every step.
    head: RunResult,
    slo: &'a Slo,
    /// The step being stored, and its head (the step's load and workload hash).
    live: Option<(LiveRun, RunResult)>,
    /// The runs stored so far, in order (the calibration first).
    pub runs: Vec<RunId>,
    /// What went wrong while storing (the sweep itself goes on).
    pub errors: Vec<StoreError>,
}

impl<'a> SweepRecorder<'a> {
    pub fn new(store: &'a mut Store, head: RunResult, slo: &'a Slo) -> Self {
        SweepRecorder {
            store,
            head,
            slo,
            live: None,
            runs: vec![],
            errors: vec![],
        }
    }

    /// The first storage error, if any (the run could not record all it measured).
    pub fn into_result(self) -> Result<Vec<RunId>, StoreError> {
        match self.errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(self.runs),
        }
    }
}

impl SweepObserver for SweepRecorder<'_> {
    fn record(&mut self, r: &RequestRecord) {
        if let Some((live, _)) = self.live.as_mut() {
            live.record(r);
        }
    }

    fn step_start(&mut self, w: &Workload, load: &LoadSpec, limits: &Limits) {
        let schedule = harness::arrival_schedule(load, limits, w.items.len());
        let n = harness::planned_requests(load, limits, w.items.len()).unwrap_or(w.items.len());
        let mut head = self.head.clone();
        head.workload = WorkloadInfo {
            hash: workload::workload_hash(w, load, &schedule),
            load: serde_json::to_string(load).unwrap_or_default(),
            n_requests: n,
            n_warmup: w.warmup.len(),
            ..self.head.workload.clone()
        };
        match LiveRun::begin(self.store, &head) {
            Ok(live) => self.live = Some((live, head)),
            Err(e) => self.errors.push(e),
        }
    }

    fn step_end(&mut self, out: &RunOutput) {
        let Some((live, head)) = self.live.take() else {
            return;
        };
        let (result, _) = run_result(&head, out, self.slo);
        let id = live.id();
        match live.finish(self.store, &result) {
            Ok(id) => self.runs.push(id),
            Err(e) => {
                self.runs.push(id);
                self.errors.push(e);
            }
        }
    }
}
