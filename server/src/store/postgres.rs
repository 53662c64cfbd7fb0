//! The PostgreSQL backend of [`KeyStore`].
//!
//! Bundles are served by one statement on the base tables that takes each device's oldest
//! unconsumed one-time prekey with `FOR UPDATE SKIP LOCKED` and flags it consumed, so concurrent
//! fetchers in any number of processes never get the same key (docs/BUNDLES.md has the numbers
//! behind this choice). Writes to one device lock its identity row first, which serializes
//! uploads, rotations and re-registrations of that device without blocking fetches.

mod maintenance;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use keyserver_proto::wire::PublicKey;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::jobs::KeyKind;
use super::writes::{KeyTx, StoredOneTimePreKey, StoredSignedPreKey};
use super::{
    AuditQuery, AuditRecord, BundleTarget, DeviceBundle, KeyStatus, KeyStore, MasterKeyRecord,
    NewDevice, NewOneTimePreKey, NewSignedPreKey, PublishedSignedPreKey, RecoverableDevice,
    SafetyRecord, SessionKey, SessionQuery, StoreError, StoredSession, VerificationMethod,
    stored_key, stored_signature,
};
use crate::audit::AuditEvent;

/// The bundle fetch after its `targets` CTE (ord, user_id, device_id, from the parameters $1
/// order, $2 user ids, $3 optional device ids): takes one one-time prekey per device of the
/// targets and returns their bundles. `devices` holds each device once however many targets name
/// it, so one statement never takes two keys of a device nor hands one key to two results.
macro_rules! fetch_bundles {
    ($targets:literal) => {
        concat!(
            "WITH targets AS (",
            $targets,
            "),
             devices AS (
                 SELECT DISTINCT ik.device_id, ik.user_id, ik.registration_id, ik.identity_key_public,
                        sp.signed_prekey_id, sp.signed_prekey_public, sp.signature, sp.rotation_date
                 FROM targets t
                 JOIN nchat_identity_keys ik
                   ON ik.user_id = t.user_id AND (t.device_id IS NULL OR ik.device_id = t.device_id)
                 JOIN nchat_signed_prekeys sp ON sp.device_id = ik.device_id AND sp.is_active = TRUE
             ),
             picked AS (
                 SELECT next.id
                 FROM devices d
                 CROSS JOIN LATERAL (
                     SELECT o.id FROM nchat_one_time_prekeys o
                     WHERE o.device_id = d.device_id AND o.is_consumed = FALSE
                     ORDER BY o.id
                     LIMIT 1
                     FOR UPDATE SKIP LOCKED
                 ) next
             ),
             taken AS (
                 UPDATE nchat_one_time_prekeys o
                 SET is_consumed = TRUE, consumed_at = NOW()
                 FROM picked
                 WHERE o.id = picked.id AND o.is_consumed = FALSE
                 RETURNING o.device_id, o.prekey_id, o.prekey_public
             )
             SELECT t.ord, d.device_id, COALESCE(d.registration_id, 0) AS registration_id,
                    d.identity_key_public, d.signed_prekey_id, d.signed_prekey_public, d.signature,
                    d.rotation_date, k.prekey_id, k.prekey_public
             FROM targets t
             JOIN devices d
               ON d.user_id = t.user_id AND (t.device_id IS NULL OR d.device_id = t.device_id)
             LEFT JOIN taken k ON k.device_id = d.device_id
             ORDER BY t.ord, d.device_id"
        )
    };
}

/// Any number of targets.
const FETCH_BUNDLES: &str = fetch_bundles!(
    "SELECT * FROM unnest($1::int4[], $2::uuid[], $3::text[]) AS t(ord, user_id, device_id)"
);

