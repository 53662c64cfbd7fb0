//! Prekeys by kind, as Signal-Server keeps one store per key kind over two generic bases.
//!
//! A kind is data: its table, columns and the request field its keys arrive in, turned into
//! statements once ([`single_use!`], [`repeated_use!`]). The rules are written once per base:
//! [`single_use`] for keys a peer takes once (one-time EC and one-time Kyber prekeys),
//! [`repeated_use`] for the signed key every peer gets until the device replaces it (the signed
//! EC prekey, the last-resort Kyber prekey). [`retired`] keeps the ids cleanup deleted, so a
//! consumed or superseded id is never stored again.

pub mod repeated_use;
pub mod retired;
pub mod single_use;

use keyserver_proto::wire::{KyberPublicKey, PublicKey};
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::audit::{self, AuditEvent};
use super::database::{ReadConn, Tx};
use super::devices;
use super::ids::{DeviceId, KeyId, KyberPreKeyId, PreKeyId, SignedPreKeyId};
use super::sql::{At, Decoded, Key, KyberKey, Sql, Uid, sql};
use super::{Store, StoreError};
use repeated_use::{RepeatedUse, Rotated, repeated_use};
use retired::Retired;
use single_use::{SingleUse, UploadReport, single_use};

/// What the generic rules need of a key as a device uploads it: its id and the bytes each
/// column stores. Its signature was verified before it got here.
pub trait NewPreKey: Send + Sync {
    type Id: KeyId;
    fn key_id(&self) -> Self::Id;
    /// The public key as stored (without the wire's type byte).
    fn public_raw(&self) -> &[u8];
    /// The signature by the identity key; empty for an unsigned kind.
    fn signature(&self) -> &[u8];
    fn encrypted_private(&self) -> &[u8];
}

/// What cleanup needs of a kind of key: its expired rows, oldest first.
#[derive(Debug, Clone, Copy)]
pub struct Expired {
    /// `$1` cut-off time: how many rows expired before it.
    pub(crate) count: Sql,
    /// `$1` cut-off, `$2` limit: (`id`, `device_id`) of the oldest expired rows.
    pub(crate) pick: Sql,
    /// `$1` list of row ids: deletes those still expired, returning (`device_id`, `key_id`).
    pub(crate) delete: Sql,
}

/// A one-time prekey as a device uploads it.
#[derive(Clone, PartialEq, Eq)]
pub struct NewOneTimePreKey {
    pub key_id: PreKeyId,
    pub public: PublicKey,
    pub encrypted_private: Vec<u8>,
}

/// A signed prekey as a device uploads it.
#[derive(Clone, PartialEq, Eq)]
pub struct NewSignedPreKey {
    pub key_id: SignedPreKeyId,
    pub public: PublicKey,
    pub signature: [u8; 64],
    pub encrypted_private: Vec<u8>,
}

/// A Kyber prekey as a device uploads it, one-time or last resort.
#[derive(Clone, PartialEq, Eq)]
pub struct NewKyberPreKey {
    pub key_id: KyberPreKeyId,
    pub public: KyberPublicKey,
    pub signature: [u8; 64],
    pub encrypted_private: Vec<u8>,
}

impl NewPreKey for NewKyberPreKey {
    type Id = KyberPreKeyId;
    fn key_id(&self) -> KyberPreKeyId {
        self.key_id
    }
    fn public_raw(&self) -> &[u8] {
        self.public.as_raw()
    }
    fn signature(&self) -> &[u8] {
        &self.signature
    }
    fn encrypted_private(&self) -> &[u8] {
        &self.encrypted_private
    }
}

impl NewPreKey for NewOneTimePreKey {
    type Id = PreKeyId;
    fn key_id(&self) -> PreKeyId {
        self.key_id
    }
    fn public_raw(&self) -> &[u8] {
        self.public.as_raw()
    }
    fn signature(&self) -> &[u8] {
        &[]
    }
    fn encrypted_private(&self) -> &[u8] {
        &self.encrypted_private
    }
}

impl NewPreKey for NewSignedPreKey {
    type Id = SignedPreKeyId;
    fn key_id(&self) -> SignedPreKeyId {
        self.key_id
    }
    fn public_raw(&self) -> &[u8] {
        self.public.as_raw()
    }
    fn signature(&self) -> &[u8] {
        &self.signature
    }
    fn encrypted_private(&self) -> &[u8] {
        &self.encrypted_private
    }
}

