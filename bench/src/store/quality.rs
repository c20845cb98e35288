//! Quality evaluations (`ember eval`): one `quality_runs` row per evaluation, its scored tokens
//! in `quality_tokens` (schema v4).

use rusqlite::params;
use serde::Serialize;

use super::{Store, StoreError, device_fingerprint, now_rfc3339};
use crate::record::Provenance;

/// One scored token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct QualityToken {
    pub nll: f64,
    pub nll_base: Option<f64>,
    pub kld: Option<f64>,
    pub same_top: Option<bool>,
}

/// An evaluation as written (with its tokens) and as read back (without them).
#[derive(Clone, Debug, Default, Serialize)]
pub struct QualityRun {
    pub run_uid: String,
    /// "ppl" or "kld".
    pub kind: String,
    pub started_at: String,
    pub finished_at: String,
    pub backend: String,
    pub device_fingerprint: String,
    pub model_sha256: String,
    pub model_path: String,
    pub model_arch: String,
    pub base_sha256: Option<String>,
    pub base_path: Option<String>,
    pub text_sha256: String,
    pub text_name: String,
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// JSON: batch, threads, top_k.
    pub settings: serde_json::Value,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    pub same_top: Option<f64>,
    pub ppl_base: Option<f64>,
    /// Every figure `ember eval --json` printed.
    pub summary: serde_json::Value,
    #[serde(skip)]
    pub tokens: Vec<QualityToken>,
}

impl Store {
    /// Store an evaluation and its tokens in one transaction; `p` is the evaluated model's
    /// provenance (its `models` row is shared with latency runs of the same file).
    pub fn save_quality(&mut self, p: &Provenance, q: &QualityRun) -> Result<String, StoreError> {
        let e = StoreError::sqlite(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        let model_id = super::write::model_row(&tx, p).map_err(e)?;
        let started = if q.started_at.is_empty() {
            now_rfc3339()
        } else {
            q.started_at.clone()
        };
        let uid = super::write::new_uid(&started, &[&q.text_sha256, &p.model_sha256]);
        tx.execute(
            "INSERT INTO quality_runs(run_uid, kind, started_at, finished_at, ember_version, git_commit, backend,
                 device_fingerprint, model_id, model_path, base_sha256, base_path, text_sha256, text_name, ctx,
                 chunks, tokens_scored, settings, ppl, ppl_stderr, kld_mean, kld_p99, same_top, ppl_base,
                 summary_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
                 ?21, ?22, ?23, ?24, ?25)",
            params![
                uid,
                q.kind,
                started,
                now_rfc3339(),
                p.ember_version,
                p.git_commit,
                p.backend,
                device_fingerprint(p),
                model_id,
                p.model_path,
                q.base_sha256,
                q.base_path,
                q.text_sha256,
                q.text_name,
                q.ctx as i64,
                q.chunks as i64,
                q.tokens_scored as i64,
                q.settings.to_string(),
                q.ppl,
                q.ppl_stderr,
                q.kld_mean,
                q.kld_p99,
                q.same_top,
                q.ppl_base,
                q.summary.to_string(),
            ],
        )
        .map_err(e)?;
        let id = tx.last_insert_rowid();
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO quality_tokens(quality_id, i, nll, nll_base, kld, same_top)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(e)?;
            for (i, t) in q.tokens.iter().enumerate() {
                st.execute(params![
                    id,
                    i as i64,
                    t.nll,
                    t.nll_base,
                    t.kld,
                    t.same_top.map(i64::from)
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        Ok(uid)
    }

    /// Every evaluation in the file, oldest first (without tokens).
    pub fn quality_runs(&self) -> Result<Vec<QualityRun>, StoreError> {
        let e = StoreError::sqlite(&self.path);
        let mut st = self
            .conn
            .prepare(
                "SELECT q.run_uid, q.kind, q.started_at, q.finished_at, q.backend, q.device_fingerprint,
                        m.sha256, q.model_path, m.arch, q.base_sha256, q.base_path, q.text_sha256, q.text_name,
                        q.ctx, q.chunks, q.tokens_scored, q.settings, q.ppl, q.ppl_stderr, q.kld_mean,
                        q.kld_p99, q.same_top, q.ppl_base, q.summary_json
                 FROM quality_runs q JOIN models m USING (model_id)
                 ORDER BY q.quality_id",
            )
            .map_err(e)?;
        let json = |s: String| serde_json::from_str(&s).unwrap_or(serde_json::Value::Null);
        let rows = st
            .query_map([], |r| {
                Ok(QualityRun {
                    run_uid: r.get(0)?,
                    kind: r.get(1)?,
                    started_at: r.get(2)?,
                    finished_at: r.get(3)?,
                    backend: r.get(4)?,
                    device_fingerprint: r.get(5)?,
                    model_sha256: r.get(6)?,
                    model_path: r.get(7)?,
                    model_arch: r.get(8)?,
                    base_sha256: r.get(9)?,
                    base_path: r.get(10)?,
                    text_sha256: r.get(11)?,
                    text_name: r.get(12)?,
                    ctx: r.get::<_, i64>(13)? as usize,
                    chunks: r.get::<_, i64>(14)? as usize,
                    tokens_scored: r.get::<_, i64>(15)? as usize,
                    settings: json(r.get(16)?),
                    ppl: r.get(17)?,
                    ppl_stderr: r.get(18)?,
                    kld_mean: r.get(19)?,
                    kld_p99: r.get(20)?,
                    same_top: r.get(21)?,
                    ppl_base: r.get(22)?,
                    summary: json(r.get(23)?),
                    tokens: Vec::new(),
                })
            })
            .map_err(e)?;
        rows.collect::<Result<_, _>>().map_err(e)
    }
}
