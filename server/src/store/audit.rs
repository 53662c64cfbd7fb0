//! The audit log (`nchat_e2ee_audit_log`): every change the key server makes is recorded in
//! the same transaction as the change. Metadata carries counts, key ids and outcomes only:
//! never key material, encrypted blobs or tokens.

use time::OffsetDateTime;
use uuid::Uuid;

use super::database::Tx;
use super::ids::DeviceId;
use super::sql::{At, Json, List, Uid, sql};
use super::{Store, StoreError};

/// An `event_type` the schema's check constraint allows (the design's nine, and one that
/// migration 0007 adds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    /// A user stored their master-key record.
    MasterKeyCreated,
    /// A device registered or re-registered its keys, or was removed.
    DeviceKeysGenerated,
    /// A device uploaded one-time prekeys.
    PrekeysReplenished,
    /// A device installed a new signed key (EC prekey or last-resort Kyber prekey).
    SignedPrekeyRotated,
    /// A device stored a session with a peer device for the first time (or again after
    /// destroying it).
    SessionEstablished,
    /// A device destroyed a session.
    SessionDestroyed,
    /// A user verified a peer's safety number.
    SafetyNumberVerified,
    /// A safety number changed because an identity key did.
    SafetyNumberChanged,
    /// A recovery code restored a device.
    RecoveryCodeUsed,
    /// A device's one-time prekeys went faster than the drain rule allows (`store::drain`).
    PrekeysDrainSuspected,
}

impl AuditEvent {
    /// Every event type, as the schema lists them.
    pub const ALL: [AuditEvent; 10] = [
        Self::MasterKeyCreated,
        Self::DeviceKeysGenerated,
        Self::SessionEstablished,
        Self::SessionDestroyed,
        Self::SignedPrekeyRotated,
        Self::PrekeysReplenished,
        Self::SafetyNumberVerified,
        Self::SafetyNumberChanged,
        Self::RecoveryCodeUsed,
        Self::PrekeysDrainSuspected,
    ];

    /// The event type stored as `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// The stored `event_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MasterKeyCreated => "master_key_created",
            Self::DeviceKeysGenerated => "device_keys_generated",
            Self::PrekeysReplenished => "prekeys_replenished",
            Self::SignedPrekeyRotated => "signed_prekey_rotated",
            Self::SessionEstablished => "session_established",
            Self::SessionDestroyed => "session_destroyed",
            Self::SafetyNumberVerified => "safety_number_verified",
            Self::SafetyNumberChanged => "safety_number_changed",
            Self::RecoveryCodeUsed => "recovery_code_used",
            Self::PrekeysDrainSuspected => "prekeys_drain_suspected",
        }
    }
}

/// One audit event as a user reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: u64,
    pub event_type: String,
    pub device_id: Option<String>,
    pub metadata: serde_json::Value,
    pub created_at: OffsetDateTime,
}

/// Which of a user's audit events to list, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only these event types; all when empty.
    pub event_types: Vec<AuditEvent>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    /// Only events with a smaller id (the previous page's last).
    pub before_id: Option<u64>,
    pub limit: u32,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: i32,
    event_type: String,
    device_id: Option<String>,
    metadata: Option<Json>,
    created_at: At,
}

/// Writes one event in the caller's transaction.
pub(crate) async fn record(
    tx: &mut Tx,
    event: AuditEvent,
    user_id: Uuid,
    device: Option<&DeviceId>,
    metadata: serde_json::Value,
) -> Result<(), StoreError> {
    tx.query(&sql!(
        "INSERT INTO nchat_e2ee_audit_log (event_type, user_id, device_id, metadata)
         VALUES ($1, $2, $3, $4)"
    ))
    .bind(event.as_str())
    .bind(Uid(user_id))
    .bind(device)
    .bind(Json(metadata))
    .execute()
    .await?;
    Ok(())
}

impl Store {
    /// A page of `user_id`'s audit events, newest first.
    pub async fn audit_events(
        &self,
        user_id: Uuid,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let types: Vec<String> = query
            .event_types
            .iter()
            .map(|e| e.as_str().to_owned())
            .collect();
        let rows: Vec<EventRow> = self
            .replica_read()
            .await?
            .query(&sql!(
                "SELECT id, event_type, device_id, metadata, created_at FROM nchat_e2ee_audit_log
                 WHERE user_id = $1
                   AND ($7 OR event_type" IN_LIST("$2") ")
                   AND ($3 IS NULL OR created_at >= $3)
                   AND ($4 IS NULL OR created_at < $4)
                   AND ($5 IS NULL OR id < $5)
                 ORDER BY id DESC
                 LIMIT $6"
            ))
            .bind(Uid(user_id))
            .bind(List(types))
            .bind(query.since.map(At))
            .bind(query.until.map(At))
            .bind(query.before_id.map(|id| id.min(i64::MAX as u64) as i64))
            .bind(i64::from(query.limit))
            .bind(query.event_types.is_empty())
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| AuditRecord {
                id: r.id as u64,
                event_type: r.event_type,
                device_id: r.device_id,
                metadata: r.metadata.map(|m| m.0).unwrap_or_default(),
                created_at: r.created_at.0,
            })
            .collect())
    }
}