/// Debug output names the key and the size of its encrypted private blob, never the blob, so
/// a logged request cannot leak it.
macro_rules! debug_without_private_key {
    ($($ty:ident),+) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("key_id", &self.key_id)
                    .field("public", &self.public)
                    .field("encrypted_private_len", &self.encrypted_private.len())
                    .finish_non_exhaustive()
            }
        }
    )+};
}
debug_without_private_key!(NewOneTimePreKey, NewSignedPreKey, NewKyberPreKey);

/// One-time Curve25519 prekeys (the schema's `nchat_one_time_prekeys`). A device may run out of
/// them: its bundles then come without one.
pub const ONE_TIME: SingleUse = single_use!(
    field: "one_time_prekeys", name: "one_time", retired: Retired::OneTime,
    available_field: "one_time_prekeys_available", fallback: None,
    table: "nchat_one_time_prekeys", id: "prekey_id", public: "prekey_public",
    private: "prekey_private_encrypted", kind_test: "TRUE", signature:
);

/// Signed Curve25519 prekeys (the schema's `nchat_signed_prekeys`).
pub const SIGNED: RepeatedUse = repeated_use!(
    field: "signed_prekey", name: "signed", retired: Retired::Signed,
    audit_fields: ("signed_prekey_id", "previous_signed_prekey_id"),
    table: "nchat_signed_prekeys", id: "signed_prekey_id", public: "signed_prekey_public",
    private: "signed_prekey_private_encrypted", installed: "rotation_date", kind_test: "TRUE",
    extra: ("", "")
);

/// One-time Kyber1024 prekeys (`nchat_kyber_prekeys` rows that are not last resort). When a
/// device runs out, its last-resort key is served instead, so a device needs one to upload them.
pub const KYBER_ONE_TIME: SingleUse = single_use!(
    field: "kyber_one_time_prekeys", name: "kyber_one_time", retired: Retired::Kyber,
    available_field: "kyber_one_time_prekeys_available", fallback: Some(&KYBER_LAST_RESORT),
    table: "nchat_kyber_prekeys", id: "kyber_prekey_id", public: "kyber_prekey_public",
    private: "kyber_prekey_private_encrypted", kind_test: "is_last_resort = FALSE",
    signature: "signature"
);

/// Last-resort Kyber1024 prekeys (`nchat_kyber_prekeys` rows flagged last resort).
pub const KYBER_LAST_RESORT: RepeatedUse = repeated_use!(
    field: "kyber_last_resort_prekey", name: "kyber_last_resort", retired: Retired::Kyber,
    audit_fields: ("kyber_prekey_id", "previous_kyber_prekey_id"),
    table: "nchat_kyber_prekeys", id: "kyber_prekey_id", public: "kyber_prekey_public",
    private: "kyber_prekey_private_encrypted", installed: "created_at",
    kind_test: "is_last_resort = TRUE", extra: (", is_last_resort", ", TRUE")
);

/// A statement reading `$columns` of one device (`$1`) with its owner, over `ik` (its identity
/// key row), `sp` (its active signed prekey) and `lr` (its active last-resort Kyber prekey).
macro_rules! own_device_keys {
    ($columns:literal) => {
        sql!(
            "SELECT ik.user_id, " $columns "
             FROM nchat_identity_keys ik
             LEFT JOIN nchat_signed_prekeys sp
               ON sp.device_id = ik.device_id AND sp.is_active = TRUE
             LEFT JOIN nchat_kyber_prekeys lr
               ON lr.device_id = ik.device_id AND lr.is_last_resort = TRUE AND lr.is_active = TRUE
             WHERE ik.device_id = $1"
        )
    };
}

/// A row of [`own_device_keys!`]: the owner, then the columns asked for.
#[derive(sqlx::FromRow)]
struct Owned<Keys> {
    user_id: Uid,
    #[sqlx(flatten)]
    keys: Keys,
}

/// A device's keys on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// One-time EC prekeys left to hand out.
    pub available: u32,
    /// Id and installation time of the active signed prekey.
    pub active_signed_prekey: Option<(SignedPreKeyId, OffsetDateTime)>,
    /// One-time Kyber prekeys left to hand out.
    pub kyber_available: u32,
    /// Id and installation time of the active last-resort Kyber prekey.
    pub kyber_last_resort: Option<(KyberPreKeyId, OffsetDateTime)>,
}

#[derive(sqlx::FromRow)]
struct StatusRow {
    available: i64,
    signed_prekey_id: Option<SignedPreKeyId>,
    rotation_date: Option<At>,
    kyber_available: i64,
    last_resort_id: Option<KyberPreKeyId>,
    last_resort_at: Option<At>,
}

