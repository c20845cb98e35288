//! Writing: a run's head, each finished request in its own transaction, memory samples, the
//! closing figures; llama-bench tests and self-test results.

use rusqlite::{OptionalExtension, params};

use super::{
    Figures, RunId, SelfTestRow, Store, StoreError, device_fingerprint, fnv1a_hex, now_rfc3339,
};
use crate::llamabench::{BenchResult, Test};
use crate::record::{MemorySample, Provenance, RequestRecord, RunResult};

/// The `models` row of `p`'s model file (made on first sight; shared by every run and
/// evaluation of the same sha256).
pub(super) fn model_row(tx: &rusqlite::Transaction, p: &Provenance) -> rusqlite::Result<i64> {
    tx.execute(
        "INSERT INTO models(sha256, arch, quant_mix, weights_bytes) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(sha256) DO NOTHING",
        params![
            p.model_sha256,
            p.model_arch,
            p.model_quant_mix,
            p.weights_bytes as i64
        ],
    )?;
    tx.query_row(
        "SELECT model_id FROM models WHERE sha256 = ?1",
        [&p.model_sha256],
        |r| r.get(0),
    )
}

/// A run's stable identity across files: its start, this process, the clock now, and `keys`.
pub(super) fn new_uid(started: &str, keys: &[&str]) -> String {
    let (pid, now) = (
        std::process::id().to_string(),
        format!("{:?}", std::time::SystemTime::now()),
    );
    let mut parts = vec![started, pid.as_str(), now.as_str()];
    parts.extend_from_slice(keys);
    fnv1a_hex(&parts)
}

impl Store {
    /// Starts a run: stores the model, the workload and the provenance (the
    /// records, memory and summary of `run` are ignored). Status `running`
    /// until [`Store::finish_run`].
    pub fn begin_run(&mut self, run: &RunResult) -> Result<RunId, StoreError> {
        let p = &run.provenance;
        let w = &run.workload;
        let e = StoreError::sqlite(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        let model_id = model_row(&tx, p).map_err(e)?;
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
        let uid = new_uid(&started, &[&w.hash, &self.path.display().to_string()]);
        tx.execute(
            "INSERT INTO runs(run_uid, status, started_at, ember_version, git_commit, backend, adapter, driver,
                 cpu_model, cpu_cores, threads, os, device_profile, device_fingerprint, model_id, model_path,
                 workload_id, load, slo_name, slo, token_cap, weights_load, transport, endpoint, server_model,
                 server_version)
             VALUES (?1, 'running', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,
                 ?22, ?23, ?24, ?25)",
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
                Some(p.transport.as_str()).filter(|s| !s.is_empty()),
                Some(p.endpoint.as_str()).filter(|s| !s.is_empty()),
                Some(p.server_model.as_str()).filter(|s| !s.is_empty()),
                Some(p.server_version.as_str()).filter(|s| !s.is_empty()),
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
        let e = StoreError::sqlite(&self.path);
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
                 cache_hit_blocks, tokens_stored, max_itl_ns, output_text, chunks, server_prompt_tokens,
                 server_output_tokens, local_output_tokens, correct, slo_attained, drafted_tokens, accepted_tokens,
                 rejected_tokens, verify_steps, draft_ns, verify_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23,
                 ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34, ?35)",
            params![
                run.0,
                r.request_id as i64,
                r.warmup,
                tags,
                r.prompt_tokens as i64,
                r.output_tokens() as i64,
                r.arrival_ns as i64,
                r.enqueue_ns as i64,
                r.schedule_ns.map(|x| x as i64),
                r.prefill_start_ns.map(|x| x as i64),
                r.prefill_end_ns.map(|x| x as i64),
                r.token_ns.first().map(|&x| x as i64),
                r.token_ns.last().map(|&x| x as i64),
                r.finish_ns as i64,
                r.finish_reason.as_str(),
                r.error,
                r.cache.cached_prompt_tokens as i64,
                r.cache.computed_prompt_tokens as i64,
                r.cache.cache_lookups as i64,
                r.cache.cache_hit_blocks as i64,
                n_store as i64,
                max_itl.map(|x| x as i64),
                text,
                r.chunks() as i64,
                r.counted.prompt_tokens.map(|x| x as i64),
                r.counted.output_tokens.map(|x| x as i64),
                r.counted.local_output_tokens.map(|x| x as i64),
                r.correct,
                r.slo_attained,
                r.spec.map(|x| x.drafted as i64),
                r.spec.map(|x| x.accepted as i64),
                r.spec.map(|x| x.drafted.saturating_sub(x.accepted) as i64),
                r.spec.map(|x| x.verify_steps as i64),
                r.spec.map(|x| x.draft_ns as i64),
                r.spec.map(|x| x.verify_ns as i64),
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
        let e = StoreError::sqlite(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO memory_samples(run_id, t_ns, rss_bytes, device_bytes, kv_bytes_used, kv_bytes_reserved, power_w)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(e)?;
            for m in samples {
                st.execute(params![
                    run.0,
                    m.t_ns as i64,
                    m.rss_bytes as i64,
                    m.device_bytes as i64,
                    m.kv_bytes_used as i64,
                    m.kv_bytes_reserved as i64,
                    m.power_w
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
        let e = StoreError::sqlite(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        let n = tx
            .execute(
                "UPDATE runs SET status = 'finished', finished_at = ?2, slo_name = ?3, slo = ?4, slo_attainment = ?5,
                     goodput_rps = ?6, cache_evictions = ?7, summary_json = ?8, power_source = ?9, power_error = ?10,
                     cost_per_hour = COALESCE(?11, cost_per_hour), usd_per_mtok = COALESCE(?12, usd_per_mtok)
                 WHERE run_id = ?1",
                params![
                    run.0,
                    now_rfc3339(),
                    result.slo_name,
                    result.slo,
                    result.slo_attainment,
                    result.goodput_rps,
                    result.cache_evictions as i64,
                    result.summary_json,
                    result.power_source,
                    result.power_error,
                    result.price.as_ref().and_then(|p| p.usd_per_hour),
                    result.price.as_ref().and_then(|p| p.usd_per_mtok)
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
        let e = StoreError::sqlite(&self.path);
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
                power_w: None,
            }],
        )?;
        let mut done = head.clone();
        done.summary_json = serde_json::to_string(results).unwrap_or_default();
        self.finish_run(run, &done)?;
        Ok(run)
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
        let e = StoreError::sqlite(&self.path);
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
}
