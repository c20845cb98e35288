-- ember results store, schema version 1. Applied by `Store::open` inside one
-- transaction, then `PRAGMA user_version = 1`. Every timestamp column ending in
-- `_ns` is nanoseconds since the run's start on one monotonic clock
-- (shared/METRICS.md); wall-clock times are RFC 3339 text.

CREATE TABLE models (
    model_id      INTEGER PRIMARY KEY,
    sha256        TEXT NOT NULL UNIQUE,
    arch          TEXT NOT NULL,
    quant_mix     TEXT NOT NULL,          -- JSON object: quant type -> tensor count
    weights_bytes INTEGER NOT NULL
);

CREATE TABLE workloads (
    workload_id INTEGER PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,     -- over prompt token ids, arrival schedule, sampling params
    name        TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    params      TEXT NOT NULL,            -- JSON
    n_requests  INTEGER NOT NULL,
    n_warmup    INTEGER NOT NULL
);

CREATE TABLE runs (
    run_id             INTEGER PRIMARY KEY,
    run_uid            TEXT NOT NULL UNIQUE, -- stable identity across files
    status             TEXT NOT NULL CHECK (status IN ('running', 'finished')),
    started_at         TEXT NOT NULL,
    finished_at        TEXT,
    ember_version      TEXT NOT NULL,
    git_commit         TEXT NOT NULL,
    backend            TEXT NOT NULL,
    adapter            TEXT NOT NULL,
    driver             TEXT NOT NULL,
    cpu_model          TEXT NOT NULL,
    cpu_cores          INTEGER NOT NULL,
    threads            INTEGER NOT NULL,
    os                 TEXT NOT NULL,
    device_profile     TEXT,
    device_fingerprint TEXT NOT NULL,      -- hash of cpu, cores, os, backend, adapter, driver
    cost_per_hour      REAL,               -- USD/hour of the device, when known
    model_id           INTEGER NOT NULL REFERENCES models(model_id),
    model_path         TEXT NOT NULL,
    workload_id        INTEGER NOT NULL REFERENCES workloads(workload_id),
    load               TEXT NOT NULL,      -- JSON, e.g. {"mode":"rate","rate":4}
    slo_name           TEXT NOT NULL,
    slo                TEXT NOT NULL,      -- JSON constraints
    slo_attainment     REAL,
    goodput_rps        REAL,
    cache_evictions    INTEGER,
    token_cap          INTEGER NOT NULL,   -- per-request cap on stored token timestamps
    summary_json       TEXT                -- the harness's own summary, verbatim
);
CREATE INDEX runs_workload ON runs(workload_id);

CREATE TABLE requests (
    req_pk                 INTEGER PRIMARY KEY,
    run_id                 INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    request_id             INTEGER NOT NULL,  -- index in the workload
    warmup                 INTEGER NOT NULL CHECK (warmup IN (0, 1)),
    tags                   TEXT NOT NULL,     -- JSON array
    prompt_tokens          INTEGER NOT NULL,
    output_tokens          INTEGER NOT NULL,  -- N, even when fewer token rows are stored
    arrival_ns             INTEGER NOT NULL,
    enqueue_ns             INTEGER NOT NULL,
    schedule_ns            INTEGER,
    prefill_start_ns       INTEGER,
    prefill_end_ns         INTEGER,
    first_token_ns         INTEGER,           -- token[1]
    last_token_ns          INTEGER,           -- token[N]
    finish_ns              INTEGER NOT NULL,
    finish_reason          TEXT NOT NULL CHECK (finish_reason IN ('stop', 'length', 'error', 'cancelled')),
    error                  TEXT,
    cached_prompt_tokens   INTEGER NOT NULL,
    computed_prompt_tokens INTEGER NOT NULL,
    cache_lookups          INTEGER NOT NULL,
    cache_hit_blocks       INTEGER NOT NULL,
    tokens_stored          INTEGER NOT NULL,  -- rows in `tokens` (min(N, token_cap))
    max_itl_ns             INTEGER,           -- worst gap over all N tokens
    output_text            TEXT
);
CREATE INDEX requests_run ON requests(run_id, request_id);

-- token[i] for i = 1..min(N, cap); one row per output token.
CREATE TABLE tokens (
    req_pk INTEGER NOT NULL REFERENCES requests(req_pk) ON DELETE CASCADE,
    i      INTEGER NOT NULL,
    t_ns   INTEGER NOT NULL,
    PRIMARY KEY (req_pk, i)
) WITHOUT ROWID;

CREATE TABLE memory_samples (
    run_id            INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    t_ns              INTEGER NOT NULL,
    rss_bytes         INTEGER NOT NULL,
    device_bytes      INTEGER NOT NULL,
    kv_bytes_used     INTEGER NOT NULL,
    kv_bytes_reserved INTEGER NOT NULL
);
CREATE INDEX memory_run ON memory_samples(run_id, t_ns);

