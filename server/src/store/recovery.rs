//! Master-key records and recovery (`nchat_user_master_keys`): a user's PBKDF2 salt and
//! iterations, and the hash of a recovery code that, once proven, returns every device's
//! sealed identity key so a new device can be restored. Failed proofs are counted and lock
//! recovery for a while, so a code cannot be guessed.

use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::audit::{self, AuditEvent};
use super::devices::ensure_user;
use super::ids::DeviceId;
use super::sql::{At, Key, Uid, sql};
use super::{Store, StoreError};
use keyserver_proto::wire::PublicKey;

/// A user's master-key record, as a device reads it (never the recovery-code hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRecord {
    pub salt: Vec<u8>,
    pub pbkdf2_iterations: u32,
}

/// A device's identity as a restoring device receives it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoverableDevice {
    pub device_id: DeviceId,
    pub registration_id: u32,
    pub identity_key: PublicKey,
    pub encrypted_identity_private: Vec<u8>,
}

/// What a proven recovery code unlocks.
#[derive(Clone, PartialEq, Eq)]
pub struct Recovery {
    pub record: MasterKeyRecord,
    pub devices: Vec<RecoverableDevice>,
}

/// Failed recovery attempts in a row before recovery locks.
pub const RECOVERY_ATTEMPTS: u32 = 5;
/// How long recovery stays locked after that many failures.
pub const RECOVERY_LOCKOUT: time::Duration = time::Duration::hours(1);

#[derive(sqlx::FromRow)]
struct RecordRow {
    master_key_salt: Vec<u8>,
    pbkdf2_iterations: i32,
}

impl From<RecordRow> for MasterKeyRecord {
    fn from(row: RecordRow) -> Self {
        Self {
            salt: row.master_key_salt,
            pbkdf2_iterations: row.pbkdf2_iterations as u32,
        }
    }
}

#[derive(sqlx::FromRow)]
struct RecoveryRow {
    #[sqlx(flatten)]
    record: RecordRow,
    recovery_code_hash: String,
    failed_recovery_attempts: i32,
    recovery_locked_until: Option<At>,
}

#[derive(sqlx::FromRow)]
struct DeviceRow {
    device_id: DeviceId,
    registration_id: i32,
    identity_key_public: Key,
    identity_key_private_encrypted: Vec<u8>,
}

impl Store {
    /// `user_id`'s master-key record, if any.
    pub async fn master_key(&self, user_id: Uuid) -> Result<Option<MasterKeyRecord>, StoreError> {
        let row: Option<RecordRow> = self
            .db
            .read()
            .await?
            .query(&sql!(
                "SELECT master_key_salt, pbkdf2_iterations FROM nchat_user_master_keys
                 WHERE user_id = $1"
            ))
            .bind(Uid(user_id))
            .fetch_optional()
            .await?;
        Ok(row.map(MasterKeyRecord::from))
    }

    /// Stores or replaces `user_id`'s record and resets its recovery state; the first is
    /// audited `master_key_created`. True when it is new.
    pub async fn put_master_key(
        &self,
        user_id: Uuid,
        record: &MasterKeyRecord,
        recovery_code_hash: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        ensure_user(&mut tx, user_id).await?;
        let created = !tx
            .query(&sql!(
                "SELECT EXISTS (SELECT 1 FROM nchat_user_master_keys WHERE user_id = $1)"
            ))
            .bind(Uid(user_id))
            .scalar::<bool>()
            .await?;
        tx.query(&sql!(
            "INSERT INTO nchat_user_master_keys
                 (user_id, master_key_salt, pbkdf2_iterations, recovery_code_hash)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id) DO UPDATE
             SET master_key_salt = excluded.master_key_salt,
                 pbkdf2_iterations = excluded.pbkdf2_iterations,
                 recovery_code_hash = excluded.recovery_code_hash,
                 failed_recovery_attempts = 0, recovery_locked_until = NULL,
                 updated_at = " NOW
        ))
        .bind(Uid(user_id))
        .bind(record.salt.as_slice())
        .bind(record.pbkdf2_iterations as i32)
        .bind(recovery_code_hash)
        .execute()
        .await?;
        if created {
            audit::record(
                &mut tx,
                AuditEvent::MasterKeyCreated,
                user_id,
                None,
                json!({ "pbkdf2_iterations": record.pbkdf2_iterations }),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    /// Proves a recovery code (by its hash) for `user_id`, comparing in constant time. A
    /// failure is counted (and committed: the count is what limits guessing); the fifth in a
    /// row locks recovery for an hour. Success resets the count, is audited
    /// `recovery_code_used`, and returns the devices' sealed identity keys.
    pub async fn recover_device(
        &self,
        user_id: Uuid,
        recovery_code_hash: &str,
    ) -> Result<Recovery, StoreError> {
        use subtle::ConstantTimeEq;

        let now = OffsetDateTime::now_utc();
        let mut tx = self.db.begin_write().await?;
        let row: RecoveryRow = tx
            .query(&sql!(
                "SELECT master_key_salt, pbkdf2_iterations, recovery_code_hash,
                        failed_recovery_attempts, recovery_locked_until
                 FROM nchat_user_master_keys WHERE user_id = $1" PG(" FOR UPDATE")
            ))
            .bind(Uid(user_id))
            .fetch_optional()
            .await?
            .ok_or(StoreError::NoMasterKey)?;
        if let Some(until) = row
            .recovery_locked_until
            .map(|at| at.0)
            .filter(|u| *u > now)
        {
            return Err(StoreError::RecoveryLocked { until });
        }
        let matches: bool = row
            .recovery_code_hash
            .as_bytes()
            .ct_eq(recovery_code_hash.as_bytes())
            .into();
        let set_state = sql!(
            "UPDATE nchat_user_master_keys
             SET failed_recovery_attempts = $2, recovery_locked_until = $3
             WHERE user_id = $1"
        );
        if !matches {
            let failed = row.failed_recovery_attempts as u32 + 1;
            let (count, lock) = if failed >= RECOVERY_ATTEMPTS {
                (0, Some(At(now + RECOVERY_LOCKOUT)))
            } else {
                (failed, None)
            };
            tx.query(&set_state)
                .bind(Uid(user_id))
                .bind(count as i32)
                .bind(lock)
                .execute()
                .await?;
            tx.commit().await?;
            return Err(StoreError::WrongRecoveryCode {
                attempts_left: RECOVERY_ATTEMPTS.saturating_sub(failed),
            });
        }
        tx.query(&set_state)
            .bind(Uid(user_id))
            .bind(0i32)
            .bind(None::<At>)
            .execute()
            .await?;
        let devices: Vec<DeviceRow> = tx
            .query(&sql!(
                "SELECT device_id, COALESCE(registration_id, 0) AS registration_id,
                        identity_key_public, identity_key_private_encrypted
                 FROM nchat_identity_keys WHERE user_id = $1 ORDER BY device_id"
            ))
            .bind(Uid(user_id))
            .fetch_all()
            .await?;
        audit::record(
            &mut tx,
            AuditEvent::RecoveryCodeUsed,
            user_id,
            None,
            json!({ "devices": devices.len() }),
        )
        .await?;
        tx.commit().await?;
        Ok(Recovery {
            record: row.record.into(),
            devices: devices
                .into_iter()
                .map(|d| RecoverableDevice {
                    device_id: d.device_id,
                    registration_id: d.registration_id as u32,
                    identity_key: d.identity_key_public.0,
                    encrypted_identity_private: d.identity_key_private_encrypted,
                })
                .collect(),
        })
    }
}
