-- Mirrors migrations/postgres/0007: who took each one-time key, the drain-check job and the
-- audit event it writes (docs/ABUSE.md).
ALTER TABLE nchat_one_time_prekeys ADD COLUMN consumed_by TEXT;
ALTER TABLE nchat_kyber_prekeys ADD COLUMN consumed_by TEXT;

-- SQLite cannot change a CHECK constraint in place: the audit log and the job runs are rebuilt
-- with the new event type and job. Nothing references their rows.
CREATE TABLE nchat_e2ee_audit_log_0007 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type TEXT NOT NULL,
    user_id TEXT REFERENCES nchat_users(id) ON DELETE SET NULL,
    device_id TEXT,
    metadata TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CHECK (event_type IN (
        'master_key_created',
        'device_keys_generated',
        'session_established',
        'session_destroyed',
        'signed_prekey_rotated',
        'prekeys_replenished',
        'safety_number_verified',
        'safety_number_changed',
        'recovery_code_used',
        'prekeys_drain_suspected'
    ))
);
INSERT INTO nchat_e2ee_audit_log_0007 (id, event_type, user_id, device_id, metadata, created_at)
    SELECT id, event_type, user_id, device_id, metadata, created_at FROM nchat_e2ee_audit_log;
DROP TABLE nchat_e2ee_audit_log;
ALTER TABLE nchat_e2ee_audit_log_0007 RENAME TO nchat_e2ee_audit_log;
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_user_id ON nchat_e2ee_audit_log(user_id);
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_device_id ON nchat_e2ee_audit_log(device_id);
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_event_type ON nchat_e2ee_audit_log(event_type);
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_created_at ON nchat_e2ee_audit_log(created_at DESC);

CREATE TABLE keyserver_job_runs_0007 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL CHECK (job IN ('rotate', 'cleanup', 'refresh-bundles', 'drain-check')),
    trigger TEXT NOT NULL CHECK (trigger IN ('cli', 'schedule')),
    started_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at TEXT,
    outcome TEXT NOT NULL
        CHECK (outcome IN ('running', 'succeeded', 'failed', 'skipped', 'abandoned')),
    counts TEXT NOT NULL DEFAULT '{}',
    message TEXT
);
INSERT INTO keyserver_job_runs_0007 (id, job, trigger, started_at, finished_at, outcome, counts, message)
    SELECT id, job, trigger, started_at, finished_at, outcome, counts, message FROM keyserver_job_runs;
DROP TABLE keyserver_job_runs;
ALTER TABLE keyserver_job_runs_0007 RENAME TO keyserver_job_runs;
CREATE INDEX IF NOT EXISTS idx_job_runs_job ON keyserver_job_runs(job, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_job_runs_finished ON keyserver_job_runs(finished_at);