/// One target, the common case (`FetchPreKeyBundle`). An array of unknown length is planned as
/// ten rows, which makes the generic plan of [`FETCH_BUNDLES`] look four times dearer than a
/// custom one, so PostgreSQL plans that statement anew on every call: the profile of a fetch
/// run had planning taking more of the database's CPU than running it. One row read from the
/// arrays plans as one row, and PostgreSQL keeps its generic plan after five calls.
/// `loadtest/pgbench/fetch.sql` runs this statement (a test keeps them equal).
const FETCH_ONE_BUNDLE: &str = fetch_bundles!(
    "SELECT ($1::int4[])[1] AS ord, ($2::uuid[])[1] AS user_id, ($3::text[])[1] AS device_id"
);

/// A pooled connection idle this long gets a round trip before it is used, so one whose
/// database went away is found out at acquire time (within the acquire timeout) rather than by
/// a request. sqlx's default makes that round trip on every acquire, one more wake-up of the
/// database per statement (a fetch run made 1.11 times as many fetches without it, see
/// docs/PERFORMANCE.md). Under load no connection sits idle this long.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// PostgreSQL error code for a NOT NULL violation (a chat app's richer `nchat_users`).
const NOT_NULL_VIOLATION: &str = "23502";

/// A [`KeyStore`] on a PostgreSQL pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects a pool of at most `max_connections` to `url`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect(url)
            .await?;
        Ok(Self { pool })
    }

    /// The underlying pool, for migrations and operator tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Key ids are validated to 0..=0xFFFFFF before they reach the store, so they fit an INTEGER.
fn db_id(key_id: u32) -> i32 {
    key_id as i32
}

/// The columns of a session, in the order [`session_row`] reads them.
const SESSION_COLUMNS: &str =
    "SELECT device_id, peer_user_id, peer_device_id, session_state_encrypted,
        is_initiator, is_active, version, last_message_at, created_at, updated_at
    FROM nchat_signal_sessions";

