//! Devices: a user's installs, each with its identity key (`nchat_identity_keys`). Registering
//! creates a device with all its first keys, merges keys into it again (the same identity
//! key), or replaces every key (a new identity key); removing one takes its keys and sessions
//! with it. Both change the user's safety numbers in the same transaction.
//!
//! Writes to one device lock its identity row first ([`lock_owned`]), which serializes uploads,
//! rotations and re-registrations of that device without blocking fetches.

use keyserver_proto::wire::PublicKey;
use serde_json::json;
use uuid::Uuid;

use super::audit::{self, AuditEvent};
use super::database::{ReadConn, Tx};
use super::ids::{DeviceId, KeyId};
use super::prekeys::{self, NewKyberPreKey, NewOneTimePreKey, NewSignedPreKey};
use super::sql::{Key, List, Uid, sql};
use super::{Store, StoreError, safety};

/// Everything a device publishes when it registers.
#[derive(Clone)]
pub struct NewDevice {
    pub user_id: Uuid,
    pub device_id: DeviceId,
    pub registration_id: u16,
    pub identity_key: PublicKey,
    pub encrypted_identity_private: Vec<u8>,
    pub signed_prekey: NewSignedPreKey,
    pub one_time_prekeys: Vec<NewOneTimePreKey>,
    /// Present for a PQXDH device; required when `kyber_one_time_prekeys` is not empty.
    pub kyber_last_resort: Option<NewKyberPreKey>,
    pub kyber_one_time_prekeys: Vec<NewKyberPreKey>,
    /// Withdraw the device's unused one-time prekeys of both kinds before storing these (a
    /// device restored from a backup holds none of their private keys).
    pub replace_one_time: bool,
    /// The caller's token is bound to this device, so it may change the device if it exists
    /// already; a token of the user alone may only create it.
    pub may_change: bool,
    /// Most devices the user may have, this one included (0: no quota).
    pub max_devices: u32,
}

/// What a registration did to the stored device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The device was new.
    Created,
    /// Same identity key: the signed prekey and one-time prekeys were merged in.
    Updated,
    /// Another identity key: every key of the device was replaced.
    Replaced,
}

impl RegisterOutcome {
    /// The name used in audit metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Replaced => "replaced",
        }
    }
}

/// The result of [`Store::register_device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub outcome: RegisterOutcome,
    /// One-time EC prekeys left to hand out.
    pub available: u32,
    /// One-time Kyber prekeys left to hand out.
    pub kyber_available: u32,
    /// Unused one-time prekeys of each kind (EC, Kyber) withdrawn from earlier uploads.
    pub withdrawn: Withdrawn,
}

/// Unused one-time prekeys a registration withdrew, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Withdrawn {
    pub one_time: u32,
    pub kyber_one_time: u32,
}

impl Withdrawn {
    /// Withdraws every unused one-time prekey of both kinds of the device (locked).
    async fn from(tx: &mut Tx, device: &DeviceId) -> Result<Self, StoreError> {
        Ok(Self {
            one_time: prekeys::ONE_TIME.withdraw_unused(tx, device).await?,
            kyber_one_time: prekeys::KYBER_ONE_TIME.withdraw_unused(tx, device).await?,
        })
    }
}

/// PostgreSQL's and SQLite's codes for a NOT NULL violation: a chat app's own `nchat_users`
/// has columns the key server cannot fill.
const NOT_NULL_VIOLATION: [&str; 2] = ["23502", "1299"];

#[derive(sqlx::FromRow)]
struct Owner {
    user_id: Uid,
    identity_key_public: Key,
}

