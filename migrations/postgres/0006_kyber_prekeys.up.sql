-- PQXDH: the Kyber1024 prekeys a device publishes (docs/BUNDLES.md), in the nchat naming style.
-- One table holds both kinds, which share one id space per device as libsignal keeps them in
-- one store:
-- - one-time Kyber prekeys, each handed out at most once, like nchat_one_time_prekeys;
-- - last-resort Kyber prekeys: one active per device, served whenever no one-time Kyber prekey
--   is left, replaced like nchat_signed_prekeys (the previous one stays, inactive, until
--   cleanup removes it after the retention period).
-- Public keys are stored raw (1568 bytes), as the schema stores Curve25519 keys without the
-- wire's type byte; the signature covers the 1569-byte serialized form.
CREATE TABLE IF NOT EXISTS nchat_kyber_prekeys (
    id SERIAL PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    kyber_prekey_id INTEGER NOT NULL,
    kyber_prekey_public BYTEA NOT NULL,
    kyber_prekey_private_encrypted BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    is_last_resort BOOLEAN NOT NULL DEFAULT FALSE,
    -- One-time keys: handed out, and when.
    is_consumed BOOLEAN NOT NULL DEFAULT FALSE,
    consumed_at TIMESTAMP WITH TIME ZONE,
    -- Last-resort keys: the one served, and when a newer one replaced it.
    is_active BOOLEAN NOT NULL DEFAULT FALSE,
    superseded_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    UNIQUE(device_id, kyber_prekey_id),
    CHECK (LENGTH(kyber_prekey_public) = 1568),
    CHECK (LENGTH(signature) = 64),
    CHECK (is_last_resort OR NOT is_active),
    CHECK (NOT (is_last_resort AND is_consumed))
);
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_device_id ON nchat_kyber_prekeys(device_id);
-- "The oldest unconsumed one-time Kyber prekey of a device" in one index probe, in upload order
-- (the serial id), for the fetch statement.
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_next
    ON nchat_kyber_prekeys(device_id, id) WHERE is_last_resort = FALSE AND is_consumed = FALSE;
-- At most one active last-resort Kyber prekey per device, whatever races.
CREATE UNIQUE INDEX IF NOT EXISTS idx_kyber_prekeys_one_last_resort
    ON nchat_kyber_prekeys(device_id) WHERE is_last_resort = TRUE AND is_active = TRUE;
-- Cleanup's scans: consumed one-time keys and superseded last-resort keys, oldest first.
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_consumed
    ON nchat_kyber_prekeys(consumed_at) WHERE is_consumed = TRUE;
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_superseded
    ON nchat_kyber_prekeys(superseded_at) WHERE is_last_resort = TRUE AND is_active = FALSE;
-- The rotation check's scan of active last-resort keys by age.
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_rotation
    ON nchat_kyber_prekeys(created_at) WHERE is_last_resort = TRUE AND is_active = TRUE;

-- Every fetch updates a row of this table, as of nchat_one_time_prekeys (migration 0002).
ALTER TABLE nchat_kyber_prekeys SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 1
);

-- Kyber prekey ids that cleanup removed stay refused, in their own id space.
ALTER TABLE keyserver_retired_prekeys DROP CONSTRAINT IF EXISTS keyserver_retired_prekeys_key_kind_check;
ALTER TABLE keyserver_retired_prekeys ADD CONSTRAINT keyserver_retired_prekeys_key_kind_check
    CHECK (key_kind IN ('one_time', 'signed', 'kyber'));