/// The keys of a device that every peer gets, as `CheckKeys` compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKeys {
    pub identity_key: PublicKey,
    pub signed_prekey: Option<(SignedPreKeyId, PublicKey)>,
    pub kyber_last_resort: Option<(KyberPreKeyId, KyberPublicKey)>,
}

#[derive(sqlx::FromRow)]
struct PublishedRow {
    identity_key_public: Key,
    signed_prekey_id: Option<SignedPreKeyId>,
    signed_prekey_public: Option<Key>,
    kyber_prekey_id: Option<KyberPreKeyId>,
    kyber_prekey_public: Option<KyberKey>,
}

/// Deletes every prekey of the device and its retired ids: a new identity key makes them all
/// meaningless. Retired ids last: a cleanup that deleted some of these keys first has then
/// committed its ranges, which this sees and deletes too.
pub(crate) async fn delete_all(tx: &mut Tx, device: &DeviceId) -> Result<(), StoreError> {
    for statement in [
        sql!("DELETE FROM nchat_one_time_prekeys WHERE device_id = $1"),
        sql!("DELETE FROM nchat_signed_prekeys WHERE device_id = $1"),
        sql!("DELETE FROM nchat_kyber_prekeys WHERE device_id = $1"),
        sql!("DELETE FROM keyserver_retired_prekeys WHERE device_id = $1"),
    ] {
        tx.query(&statement).bind(device).execute().await?;
    }
    Ok(())
}

