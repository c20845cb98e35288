-- ember results store, migration 2 -> 3. Applied by `Store::open` inside one
-- transaction, then `PRAGMA user_version = 3`.
--
-- `ember bench --url`: runs measured over HTTP against an OpenAI-compatible
-- server. The client stamps each received chunk, and a chunk may carry several
-- tokens, so a request keeps its stamps (the `tokens` rows, `chunks` of them)
-- apart from its token counts: the server's `usage` and the client's own count.

-- 'in-process' or 'http'; NULL for runs stored before v3 (all in-process).
ALTER TABLE runs ADD COLUMN transport TEXT;
-- The endpoint (no credentials), the model id it served, and what it says it
-- is (its Server header, the model's owned_by). NULL in-process.
ALTER TABLE runs ADD COLUMN endpoint TEXT;
ALTER TABLE runs ADD COLUMN server_model TEXT;
ALTER TABLE runs ADD COLUMN server_version TEXT;

-- Stamps taken (rows of `tokens` before the cap): one per token in-process,
-- one per received chunk over HTTP. NULL before v3 (= output_tokens).
ALTER TABLE requests ADD COLUMN chunks INTEGER;
-- The server's usage.prompt_tokens / usage.completion_tokens, and the output
-- text tokenized by the client. NULL in-process.
ALTER TABLE requests ADD COLUMN server_prompt_tokens INTEGER;
ALTER TABLE requests ADD COLUMN server_output_tokens INTEGER;
ALTER TABLE requests ADD COLUMN local_output_tokens INTEGER;
