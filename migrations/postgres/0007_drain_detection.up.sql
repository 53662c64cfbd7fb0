-- Drain detection (docs/ABUSE.md): who took each one-time key, a job that looks for devices
-- whose keys go too fast or mostly to one requester, and the audit event it writes.

-- The requesting user of a fetch, set in the statement that takes the key. Kept until cleanup
-- deletes the consumed row (--consumed-prekey-retention). No foreign key: the fetch must not
-- pay for one, and a deleted requester's keys still count.
ALTER TABLE nchat_one_time_prekeys ADD COLUMN IF NOT EXISTS consumed_by UUID;
ALTER TABLE nchat_kyber_prekeys ADD COLUMN IF NOT EXISTS consumed_by UUID;

-- The schema's event types, and one more: a device whose one-time keys were drained. NOT VALID
-- then VALIDATE: the check of existing rows takes no lock that blocks writers.
ALTER TABLE nchat_e2ee_audit_log DROP CONSTRAINT IF EXISTS nchat_e2ee_audit_log_event_type_check;
ALTER TABLE nchat_e2ee_audit_log ADD CONSTRAINT nchat_e2ee_audit_log_event_type_check
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
    )) NOT VALID;
ALTER TABLE nchat_e2ee_audit_log VALIDATE CONSTRAINT nchat_e2ee_audit_log_event_type_check;

ALTER TABLE keyserver_job_runs DROP CONSTRAINT IF EXISTS keyserver_job_runs_job_check;
ALTER TABLE keyserver_job_runs ADD CONSTRAINT keyserver_job_runs_job_check
    CHECK (job IN ('rotate', 'cleanup', 'refresh-bundles', 'drain-check')) NOT VALID;
ALTER TABLE keyserver_job_runs VALIDATE CONSTRAINT keyserver_job_runs_job_check;
