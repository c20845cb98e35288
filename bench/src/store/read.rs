//! Reading: the runs of a file, a run's requests (with their stored token timestamps), memory,
//! SLO verdicts, stored metrics, llama-bench tests; a whole run back as a `RunResult`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rusqlite::{Params, Row};

use super::{Figures, ReqSample, RunId, RunRow, Store, StoreError, parse_finish};
use crate::llamabench::{BenchResult, Test};
use crate::record::{
    CacheUse, Counted, MemorySample, Provenance, RequestRecord, RunResult, SloVerdict, SpecUse,
    WorkloadInfo,
};

/// A run with what compare, report and export draw from it.
pub struct RunData {
    /// Which of the files given to [`load_runs`] it came from.
    pub file_index: usize,
    pub row: RunRow,
    /// Every request, warm-up included and flagged.
    pub samples: Vec<ReqSample>,
    pub memory: Vec<MemorySample>,
    /// Its llama-bench tests; empty for a run of requests.
    pub llama_bench: Vec<BenchResult>,
    /// Whether every SLO constraint passed (None: no verdicts stored).
    pub slo_pass: Option<bool>,
}

impl RunData {
    /// The run's figures, recomputed from its stored rows.
    pub fn figures(&self) -> Figures {
        Figures::compute(&self.samples, &self.memory)
    }
}

/// Every run of `files` (file by file, oldest first) that `keep(file index, row)` accepts,
/// with its data. Each file must exist.
pub fn load_runs(
    files: &[PathBuf],
    mut keep: impl FnMut(usize, &RunRow) -> bool,
) -> Result<Vec<RunData>, StoreError> {
    let mut out = vec![];
    for (file_index, path) in files.iter().enumerate() {
        let store = Store::open_existing(path)?;
        for row in store.runs()? {
            if keep(file_index, &row) {
                out.push(RunData {
                    file_index,
                    samples: store.samples(row.run)?,
                    memory: store.memory(row.run)?,
                    llama_bench: store.llama_bench(row.run)?,
                    slo_pass: {
                        let v = store.slo_verdicts(row.run)?;
                        (!v.is_empty()).then(|| v.iter().all(|x| x.pass))
                    },
                    row,
                });
            }
        }
    }
    Ok(out)
}

/// Column `i` as an optional unsigned count (SQLite stores i64).
fn opt_u64(r: &Row, i: usize) -> rusqlite::Result<Option<u64>> {
    Ok(r.get::<_, Option<i64>>(i)?.map(|x| x as u64))
}

/// Column `i` as an unsigned count.
fn u64_at(r: &Row, i: usize) -> rusqlite::Result<u64> {
    Ok(r.get::<_, i64>(i)? as u64)
}

/// The speculation columns, in the order of [`SPEC_COLUMNS`], from column `i` on: None when
/// the request did not speculate (`drafted_tokens` is NULL).
fn spec_at(r: &Row, i: usize) -> rusqlite::Result<Option<SpecUse>> {
    let Some(drafted) = opt_u64(r, i)? else {
        return Ok(None);
    };
    let n = |k: usize| Ok::<_, rusqlite::Error>(opt_u64(r, i + k)?.unwrap_or(0));
    Ok(Some(SpecUse {
        drafted: drafted as usize,
        accepted: n(1)? as usize,
        verify_steps: n(2)? as usize,
        draft_ns: n(3)?,
        verify_ns: n(4)?,
    }))
}

/// The columns [`spec_at`] reads (`rejected_tokens` is drafted − accepted).
const SPEC_COLUMNS: &str = "drafted_tokens, accepted_tokens, verify_steps, draft_ns, verify_ns";

