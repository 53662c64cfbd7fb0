-- Reverses 0004.
ALTER TABLE nchat_user_master_keys
    DROP COLUMN IF EXISTS failed_recovery_attempts,
    DROP COLUMN IF EXISTS recovery_locked_until;
