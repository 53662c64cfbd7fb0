-- Reverses 0007: the drain events and drain-check runs go, and who took each key.
DELETE FROM nchat_e2ee_audit_log WHERE event_type = 'prekeys_drain_suspected';
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
        'recovery_code_used'
    ));
DELETE FROM keyserver_job_runs WHERE job = 'drain-check';
ALTER TABLE keyserver_job_runs DROP CONSTRAINT IF EXISTS keyserver_job_runs_job_check;
ALTER TABLE keyserver_job_runs ADD CONSTRAINT keyserver_job_runs_job_check
    CHECK (job IN ('rotate', 'cleanup', 'refresh-bundles'));
ALTER TABLE nchat_kyber_prekeys DROP COLUMN IF EXISTS consumed_by;
ALTER TABLE nchat_one_time_prekeys DROP COLUMN IF EXISTS consumed_by;
