-- Reverses 0004.
ALTER TABLE nchat_user_master_keys DROP COLUMN recovery_locked_until;
ALTER TABLE nchat_user_master_keys DROP COLUMN failed_recovery_attempts;
