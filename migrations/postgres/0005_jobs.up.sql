-- What the rotation and cleanup jobs need (docs/JOBS.md).

-- One-time and signed prekey ids that cleanup removed, as ranges of consecutive ids per device.
-- A device chooses its key ids, so a retried upload of a key consumed long ago is recognised
-- only by its id; these ranges keep refusing it after the row is gone, at a few rows per device.
CREATE TABLE IF NOT EXISTS keyserver_retired_prekeys (
    id SERIAL PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    key_kind TEXT NOT NULL CHECK (key_kind IN ('one_time', 'signed')),
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    CHECK (first_id <= last_id)
);
CREATE INDEX IF NOT EXISTS idx_retired_prekeys_device
    ON keyserver_retired_prekeys(device_id, key_kind, first_id);

-- When a signed prekey stopped being the active one: its retention period starts there.
ALTER TABLE nchat_signed_prekeys ADD COLUMN IF NOT EXISTS superseded_at TIMESTAMP WITH TIME ZONE;
-- Keys superseded before this migration: by their successor's installation, else now.
UPDATE nchat_signed_prekeys sp
SET superseded_at = COALESCE(
    (SELECT min(n.rotation_date) FROM nchat_signed_prekeys n
     WHERE n.device_id = sp.device_id AND n.rotation_date > sp.rotation_date),
    NOW())
WHERE sp.is_active = FALSE AND sp.superseded_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_signed_prekeys_superseded
    ON nchat_signed_prekeys(superseded_at) WHERE is_active = FALSE;

-- One row per run of a maintenance job, whether started by the server or by cron.
CREATE TABLE IF NOT EXISTS keyserver_job_runs (
    id SERIAL PRIMARY KEY,
    job TEXT NOT NULL CHECK (job IN ('rotate', 'cleanup', 'refresh-bundles')),
    trigger TEXT NOT NULL CHECK (trigger IN ('cli', 'schedule')),
    started_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    finished_at TIMESTAMP WITH TIME ZONE,
    outcome TEXT NOT NULL
        CHECK (outcome IN ('running', 'succeeded', 'failed', 'skipped', 'abandoned')),
    counts JSONB NOT NULL DEFAULT '{}',
    message TEXT
);
CREATE INDEX IF NOT EXISTS idx_job_runs_job ON keyserver_job_runs(job, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_job_runs_finished ON keyserver_job_runs(finished_at);
