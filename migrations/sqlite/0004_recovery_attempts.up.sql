-- Mirrors migrations/postgres/0004: limiting failed recovery attempts per user.
ALTER TABLE nchat_user_master_keys ADD COLUMN failed_recovery_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nchat_user_master_keys ADD COLUMN recovery_locked_until TEXT;
