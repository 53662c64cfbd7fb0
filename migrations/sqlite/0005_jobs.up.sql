-- Mirrors migrations/postgres/0005: what the rotation and cleanup jobs need.

CREATE TABLE IF NOT EXISTS keyserver_retired_prekeys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    key_kind TEXT NOT NULL CHECK (key_kind IN ('one_time', 'signed')),
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    CHECK (first_id <= last_id)
);
CREATE INDEX IF NOT EXISTS idx_retired_prekeys_device
    ON keyserver_retired_prekeys(device_id, key_kind, first_id);

ALTER TABLE nchat_signed_prekeys ADD COLUMN superseded_at TEXT;
UPDATE nchat_signed_prekeys
SET superseded_at = COALESCE(
    (SELECT min(n.rotation_date) FROM nchat_signed_prekeys n
     WHERE n.device_id = nchat_signed_prekeys.device_id
       AND n.rotation_date > nchat_signed_prekeys.rotation_date),
    strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
WHERE is_active = 0 AND superseded_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_signed_prekeys_superseded
    ON nchat_signed_prekeys(superseded_at) WHERE is_active = 0;

CREATE TABLE IF NOT EXISTS keyserver_job_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL CHECK (job IN ('rotate', 'cleanup', 'refresh-bundles')),
    trigger TEXT NOT NULL CHECK (trigger IN ('cli', 'schedule')),
    started_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at TEXT,
    outcome TEXT NOT NULL
        CHECK (outcome IN ('running', 'succeeded', 'failed', 'skipped', 'abandoned')),
    counts TEXT NOT NULL DEFAULT '{}',
    message TEXT
);
CREATE INDEX IF NOT EXISTS idx_job_runs_job ON keyserver_job_runs(job, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_job_runs_finished ON keyserver_job_runs(finished_at);
