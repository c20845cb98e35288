-- ember results store, migration 1 -> 2. Applied by `Store::open` inside one
-- transaction, then `PRAGMA user_version = 2`.
--
-- llama-bench mode (`ember bench --pp/--tg`): one row per test of a run, with
-- the per-repetition samples, as llama-bench's own `-o sql`/`-o json` output
-- keeps them. The run itself is a `runs` row like any other (provenance,
-- model, a workload named 'llama-bench' whose hash covers the test list and
-- the batch size), so `ember compare`, `report` and `export` find it.

CREATE TABLE llama_bench (
    run_id     INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    test       TEXT NOT NULL,      -- "pp512", "tg128"
    n_prompt   INTEGER NOT NULL,   -- tokens prefilled (pp tests), else 0
    n_gen      INTEGER NOT NULL,   -- tokens decoded one at a time (tg tests), else 0
    n_batch    INTEGER NOT NULL,   -- prompt tokens per forward pass
    n_threads  INTEGER NOT NULL,
    reps       INTEGER NOT NULL,   -- timed repetitions (one untimed warm-up before them)
    avg_ns     INTEGER NOT NULL,   -- mean wall time of a repetition
    stddev_ns  INTEGER NOT NULL,   -- sample standard deviation of it
    avg_ts     REAL NOT NULL,      -- mean of the per-repetition tokens/s
    stddev_ts  REAL NOT NULL,      -- sample standard deviation of them
    samples_ns TEXT NOT NULL,      -- JSON array, one per repetition
    samples_ts TEXT NOT NULL,      -- JSON array, one per repetition
    PRIMARY KEY (run_id, test)
);                                 -- rowid order = the order the tests ran

-- Self-test rows are checks (pass or fail) or measurements (a figure with nothing to judge it
-- by, stored with pass = 1: it cannot fail).
ALTER TABLE selftest_results ADD COLUMN kind TEXT NOT NULL DEFAULT 'check'
    CHECK (kind IN ('check', 'measurement'));

-- How the weights were loaded: 'mmap' (mapped file pages) or 'read'
-- (--no-mmap: read into anonymous memory). NULL for runs stored before v2.
ALTER TABLE runs ADD COLUMN weights_load TEXT;

-- llama-bench's `-o sql` columns, one row per test, from ember's own tables.
CREATE VIEW v_llama_bench AS
SELECT r.run_id, r.started_at AS test_time, r.git_commit AS build_commit,
       r.cpu_model AS cpu_info, r.adapter AS gpu_info, r.backend AS backends,
       r.device_profile, r.device_fingerprint,
       r.model_path AS model_filename, mo.arch AS model_type, mo.weights_bytes AS model_size,
       mo.sha256 AS model_sha256, lb.n_batch, lb.n_threads, r.weights_load,
       lb.test, lb.n_prompt, lb.n_gen, lb.reps,
       lb.avg_ns, lb.stddev_ns, lb.avg_ts, lb.stddev_ts, lb.samples_ns, lb.samples_ts
FROM llama_bench lb
JOIN runs r USING (run_id)
JOIN models mo USING (model_id);
