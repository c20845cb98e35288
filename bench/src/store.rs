//! The results store: one SQLite file (rusqlite, bundled SQLite) that holds
//! everything needed to explain a number. Schema: `store/schema_v1.sql`;
//! documentation with example queries: `bench/STORE.md`.
//!
//! Writing a run as it happens (each call is its own transaction, so a crash
//! loses at most the requests still in flight):
//!
//! ```no_run
//! # use ember_bench::{store::Store, record::*};
//! # fn f(run_result: &RunResult, rec: &RequestRecord, mem: &[MemorySample]) -> Result<(), ember_bench::store::StoreError> {
//! let mut store = Store::open(ember_bench::store::default_db_path())?;
//! let run = store.begin_run(run_result)?;        // provenance, workload; records ignored
//! store.add_request(run, rec)?;                  // once per finished request
//! store.add_memory_samples(run, mem)?;           // any time, in batches
//! store.finish_run(run, run_result)?;            // SLO verdicts, attainment, summary
//! # Ok(()) }
//! ```
//!
//! or all at once with [`Store::save_run`].

pub mod figures;
pub mod testdata;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::llamabench::{BenchResult, Test};
use crate::record::{
    CacheUse, FinishKind, MemorySample, Provenance, RequestRecord, RunResult, SloVerdict,
    WorkloadInfo,
};

pub use figures::{Figures, ReqSample, Stats};

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// Migrations, in order: `MIGRATIONS[k]` takes a database from version k to k+1.
const MIGRATIONS: &[&str] = &[
    include_str!("store/schema_v1.sql"),
    include_str!("store/schema_v2.sql"),
];

/// Default cap on stored token timestamps per request.
pub const DEFAULT_TOKEN_CAP: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // `err`, not `source`: the message already carries the cause, and a `source` would make
    // error-chain printers repeat it.
    #[error("{path}: {}", sqlite_message(err, path))]
    Sqlite { path: PathBuf, err: rusqlite::Error },
    #[error("{path}: cannot create the directory: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: no such database")]
    Missing { path: PathBuf },
    #[error(
        "{path}: schema version {found} is newer than this ember understands ({SCHEMA_VERSION}); upgrade ember"
    )]
    TooNew { path: PathBuf, found: i64 },
    #[error("{path}: run {run} does not exist")]
    NoSuchRun { path: PathBuf, run: i64 },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{path}: run {run}: {lost} of {total} finished requests could not be written, so the stored run is incomplete (first error: {first_error})"
    )]
    Lost {
        path: PathBuf,
        run: i64,
        lost: usize,
        total: usize,
        first_error: String,
    },
}

/// SQLite's words for an error, without the file name it sometimes appends (the error names
/// the file already).
fn sqlite_message(err: &rusqlite::Error, path: &Path) -> String {
    let msg = err.to_string();
    msg.strip_suffix(&format!(": {}", path.display()))
        .map(str::to_string)
        .unwrap_or(msg)
}

/// A run's row id inside one database file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(pub i64);

/// What the store keeps besides the figures.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Per-request cap on stored token timestamps; 0 stores none (TTFT, TPOT,
    /// e2e and the worst gap stay exact: first/last token are always stored).
    pub token_cap: usize,
    /// Keep each request's generated text.
    pub keep_text: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            token_cap: DEFAULT_TOKEN_CAP,
            keep_text: true,
        }
    }
}

/// One self-test check's outcome (`ember selftest` writes these).
#[derive(Clone, Debug, PartialEq)]
pub struct SelfTestRow {
    pub check_name: String,
    /// Always `true` for a measurement.
    pub pass: bool,
    /// A figure with nothing to judge it by (column `kind = 'measurement'`), not a check.
    pub measurement: bool,
    pub figure: Option<f64>,
    pub unit: Option<String>,
    pub message: String,
}

