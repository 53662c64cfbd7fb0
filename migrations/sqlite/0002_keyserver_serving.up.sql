-- What serving bundles needs beyond the designed schema; mirrors migrations/postgres/0002.
-- (SQLite has no refresh triggers to drop and no autovacuum to tune.)

-- libsignal bundles carry the install's registration id.
ALTER TABLE nchat_identity_keys
    ADD COLUMN registration_id INTEGER
    CONSTRAINT nchat_identity_keys_registration_id_range
        CHECK (registration_id BETWEEN 1 AND 16383);

-- At most one active signed prekey per device.
CREATE UNIQUE INDEX IF NOT EXISTS idx_signed_prekeys_one_active
    ON nchat_signed_prekeys(device_id) WHERE is_active = 1;

-- "The oldest unconsumed one-time prekey of a device" in one index probe, in upload order.
CREATE INDEX IF NOT EXISTS idx_one_time_prekeys_next
    ON nchat_one_time_prekeys(device_id, id) WHERE is_consumed = 0;