CREATE TABLE slo_verdicts (
    run_id     INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    constraint_text TEXT NOT NULL,        -- e.g. "ttft_p99 <= 200ms"
    measured   REAL NOT NULL,
    limit_value REAL NOT NULL,
    pass       INTEGER NOT NULL CHECK (pass IN (0, 1))
);

-- Figures computed by ember from the rows above when the run finished
-- (store::figures, nearest rank). Latencies in ns, rates per second.
CREATE TABLE run_metrics (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    metric TEXT NOT NULL,   -- ttft, queue, ttft_engine, itl, tpot, e2e, prefill_tps, decode_tps, or a system figure
    stat   TEXT NOT NULL,   -- n, mean, min, max, sd, p50, p90, p95, p99, p99.9, value
    value  REAL,
    PRIMARY KEY (run_id, metric, stat)
) WITHOUT ROWID;

-- Written by `ember selftest` (issue 7).
CREATE TABLE selftest_results (
    run_id  INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    check_name TEXT NOT NULL,
    pass    INTEGER NOT NULL CHECK (pass IN (0, 1)),
    figure  REAL,
    unit    TEXT,
    message TEXT NOT NULL DEFAULT ''
);

-- ---------------------------------------------------------------- views --
-- Per-request latency (METRICS.md), in milliseconds. NULL where undefined.
CREATE VIEW v_request_latency AS
SELECT r.run_id, r.req_pk, r.request_id, r.warmup, r.finish_reason,
       r.finish_reason IN ('error', 'cancelled') AS failed,
       r.prompt_tokens, r.output_tokens, r.cached_prompt_tokens,
       (r.first_token_ns - r.arrival_ns) / 1e6                    AS ttft_ms,
       (r.schedule_ns - r.arrival_ns) / 1e6                       AS queue_ms,
       (r.first_token_ns - r.schedule_ns) / 1e6                   AS ttft_engine_ms,
       CASE WHEN r.output_tokens >= 2
            THEN (r.last_token_ns - r.first_token_ns) / 1e6 / (r.output_tokens - 1) END AS tpot_ms,
       (r.finish_ns - r.arrival_ns) / 1e6                         AS e2e_ms,
       CASE WHEN r.prefill_end_ns > r.prefill_start_ns
            THEN r.computed_prompt_tokens * 1e9 / (r.prefill_end_ns - r.prefill_start_ns) END AS prefill_tps,
       CASE WHEN r.output_tokens >= 2 AND r.last_token_ns > r.first_token_ns
            THEN (r.output_tokens - 1) * 1e9 / (r.last_token_ns - r.first_token_ns) END AS decode_tps,
       r.max_itl_ns / 1e6                                         AS max_itl_ms,
       r.error
FROM requests r;

-- Every inter-token gap (token[i] - token[i-1], i >= 2), in ns.
CREATE VIEW v_itl AS
SELECT r.run_id, t.req_pk, r.request_id, r.warmup,
       r.finish_reason IN ('error', 'cancelled') AS failed,
       t.i, t.t_ns,
       t.t_ns - LAG(t.t_ns) OVER (PARTITION BY t.req_pk ORDER BY t.i) AS itl_ns
FROM tokens t JOIN requests r USING (req_pk);

-- The samples behind each latency distribution: measured (not warm-up),
-- non-failed requests; itl pools every stored gap (token-weighted).
CREATE VIEW v_latency_samples AS
SELECT run_id, 'ttft' AS metric, first_token_ns - arrival_ns AS value_ns FROM requests
 WHERE warmup = 0 AND finish_reason NOT IN ('error', 'cancelled') AND first_token_ns IS NOT NULL
UNION ALL
SELECT run_id, 'queue', schedule_ns - arrival_ns FROM requests
 WHERE warmup = 0 AND finish_reason NOT IN ('error', 'cancelled') AND schedule_ns IS NOT NULL
UNION ALL
SELECT run_id, 'ttft_engine', first_token_ns - schedule_ns FROM requests
 WHERE warmup = 0 AND finish_reason NOT IN ('error', 'cancelled') AND first_token_ns IS NOT NULL AND schedule_ns IS NOT NULL
UNION ALL
SELECT run_id, 'tpot', (last_token_ns - first_token_ns) * 1.0 / (output_tokens - 1) FROM requests
 WHERE warmup = 0 AND finish_reason NOT IN ('error', 'cancelled') AND output_tokens >= 2
UNION ALL
SELECT run_id, 'e2e', finish_ns - arrival_ns FROM requests
 WHERE warmup = 0 AND finish_reason NOT IN ('error', 'cancelled')
UNION ALL
SELECT run_id, 'itl', itl_ns FROM v_itl
 WHERE warmup = 0 AND failed = 0 AND itl_ns IS NOT NULL;

