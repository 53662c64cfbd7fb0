-- Failed recovery attempts are limited per user: a run of failures locks recovery for a while.
ALTER TABLE nchat_user_master_keys
    ADD COLUMN IF NOT EXISTS failed_recovery_attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS recovery_locked_until TIMESTAMP WITH TIME ZONE;
