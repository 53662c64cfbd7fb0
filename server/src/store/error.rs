//! Why a store call failed, in terms a handler can map to a status. The driver's errors are
//! classified here and go no further: above the store there is no database type, only whether
//! to retry (the database is unavailable, a concurrent change conflicted) or not.

use time::OffsetDateTime;

/// Why a store call failed. Cloned to answer every fetch of a batch that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("no such device")]
    DeviceNotFound,
    #[error("the device belongs to another user")]
    NotYourDevice,
    #[error("the device id is registered to another user")]
    DeviceTaken,
    /// The device exists, and the caller's token is not bound to it.
    #[error("changing the device needs a token bound to it")]
    DeviceTokenRequired,
    /// A new device would take the user past the device quota.
    #[error("the user already has {max} devices, the most allowed")]
    TooManyDevices { max: u32 },
    #[error("the user is not known to the chat database")]
    UnknownUser,
    /// A one-time key id (of the request field `field`) is stored with other bytes.
    #[error("{field}: key id {key_id} is already stored with different bytes")]
    OneTimePreKeyConflict { field: &'static str, key_id: u32 },
    /// A signed key id (signed EC prekey, last-resort Kyber prekey) is stored with other bytes.
    #[error("{field}: key id {key_id} is already stored with different bytes")]
    SignedPreKeyConflict { field: &'static str, key_id: u32 },
    #[error("{field}: key id {key_id} was already superseded by a newer one")]
    SignedPreKeySuperseded { field: &'static str, key_id: u32 },
    /// The device has no active key of the kind `field` names, which the call needs.
    #[error("the device has no active {field}")]
    NoActiveKey { field: &'static str },
    #[error("the device's identity key changed during the call")]
    IdentityChanged,
    #[error("no such session")]
    SessionNotFound,
    #[error("the session is at version {current}, not {expected}")]
    StaleSession { expected: u64, current: u64 },
    #[error("the peer user does not exist")]
    UnknownPeer,
    #[error("the peer user has no registered device")]
    PeerHasNoDevices,
    #[error("the caller has no registered device")]
    CallerHasNoDevices,
    #[error("the safety number is not the current one")]
    SafetyNumberMismatch,
    #[error("the user has no master-key record")]
    NoMasterKey,
    #[error("the recovery code does not match ({attempts_left} attempts left)")]
    WrongRecoveryCode { attempts_left: u32 },
    #[error("recovery is locked after repeated failures")]
    RecoveryLocked { until: OffsetDateTime },
    /// The database was fenced by a cutover: its keys moved to `moved_to` (a database
    /// address without its password), and it hands out and accepts nothing any more.
    #[error("the keys moved to {moved_to}")]
    Fenced { moved_to: String },
    /// The database cannot do the work now: the connection was lost or refused, the server is
    /// shutting down or read-only (a failover), the pool is exhausted, the file is locked.
    /// Retrying later may succeed.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A concurrent change won a race the statement lost (a unique or foreign-key violation,
    /// a serialization failure, a deadlock). Retrying the whole call may succeed.
    #[error("a concurrent change conflicted: {0}")]
    Conflict(String),
    /// Anything else: a stored row that does not decode, a statement that does not fit the
    /// schema. Not worth retrying.
    #[error("storage error: {0}")]
    Internal(String),
}

impl StoreError {
    /// A stored value that is not what the schema promises.
    pub(crate) fn corrupt(what: impl std::fmt::Display) -> Self {
        Self::Internal(format!("corrupt row: {what}"))
    }
}

/// PostgreSQL error codes (SQLSTATE) that mean "not now": connection exceptions (class 08),
/// the server shutting down or starting (57P01-57P03), too many connections, a read-only
/// server (a standby after failover), a lock or statement timeout, out of disk.
fn postgres_unavailable(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "53100" | "25006" | "55P03" | "57014"
        )
}

/// PostgreSQL error codes that mean a concurrent transaction won: unique and foreign-key
/// violations, serialization failures and deadlocks.
fn postgres_conflict(code: &str) -> bool {
    matches!(code, "23505" | "23503" | "40001" | "40P01")
}

/// SQLite's result codes (the primary code is the low byte of an extended one): busy and locked
/// (another writer), an I/O error, a full disk.
fn sqlite_unavailable(code: &str) -> bool {
    let primary = code.parse::<u32>().map_or(0, |c| c & 0xFF);
    matches!(primary, 5 | 6 | 13 | 10)
}

/// SQLite's extended constraint codes of a unique key, a primary key and a foreign key.
fn sqlite_conflict(code: &str) -> bool {
    matches!(code, "2067" | "1555" | "787")
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(e.to_string()),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
                let (unavailable, conflict) = if sqlite {
                    (sqlite_unavailable(&code), sqlite_conflict(&code))
                } else {
                    (postgres_unavailable(&code), postgres_conflict(&code))
                };
                if unavailable {
                    Self::Unavailable(e.to_string())
                } else if conflict {
                    Self::Conflict(e.to_string())
                } else {
                    Self::Internal(e.to_string())
                }
            }
            sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => Self::corrupt(&e),
            _ => Self::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_and_busy_codes_are_retryable_and_races_are_conflicts() {
        for code in ["57P01", "25006", "08006", "08001", "53300"] {
            assert!(postgres_unavailable(code), "{code}");
        }
        assert!(!postgres_unavailable("23505") && !postgres_unavailable("42601"));
        assert!(postgres_conflict("23505") && postgres_conflict("40001"));
        assert!(!postgres_conflict("22001"));
        // SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT (517), SQLITE_LOCKED; not SQLITE_CONSTRAINT.
        for code in ["5", "517", "6"] {
            assert!(sqlite_unavailable(code), "{code}");
        }
        assert!(!sqlite_unavailable("19") && !sqlite_unavailable("2067"));
        assert!(sqlite_conflict("2067") && !sqlite_conflict("19"));
        assert!(matches!(
            StoreError::from(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::Internal(_)
        ));
    }
}