-- Nearest-rank percentiles (rank = ceil(q*n), in integer arithmetic) per run
-- and metric, in milliseconds, straight from the stored timestamps.
CREATE VIEW v_latency_percentiles AS
WITH ranked AS (
    SELECT run_id, metric, value_ns,
           ROW_NUMBER() OVER (PARTITION BY run_id, metric ORDER BY value_ns) AS rn,
           COUNT(*)     OVER (PARTITION BY run_id, metric)                   AS n
    FROM v_latency_samples
)
SELECT run_id, metric, n,
       MIN(value_ns) / 1e6 AS min_ms,
       AVG(value_ns) / 1e6 AS mean_ms,
       MAX(CASE WHEN rn = (500 * n + 999) / 1000 THEN value_ns END) / 1e6 AS p50_ms,
       MAX(CASE WHEN rn = (900 * n + 999) / 1000 THEN value_ns END) / 1e6 AS p90_ms,
       MAX(CASE WHEN rn = (950 * n + 999) / 1000 THEN value_ns END) / 1e6 AS p95_ms,
       MAX(CASE WHEN rn = (990 * n + 999) / 1000 THEN value_ns END) / 1e6 AS p99_ms,
       MAX(CASE WHEN rn = (999 * n + 999) / 1000 THEN value_ns END) / 1e6 AS p999_ms,
       MAX(value_ns) / 1e6 AS max_ms
FROM ranked GROUP BY run_id, metric;

-- One row per run: what ran where, and its headline figures, all recomputed
-- from the raw rows (so a run cut short by a crash still has a summary).
CREATE VIEW v_run_summary AS
WITH m AS (
    SELECT run_id,
           COUNT(*) AS measured,
           SUM(finish_reason IN ('error', 'cancelled')) AS failed,
           MIN(arrival_ns) AS window_start_ns,
           MAX(finish_ns)  AS window_end_ns,
           SUM(prompt_tokens) AS prompt_tokens,
           SUM(output_tokens) AS output_tokens,
           SUM(cached_prompt_tokens) AS cached_prompt_tokens
    FROM requests WHERE warmup = 0 GROUP BY run_id
),
mem AS (
    SELECT run_id, MAX(rss_bytes) AS rss_peak, MAX(device_bytes) AS device_peak,
           MAX(kv_bytes_used) AS kv_peak
    FROM memory_samples GROUP BY run_id
),
p AS (SELECT * FROM v_latency_percentiles)
SELECT r.run_id, r.status, r.started_at, r.device_profile, r.device_fingerprint,
       r.backend, r.adapter, r.cpu_model, r.threads,
       mo.arch AS model_arch, substr(mo.sha256, 1, 12) AS model_sha,
       w.name AS workload, w.hash AS workload_hash, r.load,
       m.measured, m.failed,
       (m.window_end_ns - m.window_start_ns) / 1e9 AS window_s,
       (m.measured - m.failed) * 1e9 / NULLIF(m.window_end_ns - m.window_start_ns, 0) AS rps,
       m.output_tokens * 1e9 / NULLIF(m.window_end_ns - m.window_start_ns, 0) AS output_tps,
       m.prompt_tokens * 1e9 / NULLIF(m.window_end_ns - m.window_start_ns, 0) AS input_tps,
       m.failed * 1.0 / NULLIF(m.measured, 0) AS error_rate,
       m.cached_prompt_tokens * 1.0 / NULLIF(m.prompt_tokens, 0) AS prefix_hit_rate,
       r.slo_name, r.slo_attainment, r.goodput_rps, r.cache_evictions,
       (SELECT p50_ms FROM p WHERE p.run_id = r.run_id AND metric = 'ttft') AS ttft_p50_ms,
       (SELECT p99_ms FROM p WHERE p.run_id = r.run_id AND metric = 'ttft') AS ttft_p99_ms,
       (SELECT p50_ms FROM p WHERE p.run_id = r.run_id AND metric = 'itl')  AS itl_p50_ms,
       (SELECT p99_ms FROM p WHERE p.run_id = r.run_id AND metric = 'itl')  AS itl_p99_ms,
       (SELECT p50_ms FROM p WHERE p.run_id = r.run_id AND metric = 'tpot') AS tpot_p50_ms,
       (SELECT p99_ms FROM p WHERE p.run_id = r.run_id AND metric = 'tpot') AS tpot_p99_ms,
       (SELECT p99_ms FROM p WHERE p.run_id = r.run_id AND metric = 'e2e')  AS e2e_p99_ms,
       mem.rss_peak / 1048576.0 AS rss_peak_mib,
       mem.device_peak / 1048576.0 AS device_peak_mib,
       mem.kv_peak / 1048576.0 AS kv_peak_mib
FROM runs r
JOIN models mo USING (model_id)
JOIN workloads w USING (workload_id)
LEFT JOIN m USING (run_id)
LEFT JOIN mem USING (run_id);
