-- ember results store, migration 3 -> 4. Applied by `Store::open` inside one
-- transaction, then `PRAGMA user_version = 4`.
--
-- Quality (`ember eval ppl`, `ember eval kld`): one row per evaluation, keyed
-- by the model's sha256 (the `models` row latency runs of the same file use),
-- the text's sha256 and the settings; the headline figures as columns, and
-- every scored token in `quality_tokens`, so each figure can be recomputed by
-- SQL (ppl = exp(avg(nll)), mean KLD = avg(kld), same top p = avg(same_top)).

CREATE TABLE quality_runs (
    quality_id         INTEGER PRIMARY KEY,
    run_uid            TEXT NOT NULL UNIQUE,
    kind               TEXT NOT NULL CHECK (kind IN ('ppl', 'kld')),
    started_at         TEXT NOT NULL,
    finished_at        TEXT NOT NULL,
    ember_version      TEXT NOT NULL,
    git_commit         TEXT NOT NULL,
    backend            TEXT NOT NULL,
    device_fingerprint TEXT NOT NULL,
    model_id           INTEGER NOT NULL REFERENCES models(model_id),
    model_path         TEXT NOT NULL,
    -- kld: the base model's sha256 and file name (NULL for ppl).
    base_sha256        TEXT,
    base_path          TEXT,
    -- sha256 of the text's bytes; for kld from a saved base without the text,
    -- of the base file's token ids.
    text_sha256        TEXT NOT NULL,
    text_name          TEXT NOT NULL,
    ctx                INTEGER NOT NULL,
    chunks             INTEGER NOT NULL,
    tokens_scored      INTEGER NOT NULL,
    settings           TEXT NOT NULL,      -- JSON: batch, threads, top_k
    ppl                REAL NOT NULL,
    ppl_stderr         REAL NOT NULL,
    kld_mean           REAL,               -- kld only
    kld_p99            REAL,
    same_top           REAL,               -- fraction, kld only
    ppl_base           REAL,               -- kld only
    summary_json       TEXT NOT NULL       -- every figure `--json` prints
);
CREATE INDEX quality_model ON quality_runs(model_id, kind);

-- One row per scored token, in text order (i = chunk * per_chunk + position).
CREATE TABLE quality_tokens (
    quality_id INTEGER NOT NULL REFERENCES quality_runs(quality_id) ON DELETE CASCADE,
    i          INTEGER NOT NULL,
    nll        REAL NOT NULL,              -- -ln p(token | model)
    nll_base   REAL,                       -- kld: -ln p(token | base)
    kld        REAL,                       -- kld: KL(base || model) at this position
    same_top   INTEGER CHECK (same_top IN (0, 1)),
    PRIMARY KEY (quality_id, i)
) WITHOUT ROWID;

-- `ember bench --score`: whether each scored request's answer was right (NULL:
-- not scored, or the request failed). Accuracy = avg(correct) over the
-- measured requests where it is not NULL.
ALTER TABLE requests ADD COLUMN correct INTEGER CHECK (correct IN (0, 1));

-- Whether the request met the run's SLO (NULL: judged by none). The output
-- tokens of those that did, per second of the window, are the goodput that
-- $/Mtok at the SLO divides by.
ALTER TABLE requests ADD COLUMN slo_attained INTEGER CHECK (slo_attained IN (0, 1));

-- Measured power (bench/src/power.rs): watts from the power sensor on the
-- timer's memory samples (mean since its previous reading; NULL where it was
-- not read), and which sensor it was. Energy over a window is the sum of
-- watts × the time since the previous reading; `power_error` says why a
-- sensor stopped being read mid-run (then no energy is reported for it).
ALTER TABLE memory_samples ADD COLUMN power_w REAL;
ALTER TABLE runs ADD COLUMN power_source TEXT;
ALTER TABLE runs ADD COLUMN power_error TEXT;

-- A price per million output tokens (`ember bench --url … --cost-per-mtok`, an
-- API's); the hourly price goes to the existing `cost_per_hour`.
ALTER TABLE runs ADD COLUMN usd_per_mtok REAL;