/// Makes sure the user exists; [`StoreError::UnknownUser`] when it cannot be created.
pub(crate) async fn ensure_user(tx: &mut Tx, user_id: Uuid) -> Result<(), StoreError> {
    if user_exists(tx, user_id).await? {
        return Ok(());
    }
    // A chat app's own users table has columns the key server cannot fill: there, the user
    // must already be in it.
    match tx
        .query(&sql!(
            "INSERT INTO nchat_users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING"
        ))
        .bind(Uid(user_id))
        .execute()
        .await
    {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e))
            if e.code().is_some_and(|c| NOT_NULL_VIOLATION.contains(&&*c)) =>
        {
            Err(StoreError::UnknownUser)
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn user_exists(tx: &mut Tx, user_id: Uuid) -> Result<bool, StoreError> {
    Ok(tx
        .query(&sql!(
            "SELECT EXISTS (SELECT 1 FROM nchat_users WHERE id = $1)"
        ))
        .bind(Uid(user_id))
        .scalar()
        .await?)
}

/// Locks the device against other writers until commit and checks that `user_id` owns it;
/// its identity key.
pub(crate) async fn lock_owned(
    tx: &mut Tx,
    user_id: Uuid,
    device: &DeviceId,
) -> Result<PublicKey, StoreError> {
    // SQLite's BEGIN IMMEDIATE already holds the write lock: a plain read is stable.
    let owner: Option<Owner> = tx
        .query(&sql!(
            "SELECT user_id, identity_key_public FROM nchat_identity_keys WHERE device_id = $1"
            PG(" FOR NO KEY UPDATE")
        ))
        .bind(device)
        .fetch_optional()
        .await?;
    match owner {
        None => Err(StoreError::DeviceNotFound),
        Some(o) if o.user_id.0 != user_id => Err(StoreError::NotYourDevice),
        Some(o) => Ok(o.identity_key_public.0),
    }
}

/// Serializes the transactions that read or change a user's identity keys together with
/// their safety numbers (SQLite's single writer already serializes every write).
pub(crate) async fn lock_user(tx: &mut Tx, user_id: Uuid) -> Result<(), StoreError> {
    tx.query(&sql!(PG(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))"
    )))
    .bind(Uid(user_id))
    .execute()
    .await?;
    Ok(())
}

/// The identity keys of every device of the user.
pub(crate) async fn identity_keys(
    tx: &mut Tx,
    user_id: Uuid,
) -> Result<Vec<PublicKey>, StoreError> {
    let keys: Vec<(Key,)> = tx
        .query(&IDENTITY_KEYS)
        .bind(Uid(user_id))
        .fetch_all()
        .await?;
    Ok(keys.into_iter().map(|(k,)| k.0).collect())
}

const IDENTITY_KEYS: super::sql::Sql =
    sql!("SELECT identity_key_public FROM nchat_identity_keys WHERE user_id = $1");

/// Inserts every key of a device that has none.
async fn insert_keys(tx: &mut Tx, device: &NewDevice) -> Result<(), StoreError> {
    let id = &device.device_id;
    prekeys::SIGNED
        .insert(tx, id, &device.signed_prekey)
        .await?;
    let one_time: Vec<&NewOneTimePreKey> = device.one_time_prekeys.iter().collect();
    prekeys::ONE_TIME.insert(tx, id, &one_time).await?;
    if let Some(last_resort) = &device.kyber_last_resort {
        prekeys::KYBER_LAST_RESORT
            .insert(tx, id, last_resort)
            .await?;
    }
    let kyber: Vec<&NewKyberPreKey> = device.kyber_one_time_prekeys.iter().collect();
    prekeys::KYBER_ONE_TIME.insert(tx, id, &kyber).await
}

