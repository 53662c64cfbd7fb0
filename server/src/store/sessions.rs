//! Signal sessions (`nchat_signal_sessions`): one per device of the owner and peer device,
//! holding client-encrypted ratchet state the server cannot read. Every write names the
//! version it replaces (compare-and-swap), so a stale writer cannot overwrite newer state.

use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::audit::{self, AuditEvent};
use super::database::Tx;
use super::devices::{device_identity_on, lock_owned, user_exists};
use super::ids::DeviceId;
use super::sql::{At, Sql, Uid, sql};
use super::{Store, StoreError};

/// One Signal session: the owner's device and one peer device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    pub device_id: DeviceId,
    pub peer_user_id: Uuid,
    pub peer_device_id: DeviceId,
}

/// A stored session. Its state is client-encrypted and opaque to the server.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub key: SessionKey,
    pub state: Vec<u8>,
    pub is_initiator: bool,
    pub active: bool,
    pub version: u64,
    pub last_message_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// Debug output never shows the encrypted state, only its length.
impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("key", &self.key)
            .field("state_len", &self.state.len())
            .field("active", &self.active)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Which sessions of a device to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionQuery {
    pub device_id: DeviceId,
    pub peer_user_id: Option<Uuid>,
    pub include_inactive: bool,
    /// List sessions after this (peer user, peer device), in that order.
    pub after: Option<(Uuid, DeviceId)>,
    pub limit: u32,
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    device_id: DeviceId,
    peer_user_id: Uid,
    peer_device_id: DeviceId,
    session_state_encrypted: Vec<u8>,
    is_initiator: bool,
    is_active: bool,
    version: i32,
    last_message_at: Option<At>,
    created_at: At,
    updated_at: At,
}

impl From<SessionRow> for StoredSession {
    fn from(row: SessionRow) -> Self {
        Self {
            key: SessionKey {
                device_id: row.device_id,
                peer_user_id: row.peer_user_id.0,
                peer_device_id: row.peer_device_id,
            },
            state: row.session_state_encrypted,
            is_initiator: row.is_initiator,
            active: row.is_active,
            version: row.version as u64,
            last_message_at: row.last_message_at.map(|at| at.0),
            created_at: row.created_at.0,
            updated_at: row.updated_at.0,
        }
    }
}

