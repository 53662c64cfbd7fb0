-- Mirrors migrations/postgres/0006: the Kyber1024 prekeys a device publishes, one-time and
-- last resort, in one table (they share one id space per device).
CREATE TABLE IF NOT EXISTS nchat_kyber_prekeys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    kyber_prekey_id INTEGER NOT NULL,
    kyber_prekey_public BLOB NOT NULL,
    kyber_prekey_private_encrypted BLOB NOT NULL,
    signature BLOB NOT NULL,
    is_last_resort INTEGER NOT NULL DEFAULT 0,
    is_consumed INTEGER NOT NULL DEFAULT 0,
    consumed_at TEXT,
    is_active INTEGER NOT NULL DEFAULT 0,
    superseded_at TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE(device_id, kyber_prekey_id),
    CHECK (length(kyber_prekey_public) = 1568),
    CHECK (length(signature) = 64),
    CHECK (is_last_resort OR NOT is_active),
    CHECK (NOT (is_last_resort AND is_consumed))
);
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_device_id ON nchat_kyber_prekeys(device_id);
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_next
    ON nchat_kyber_prekeys(device_id, id) WHERE is_last_resort = 0 AND is_consumed = 0;
CREATE UNIQUE INDEX IF NOT EXISTS idx_kyber_prekeys_one_last_resort
    ON nchat_kyber_prekeys(device_id) WHERE is_last_resort = 1 AND is_active = 1;
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_consumed
    ON nchat_kyber_prekeys(consumed_at) WHERE is_consumed = 1;
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_superseded
    ON nchat_kyber_prekeys(superseded_at) WHERE is_last_resort = 1 AND is_active = 0;
CREATE INDEX IF NOT EXISTS idx_kyber_prekeys_rotation
    ON nchat_kyber_prekeys(created_at) WHERE is_last_resort = 1 AND is_active = 1;

-- SQLite cannot change a CHECK constraint in place: keyserver_retired_prekeys is rebuilt with
-- 'kyber' among its key kinds. Nothing references its rows, whose ids are handles used within
-- one cleanup transaction only.
CREATE TABLE keyserver_retired_prekeys_0006 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    key_kind TEXT NOT NULL CHECK (key_kind IN ('one_time', 'signed', 'kyber')),
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    CHECK (first_id <= last_id)
);
INSERT INTO keyserver_retired_prekeys_0006 (id, device_id, key_kind, first_id, last_id)
    SELECT id, device_id, key_kind, first_id, last_id FROM keyserver_retired_prekeys;
DROP TABLE keyserver_retired_prekeys;
ALTER TABLE keyserver_retired_prekeys_0006 RENAME TO keyserver_retired_prekeys;
CREATE INDEX IF NOT EXISTS idx_retired_prekeys_device
    ON keyserver_retired_prekeys(device_id, key_kind, first_id);