/// A run as listed by [`Store::runs`].
#[derive(Clone, Debug, PartialEq)]
pub struct RunRow {
    pub run: RunId,
    pub run_uid: String,
    pub status: String,
    pub started_at: String,
    pub provenance: Provenance,
    pub device_fingerprint: String,
    pub cost_per_hour: Option<f64>,
    pub workload: WorkloadInfo,
    pub slo_name: String,
    pub slo_attainment: Option<f64>,
    pub goodput_rps: Option<f64>,
    pub cache_evictions: Option<u64>,
}

impl RunRow {
    /// A short human label for the device: profile name, else backend + CPU.
    pub fn device_label(&self) -> String {
        let p = &self.provenance;
        match &p.device_profile {
            Some(d) if !d.is_empty() => format!("{d} ({})", p.backend),
            _ => {
                let adapter = if p.adapter.is_empty() {
                    p.cpu_model.as_str()
                } else {
                    p.adapter.as_str()
                };
                format!("{} {}", p.backend, adapter).trim().to_string()
            }
        }
    }
}

/// The results store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    pub opts: StoreOptions,
}

/// `$EMBER_DB` if set, else `$XDG_DATA_HOME/ember/ember.db`, else
/// `~/.local/share/ember/ember.db`, else `./ember.db`.
pub fn default_db_path() -> PathBuf {
    if let Some(p) = std::env::var_os("EMBER_DB").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(d).join("ember").join("ember.db");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(h).join(".local/share/ember/ember.db");
    }
    PathBuf::from("ember.db")
}

/// FNV-1a 64, hex: a stable, dependency-free fingerprint (not cryptographic).
fn fnv1a_hex(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The device fingerprint: what makes two runs "the same machine".
pub fn device_fingerprint(p: &Provenance) -> String {
    fnv1a_hex(&[
        &p.cpu_model,
        &p.cpu_cores.to_string(),
        &p.os,
        &p.backend,
        &p.adapter,
        &p.driver,
    ])
}

fn finish_str(k: FinishKind) -> &'static str {
    match k {
        FinishKind::Stop => "stop",
        FinishKind::Length => "length",
        FinishKind::Error => "error",
        FinishKind::Cancelled => "cancelled",
    }
}

pub fn parse_finish(s: &str) -> FinishKind {
    match s {
        "stop" => FinishKind::Stop,
        "length" => FinishKind::Length,
        "cancelled" => FinishKind::Cancelled,
        _ => FinishKind::Error,
    }
}

