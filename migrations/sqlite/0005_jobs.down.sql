-- Reverses 0005.
DROP TABLE IF EXISTS keyserver_job_runs;
DROP INDEX IF EXISTS idx_signed_prekeys_superseded;
ALTER TABLE nchat_signed_prekeys DROP COLUMN superseded_at;
DROP TABLE IF EXISTS keyserver_retired_prekeys;
