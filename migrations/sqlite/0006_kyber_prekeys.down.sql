-- Reverses 0006: every Kyber prekey goes, and with it the ids cleanup retired.
CREATE TABLE keyserver_retired_prekeys_0005 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    key_kind TEXT NOT NULL CHECK (key_kind IN ('one_time', 'signed')),
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    CHECK (first_id <= last_id)
);
INSERT INTO keyserver_retired_prekeys_0005 (id, device_id, key_kind, first_id, last_id)
    SELECT id, device_id, key_kind, first_id, last_id FROM keyserver_retired_prekeys
    WHERE key_kind <> 'kyber';
DROP TABLE keyserver_retired_prekeys;
ALTER TABLE keyserver_retired_prekeys_0005 RENAME TO keyserver_retired_prekeys;
CREATE INDEX IF NOT EXISTS idx_retired_prekeys_device
    ON keyserver_retired_prekeys(device_id, key_kind, first_id);
DROP TABLE IF EXISTS nchat_kyber_prekeys;
