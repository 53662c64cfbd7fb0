-- What serving bundles from the base tables needs beyond the designed schema. Column and table
-- names of the design are untouched; this only adds.

-- A chat database that ran the design's migration has triggers that refresh the whole view on
-- every write; they serialize all writers behind one refresh (docs/BUNDLES.md). The key server
-- refreshes the view off the request path instead.
DROP TRIGGER IF EXISTS refresh_prekey_bundles_on_identity_key ON nchat_identity_keys;
DROP TRIGGER IF EXISTS refresh_prekey_bundles_on_signed_prekey ON nchat_signed_prekeys;
DROP TRIGGER IF EXISTS refresh_prekey_bundles_on_one_time_prekey ON nchat_one_time_prekeys;
DROP FUNCTION IF EXISTS refresh_prekey_bundles();

-- libsignal bundles carry the install's registration id; the design has no column for it.
-- Nullable so rows written before the key server stay valid (they are served with 0).
ALTER TABLE nchat_identity_keys
    ADD COLUMN IF NOT EXISTS registration_id INTEGER
    CONSTRAINT nchat_identity_keys_registration_id_range
        CHECK (registration_id BETWEEN 1 AND 16383);

-- At most one active signed prekey per device, whatever races: two rotations that both try to
-- activate a key cannot both commit.
CREATE UNIQUE INDEX IF NOT EXISTS idx_signed_prekeys_one_active
    ON nchat_signed_prekeys(device_id) WHERE is_active = TRUE;

-- "The oldest unconsumed one-time prekey of a device" in one index probe, in upload order
-- (the serial id), for the fetch statement.
CREATE INDEX IF NOT EXISTS idx_one_time_prekeys_next
    ON nchat_one_time_prekeys(device_id, id) WHERE is_consumed = FALSE;

-- Every fetch updates one row of this table; vacuum it early and often so dead tuples from
-- consumed keys do not bloat the hot index.
ALTER TABLE nchat_one_time_prekeys SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 1
);
