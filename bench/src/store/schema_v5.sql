-- ember results store, migration 4 -> 5. Applied by `Store::open` inside one
-- transaction, then `PRAGMA user_version = 5`.
--
-- Speculative decoding (`--lookup N`, `--draft MODEL`): each request's totals
-- as the server reports them once, just before the request finishes
-- (docs/METRICS.md, Speculative decoding). NULL for a request that did not
-- speculate: every request of a plain run, and every row stored before v5.
-- The request's tokens stay one `tokens` row each, stamped as it was released,
-- so the several tokens of one verify pass are microseconds apart.

-- Draft tokens proposed and checked by the target, those it accepted, and
-- those it rejected (= drafted - accepted, stored for plain SQL sums).
ALTER TABLE requests ADD COLUMN drafted_tokens INTEGER;
ALTER TABLE requests ADD COLUMN accepted_tokens INTEGER;
ALTER TABLE requests ADD COLUMN rejected_tokens INTEGER;
-- Verify passes that carried at least one of its draft tokens.
ALTER TABLE requests ADD COLUMN verify_steps INTEGER;
-- Durations (not timestamps), ns: time proposing its drafts, and the target
-- passes that verified them. A pass shared by several requests counts in full
-- for each of them.
ALTER TABLE requests ADD COLUMN draft_ns INTEGER;
ALTER TABLE requests ADD COLUMN verify_ns INTEGER;

-- v_request_latency as in v1, plus the speculation columns (NULL when the
-- request did not speculate), so `ember export --what requests` carries them.
DROP VIEW v_request_latency;
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
       r.error,
       r.drafted_tokens, r.accepted_tokens, r.rejected_tokens, r.verify_steps,
       r.accepted_tokens * 1.0 / NULLIF(r.drafted_tokens, 0)      AS acceptance_rate,
       r.accepted_tokens * 1.0 / NULLIF(r.verify_steps, 0)        AS mean_accepted_run,
       r.draft_ns / 1e6                                           AS draft_ms,
       r.verify_ns / 1e6                                          AS verify_ms
FROM requests r;

-- One row per run that speculated: its measured requests' totals (failed ones
-- included: their drafts were work done), token-weighted acceptance, and TPOT
-- and ITL beside them (TPOT is the per-token figure to compare with a plain
-- run; ITL's percentiles show the bursts).
CREATE VIEW v_run_speculation AS
WITH s AS (
    SELECT run_id,
           COUNT(*)             AS requests,
           SUM(output_tokens)   AS output_tokens,
           SUM(drafted_tokens)  AS drafted_tokens,
           SUM(accepted_tokens) AS accepted_tokens,
           SUM(rejected_tokens) AS rejected_tokens,
           SUM(verify_steps)    AS verify_steps,
           SUM(draft_ns)        AS draft_ns,
           SUM(verify_ns)       AS verify_ns
    FROM requests WHERE warmup = 0 AND drafted_tokens IS NOT NULL GROUP BY run_id
),
p AS (SELECT * FROM v_latency_percentiles)
SELECT s.run_id, s.requests, s.output_tokens,
       s.drafted_tokens, s.accepted_tokens, s.rejected_tokens, s.verify_steps,
       s.accepted_tokens * 1.0 / NULLIF(s.drafted_tokens, 0) AS acceptance_rate,
       s.accepted_tokens * 1.0 / NULLIF(s.verify_steps, 0)   AS mean_accepted_run,
       s.draft_ns / 1e6  AS draft_ms,
       s.verify_ns / 1e6 AS verify_ms,
       (SELECT p50_ms FROM p WHERE p.run_id = s.run_id AND metric = 'tpot') AS tpot_p50_ms,
       (SELECT p99_ms FROM p WHERE p.run_id = s.run_id AND metric = 'tpot') AS tpot_p99_ms,
       (SELECT p50_ms FROM p WHERE p.run_id = s.run_id AND metric = 'itl')  AS itl_p50_ms,
       (SELECT p99_ms FROM p WHERE p.run_id = s.run_id AND metric = 'itl')  AS itl_p99_ms
FROM s;
