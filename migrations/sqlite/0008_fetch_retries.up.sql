-- Mirrors migrations/postgres/0008: the key a fetch's client chose, recorded on the one-time keys
-- it took, so a retry with the same key gets them again (docs/BUNDLES.md).
ALTER TABLE nchat_one_time_prekeys ADD COLUMN fetch_key TEXT;
ALTER TABLE nchat_kyber_prekeys ADD COLUMN fetch_key TEXT;

CREATE INDEX IF NOT EXISTS idx_one_time_prekeys_fetch_key
    ON nchat_one_time_prekeys (device_id, fetch_key) WHERE fetch_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_fetch_key
    ON nchat_kyber_prekeys (device_id, fetch_key) WHERE fetch_key IS NOT NULL;