/// Stores the device with all its keys, or merges them in (same identity), or replaces them.
async fn register_keys(
    tx: &mut Tx,
    device: &NewDevice,
) -> Result<(RegisterOutcome, Withdrawn), StoreError> {
    ensure_user(tx, device.user_id).await?;
    lock_user(tx, device.user_id).await?;
    let id = &device.device_id;
    let inserted = tx
        .query(&sql!(
            "INSERT INTO nchat_identity_keys
                 (device_id, user_id, identity_key_public, identity_key_private_encrypted,
                  registration_id)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (device_id) DO NOTHING"
        ))
        .bind(id)
        .bind(Uid(device.user_id))
        .bind(Key(device.identity_key))
        .bind(device.encrypted_identity_private.as_slice())
        .bind(i32::from(device.registration_id))
        .execute()
        .await?;
    if inserted == 1 {
        // The user's lock above serializes registrations of one user on PostgreSQL (SQLite
        // has one writer): two cannot both pass the count.
        if device.max_devices > 0 {
            let devices: i64 = tx
                .query(&sql!(
                    "SELECT COUNT(*) FROM nchat_identity_keys WHERE user_id = $1"
                ))
                .bind(Uid(device.user_id))
                .scalar()
                .await?;
            if devices > i64::from(device.max_devices) {
                return Err(StoreError::TooManyDevices {
                    max: device.max_devices,
                });
            }
        }
        insert_keys(tx, device).await?;
        return Ok((RegisterOutcome::Created, Withdrawn::default()));
    }
    let stored_identity = lock_owned(tx, device.user_id, id)
        .await
        .map_err(|e| match e {
            StoreError::NotYourDevice => StoreError::DeviceTaken,
            e => e,
        })?;
    if !device.may_change {
        return Err(StoreError::DeviceTokenRequired);
    }
    let same_identity = stored_identity == device.identity_key;
    tx.query(&sql!(
        "UPDATE nchat_identity_keys
         SET identity_key_public = $2, identity_key_private_encrypted = $3, registration_id = $4,
             created_at = CASE WHEN $5 THEN " NOW " ELSE created_at END
         WHERE device_id = $1"
    ))
    .bind(id)
    .bind(Key(device.identity_key))
    .bind(device.encrypted_identity_private.as_slice())
    .bind(i32::from(device.registration_id))
    .bind(!same_identity)
    .execute()
    .await?;
    if same_identity {
        // Withdrawn before the merge, so the new keys may take ids of withdrawn ones; ids
        // handed out stay refused.
        let withdrawn = if device.replace_one_time {
            Withdrawn::from(tx, id).await?
        } else {
            Withdrawn::default()
        };
        prekeys::SIGNED
            .install(tx, id, &device.signed_prekey)
            .await?;
        prekeys::ONE_TIME
            .merge(tx, id, &device.one_time_prekeys, device.replace_one_time)
            .await?;
        // The last-resort key first: one-time Kyber keys need one to fall back to.
        if let Some(last_resort) = &device.kyber_last_resort {
            prekeys::KYBER_LAST_RESORT
                .install(tx, id, last_resort)
                .await?;
        }
        prekeys::KYBER_ONE_TIME
            .merge(
                tx,
                id,
                &device.kyber_one_time_prekeys,
                device.replace_one_time,
            )
            .await?;
        return Ok((RegisterOutcome::Updated, withdrawn));
    }
    // A new identity key makes every old key of the device meaningless: replace them all.
    let withdrawn = Withdrawn::from(tx, id).await?;
    prekeys::delete_all(tx, id).await?;
    insert_keys(tx, device).await?;
    Ok((RegisterOutcome::Replaced, withdrawn))
}

