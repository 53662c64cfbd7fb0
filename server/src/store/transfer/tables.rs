//! The tables `db copy` moves, in foreign-key order, with each column's type: what it takes to
//! carry a row between PostgreSQL's types and SQLite's (see the two migration folders).

/// How a column is typed on each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// INTEGER / SERIAL on both.
    Int,
    /// TEXT on both.
    Text,
    /// BYTEA / BLOB.
    Bytes,
    /// BOOLEAN / INTEGER 0-1.
    Bool,
    /// UUID / TEXT (hyphenated).
    Uuid,
    /// TIMESTAMPTZ / TEXT (UTC, RFC 3339, milliseconds).
    Time,
    /// JSONB / TEXT.
    Json,
}

/// One table: its name, its primary key (the first column) and its columns.
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, ColumnType)],
    /// True when the key is a serial id whose sequence must continue on the target.
    pub serial: bool,
    /// Foreign keys: (column, parent table, parent column).
    pub references: &'static [(&'static str, &'static str, &'static str)],
}

impl Table {
    pub fn key(&self) -> &'static str {
        self.columns[0].0
    }
}

use ColumnType::*;

/// Every table of the schema, parents before children.
pub const TABLES: &[Table] = &[
    Table {
        name: "nchat_users",
        columns: &[("id", Uuid), ("created_at", Time)],
        references: &[],
        serial: false,
    },
    Table {
        name: "nchat_user_master_keys",
        columns: &[
            ("user_id", Uuid),
            ("master_key_salt", Bytes),
            ("pbkdf2_iterations", Int),
            ("recovery_code_hash", Text),
            ("created_at", Time),
            ("updated_at", Time),
            ("failed_recovery_attempts", Int),
            ("recovery_locked_until", Time),
        ],
        references: &[("user_id", "nchat_users", "id")],
        serial: false,
    },
    Table {
        name: "nchat_identity_keys",
        columns: &[
            ("device_id", Text),
            ("user_id", Uuid),
            ("identity_key_public", Bytes),
            ("identity_key_private_encrypted", Bytes),
            ("created_at", Time),
            ("registration_id", Int),
        ],
        references: &[("user_id", "nchat_users", "id")],
        serial: false,
    },
    Table {
        name: "nchat_signed_prekeys",
        columns: &[
            ("id", Int),
            ("device_id", Text),
            ("signed_prekey_id", Int),
            ("signed_prekey_public", Bytes),
            ("signed_prekey_private_encrypted", Bytes),
            ("signature", Bytes),
            ("rotation_date", Time),
            ("is_active", Bool),
            ("created_at", Time),
            ("superseded_at", Time),
        ],
        references: &[("device_id", "nchat_identity_keys", "device_id")],
        serial: true,
    },
    Table {
        name: "nchat_one_time_prekeys",
        columns: &[
            ("id", Int),
            ("device_id", Text),
            ("prekey_id", Int),
            ("prekey_public", Bytes),
            ("prekey_private_encrypted", Bytes),
            ("is_consumed", Bool),
            ("consumed_at", Time),
            ("consumed_by", Uuid),
            ("fetch_key", Text),
            ("created_at", Time),
        ],
        references: &[("device_id", "nchat_identity_keys", "device_id")],
        serial: true,
    },
    Table {
        name: "nchat_kyber_prekeys",
        columns: &[
            ("id", Int),
            ("device_id", Text),
            ("kyber_prekey_id", Int),
            ("kyber_prekey_public", Bytes),
            ("kyber_prekey_private_encrypted", Bytes),
            ("signature", Bytes),
            ("is_last_resort", Bool),
            ("is_consumed", Bool),
            ("consumed_at", Time),
            ("consumed_by", Uuid),
            ("fetch_key", Text),
            ("is_active", Bool),
            ("superseded_at", Time),
            ("created_at", Time),
        ],
        references: &[("device_id", "nchat_identity_keys", "device_id")],
        serial: true,
    },
    Table {
        name: "keyserver_retired_prekeys",
        columns: &[
            ("id", Int),
            ("device_id", Text),
            ("key_kind", Text),
            ("first_id", Int),
            ("last_id", Int),
        ],
        references: &[("device_id", "nchat_identity_keys", "device_id")],
        serial: true,
    },
    Table {
        name: "nchat_signal_sessions",
        columns: &[
            ("id", Int),
            ("device_id", Text),
            ("peer_user_id", Uuid),
            ("peer_device_id", Text),
            ("session_state_encrypted", Bytes),
            ("is_initiator", Bool),
            ("is_active", Bool),
            ("last_message_at", Time),
            ("created_at", Time),
            ("updated_at", Time),
            ("version", Int),
        ],
        references: &[
            ("device_id", "nchat_identity_keys", "device_id"),
            ("peer_user_id", "nchat_users", "id"),
        ],
        serial: true,
    },
    Table {
        name: "nchat_safety_numbers",
        columns: &[
            ("id", Int),
            ("user_id", Uuid),
            ("peer_user_id", Uuid),
            ("safety_number", Text),
            ("verified_at", Time),
            ("verification_method", Text),
            ("created_at", Time),
            ("updated_at", Time),
        ],
        references: &[
            ("user_id", "nchat_users", "id"),
            ("peer_user_id", "nchat_users", "id"),
        ],
        serial: true,
    },
    Table {
        name: "nchat_e2ee_audit_log",
        columns: &[
            ("id", Int),
            ("event_type", Text),
            ("user_id", Uuid),
            ("device_id", Text),
            ("metadata", Json),
            ("created_at", Time),
        ],
        references: &[("user_id", "nchat_users", "id")],
        serial: true,
    },
    Table {
        name: "keyserver_job_runs",
        columns: &[
            ("id", Int),
            ("job", Text),
            ("trigger", Text),
            ("started_at", Time),
            ("finished_at", Time),
            ("outcome", Text),
            ("counts", Json),
            ("message", Text),
        ],
        references: &[],
        serial: true,
    },
];