/// Uploads keys of a single-use kind to a device of `user_id`, with a `prekeys_replenished`
/// event when any was stored. Signed keys were verified against `signed_by`, which must still
/// be the device's identity key.
async fn upload<K: NewPreKey>(
    mut tx: Tx,
    kind: &SingleUse,
    user_id: Uuid,
    (device, signed_by): (&DeviceId, Option<PublicKey>),
    keys: &[K],
) -> Result<UploadReport<K::Id>, StoreError> {
    let identity = devices::lock_owned(&mut tx, user_id, device).await?;
    if signed_by.is_some_and(|signer| signer != identity) {
        return Err(StoreError::IdentityChanged);
    }
    if let Some(fallback) = kind.fallback
        && !fallback.has_active(&mut tx, device).await?
    {
        return Err(StoreError::NoActiveKey {
            field: fallback.field,
        });
    }
    let report = kind.merge(&mut tx, device, keys, false).await?;
    if !report.stored.is_empty() {
        audit::record(
            &mut tx,
            AuditEvent::PrekeysReplenished,
            user_id,
            Some(device),
            json!({
                "kind": kind.name,
                "stored": report.stored.len(),
                "unchanged": report.unchanged.len(),
                "refused_consumed": report.refused_consumed.len(),
                kind.available_field: report.available,
            }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Installs a key of a repeated-use kind verified against `signed_by`, with a
/// `signed_prekey_rotated` event when it is new.
async fn rotate<K: NewPreKey>(
    mut tx: Tx,
    kind: &RepeatedUse,
    user_id: Uuid,
    device: &DeviceId,
    signed_by: PublicKey,
    key: &K,
) -> Result<Rotated<K::Id>, StoreError> {
    if devices::lock_owned(&mut tx, user_id, device).await? != signed_by {
        return Err(StoreError::IdentityChanged);
    }
    let rotated = kind.install(&mut tx, device, key).await?;
    if rotated.rotated {
        let (id_field, previous_field) = kind.audit_fields;
        audit::record(
            &mut tx,
            AuditEvent::SignedPrekeyRotated,
            user_id,
            Some(device),
            json!({
                "kind": kind.name,
                id_field: key.key_id().get(),
                previous_field: rotated.previous_key_id.map(KeyId::get),
            }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(rotated)
}

impl Store {
    /// Appends one-time prekeys: identical stored keys are left alone, consumed ids refused.
    pub async fn upload_one_time_prekeys(
        &self,
        user_id: Uuid,
        device: &DeviceId,
        keys: Vec<NewOneTimePreKey>,
    ) -> Result<UploadReport<PreKeyId>, StoreError> {
        let tx = self.db.begin_write().await?;
        upload(tx, &ONE_TIME, user_id, (device, None), &keys).await
    }

    /// Appends one-time Kyber prekeys, signed by `signed_by`, to a device with a last-resort
    /// Kyber prekey, as [`Store::upload_one_time_prekeys`] does. Fails with
    /// [`StoreError::IdentityChanged`] when the device's identity key is no longer `signed_by`.
    pub async fn upload_kyber_prekeys(
        &self,
        user_id: Uuid,
        device: &DeviceId,
        signed_by: PublicKey,
        keys: Vec<NewKyberPreKey>,
    ) -> Result<UploadReport<KyberPreKeyId>, StoreError> {
        let tx = self.db.begin_write().await?;
        let device = (device, Some(signed_by));
        upload(tx, &KYBER_ONE_TIME, user_id, device, &keys).await
    }

    /// Makes `key` the device's only active signed prekey. Fails with
    /// [`StoreError::IdentityChanged`] when the device's identity key is no longer
    /// `signed_by` (the signature was checked against that key).
    pub async fn rotate_signed_prekey(
        &self,
        user_id: Uuid,
        device: &DeviceId,
        signed_by: PublicKey,
        key: NewSignedPreKey,
    ) -> Result<Rotated<SignedPreKeyId>, StoreError> {
        let tx = self.db.begin_write().await?;
        rotate(tx, &SIGNED, user_id, device, signed_by, &key).await
    }

    /// Makes `key` the device's only active last-resort Kyber prekey, as
    /// [`Store::rotate_signed_prekey`] does for the signed prekey.
    pub async fn rotate_kyber_last_resort_prekey(
        &self,
        user_id: Uuid,
        device: &DeviceId,
        signed_by: PublicKey,
        key: NewKyberPreKey,
    ) -> Result<Rotated<KyberPreKeyId>, StoreError> {
        let tx = self.db.begin_write().await?;
        rotate(tx, &KYBER_LAST_RESORT, user_id, device, signed_by, &key).await
    }

    /// The device's key counts and active keys; the device must belong to `user_id` (on a read
    /// replica when there is one: counts a moment old are fine for deciding to replenish).
    pub async fn key_status(
        &self,
        user_id: Uuid,
        device: &DeviceId,
    ) -> Result<KeyStatus, StoreError> {
        let row: StatusRow = Self::own_device_keys(
            self.replica_read().await?,
            user_id,
            device,
            &own_device_keys!(
                "(SELECT count(*) FROM nchat_one_time_prekeys o
                      WHERE o.device_id = ik.device_id AND o.is_consumed = FALSE) AS available,
                     sp.signed_prekey_id, sp.rotation_date,
                     (SELECT count(*) FROM nchat_kyber_prekeys k
                      WHERE k.device_id = ik.device_id AND k.is_last_resort = FALSE
                        AND k.is_consumed = FALSE) AS kyber_available,
                     lr.kyber_prekey_id AS last_resort_id, lr.created_at AS last_resort_at"
            ),
        )
        .await?;
        Ok(KeyStatus {
            available: row.available as u32,
            active_signed_prekey: row.signed_prekey_id.zip(row.rotation_date.map(|at| at.0)),
            kyber_available: row.kyber_available as u32,
            kyber_last_resort: row.last_resort_id.zip(row.last_resort_at.map(|at| at.0)),
        })
    }

    /// The device's identity key and active signed keys; the device must belong to `user_id`.
    pub async fn published_keys(
        &self,
        user_id: Uuid,
        device: &DeviceId,
    ) -> Result<PublishedKeys, StoreError> {
        // The primary's: a device compares these with what it holds, right after a rotation.
        let row: PublishedRow = Self::own_device_keys(
            self.db.read().await?,
            user_id,
            device,
            &own_device_keys!(
                "ik.identity_key_public, sp.signed_prekey_id, sp.signed_prekey_public,
                     lr.kyber_prekey_id, lr.kyber_prekey_public"
            ),
        )
        .await?;
        Ok(PublishedKeys {
            identity_key: row.identity_key_public.0,
            signed_prekey: row
                .signed_prekey_id
                .zip(row.signed_prekey_public.map(|k| k.0)),
            kyber_last_resort: row
                .kyber_prekey_id
                .zip(row.kyber_prekey_public.map(|k| k.0)),
        })
    }

    /// Reads one row of a device's keys, which must belong to `user_id`: `query` is an
    /// [`own_device_keys!`] statement.
    async fn own_device_keys<R: Decoded>(
        mut conn: ReadConn,
        user_id: Uuid,
        device: &DeviceId,
        query: &Sql,
    ) -> Result<R, StoreError> {
        let row: Owned<R> = conn
            .query(query)
            .bind(device)
            .fetch_optional()
            .await?
            .ok_or(StoreError::DeviceNotFound)?;
        if row.user_id.0 != user_id {
            return Err(StoreError::NotYourDevice);
        }
        Ok(row.keys)
    }
}
