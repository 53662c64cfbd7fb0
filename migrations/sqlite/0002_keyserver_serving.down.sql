-- Reverses 0002.
DROP INDEX IF EXISTS idx_one_time_prekeys_next;
DROP INDEX IF EXISTS idx_signed_prekeys_one_active;
ALTER TABLE nchat_identity_keys DROP COLUMN registration_id;
