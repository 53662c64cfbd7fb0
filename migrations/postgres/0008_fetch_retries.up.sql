-- Retries that burn no key (docs/BUNDLES.md): a fetch may carry a key its client chose, recorded
-- on the one-time keys it takes in the same statement, so a retry with the same key within the
-- retry window gets those keys again instead of taking more. Kept, like consumed_by, until
-- cleanup deletes the consumed row.
ALTER TABLE nchat_one_time_prekeys ADD COLUMN IF NOT EXISTS fetch_key TEXT;
ALTER TABLE nchat_kyber_prekeys ADD COLUMN IF NOT EXISTS fetch_key TEXT;

-- A retry finds its keys by device and key; only fetches that carried a key are indexed.
CREATE INDEX IF NOT EXISTS idx_one_time_prekeys_fetch_key
    ON nchat_one_time_prekeys (device_id, fetch_key) WHERE fetch_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_fetch_key
    ON nchat_kyber_prekeys (device_id, fetch_key) WHERE fetch_key IS NOT NULL;