/// The current UTC time as RFC 3339 (for humans; every figure uses the monotonic clock).
pub fn now_rfc3339() -> String {
    // Civil UTC from the Unix time (Howard Hinnant's days-to-civil algorithm).
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Store {
    /// Opens (creating it and its directory if needed) and migrates a store.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| StoreError::Io {
                path: dir.to_path_buf(),
                err,
            })?;
        }
        let conn = Connection::open(&path).map_err(|err| StoreError::Sqlite {
            path: path.clone(),
            err,
        })?;
        let mut s = Store {
            conn,
            path,
            opts: StoreOptions::default(),
        };
        s.configure()?;
        s.migrate()?;
        Ok(s)
    }

    /// Opens an existing store (for reading: compare, report, export). Fails
    /// if the file does not exist rather than creating an empty one. An older
    /// schema is migrated in place.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        Store::open(path)
    }

    pub fn with_options(mut self, opts: StoreOptions) -> Store {
        self.opts = opts;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying connection, for ad-hoc queries.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    fn err(&self, err: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            err,
        }
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        // WAL: readers never block the writer; a commit is one append to the
        // log. synchronous=NORMAL keeps every committed transaction across a
        // process crash (kill -9); only a power loss can drop the last few.
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The file's schema version.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let v = self.schema_version()?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: v,
            });
        }
        for (k, sql) in MIGRATIONS.iter().enumerate().skip(v as usize) {
            let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                err: e,
            })?;
            tx.execute_batch(sql).map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                err: e,
            })?;
            tx.pragma_update(None, "user_version", (k + 1) as i64)
                .map_err(|e| StoreError::Sqlite {
                    path: self.path.clone(),
                    err: e,
                })?;
            tx.commit().map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                err: e,
            })?;
        }
        Ok(())
    }

    /// Starts a run: stores the model, the workload and the provenance (the
    /// records, memory and summary of `run` are ignored). Status `running`
    /// until [`Store::finish_run`].
    pub fn begin_run(&mut self, run: &RunResult) -> Result<RunId, StoreError> {
        let p = &run.provenance;
        let w = &run.workload;
        let path = self.path.clone();
        let e = |err| StoreError::Sqlite {
            path: path.clone(),
            err,
        };
        let tx = self.conn.transaction().map_err(e)?;
        tx.execute(
            "INSERT INTO models(sha256, arch, quant_mix, weights_bytes) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(sha256) DO NOTHING",
            params![
                p.model_sha256,
                p.model_arch,
                p.model_quant_mix,
                p.weights_bytes as i64
            ],
        )
        .map_err(e)?;
        let model_id: i64 = tx
            .query_row(
                "SELECT model_id FROM models WHERE sha256 = ?1",
                [&p.model_sha256],
                |r| r.get(0),
            )
            .map_err(e)?;
        tx.execute(
            "INSERT INTO workloads(hash, name, seed, params, n_requests, n_warmup) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(hash) DO NOTHING",
            params![w.hash, w.name, w.seed as i64, w.params, w.n_requests as i64, w.n_warmup as i64],
        )
        .map_err(e)?;
        let workload_id: i64 = tx
            .query_row(
                "SELECT workload_id FROM workloads WHERE hash = ?1",
                [&w.hash],
                |r| r.get(0),
            )
            .map_err(e)?;
        let started = if run.started_at.is_empty() {
            now_rfc3339()
        } else {
            run.started_at.clone()
        };
        let uid = fnv1a_hex(&[
            &started,
            &std::process::id().to_string(),
            &format!("{:?}", std::time::SystemTime::now()),
            &w.hash,
            &self.path.display().to_string(),
        ]);
        tx.execute(
            "INSERT INTO runs(run_uid, status, started_at, ember_version, git_commit, backend, adapter, driver,
                 cpu_model, cpu_cores, threads, os, device_profile, device_fingerprint, model_id, model_path,
                 workload_id, load, slo_name, slo, token_cap, weights_load)
             VALUES (?1, 'running', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
            params![
                uid,
                started,
                p.ember_version,
                p.git_commit,
                p.backend,
                p.adapter,
                p.driver,
                p.cpu_model,
                p.cpu_cores as i64,
                p.threads as i64,
                p.os,
                p.device_profile,
                device_fingerprint(p),
                model_id,
                p.model_path,
                workload_id,
                w.load,
                run.slo_name,
                run.slo,
                self.opts.token_cap as i64,
                Some(p.weights_load.as_str()).filter(|s| !s.is_empty()),
            ],
        )
        .map_err(e)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(e)?;
        Ok(RunId(id))
    }

    /// Stores one finished request (and up to `token_cap` token timestamps)
    /// in its own transaction.
    pub fn add_request(&mut self, run: RunId, r: &RequestRecord) -> Result<(), StoreError> {
        let path = self.path.clone();
        let e = |err| StoreError::Sqlite {
            path: path.clone(),
            err,
        };
        let tx = self.conn.transaction().map_err(e)?;
        let cap: i64 = tx
            .query_row(
                "SELECT token_cap FROM runs WHERE run_id = ?1",
                [run.0],
                |r| r.get(0),
            )
            .optional()
            .map_err(e)?
            .ok_or(StoreError::NoSuchRun {
                path: self.path.clone(),
                run: run.0,
            })?;
        let n_store = r.token_ns.len().min(cap.max(0) as usize);
        let max_itl = r
            .token_ns
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
            .max();
        let tags = serde_json::to_string(&r.tags).unwrap_or_else(|_| "[]".into());
        let text = if self.opts.keep_text {
            r.output_text.clone()
        } else {
            None
        };
        tx.execute(
            "INSERT INTO requests(run_id, request_id, warmup, tags, prompt_tokens, output_tokens, arrival_ns,
                 enqueue_ns, schedule_ns, prefill_start_ns, prefill_end_ns, first_token_ns, last_token_ns,
                 finish_ns, finish_reason, error, cached_prompt_tokens, computed_prompt_tokens, cache_lookups,
                 cache_hit_blocks, tokens_stored, max_itl_ns, output_text)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            params![
                run.0,
                r.request_id as i64,
                r.warmup,
                tags,
                r.prompt_tokens as i64,
                r.token_ns.len() as i64,
                r.arrival_ns as i64,
                r.enqueue_ns as i64,
                r.schedule_ns.map(|x| x as i64),
                r.prefill_start_ns.map(|x| x as i64),
                r.prefill_end_ns.map(|x| x as i64),
                r.token_ns.first().map(|&x| x as i64),
                r.token_ns.last().map(|&x| x as i64),
                r.finish_ns as i64,
                finish_str(r.finish_reason),
                r.error,
                r.cache.cached_prompt_tokens as i64,
                r.cache.computed_prompt_tokens as i64,
                r.cache.cache_lookups as i64,
                r.cache.cache_hit_blocks as i64,
                n_store as i64,
                max_itl.map(|x| x as i64),
                text,
            ],
        )
        .map_err(e)?;
        let pk = tx.last_insert_rowid();
        {
            let mut st = tx
                .prepare_cached("INSERT INTO tokens(req_pk, i, t_ns) VALUES (?1, ?2, ?3)")
                .map_err(e)?;
            for (i, &t) in r.token_ns.iter().take(n_store).enumerate() {
                st.execute(params![pk, (i + 1) as i64, t as i64])
                    .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Appends memory samples (one transaction).
    pub fn add_memory_samples(
        &mut self,
        run: RunId,
        samples: &[MemorySample],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let e = |err| StoreError::Sqlite {
            path: path.clone(),
            err,
        };
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO memory_samples(run_id, t_ns, rss_bytes, device_bytes, kv_bytes_used, kv_bytes_reserved)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(e)?;
            for m in samples {
                st.execute(params![
                    run.0,
                    m.t_ns as i64,
                    m.rss_bytes as i64,
                    m.device_bytes as i64,
                    m.kv_bytes_used as i64,
                    m.kv_bytes_reserved as i64
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Ends a run: stores the SLO verdicts, attainment, goodput, cache
    /// evictions and the harness's summary from `result` (its records and
    /// memory are ignored: add them with `add_request`/`add_memory_samples`),
    /// then computes the figures from the stored rows into `run_metrics`.
    pub fn finish_run(&mut self, run: RunId, result: &RunResult) -> Result<(), StoreError> {
        let samples = self.samples(run)?;
        let mem = self.memory(run)?;
        let figs = Figures::compute(&samples, &mem);
        let path = self.path.clone();
        let e = |err| StoreError::Sqlite {
            path: path.clone(),
            err,
        };
        let tx = self.conn.transaction().map_err(e)?;
        let n = tx
            .execute(
                "UPDATE runs SET status = 'finished', finished_at = ?2, slo_name = ?3, slo = ?4, slo_attainment = ?5,
                     goodput_rps = ?6, cache_evictions = ?7, summary_json = ?8 WHERE run_id = ?1",
                params![
                    run.0,
                    now_rfc3339(),
                    result.slo_name,
                    result.slo,
                    result.slo_attainment,
                    result.goodput_rps,
                    result.cache_evictions as i64,
                    result.summary_json
                ],
            )
            .map_err(e)?;
        if n == 0 {
            return Err(StoreError::NoSuchRun {
                path: self.path.clone(),
                run: run.0,
            });
        }
        tx.execute("DELETE FROM slo_verdicts WHERE run_id = ?1", [run.0])
            .map_err(e)?;
        for v in &result.slo_verdicts {
            tx.execute(
                "INSERT INTO slo_verdicts(run_id, constraint_text, measured, limit_value, pass) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![run.0, v.constraint, v.measured, v.limit, v.pass],
            )
            .map_err(e)?;
        }
        tx.execute("DELETE FROM run_metrics WHERE run_id = ?1", [run.0])
            .map_err(e)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO run_metrics(run_id, metric, stat, value) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(e)?;
            for (metric, stat, value) in figs.rows() {
                st.execute(params![run.0, metric, stat, value]).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Writes a whole run at once (one transaction per request, as live).
    pub fn save_run(&mut self, result: &RunResult) -> Result<RunId, StoreError> {
        let run = self.begin_run(result)?;
        for r in &result.records {
            self.add_request(run, r)?;
        }
        if !result.memory.is_empty() {
            self.add_memory_samples(run, &result.memory)?;
        }
        self.finish_run(run, result)?;
        Ok(run)
    }

    /// Stores the tests of a llama-bench run (`ember bench --pp/--tg`), one row each with its
    /// per-repetition samples, in one transaction.
    pub fn add_llama_bench(
        &mut self,
        run: RunId,
        n_batch: usize,
        n_threads: usize,
        results: &[BenchResult],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let e = |err| StoreError::Sqlite {
            path: path.clone(),
            err,
        };
        let tx = self.conn.transaction().map_err(e)?;
        for r in results {
            let (avg_ns, sd_ns) = r.mean_sd_ns();
            let (n_prompt, n_gen) = match r.kind {
                Test::Pp => (r.n_tokens, 0),
                Test::Tg => (0, r.n_tokens),
            };
            tx.execute(
                "INSERT INTO llama_bench(run_id, test, n_prompt, n_gen, n_batch, n_threads, reps, avg_ns, stddev_ns,
                     avg_ts, stddev_ts, samples_ns, samples_ts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    run.0,
                    r.test,
                    n_prompt as i64,
                    n_gen as i64,
                    n_batch as i64,
                    n_threads as i64,
                    r.samples_ns.len() as i64,
                    avg_ns.round() as i64,
                    sd_ns.round() as i64,
                    r.mean_tps,
                    r.sd_tps,
                    serde_json::to_string(&r.samples_ns).unwrap_or_default(),
                    serde_json::to_string(&r.samples_tps).unwrap_or_default(),
                ],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Writes a whole llama-bench run: `head` (see [`crate::llamabench::run_head`]), its tests
    /// (timed with `n_batch` prompt tokens per pass)
    /// and one memory sample with the process's peak RSS and device memory.
    pub fn save_llama_bench(
        &mut self,
        head: &RunResult,
        n_batch: usize,
        results: &[BenchResult],
        rss_peak_bytes: u64,
        device_peak_bytes: u64,
    ) -> Result<RunId, StoreError> {
        let run = self.begin_run(head)?;
        self.add_llama_bench(run, n_batch, head.provenance.threads, results)?;
        let elapsed_ns: u64 = results.iter().flat_map(|r| &r.samples_ns).sum();
        self.add_memory_samples(
            run,
            &[MemorySample {
                t_ns: elapsed_ns,
                rss_bytes: rss_peak_bytes,
                device_bytes: device_peak_bytes,
                kv_bytes_used: 0,
                kv_bytes_reserved: 0,
            }],
        )?;
        let mut done = head.clone();
        done.summary_json = serde_json::to_string(results).unwrap_or_default();
        self.finish_run(run, &done)?;
        Ok(run)
    }

    /// The llama-bench tests of a run, in the order they ran (empty for other runs).
    pub fn llama_bench(&self, run: RunId) -> Result<Vec<BenchResult>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT n_prompt, n_gen, samples_ns FROM llama_bench WHERE run_id = ?1 ORDER BY rowid",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([run.0], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = vec![];
        for row in rows {
            let (n_prompt, n_gen, samples) = row.map_err(|e| self.err(e))?;
            let samples_ns: Vec<u64> = serde_json::from_str(&samples).map_err(|err| {
                StoreError::Invalid(format!(
                    "{}: run {}: llama_bench.samples_ns is not a JSON array of integers: {err}",
                    self.path.display(),
                    run.0
                ))
            })?;
            let (kind, n) = if n_gen > 0 {
                (Test::Tg, n_gen)
            } else {
                (Test::Pp, n_prompt)
            };
            out.push(BenchResult::from_samples(kind, n as usize, samples_ns));
        }
        Ok(out)
    }

    /// Records the device's cost (USD per hour) for $/Mtok.
    pub fn set_cost_per_hour(&mut self, run: RunId, usd_per_hour: f64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE runs SET cost_per_hour = ?2 WHERE run_id = ?1",
                params![run.0, usd_per_hour],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Stores self-test results for a run (one transaction).
    pub fn add_selftest(&mut self, run: RunId, rows: &[SelfTestRow]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let e = |err| StoreError::Sqlite {
            path: path.clone(),
            err,
        };
        let tx = self.conn.transaction().map_err(e)?;
        for r in rows {
            tx.execute(
                "INSERT INTO selftest_results(run_id, check_name, pass, figure, unit, message, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    run.0,
                    r.check_name,
                    r.pass,
                    r.figure,
                    r.unit,
                    r.message,
                    if r.measurement { "measurement" } else { "check" }
                ],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Every run in the file, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT r.run_id, r.run_uid, r.status, r.started_at, r.ember_version, r.git_commit, r.backend, r.adapter,
                        r.driver, r.cpu_model, r.cpu_cores, r.threads, r.os, r.device_profile, r.model_path,
                        m.sha256, m.arch, m.quant_mix, m.weights_bytes, r.device_fingerprint, r.cost_per_hour,
                        w.name, w.seed, w.hash, r.load, w.params, w.n_requests, w.n_warmup,
                        r.slo_name, r.slo_attainment, r.goodput_rps, r.cache_evictions, r.weights_load
                 FROM runs r JOIN models m USING (model_id) JOIN workloads w USING (workload_id)
                 ORDER BY r.run_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(RunRow {
                    run: RunId(r.get(0)?),
                    run_uid: r.get(1)?,
                    status: r.get(2)?,
                    started_at: r.get(3)?,
                    provenance: Provenance {
                        ember_version: r.get(4)?,
                        git_commit: r.get(5)?,
                        backend: r.get(6)?,
                        adapter: r.get(7)?,
                        driver: r.get(8)?,
                        cpu_model: r.get(9)?,
                        cpu_cores: r.get::<_, i64>(10)? as usize,
                        threads: r.get::<_, i64>(11)? as usize,
                        os: r.get(12)?,
                        device_profile: r.get(13)?,
                        model_path: r.get(14)?,
                        model_sha256: r.get(15)?,
                        model_arch: r.get(16)?,
                        model_quant_mix: r.get(17)?,
                        weights_bytes: r.get::<_, i64>(18)? as u64,
                        weights_load: r.get::<_, Option<String>>(32)?.unwrap_or_default(),
                    },
                    device_fingerprint: r.get(19)?,
                    cost_per_hour: r.get(20)?,
                    workload: WorkloadInfo {
                        name: r.get(21)?,
                        seed: r.get::<_, i64>(22)? as u64,
                        hash: r.get(23)?,
                        load: r.get(24)?,
                        params: r.get(25)?,
                        n_requests: r.get::<_, i64>(26)? as usize,
                        n_warmup: r.get::<_, i64>(27)? as usize,
                    },
                    slo_name: r.get(28)?,
                    slo_attainment: r.get(29)?,
                    goodput_rps: r.get(30)?,
                    cache_evictions: r.get::<_, Option<i64>>(31)?.map(|x| x as u64),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// The per-request samples of a run (all requests, warm-up included and
    /// flagged), with the stored token timestamps.
    pub fn samples(&self, run: RunId) -> Result<Vec<ReqSample>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT req_pk, request_id, warmup, prompt_tokens, output_tokens, arrival_ns, schedule_ns,
                        prefill_start_ns, prefill_end_ns, first_token_ns, last_token_ns, finish_ns, finish_reason,
                        cached_prompt_tokens, computed_prompt_tokens, max_itl_ns
                 FROM requests WHERE run_id = ?1 ORDER BY req_pk",
            )
            .map_err(|e| self.err(e))?;
        let mut out: Vec<(i64, ReqSample)> = st
            .query_map([run.0], |r| {
                let o = |i: usize| -> rusqlite::Result<Option<u64>> {
                    Ok(r.get::<_, Option<i64>>(i)?.map(|x| x as u64))
                };
                Ok((
                    r.get::<_, i64>(0)?,
                    ReqSample {
                        request_id: r.get::<_, i64>(1)? as u64,
                        warmup: r.get(2)?,
                        prompt_tokens: r.get::<_, i64>(3)? as u64,
                        output_tokens: r.get::<_, i64>(4)? as u64,
                        arrival_ns: r.get::<_, i64>(5)? as u64,
                        schedule_ns: o(6)?,
                        prefill_start_ns: o(7)?,
                        prefill_end_ns: o(8)?,
                        first_token_ns: o(9)?,
                        last_token_ns: o(10)?,
                        finish_ns: r.get::<_, i64>(11)? as u64,
                        failed: matches!(r.get::<_, String>(12)?.as_str(), "error" | "cancelled"),
                        cached_prompt_tokens: r.get::<_, i64>(13)? as u64,
                        computed_prompt_tokens: r.get::<_, i64>(14)? as u64,
                        max_itl_ns: o(15)?,
                        token_ns: vec![],
                    },
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        let mut tst = self
            .conn
            .prepare_cached(
                "SELECT t.req_pk, t.t_ns FROM tokens t JOIN requests r USING (req_pk) WHERE r.run_id = ?1 ORDER BY t.req_pk, t.i",
            )
            .map_err(|e| self.err(e))?;
        let toks = tst
            .query_map([run.0], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.err(e))?;
        let mut idx = 0usize;
        for t in toks {
            let (pk, ns) = t.map_err(|e| self.err(e))?;
            while idx < out.len() && out[idx].0 < pk {
                idx += 1;
            }
            if idx < out.len() && out[idx].0 == pk {
                out[idx].1.token_ns.push(ns);
            }
        }
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }

    /// A run's memory timeline, by time.
    pub fn memory(&self, run: RunId) -> Result<Vec<MemorySample>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT t_ns, rss_bytes, device_bytes, kv_bytes_used, kv_bytes_reserved FROM memory_samples
                 WHERE run_id = ?1 ORDER BY t_ns",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([run.0], |r| {
                Ok(MemorySample {
                    t_ns: r.get::<_, i64>(0)? as u64,
                    rss_bytes: r.get::<_, i64>(1)? as u64,
                    device_bytes: r.get::<_, i64>(2)? as u64,
                    kv_bytes_used: r.get::<_, i64>(3)? as u64,
                    kv_bytes_reserved: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The SLO verdicts stored for a run.
    pub fn slo_verdicts(&self, run: RunId) -> Result<Vec<SloVerdict>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT constraint_text, measured, limit_value, pass FROM slo_verdicts WHERE run_id = ?1 ORDER BY rowid")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([run.0], |r| {
                Ok(SloVerdict {
                    constraint: r.get(0)?,
                    measured: r.get(1)?,
                    limit: r.get(2)?,
                    pass: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The stored `run_metrics` of a run as (metric, stat) -> value.
    pub fn run_metrics(
        &self,
        run: RunId,
    ) -> Result<std::collections::BTreeMap<(String, String), Option<f64>>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT metric, stat, value FROM run_metrics WHERE run_id = ?1")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([run.0], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Reads a whole run back as a `RunResult` (token timestamps as stored,
    /// i.e. at most `token_cap` per request).
    pub fn load_run(&self, run: RunId) -> Result<RunResult, StoreError> {
        let row = self
            .runs()?
            .into_iter()
            .find(|r| r.run == run)
            .ok_or(StoreError::NoSuchRun {
                path: self.path.clone(),
                run: run.0,
            })?;
        let (slo, summary_json): (String, Option<String>) = self
            .conn
            .query_row(
                "SELECT slo, summary_json FROM runs WHERE run_id = ?1",
                [run.0],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        let mut st = self
            .conn
            .prepare(
                "SELECT req_pk, request_id, warmup, tags, prompt_tokens, arrival_ns, enqueue_ns, schedule_ns,
                        prefill_start_ns, prefill_end_ns, finish_ns, finish_reason, error, cached_prompt_tokens,
                        computed_prompt_tokens, cache_lookups, cache_hit_blocks, output_text
                 FROM requests WHERE run_id = ?1 ORDER BY req_pk",
            )
            .map_err(|e| self.err(e))?;
        let samples = self.samples(run)?;
        let recs = st
            .query_map([run.0], |r| {
                let o = |i: usize| -> rusqlite::Result<Option<u64>> {
                    Ok(r.get::<_, Option<i64>>(i)?.map(|x| x as u64))
                };
                Ok(RequestRecord {
                    request_id: r.get::<_, i64>(1)? as u64,
                    warmup: r.get(2)?,
                    tags: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
                    prompt_tokens: r.get::<_, i64>(4)? as usize,
                    arrival_ns: r.get::<_, i64>(5)? as u64,
                    enqueue_ns: r.get::<_, i64>(6)? as u64,
                    schedule_ns: o(7)?,
                    prefill_start_ns: o(8)?,
                    prefill_end_ns: o(9)?,
                    token_ns: vec![],
                    finish_ns: r.get::<_, i64>(10)? as u64,
                    finish_reason: parse_finish(&r.get::<_, String>(11)?),
                    error: r.get(12)?,
                    cache: CacheUse {
                        cached_prompt_tokens: r.get::<_, i64>(13)? as usize,
                        computed_prompt_tokens: r.get::<_, i64>(14)? as usize,
                        cache_lookups: r.get::<_, i64>(15)? as usize,
                        cache_hit_blocks: r.get::<_, i64>(16)? as usize,
                    },
                    output_text: r.get(17)?,
                })
            })
            .map_err(|e| self.err(e))?;
        let mut records = vec![];
        for (rec, s) in recs.zip(samples) {
            let mut rec = rec.map_err(|e| self.err(e))?;
            rec.token_ns = s.token_ns;
            records.push(rec);
        }
        Ok(RunResult {
            started_at: row.started_at,
            provenance: row.provenance,
            workload: row.workload,
            slo_name: row.slo_name,
            slo,
            slo_verdicts: self.slo_verdicts(run)?,
            slo_attainment: row.slo_attainment.unwrap_or(0.0),
            goodput_rps: row.goodput_rps.unwrap_or(0.0),
            records,
            memory: self.memory(run)?,
            cache_evictions: row.cache_evictions.unwrap_or(0),
            summary_json: summary_json.unwrap_or_default(),
        })
    }

    /// `PRAGMA integrity_check`'s answer ("ok" when sound).
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }
}

/// Expands arguments into database files: a directory contributes every
/// `*.db` in it (sorted); a file is taken as is.
pub fn expand_db_args(args: &[PathBuf]) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = vec![];
    for a in args {
        if a.is_dir() {
            let rd = std::fs::read_dir(a).map_err(|err| StoreError::Io {
                path: a.clone(),
                err,
            })?;
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "db" || x == "sqlite"))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "{}: no .db files in this directory",
                    a.display()
                )));
            }
            out.extend(v);
        } else if a.is_file() {
            out.push(a.clone());
        } else {
            return Err(StoreError::Missing { path: a.clone() });
        }
    }
    Ok(out)
}