impl Store {
    /// Registers or re-registers a device of `device.user_id`, with its
    /// `device_keys_generated` event.
    pub async fn register_device(&self, device: NewDevice) -> Result<Registered, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let (outcome, withdrawn) = register_keys(&mut tx, &device).await?;
        // A new device or a new identity key changes the user's safety numbers.
        if outcome != RegisterOutcome::Updated {
            safety::refresh(&mut tx, device.user_id).await?;
        }
        let available = prekeys::ONE_TIME
            .available(&mut tx, &device.device_id)
            .await?;
        let kyber_available = prekeys::KYBER_ONE_TIME
            .available(&mut tx, &device.device_id)
            .await?;
        audit::record(
            &mut tx,
            AuditEvent::DeviceKeysGenerated,
            device.user_id,
            Some(&device.device_id),
            json!({
                "outcome": outcome.as_str(),
                "registration_id": device.registration_id,
                "signed_prekey_id": device.signed_prekey.key_id.get(),
                "one_time_prekeys_uploaded": device.one_time_prekeys.len(),
                "one_time_prekeys_available": available,
                "kyber_last_resort_prekey_id": device.kyber_last_resort.as_ref().map(|k| k.key_id.get()),
                "kyber_one_time_prekeys_uploaded": device.kyber_one_time_prekeys.len(),
                "kyber_one_time_prekeys_available": kyber_available,
                "one_time_prekeys_withdrawn": withdrawn.one_time,
                "kyber_one_time_prekeys_withdrawn": withdrawn.kyber_one_time,
            }),
        )
        .await?;
        tx.commit().await?;
        Ok(Registered {
            outcome,
            available,
            kyber_available,
            withdrawn,
        })
    }

    /// Removes a device of `user_id` with everything that hangs off it (the schema's cascades
    /// delete its prekeys and sessions), recomputes the user's safety numbers, and audits the
    /// removal (as `device_keys_generated` with outcome `removed`: the schema has no event
    /// type of its own for it). Returns how many sessions went with it.
    pub async fn remove_device(&self, user_id: Uuid, device: &DeviceId) -> Result<u32, StoreError> {
        let mut tx = self.db.begin_write().await?;
        lock_user(&mut tx, user_id).await?;
        lock_owned(&mut tx, user_id, device).await?;
        let sessions: i64 = tx
            .query(&sql!(
                "SELECT count(*) FROM nchat_signal_sessions WHERE device_id = $1"
            ))
            .bind(device)
            .scalar()
            .await?;
        tx.query(&sql!(
            "DELETE FROM nchat_identity_keys WHERE device_id = $1"
        ))
        .bind(device)
        .execute()
        .await?;
        safety::refresh(&mut tx, user_id).await?;
        audit::record(
            &mut tx,
            AuditEvent::DeviceKeysGenerated,
            user_id,
            Some(device),
            json!({ "outcome": "removed", "sessions_removed": sessions }),
        )
        .await?;
        tx.commit().await?;
        Ok(sessions as u32)
    }

    /// The identity key of `device`, which must belong to `user_id`.
    pub async fn device_identity(
        &self,
        user_id: Uuid,
        device: &DeviceId,
    ) -> Result<PublicKey, StoreError> {
        device_identity_on(&mut self.db.read().await?, user_id, device).await
    }
}

/// The identity key of `device`, which must belong to `user_id`, read on `conn` (the primary
/// or a read replica).
pub(crate) async fn device_identity_on(
    conn: &mut ReadConn,
    user_id: Uuid,
    device: &DeviceId,
) -> Result<PublicKey, StoreError> {
    let owner: Owner = conn
        .query(&sql!(
            "SELECT user_id, identity_key_public FROM nchat_identity_keys WHERE device_id = $1"
        ))
        .bind(device)
        .fetch_optional()
        .await?
        .ok_or(StoreError::DeviceNotFound)?;
    if owner.user_id.0 != user_id {
        return Err(StoreError::NotYourDevice);
    }
    Ok(owner.identity_key_public.0)
}

impl Store {
    /// Every device of the given users with its identity key, in one statement.
    pub async fn device_identities(
        &self,
        users: &[Uuid],
    ) -> Result<Vec<(Uuid, DeviceId, PublicKey)>, StoreError> {
        let rows: Vec<(Uid, DeviceId, Key)> = self
            .db
            .read()
            .await?
            .query(&sql!(
                "SELECT user_id, device_id, identity_key_public FROM nchat_identity_keys
                 WHERE user_id" IN_LIST("$1")
            ))
            .bind(List(users.to_vec()))
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|(user, device, key)| (user.0, device, key.0))
            .collect())
    }

    /// The identity keys of every device of `user_id` (on a read replica when there is one).
    pub async fn identity_keys(&self, user_id: Uuid) -> Result<Vec<PublicKey>, StoreError> {
        let keys: Vec<(Key,)> = self
            .replica_read()
            .await?
            .query(&IDENTITY_KEYS)
            .bind(Uid(user_id))
            .fetch_all()
            .await?;
        Ok(keys.into_iter().map(|(k,)| k.0).collect())
    }
}