/// The columns [`SessionRow`] reads, as the start of a statement.
macro_rules! select_sessions {
    ($($rest:tt)*) => {
        sql!("SELECT device_id, peer_user_id, peer_device_id, session_state_encrypted,
                     is_initiator, is_active, version, last_message_at, created_at, updated_at
              FROM nchat_signal_sessions " $($rest)*)
    };
}

/// Binds a session's key as `$1`, `$2`, `$3`.
fn session_query<'q>(tx: &'q mut Tx, sql: &Sql, key: &'q SessionKey) -> super::sql::Query<'q> {
    tx.query(sql)
        .bind(&key.device_id)
        .bind(Uid(key.peer_user_id))
        .bind(&key.peer_device_id)
}

/// The session's version and whether it is active.
async fn version(tx: &mut Tx, key: &SessionKey) -> Result<Option<(i32, bool)>, StoreError> {
    Ok(session_query(
        tx,
        &sql!("SELECT version, is_active FROM nchat_signal_sessions "
            "WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3"),
        key,
    )
    .fetch_optional()
    .await?)
}

/// Rewrites a session's state and activity at `version`; `is_initiator` None keeps it.
async fn update(
    tx: &mut Tx,
    key: &SessionKey,
    state: &[u8],
    is_initiator: Option<bool>,
    active: bool,
    version: u64,
) -> Result<(), StoreError> {
    session_query(
        tx,
        &sql!("UPDATE nchat_signal_sessions
               SET session_state_encrypted = $4, is_initiator = COALESCE($5, is_initiator),
                   is_active = $6, version = $7, updated_at = " NOW "
               WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3"),
        key,
    )
    .bind(state)
    .bind(is_initiator)
    .bind(active)
    .bind(version as i32)
    .execute()
    .await?;
    Ok(())
}

fn stale(expected: u64, current: u64) -> StoreError {
    StoreError::StaleSession { expected, current }
}

impl Store {
    /// Writes a session if `expected_version` is its stored version (0 when there is none).
    /// Storing a session that was not active is audited `session_established`.
    pub async fn put_session(
        &self,
        user_id: Uuid,
        key: &SessionKey,
        state: &[u8],
        is_initiator: bool,
        expected_version: u64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.db.begin_write().await?;
        lock_owned(&mut tx, user_id, &key.device_id).await?;
        if !user_exists(&mut tx, key.peer_user_id).await? {
            return Err(StoreError::UnknownPeer);
        }
        let current = version(&mut tx, key).await?;
        let current_version = current.map_or(0, |(version, _)| version as u64);
        if current_version != expected_version {
            return Err(stale(expected_version, current_version));
        }
        if current.is_none() {
            session_query(
                &mut tx,
                &sql!(
                    "INSERT INTO nchat_signal_sessions
                           (device_id, peer_user_id, peer_device_id, session_state_encrypted,
                            is_initiator)
                       VALUES ($1, $2, $3, $4, $5)"
                ),
                key,
            )
            .bind(state)
            .bind(is_initiator)
            .execute()
            .await?;
        } else {
            update(
                &mut tx,
                key,
                state,
                Some(is_initiator),
                true,
                current_version + 1,
            )
            .await?;
        }
        if !matches!(current, Some((_, true))) {
            audit::record(
                &mut tx,
                AuditEvent::SessionEstablished,
                user_id,
                Some(&key.device_id),
                json!({
                    "peer_user_id": key.peer_user_id,
                    "peer_device_id": key.peer_device_id.as_str(),
                    "is_initiator": is_initiator,
                }),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(current_version + 1)
    }

    /// Marks a session inactive and wipes its state, compare-and-swap like a put, audited
    /// `session_destroyed`. Destroying an inactive session at its version changes nothing.
    pub async fn destroy_session(
        &self,
        user_id: Uuid,
        key: &SessionKey,
        expected_version: u64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.db.begin_write().await?;
        lock_owned(&mut tx, user_id, &key.device_id).await?;
        let (version, active) = version(&mut tx, key)
            .await?
            .ok_or(StoreError::SessionNotFound)?;
        let version = version as u64;
        if version != expected_version {
            return Err(stale(expected_version, version));
        }
        if !active {
            return Ok(version);
        }
        update(&mut tx, key, &[], None, false, version + 1).await?;
        audit::record(
            &mut tx,
            AuditEvent::SessionDestroyed,
            user_id,
            Some(&key.device_id),
            json!({
                "peer_user_id": key.peer_user_id,
                "peer_device_id": key.peer_device_id.as_str(),
            }),
        )
        .await?;
        tx.commit().await?;
        Ok(version + 1)
    }

    /// Records a message on an active session of the caller's device now.
    pub async fn touch_session(
        &self,
        user_id: Uuid,
        key: &SessionKey,
    ) -> Result<OffsetDateTime, StoreError> {
        let mut tx = self.db.begin_write().await?;
        lock_owned(&mut tx, user_id, &key.device_id).await?;
        let at: Option<At> = session_query(
            &mut tx,
            &sql!("UPDATE nchat_signal_sessions SET last_message_at = " NOW "
                   WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3
                     AND is_active = TRUE
                   RETURNING last_message_at"),
            key,
        )
        .fetch_optional::<(At,)>()
        .await?
        .map(|(at,)| at);
        let at = at.ok_or(StoreError::SessionNotFound)?;
        tx.commit().await?;
        Ok(at.0)
    }

    /// One session of a device of `user_id`, active or not.
    pub async fn session(
        &self,
        user_id: Uuid,
        key: &SessionKey,
    ) -> Result<StoredSession, StoreError> {
        let mut conn = self.replica_read().await?;
        device_identity_on(&mut conn, user_id, &key.device_id).await?;
        let row: Option<SessionRow> = conn
            .query(&select_sessions!(
                "WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3"
            ))
            .bind(&key.device_id)
            .bind(Uid(key.peer_user_id))
            .bind(&key.peer_device_id)
            .fetch_optional()
            .await?;
        row.map(StoredSession::from)
            .ok_or(StoreError::SessionNotFound)
    }

    /// A page of a device's sessions, ordered by peer user id, then peer device id.
    pub async fn sessions(
        &self,
        user_id: Uuid,
        query: &SessionQuery,
    ) -> Result<Vec<StoredSession>, StoreError> {
        let (after_user, after_device) = query.after.clone().unzip();
        let mut conn = self.replica_read().await?;
        device_identity_on(&mut conn, user_id, &query.device_id).await?;
        let rows: Vec<SessionRow> = conn
            // Device ids compare bytewise on both backends, so pages continue where they ended.
            .query(&select_sessions!(
                "WHERE device_id = $1
                   AND ($2 IS NULL OR peer_user_id = $2)
                   AND ($3 OR is_active = TRUE)
                   AND ($4 IS NULL OR peer_user_id > $4
                        OR (peer_user_id = $4 AND peer_device_id" PG(" COLLATE \"C\"") " > $5))
                 ORDER BY peer_user_id, peer_device_id" PG(" COLLATE \"C\"") "
                 LIMIT $6"
            ))
            .bind(&query.device_id)
            .bind(query.peer_user_id.map(Uid))
            .bind(query.include_inactive)
            .bind(after_user.map(Uid))
            .bind(after_device)
            .bind(i64::from(query.limit))
            .fetch_all()
            .await?;
        Ok(rows.into_iter().map(StoredSession::from).collect())
    }
}
