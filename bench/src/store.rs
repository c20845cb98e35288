//! The results store: one SQLite file (rusqlite, bundled SQLite) that holds
//! everything needed to explain a number. Schema: `store/schema_v1.sql` and the
//! migrations after it; documentation with example queries: `bench/STORE.md`.
//!
//! What lives where: this file has the types (errors, ids, rows, options), opening a file and
//! the fingerprints; `schema` the migrations; `write` the inserts of a run as it happens;
//! `read` the queries that read runs back ([`RunData`] is what compare, report and export
//! load per run); [`figures`] recomputes the figures from stored rows; [`testdata`] makes
//! synthetic runs for tests.
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
mod quality;
mod read;
mod schema;
pub mod testdata;
mod write;

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::record::{FinishKind, Provenance, WorkloadInfo};

pub use figures::{Figures, ReqSample, Stats};
pub use quality::{QualityRun, QualityToken};
pub use read::{RunData, load_runs};
pub use schema::SCHEMA_VERSION;

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

impl StoreError {
    /// Wraps a SQLite error with the file it came from (for `map_err`).
    pub(crate) fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
        move |err| StoreError::Sqlite {
            path: path.to_path_buf(),
            err,
        }
    }
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

/// A stored `finish_reason` back as a [`FinishKind`] (the inverse of `FinishKind::as_str`);
/// anything unknown reads as an error.
pub fn parse_finish(s: &str) -> FinishKind {
    match s {
        "stop" => FinishKind::Stop,
        "length" => FinishKind::Length,
        "cancelled" => FinishKind::Cancelled,
        _ => FinishKind::Error,
    }
}

/// RFC 3339 in UTC, as `strftime` directives.
const RFC3339: &str = "%Y-%m-%dT%H:%M:%SZ";

/// The current UTC time as RFC 3339 (for humans; every figure uses the monotonic clock).
pub fn now_rfc3339() -> String {
    ember_runtime::chat::strftime_now_utc(RFC3339)
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
        let conn = Connection::open(&path).map_err(StoreError::sqlite(&path))?;
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

/// The name a file goes by in tables and plots: its file name, else the path as given.
pub fn file_label(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_runtime::chat::strftime_at;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        // A leap day and the last second of a year, written as the store writes them.
        assert_eq!(strftime_at(RFC3339, 951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(strftime_at(RFC3339, 1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(strftime_at(RFC3339, 0), "1970-01-01T00:00:00Z");
        let now = now_rfc3339();
        let shape: String = now
            .chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect();
        assert_eq!(shape, "0000-00-00T00:00:00Z", "{now}");
        assert!(now.as_str() > "2024", "{now}");
    }

    #[test]
    fn finish_reasons_read_back_as_written() {
        for k in [
            FinishKind::Stop,
            FinishKind::Length,
            FinishKind::Error,
            FinishKind::Cancelled,
        ] {
            assert_eq!(parse_finish(k.as_str()), k);
        }
        assert_eq!(parse_finish("exploded"), FinishKind::Error);
    }
}
