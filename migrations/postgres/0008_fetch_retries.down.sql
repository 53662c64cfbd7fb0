-- Reverses 0008: fetches' idempotency keys go (a retry after this takes new keys).
DROP INDEX IF EXISTS idx_kyber_prekeys_fetch_key;
DROP INDEX IF EXISTS idx_one_time_prekeys_fetch_key;
ALTER TABLE nchat_kyber_prekeys DROP COLUMN IF EXISTS fetch_key;
ALTER TABLE nchat_one_time_prekeys DROP COLUMN IF EXISTS fetch_key;