impl Store {
    /// Every row of `sql` with `params`, each read by `f`.
    fn rows<T, C: FromIterator<T>>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnMut(&Row) -> rusqlite::Result<T>,
    ) -> Result<C, StoreError> {
        let mut st = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = st.query_map(params, f).map_err(|e| self.err(e))?;
        rows.collect::<Result<C, _>>().map_err(|e| self.err(e))
    }

    /// The llama-bench tests of a run, in the order they ran (empty for other runs).
    pub fn llama_bench(&self, run: RunId) -> Result<Vec<BenchResult>, StoreError> {
        let rows: Vec<(i64, i64, String)> = self.rows(
            "SELECT n_prompt, n_gen, samples_ns FROM llama_bench WHERE run_id = ?1 ORDER BY rowid",
            [run.0],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let mut out = vec![];
        for (n_prompt, n_gen, samples) in rows {
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

    /// Every run in the file, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.rows(
            "SELECT r.run_id, r.run_uid, r.status, r.started_at, r.ember_version, r.git_commit, r.backend, r.adapter,
                    r.driver, r.cpu_model, r.cpu_cores, r.threads, r.os, r.device_profile, r.model_path,
                    m.sha256, m.arch, m.quant_mix, m.weights_bytes, r.device_fingerprint, r.cost_per_hour,
                    w.name, w.seed, w.hash, r.load, w.params, w.n_requests, w.n_warmup,
                    r.slo_name, r.slo_attainment, r.goodput_rps, r.cache_evictions, r.weights_load,
                    r.transport, r.endpoint, r.server_model, r.server_version
             FROM runs r JOIN models m USING (model_id) JOIN workloads w USING (workload_id)
             ORDER BY r.run_id",
            [],
            |r| {
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
                        cpu_cores: u64_at(r, 10)? as usize,
                        threads: u64_at(r, 11)? as usize,
                        os: r.get(12)?,
                        device_profile: r.get(13)?,
                        model_path: r.get(14)?,
                        model_sha256: r.get(15)?,
                        model_arch: r.get(16)?,
                        model_quant_mix: r.get(17)?,
                        weights_bytes: u64_at(r, 18)?,
                        weights_load: r.get::<_, Option<String>>(32)?.unwrap_or_default(),
                        transport: r.get::<_, Option<String>>(33)?.unwrap_or_default(),
                        endpoint: r.get::<_, Option<String>>(34)?.unwrap_or_default(),
                        server_model: r.get::<_, Option<String>>(35)?.unwrap_or_default(),
                        server_version: r.get::<_, Option<String>>(36)?.unwrap_or_default(),
                    },
                    device_fingerprint: r.get(19)?,
                    cost_per_hour: r.get(20)?,
                    workload: WorkloadInfo {
                        name: r.get(21)?,
                        seed: u64_at(r, 22)?,
                        hash: r.get(23)?,
                        load: r.get(24)?,
                        params: r.get(25)?,
                        n_requests: u64_at(r, 26)? as usize,
                        n_warmup: u64_at(r, 27)? as usize,
                    },
                    slo_name: r.get(28)?,
                    slo_attainment: r.get(29)?,
                    goodput_rps: r.get(30)?,
                    cache_evictions: opt_u64(r, 31)?,
                })
            },
        )
    }

    /// The per-request samples of a run (all requests, warm-up included and
    /// flagged), with the stored token timestamps.
    pub fn samples(&self, run: RunId) -> Result<Vec<ReqSample>, StoreError> {
        let mut out: Vec<(i64, ReqSample)> = self.rows(
            &format!("SELECT req_pk, request_id, warmup, prompt_tokens, output_tokens, arrival_ns, schedule_ns,
                    prefill_start_ns, prefill_end_ns, first_token_ns, last_token_ns, finish_ns, finish_reason,
                    cached_prompt_tokens, computed_prompt_tokens, max_itl_ns, correct, slo_attained, {SPEC_COLUMNS}
             FROM requests WHERE run_id = ?1 ORDER BY req_pk"),
            [run.0],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    ReqSample {
                        request_id: u64_at(r, 1)?,
                        warmup: r.get(2)?,
                        prompt_tokens: u64_at(r, 3)?,
                        output_tokens: u64_at(r, 4)?,
                        arrival_ns: u64_at(r, 5)?,
                        schedule_ns: opt_u64(r, 6)?,
                        prefill_start_ns: opt_u64(r, 7)?,
                        prefill_end_ns: opt_u64(r, 8)?,
                        first_token_ns: opt_u64(r, 9)?,
                        last_token_ns: opt_u64(r, 10)?,
                        finish_ns: u64_at(r, 11)?,
                        failed: matches!(r.get::<_, String>(12)?.as_str(), "error" | "cancelled"),
                        cached_prompt_tokens: u64_at(r, 13)?,
                        computed_prompt_tokens: u64_at(r, 14)?,
                        max_itl_ns: opt_u64(r, 15)?,
                        correct: r.get(16)?,
                        slo_attained: r.get(17)?,
                        spec: spec_at(r, 18)?,
                        token_ns: vec![],
                    },
                ))
            },
        )?;
        let toks: Vec<(i64, u64)> = self.rows(
            "SELECT t.req_pk, t.t_ns FROM tokens t JOIN requests r USING (req_pk) WHERE r.run_id = ?1 ORDER BY t.req_pk, t.i",
            [run.0],
            |r| Ok((r.get(0)?, u64_at(r, 1)?)),
        )?;
        let mut idx = 0usize;
        for (pk, ns) in toks {
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
        self.rows(
            "SELECT t_ns, rss_bytes, device_bytes, kv_bytes_used, kv_bytes_reserved, power_w FROM memory_samples
             WHERE run_id = ?1 ORDER BY t_ns",
            [run.0],
            |r| {
                Ok(MemorySample {
                    t_ns: u64_at(r, 0)?,
                    rss_bytes: u64_at(r, 1)?,
                    device_bytes: u64_at(r, 2)?,
                    kv_bytes_used: u64_at(r, 3)?,
                    kv_bytes_reserved: u64_at(r, 4)?,
                    power_w: r.get(5)?,
                })
            },
        )
    }

    /// The SLO verdicts stored for a run.
    pub fn slo_verdicts(&self, run: RunId) -> Result<Vec<SloVerdict>, StoreError> {
        self.rows(
            "SELECT constraint_text, measured, limit_value, pass FROM slo_verdicts WHERE run_id = ?1 ORDER BY rowid",
            [run.0],
            |r| {
                Ok(SloVerdict {
                    constraint: r.get(0)?,
                    measured: r.get(1)?,
                    limit: r.get(2)?,
                    pass: r.get(3)?,
                })
            },
        )
    }

    /// The stored `run_metrics` of a run as (metric, stat) -> value.
    pub fn run_metrics(
        &self,
        run: RunId,
    ) -> Result<BTreeMap<(String, String), Option<f64>>, StoreError> {
        self.rows(
            "SELECT metric, stat, value FROM run_metrics WHERE run_id = ?1",
            [run.0],
            |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)),
        )
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
        let (slo, summary_json, power_source, power_error): (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = self
            .conn
            .query_row(
                "SELECT slo, summary_json, power_source, power_error FROM runs WHERE run_id = ?1",
                [run.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(|e| self.err(e))?;
        let recs: Vec<RequestRecord> = self.rows(
            &format!("SELECT req_pk, request_id, warmup, tags, prompt_tokens, arrival_ns, enqueue_ns, schedule_ns,
                    prefill_start_ns, prefill_end_ns, finish_ns, finish_reason, error, cached_prompt_tokens,
                    computed_prompt_tokens, cache_lookups, cache_hit_blocks, output_text,
                    server_prompt_tokens, server_output_tokens, local_output_tokens, correct, slo_attained,
                    {SPEC_COLUMNS}
             FROM requests WHERE run_id = ?1 ORDER BY req_pk"),
            [run.0],
            |r| {
                Ok(RequestRecord {
                    request_id: u64_at(r, 1)?,
                    warmup: r.get(2)?,
                    tags: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
                    prompt_tokens: u64_at(r, 4)? as usize,
                    arrival_ns: u64_at(r, 5)?,
                    enqueue_ns: u64_at(r, 6)?,
                    schedule_ns: opt_u64(r, 7)?,
                    prefill_start_ns: opt_u64(r, 8)?,
                    prefill_end_ns: opt_u64(r, 9)?,
                    token_ns: vec![],
                    finish_ns: u64_at(r, 10)?,
                    finish_reason: parse_finish(&r.get::<_, String>(11)?),
                    error: r.get(12)?,
                    cache: CacheUse {
                        cached_prompt_tokens: u64_at(r, 13)? as usize,
                        computed_prompt_tokens: u64_at(r, 14)? as usize,
                        cache_lookups: u64_at(r, 15)? as usize,
                        cache_hit_blocks: u64_at(r, 16)? as usize,
                    },
                    output_text: r.get(17)?,
                    counted: Counted {
                        prompt_tokens: opt_u64(r, 18)?.map(|n| n as usize),
                        output_tokens: opt_u64(r, 19)?.map(|n| n as usize),
                        local_output_tokens: opt_u64(r, 20)?.map(|n| n as usize),
                    },
                    correct: r.get(21)?,
                    slo_attained: r.get(22)?,
                    spec: spec_at(r, 23)?,
                })
            },
        )?;
        let samples = self.samples(run)?;
        let records = recs
            .into_iter()
            .zip(samples)
            .map(|(mut rec, s)| {
                rec.token_ns = s.token_ns;
                rec
            })
            .collect();
        Ok(RunResult {
            power_source,
            power_error,
            price: None,
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
