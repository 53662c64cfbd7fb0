-- The nchat E2EE schema for the embedded SQLite store, table for table the PostgreSQL schema
-- (migrations/postgres/0001): same names, columns, constraints, checks and partial indexes.
-- Types map as UUID -> TEXT (hyphenated), BYTEA -> BLOB, BOOLEAN -> INTEGER 0/1,
-- TIMESTAMPTZ -> TEXT (UTC, RFC 3339 with milliseconds), JSONB -> TEXT holding JSON,
-- SERIAL -> INTEGER PRIMARY KEY AUTOINCREMENT (ids are never reused), and the materialized
-- view becomes a plain view (SQLite has no materialized views; it is always fresh).

CREATE TABLE IF NOT EXISTS nchat_users (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE IF NOT EXISTS nchat_user_master_keys (
    user_id TEXT PRIMARY KEY REFERENCES nchat_users(id) ON DELETE CASCADE,
    master_key_salt BLOB NOT NULL,
    pbkdf2_iterations INTEGER NOT NULL DEFAULT 100000,
    recovery_code_hash TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS idx_user_master_keys_user_id ON nchat_user_master_keys(user_id);

CREATE TABLE IF NOT EXISTS nchat_identity_keys (
    device_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES nchat_users(id) ON DELETE CASCADE,
    identity_key_public BLOB NOT NULL,
    identity_key_private_encrypted BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE(user_id, device_id)
);
CREATE INDEX IF NOT EXISTS idx_identity_keys_user_id ON nchat_identity_keys(user_id);
CREATE INDEX IF NOT EXISTS idx_identity_keys_device_id ON nchat_identity_keys(device_id);

CREATE TABLE IF NOT EXISTS nchat_signed_prekeys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    signed_prekey_id INTEGER NOT NULL,
    signed_prekey_public BLOB NOT NULL,
    signed_prekey_private_encrypted BLOB NOT NULL,
    signature BLOB NOT NULL,
    rotation_date TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    is_active INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE(device_id, signed_prekey_id)
);
CREATE INDEX IF NOT EXISTS idx_signed_prekeys_device_id ON nchat_signed_prekeys(device_id);
CREATE INDEX IF NOT EXISTS idx_signed_prekeys_active ON nchat_signed_prekeys(device_id, is_active);
CREATE INDEX IF NOT EXISTS idx_signed_prekeys_rotation ON nchat_signed_prekeys(rotation_date)
    WHERE is_active = 1;

CREATE TABLE IF NOT EXISTS nchat_one_time_prekeys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    prekey_id INTEGER NOT NULL,
    prekey_public BLOB NOT NULL,
    prekey_private_encrypted BLOB NOT NULL,
    is_consumed INTEGER NOT NULL DEFAULT 0 CHECK (is_consumed IN (0, 1)),
    consumed_at TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE(device_id, prekey_id)
);
CREATE INDEX IF NOT EXISTS idx_one_time_prekeys_device_id ON nchat_one_time_prekeys(device_id);
CREATE INDEX IF NOT EXISTS idx_one_time_prekeys_available ON nchat_one_time_prekeys(device_id, is_consumed)
    WHERE is_consumed = 0;
CREATE INDEX IF NOT EXISTS idx_one_time_prekeys_consumed ON nchat_one_time_prekeys(consumed_at)
    WHERE is_consumed = 1;

CREATE TABLE IF NOT EXISTS nchat_signal_sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    peer_user_id TEXT NOT NULL REFERENCES nchat_users(id) ON DELETE CASCADE,
    peer_device_id TEXT NOT NULL,
    session_state_encrypted BLOB NOT NULL,
    is_initiator INTEGER NOT NULL CHECK (is_initiator IN (0, 1)),
    is_active INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    last_message_at TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE(device_id, peer_user_id, peer_device_id)
);
CREATE INDEX IF NOT EXISTS idx_signal_sessions_device_id ON nchat_signal_sessions(device_id);
CREATE INDEX IF NOT EXISTS idx_signal_sessions_peer ON nchat_signal_sessions(peer_user_id, peer_device_id);
CREATE INDEX IF NOT EXISTS idx_signal_sessions_active ON nchat_signal_sessions(device_id, is_active);
CREATE INDEX IF NOT EXISTS idx_signal_sessions_last_message ON nchat_signal_sessions(last_message_at)
    WHERE is_active = 1;

CREATE TABLE IF NOT EXISTS nchat_safety_numbers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL REFERENCES nchat_users(id) ON DELETE CASCADE,
    peer_user_id TEXT NOT NULL REFERENCES nchat_users(id) ON DELETE CASCADE,
    safety_number TEXT NOT NULL,
    verified_at TEXT,
    verification_method TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE(user_id, peer_user_id),
    CHECK (LENGTH(safety_number) = 60),
    CHECK (verification_method IN ('manual', 'qr_code', 'out_of_band', NULL))
);
CREATE INDEX IF NOT EXISTS idx_safety_numbers_user_id ON nchat_safety_numbers(user_id);
CREATE INDEX IF NOT EXISTS idx_safety_numbers_peer_user_id ON nchat_safety_numbers(peer_user_id);
CREATE INDEX IF NOT EXISTS idx_safety_numbers_verified ON nchat_safety_numbers(user_id, verified_at)
    WHERE verified_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS nchat_e2ee_audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type TEXT NOT NULL,
    user_id TEXT REFERENCES nchat_users(id) ON DELETE SET NULL,
    device_id TEXT,
    metadata TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CHECK (event_type IN (
        'master_key_created',
        'device_keys_generated',
        'session_established',
        'session_destroyed',
        'signed_prekey_rotated',
        'prekeys_replenished',
        'safety_number_verified',
        'safety_number_changed',
        'recovery_code_used'
    ))
);
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_user_id ON nchat_e2ee_audit_log(user_id);
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_device_id ON nchat_e2ee_audit_log(device_id);
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_event_type ON nchat_e2ee_audit_log(event_type);
CREATE INDEX IF NOT EXISTS idx_e2ee_audit_log_created_at ON nchat_e2ee_audit_log(created_at DESC);

CREATE VIEW IF NOT EXISTS nchat_prekey_bundles AS
SELECT
    ik.user_id,
    ik.device_id,
    ik.identity_key_public,
    sp.signed_prekey_id,
    sp.signed_prekey_public,
    sp.signature,
    (SELECT prekey_id FROM nchat_one_time_prekeys
     WHERE device_id = ik.device_id AND is_consumed = 0
     ORDER BY created_at ASC LIMIT 1) AS one_time_prekey_id,
    (SELECT prekey_public FROM nchat_one_time_prekeys
     WHERE device_id = ik.device_id AND is_consumed = 0
     ORDER BY created_at ASC LIMIT 1) AS one_time_prekey_public
FROM nchat_identity_keys ik
JOIN nchat_signed_prekeys sp ON ik.device_id = sp.device_id AND sp.is_active = 1;