fn session_row(row: &sqlx::postgres::PgRow) -> StoredSession {
    StoredSession {
        key: SessionKey {
            device_id: row.get("device_id"),
            peer_user_id: row.get("peer_user_id"),
            peer_device_id: row.get("peer_device_id"),
        },
        state: row.get("session_state_encrypted"),
        is_initiator: row.get("is_initiator"),
        active: row.get("is_active"),
        version: row.get::<i32, _>("version") as u64,
        last_message_at: row.get("last_message_at"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    }
}

/// One write transaction on PostgreSQL.
struct PgTx(Transaction<'static, Postgres>);

#[async_trait]
impl KeyTx for PgTx {
    async fn ensure_user(&mut self, user_id: Uuid) -> Result<(), StoreError> {
        if self.user_exists(user_id).await? {
            return Ok(());
        }
        // A chat app's own users table has columns the key server cannot fill: the user must
        // already be there.
        match sqlx::query("INSERT INTO nchat_users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(user_id)
            .execute(&mut *self.0)
            .await
        {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(NOT_NULL_VIOLATION) => {
                Err(StoreError::UnknownUser)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn insert_device(&mut self, device: &NewDevice) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO nchat_identity_keys
                 (device_id, user_id, identity_key_public, identity_key_private_encrypted, registration_id)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (device_id) DO NOTHING",
        )
        .bind(&device.device_id)
        .bind(device.user_id)
        .bind(device.identity_key.as_raw().as_slice())
        .bind(&device.encrypted_identity_private)
        .bind(i32::from(device.registration_id))
        .execute(&mut *self.0)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn lock_device(
        &mut self,
        device_id: &str,
    ) -> Result<Option<(Uuid, PublicKey)>, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, identity_key_public FROM nchat_identity_keys
             WHERE device_id = $1 FOR NO KEY UPDATE",
        )
        .bind(device_id)
        .fetch_optional(&mut *self.0)
        .await?;
        row.map(|r| Ok((r.get("user_id"), stored_key(r.get("identity_key_public"))?)))
            .transpose()
    }

    async fn update_device(
        &mut self,
        device: &NewDevice,
        new_identity: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE nchat_identity_keys
             SET identity_key_public = $2, identity_key_private_encrypted = $3, registration_id = $4,
                 created_at = CASE WHEN $5 THEN NOW() ELSE created_at END
             WHERE device_id = $1",
        )
        .bind(&device.device_id)
        .bind(device.identity_key.as_raw().as_slice())
        .bind(&device.encrypted_identity_private)
        .bind(i32::from(device.registration_id))
        .bind(new_identity)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn delete_prekeys(&mut self, device_id: &str) -> Result<(), StoreError> {
        // Retired ids last: a cleanup that deleted some of these keys first has then committed
        // its ranges, which this statement sees and deletes too.
        for table in [
            "nchat_one_time_prekeys",
            "nchat_signed_prekeys",
            "keyserver_retired_prekeys",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE device_id = $1"))
                .bind(device_id)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }

    async fn one_time_prekeys(
        &mut self,
        device_id: &str,
        ids: &[u32],
    ) -> Result<HashMap<u32, StoredOneTimePreKey>, StoreError> {
        let ids: Vec<i32> = ids.iter().map(|&id| db_id(id)).collect();
        let rows = sqlx::query(
            "SELECT prekey_id, prekey_public, is_consumed FROM nchat_one_time_prekeys
             WHERE device_id = $1 AND prekey_id = ANY($2)",
        )
        .bind(device_id)
        .bind(&ids)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let stored = StoredOneTimePreKey {
                    public: r.get("prekey_public"),
                    consumed: r.get("is_consumed"),
                };
                (r.get::<i32, _>("prekey_id") as u32, stored)
            })
            .collect())
    }

    async fn retired_ids(
        &mut self,
        device_id: &str,
        kind: KeyKind,
    ) -> Result<Vec<(u32, u32)>, StoreError> {
        Ok(sqlx::query_as::<_, (i32, i32)>(
            "SELECT first_id, last_id FROM keyserver_retired_prekeys
             WHERE device_id = $1 AND key_kind = $2",
        )
        .bind(device_id)
        .bind(kind.as_str())
        .fetch_all(&mut *self.0)
        .await?
        .into_iter()
        .map(|(first, last)| (first as u32, last as u32))
        .collect())
    }

    async fn insert_one_time_prekeys(
        &mut self,
        device_id: &str,
        keys: &[&NewOneTimePreKey],
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let ids: Vec<i32> = keys.iter().map(|k| db_id(k.key_id)).collect();
        let publics: Vec<&[u8]> = keys.iter().map(|k| k.public.as_raw().as_slice()).collect();
        let privates: Vec<&[u8]> = keys
            .iter()
            .map(|k| k.encrypted_private.as_slice())
            .collect();
        sqlx::query(
            "INSERT INTO nchat_one_time_prekeys (device_id, prekey_id, prekey_public, prekey_private_encrypted)
             SELECT $1, k.id, k.public, k.private
             FROM unnest($2::int4[], $3::bytea[], $4::bytea[]) WITH ORDINALITY AS k(id, public, private, n)
             ORDER BY k.n",
        )
        .bind(device_id)
        .bind(&ids)
        .bind(&publics)
        .bind(&privates)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn signed_prekeys(
        &mut self,
        device_id: &str,
        key_id: u32,
    ) -> Result<Vec<StoredSignedPreKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT signed_prekey_id, signed_prekey_public, is_active FROM nchat_signed_prekeys
             WHERE device_id = $1 AND (signed_prekey_id = $2 OR is_active = TRUE)",
        )
        .bind(device_id)
        .bind(db_id(key_id))
        .fetch_all(&mut *self.0)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| StoredSignedPreKey {
                key_id: r.get::<i32, _>("signed_prekey_id") as u32,
                public: r.get("signed_prekey_public"),
                active: r.get("is_active"),
            })
            .collect())
    }

    async fn deactivate_signed_prekeys(&mut self, device_id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE nchat_signed_prekeys SET is_active = FALSE, superseded_at = NOW()
             WHERE device_id = $1 AND is_active = TRUE",
        )
        .bind(device_id)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn insert_signed_prekey(
        &mut self,
        device_id: &str,
        key: &NewSignedPreKey,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nchat_signed_prekeys
                 (device_id, signed_prekey_id, signed_prekey_public, signed_prekey_private_encrypted,
                  signature, is_active)
             VALUES ($1, $2, $3, $4, $5, TRUE)",
        )
        .bind(device_id)
        .bind(db_id(key.key_id))
        .bind(key.public.as_raw().as_slice())
        .bind(&key.encrypted_private)
        .bind(key.signature.as_slice())
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn count_available(&mut self, device_id: &str) -> Result<u32, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM nchat_one_time_prekeys WHERE device_id = $1 AND is_consumed = FALSE",
        )
        .bind(device_id)
        .fetch_one(&mut *self.0)
        .await?;
        Ok(count as u32)
    }

    async fn user_exists(&mut self, user_id: Uuid) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM nchat_users WHERE id = $1)")
                .bind(user_id)
                .fetch_one(&mut *self.0)
                .await?,
        )
    }

    async fn session_version(
        &mut self,
        key: &SessionKey,
    ) -> Result<Option<(u64, bool)>, StoreError> {
        let row = sqlx::query(
            "SELECT version, is_active FROM nchat_signal_sessions
             WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3",
        )
        .bind(&key.device_id)
        .bind(key.peer_user_id)
        .bind(&key.peer_device_id)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(row.map(|r| (r.get::<i32, _>("version") as u64, r.get("is_active"))))
    }

    async fn insert_session(
        &mut self,
        key: &SessionKey,
        state: &[u8],
        is_initiator: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nchat_signal_sessions
                 (device_id, peer_user_id, peer_device_id, session_state_encrypted, is_initiator)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key.device_id)
        .bind(key.peer_user_id)
        .bind(&key.peer_device_id)
        .bind(state)
        .bind(is_initiator)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn update_session(
        &mut self,
        key: &SessionKey,
        state: &[u8],
        is_initiator: Option<bool>,
        active: bool,
        version: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE nchat_signal_sessions
             SET session_state_encrypted = $4, is_initiator = COALESCE($5, is_initiator),
                 is_active = $6, version = $7, updated_at = NOW()
             WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3",
        )
        .bind(&key.device_id)
        .bind(key.peer_user_id)
        .bind(&key.peer_device_id)
        .bind(state)
        .bind(is_initiator)
        .bind(active)
        .bind(version as i32)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn touch_session(
        &mut self,
        key: &SessionKey,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE nchat_signal_sessions SET last_message_at = NOW()
             WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3 AND is_active = TRUE
             RETURNING last_message_at",
        )
        .bind(&key.device_id)
        .bind(key.peer_user_id)
        .bind(&key.peer_device_id)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn master_key_for_update(
        &mut self,
        user_id: Uuid,
    ) -> Result<Option<(MasterKeyRecord, String, u32, Option<OffsetDateTime>)>, StoreError> {
        let row = sqlx::query(
            "SELECT master_key_salt, pbkdf2_iterations, recovery_code_hash,
                    failed_recovery_attempts, recovery_locked_until
             FROM nchat_user_master_keys WHERE user_id = $1 FOR UPDATE",
        )
        .bind(user_id)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(row.map(|r| {
            (
                MasterKeyRecord {
                    salt: r.get("master_key_salt"),
                    pbkdf2_iterations: r.get::<i32, _>("pbkdf2_iterations") as u32,
                },
                r.get("recovery_code_hash"),
                r.get::<i32, _>("failed_recovery_attempts") as u32,
                r.get("recovery_locked_until"),
            )
        }))
    }

    async fn upsert_master_key(
        &mut self,
        user_id: Uuid,
        record: &MasterKeyRecord,
        recovery_code_hash: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO nchat_user_master_keys (user_id, master_key_salt, pbkdf2_iterations, recovery_code_hash) VALUES ($1, $2, $3, $4) ON CONFLICT (user_id) DO UPDATE SET master_key_salt = excluded.master_key_salt, pbkdf2_iterations = excluded.pbkdf2_iterations, recovery_code_hash = excluded.recovery_code_hash, failed_recovery_attempts = 0, recovery_locked_until = NULL, updated_at = NOW()")
            .bind(user_id)
            .bind(&record.salt)
            .bind(record.pbkdf2_iterations as i32)
            .bind(recovery_code_hash)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn set_recovery_state(
        &mut self,
        user_id: Uuid,
        failed_attempts: u32,
        locked_until: Option<OffsetDateTime>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE nchat_user_master_keys
             SET failed_recovery_attempts = $2, recovery_locked_until = $3
             WHERE user_id = $1",
        )
        .bind(user_id)
        .bind(failed_attempts as i32)
        .bind(locked_until)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn recoverable_devices(
        &mut self,
        user_id: Uuid,
    ) -> Result<Vec<RecoverableDevice>, StoreError> {
        let rows = sqlx::query(
            "SELECT device_id, COALESCE(registration_id, 0) AS registration_id,
                    identity_key_public, identity_key_private_encrypted
             FROM nchat_identity_keys WHERE user_id = $1 ORDER BY device_id",
        )
        .bind(user_id)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RecoverableDevice {
                    device_id: r.get("device_id"),
                    registration_id: r.get::<i32, _>("registration_id") as u32,
                    identity_key: stored_key(r.get("identity_key_public"))?,
                    encrypted_identity_private: r.get("identity_key_private_encrypted"),
                })
            })
            .collect()
    }

    async fn delete_device(&mut self, device_id: &str) -> Result<u32, StoreError> {
        let sessions: i64 =
            sqlx::query_scalar("SELECT count(*) FROM nchat_signal_sessions WHERE device_id = $1")
                .bind(device_id)
                .fetch_one(&mut *self.0)
                .await?;
        sqlx::query("DELETE FROM nchat_identity_keys WHERE device_id = $1")
            .bind(device_id)
            .execute(&mut *self.0)
            .await?;
        Ok(sessions as u32)
    }

    async fn lock_user(&mut self, user_id: Uuid) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))")
            .bind(user_id)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn identity_keys(&mut self, user_id: Uuid) -> Result<Vec<PublicKey>, StoreError> {
        let rows =
            sqlx::query("SELECT identity_key_public FROM nchat_identity_keys WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(&mut *self.0)
                .await?;
        rows.iter()
            .map(|r| stored_key(r.get("identity_key_public")))
            .collect()
    }

    async fn safety_numbers_involving(
        &mut self,
        user_id: Uuid,
    ) -> Result<Vec<(i64, Uuid, Uuid, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, user_id, peer_user_id, safety_number FROM nchat_safety_numbers
             WHERE user_id = $1 OR peer_user_id = $1",
        )
        .bind(user_id)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<i32, _>("id").into(),
                    r.get("user_id"),
                    r.get("peer_user_id"),
                    r.get("safety_number"),
                )
            })
            .collect())
    }

    async fn replace_safety_number(&mut self, id: i64, number: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE nchat_safety_numbers
             SET safety_number = $2, verified_at = NULL, verification_method = NULL,
                 updated_at = NOW()
             WHERE id = $1",
        )
        .bind(id as i32)
        .bind(number)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn store_verified_safety_number(
        &mut self,
        user_id: Uuid,
        peer_user_id: Uuid,
        number: &str,
        method: VerificationMethod,
    ) -> Result<OffsetDateTime, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO nchat_safety_numbers
                 (user_id, peer_user_id, safety_number, verified_at, verification_method)
             VALUES ($1, $2, $3, NOW(), $4)
             ON CONFLICT (user_id, peer_user_id) DO UPDATE
             SET safety_number = excluded.safety_number, verified_at = excluded.verified_at,
                 verification_method = excluded.verification_method, updated_at = NOW()
             RETURNING verified_at",
        )
        .bind(user_id)
        .bind(peer_user_id)
        .bind(number)
        .bind(method.as_str())
        .fetch_one(&mut *self.0)
        .await?)
    }

    async fn audit(
        &mut self,
        event: AuditEvent,
        user_id: Uuid,
        device_id: Option<&str>,
        metadata: serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nchat_e2ee_audit_log (event_type, user_id, device_id, metadata)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(event.as_str())
        .bind(user_id)
        .bind(device_id)
        .bind(metadata)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.0.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl KeyStore for PgStore {
    async fn begin_write(&self) -> Result<Box<dyn KeyTx>, StoreError> {
        Ok(Box::new(PgTx(self.pool.begin().await?)))
    }

    async fn device_identity(
        &self,
        user_id: Uuid,
        device_id: &str,
    ) -> Result<PublicKey, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, identity_key_public FROM nchat_identity_keys WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::DeviceNotFound)?;
        if row.get::<Uuid, _>("user_id") != user_id {
            return Err(StoreError::NotYourDevice);
        }
        stored_key(row.get("identity_key_public"))
    }

    async fn key_status(&self, user_id: Uuid, device_id: &str) -> Result<KeyStatus, StoreError> {
        let row = sqlx::query(
            "SELECT ik.user_id,
                    (SELECT count(*) FROM nchat_one_time_prekeys o
                     WHERE o.device_id = ik.device_id AND o.is_consumed = FALSE) AS available,
                    sp.signed_prekey_id, sp.rotation_date
             FROM nchat_identity_keys ik
             LEFT JOIN nchat_signed_prekeys sp ON sp.device_id = ik.device_id AND sp.is_active = TRUE
             WHERE ik.device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::DeviceNotFound)?;
        if row.get::<Uuid, _>("user_id") != user_id {
            return Err(StoreError::NotYourDevice);
        }
        let signed_id: Option<i32> = row.get("signed_prekey_id");
        let rotated_at: Option<OffsetDateTime> = row.get("rotation_date");
        Ok(KeyStatus {
            available: row.get::<i64, _>("available") as u32,
            active_signed_prekey: signed_id.zip(rotated_at).map(|(id, at)| (id as u32, at)),
        })
    }

    async fn session(&self, user_id: Uuid, key: &SessionKey) -> Result<StoredSession, StoreError> {
        self.device_identity(user_id, &key.device_id).await?;
        let row = sqlx::query(&format!(
            "{SESSION_COLUMNS} WHERE device_id = $1 AND peer_user_id = $2 AND peer_device_id = $3"
        ))
        .bind(&key.device_id)
        .bind(key.peer_user_id)
        .bind(&key.peer_device_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::SessionNotFound)?;
        Ok(session_row(&row))
    }

    async fn sessions(
        &self,
        user_id: Uuid,
        query: &SessionQuery,
    ) -> Result<Vec<StoredSession>, StoreError> {
        self.device_identity(user_id, &query.device_id).await?;
        let (after_user, after_device) = query.after.clone().unzip();
        let rows = sqlx::query(&format!(
            "{SESSION_COLUMNS}
             WHERE device_id = $1
               AND ($2::uuid IS NULL OR peer_user_id = $2)
               AND ($3 OR is_active = TRUE)
               AND ($4::uuid IS NULL OR peer_user_id > $4
                    OR (peer_user_id = $4 AND peer_device_id COLLATE \"C\" > $5))
             ORDER BY peer_user_id, peer_device_id COLLATE \"C\"
             LIMIT $6"
        ))
        .bind(&query.device_id)
        .bind(query.peer_user_id)
        .bind(query.include_inactive)
        .bind(after_user)
        .bind(after_device)
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(session_row).collect())
    }

    async fn master_key(&self, user_id: Uuid) -> Result<Option<MasterKeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT master_key_salt, pbkdf2_iterations FROM nchat_user_master_keys
             WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| MasterKeyRecord {
            salt: r.get("master_key_salt"),
            pbkdf2_iterations: r.get::<i32, _>("pbkdf2_iterations") as u32,
        }))
    }

    async fn identity_keys(&self, user_id: Uuid) -> Result<Vec<PublicKey>, StoreError> {
        let rows =
            sqlx::query("SELECT identity_key_public FROM nchat_identity_keys WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| stored_key(r.get("identity_key_public")))
            .collect()
    }

    async fn safety_record(
        &self,
        user_id: Uuid,
        peer_user_id: Uuid,
    ) -> Result<Option<SafetyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT safety_number, verified_at, verification_method FROM nchat_safety_numbers
             WHERE user_id = $1 AND peer_user_id = $2",
        )
        .bind(user_id)
        .bind(peer_user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| {
            let at: Option<OffsetDateTime> = r.get("verified_at");
            let method: Option<String> = r.get("verification_method");
            SafetyRecord {
                number: r.get("safety_number"),
                verified: at.zip(method.as_deref().and_then(VerificationMethod::from_name)),
            }
        }))
    }

    async fn audit_events(
        &self,
        user_id: Uuid,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let types: Vec<&str> = query.event_types.iter().map(|e| e.as_str()).collect();
        let rows = sqlx::query(
            "SELECT id, event_type, device_id, metadata, created_at FROM nchat_e2ee_audit_log
             WHERE user_id = $1
               AND (cardinality($2::text[]) = 0 OR event_type = ANY($2))
               AND ($3::timestamptz IS NULL OR created_at >= $3)
               AND ($4::timestamptz IS NULL OR created_at < $4)
               AND ($5::int4 IS NULL OR id < $5)
             ORDER BY id DESC
             LIMIT $6",
        )
        .bind(user_id)
        .bind(&types)
        .bind(query.since)
        .bind(query.until)
        .bind(query.before_id.map(|id| id.min(i32::MAX as u64) as i32))
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| AuditRecord {
                id: r.get::<i32, _>("id") as u64,
                event_type: r.get("event_type"),
                device_id: r.get("device_id"),
                metadata: r
                    .get::<Option<serde_json::Value>, _>("metadata")
                    .unwrap_or_default(),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    async fn fetch_bundles(
        &self,
        targets: &[BundleTarget],
    ) -> Result<Vec<Vec<DeviceBundle>>, StoreError> {
        let ords: Vec<i32> = (0..targets.len() as i32).collect();
        let users: Vec<Uuid> = targets.iter().map(|t| t.user_id).collect();
        let devices: Vec<Option<&str>> = targets.iter().map(|t| t.device_id.as_deref()).collect();
        let statement = match targets {
            [_] => FETCH_ONE_BUNDLE,
            _ => FETCH_BUNDLES,
        };
        let rows = sqlx::query(statement)
            .bind(&ords)
            .bind(&users)
            .bind(&devices)
            .fetch_all(&self.pool)
            .await?;

        let mut results = vec![Vec::new(); targets.len()];
        for row in rows {
            let one_time_prekey = match row.get::<Option<i32>, _>("prekey_id") {
                Some(id) => Some((id as u32, stored_key(row.get("prekey_public"))?)),
                None => None,
            };
            let bundle = DeviceBundle {
                device_id: row.get("device_id"),
                registration_id: row.get::<i32, _>("registration_id") as u32,
                identity_key: stored_key(row.get("identity_key_public"))?,
                signed_prekey: PublishedSignedPreKey {
                    key_id: row.get::<i32, _>("signed_prekey_id") as u32,
                    public: stored_key(row.get("signed_prekey_public"))?,
                    signature: stored_signature(row.get("signature"))?,
                    rotated_at: row.get("rotation_date"),
                },
                one_time_prekey,
            };
            results[row.get::<i32, _>("ord") as usize].push(bundle);
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    /// The pgbench script measures the statement the server runs, not a copy that drifted.
    #[test]
    fn the_pgbench_script_runs_the_fetch_statement() {
        let script = include_str!("../../../loadtest/pgbench/fetch.sql");
        let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
        let from_devices = |text: &str| {
            let text = words(text);
            text[text.find("devices AS (").expect("a devices CTE")..]
                .trim_end_matches(';')
                .to_owned()
        };
        assert_eq!(from_devices(script), from_devices(super::FETCH_ONE_BUNDLE));
    }
}
