//! The storage interface of the key server, in domain terms.
//!
//! Handlers validate requests into the types here and call a [`KeyStore`]; SQL lives only in
//! the backends below this module. Every write method is one transaction that includes its audit
//! event, so a failed call writes nothing. The PostgreSQL backend is [`postgres::PgStore`]; an
//! embedded backend implements the same trait.

pub mod database;
pub mod jobs;
pub mod migrations;
pub mod postgres;
pub mod sqlite;
pub mod transfer;
pub mod writes;

use async_trait::async_trait;
use keyserver_proto::wire::PublicKey;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::AuditEvent;
use writes::KeyTx;

/// A signed prekey as a device uploads it; its signature is verified before it gets here.
#[derive(Clone, PartialEq, Eq)]
pub struct NewSignedPreKey {
    pub key_id: u32,
    pub public: PublicKey,
    pub signature: [u8; 64],
    pub encrypted_private: Vec<u8>,
}

/// A one-time prekey as a device uploads it.
#[derive(Clone, PartialEq, Eq)]
pub struct NewOneTimePreKey {
    pub key_id: u32,
    pub public: PublicKey,
    pub encrypted_private: Vec<u8>,
}

/// Debug output names the key and the size of its encrypted private blob, never the blob, so
/// a logged request cannot leak it.
impl std::fmt::Debug for NewSignedPreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSignedPreKey")
            .field("key_id", &self.key_id)
            .field("public", &self.public)
            .field("encrypted_private_len", &self.encrypted_private.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for NewOneTimePreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewOneTimePreKey")
            .field("key_id", &self.key_id)
            .field("public", &self.public)
            .field("encrypted_private_len", &self.encrypted_private.len())
            .finish()
    }
}

/// Everything a device publishes when it registers.
#[derive(Clone)]
pub struct NewDevice {
    pub user_id: Uuid,
    pub device_id: String,
    pub registration_id: u16,
    pub identity_key: PublicKey,
    pub encrypted_identity_private: Vec<u8>,
    pub signed_prekey: NewSignedPreKey,
    pub one_time_prekeys: Vec<NewOneTimePreKey>,
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

/// The result of [`KeyStore::register_device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub outcome: RegisterOutcome,
    pub available: u32,
}

/// Where each uploaded one-time prekey went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    pub stored: Vec<u32>,
    pub unchanged: Vec<u32>,
    pub refused_consumed: Vec<u32>,
    pub available: u32,
}

/// The result of [`KeyStore::rotate_signed_prekey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    /// False when the key was already the active one (a retried rotation).
    pub rotated: bool,
    pub previous_key_id: Option<u32>,
}

/// A device's keys on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub available: u32,
    /// Id and installation time of the active signed prekey.
    pub active_signed_prekey: Option<(u32, OffsetDateTime)>,
}

/// One fetch target: a user, and one device or all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BundleTarget {
    pub user_id: Uuid,
    pub device_id: Option<String>,
}

/// A signed prekey as peers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedSignedPreKey {
    pub key_id: u32,
    pub public: PublicKey,
    pub signature: [u8; 64],
    /// When the device installed it.
    pub rotated_at: OffsetDateTime,
}

/// What a peer needs to start a session with one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundle {
    pub device_id: String,
    pub registration_id: u32,
    pub identity_key: PublicKey,
    pub signed_prekey: PublishedSignedPreKey,
    /// The one-time prekey handed to this caller, if the device had one left.
    pub one_time_prekey: Option<(u32, PublicKey)>,
}

/// One Signal session: the owner's device and one peer device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    pub device_id: String,
    pub peer_user_id: Uuid,
    pub peer_device_id: String,
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
    pub device_id: String,
    pub peer_user_id: Option<Uuid>,
    pub include_inactive: bool,
    /// List sessions after this (peer user, peer device), in that order.
    pub after: Option<(Uuid, String)>,
    pub limit: u32,
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

/// How a safety number was compared (the schema's `verification_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationMethod {
    Manual,
    QrCode,
    OutOfBand,
}

impl VerificationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::QrCode => "qr_code",
            Self::OutOfBand => "out_of_band",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Manual, Self::QrCode, Self::OutOfBand]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// A user's stored safety number with a peer: the number as last computed, and the
/// verification (cleared when an identity key of either user changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyRecord {
    pub number: String,
    pub verified: Option<(OffsetDateTime, VerificationMethod)>,
}

/// A user's master-key record, as a device reads it (never the recovery-code hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRecord {
    pub salt: Vec<u8>,
    pub pbkdf2_iterations: u32,
}

/// A device's identity as a restoring device receives it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoverableDevice {
    pub device_id: String,
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

/// Why a store call failed, in terms a handler can map to a status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such device")]
    DeviceNotFound,
    #[error("the device belongs to another user")]
    NotYourDevice,
    #[error("the device id is registered to another user")]
    DeviceTaken,
    #[error("the user is not known to the chat database")]
    UnknownUser,
    #[error("one-time prekey {key_id} is already stored with different bytes")]
    OneTimePreKeyConflict { key_id: u32 },
    #[error("signed prekey {key_id} is already stored with different bytes")]
    SignedPreKeyConflict { key_id: u32 },
    #[error("signed prekey {key_id} was already superseded by a newer one")]
    SignedPreKeySuperseded { key_id: u32 },
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
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A public key as stored (32 raw bytes); anything else is a corrupt row.
fn stored_key(bytes: &[u8]) -> Result<PublicKey, StoreError> {
    PublicKey::from_raw_slice(bytes)
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(e.into())))
}

/// A signature as stored (64 bytes); anything else is a corrupt row.
fn stored_signature(bytes: &[u8]) -> Result<[u8; 64], StoreError> {
    bytes.try_into().map_err(|_| {
        StoreError::Database(sqlx::Error::Decode(
            format!("stored signature has {} bytes", bytes.len()).into(),
        ))
    })
}

/// The key server's storage. Implementations must hand out each one-time prekey at most once,
/// even to concurrent callers in several processes. A backend provides write transactions and
/// the reads; the write rules themselves are shared ([`writes`]).
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Starts a write transaction that serializes with other writers of the same device.
    async fn begin_write(&self) -> Result<Box<dyn KeyTx>, StoreError>;

    /// The identity key of `device_id`, which must belong to `user_id`.
    async fn device_identity(
        &self,
        user_id: Uuid,
        device_id: &str,
    ) -> Result<PublicKey, StoreError>;

    /// The device's key counts; the device must belong to `user_id`.
    async fn key_status(&self, user_id: Uuid, device_id: &str) -> Result<KeyStatus, StoreError>;

    /// One result per target, in order, each with the bundles of the target's devices that have
    /// an active signed prekey, ordered by device id. Takes one one-time prekey per device, and
    /// a device named by several targets gets one key, shared by their results. One round trip.
    async fn fetch_bundles(
        &self,
        targets: &[BundleTarget],
    ) -> Result<Vec<Vec<DeviceBundle>>, StoreError>;

    /// One session of a device of `user_id`, active or not.
    async fn session(&self, user_id: Uuid, key: &SessionKey) -> Result<StoredSession, StoreError>;

    /// A page of a device's sessions, ordered by peer user id, then peer device id.
    async fn sessions(
        &self,
        user_id: Uuid,
        query: &SessionQuery,
    ) -> Result<Vec<StoredSession>, StoreError>;

    /// The identity keys of every device of `user_id`.
    async fn identity_keys(&self, user_id: Uuid) -> Result<Vec<PublicKey>, StoreError>;

    /// `user_id`'s stored safety number with `peer_user_id`, if they ever verified one.
    async fn safety_record(
        &self,
        user_id: Uuid,
        peer_user_id: Uuid,
    ) -> Result<Option<SafetyRecord>, StoreError>;

    /// Records that `user_id` verified `number` with `peer_user_id`, if it is the current one.
    async fn verify_safety_number(
        &self,
        user_id: Uuid,
        peer_user_id: Uuid,
        number: &str,
        method: VerificationMethod,
    ) -> Result<OffsetDateTime, StoreError> {
        let tx = self.begin_write().await?;
        writes::verify_safety_number(tx, user_id, peer_user_id, number, method).await
    }

    /// A page of `user_id`'s audit events, newest first.
    async fn audit_events(
        &self,
        user_id: Uuid,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Writes a session if `expected_version` is its stored version (0 when there is none).
    async fn put_session(
        &self,
        user_id: Uuid,
        key: &SessionKey,
        state: &[u8],
        is_initiator: bool,
        expected_version: u64,
    ) -> Result<u64, StoreError> {
        let tx = self.begin_write().await?;
        writes::put_session(tx, user_id, key, state, is_initiator, expected_version).await
    }

    /// Marks a session inactive and wipes its state, compare-and-swap like a put.
    async fn destroy_session(
        &self,
        user_id: Uuid,
        key: &SessionKey,
        expected_version: u64,
    ) -> Result<u64, StoreError> {
        writes::destroy_session(self.begin_write().await?, user_id, key, expected_version).await
    }

    /// Records a message on an active session now.
    async fn touch_session(
        &self,
        user_id: Uuid,
        key: &SessionKey,
    ) -> Result<OffsetDateTime, StoreError> {
        writes::touch_session(self.begin_write().await?, user_id, key).await
    }

    /// `user_id`'s master-key record, if any.
    async fn master_key(&self, user_id: Uuid) -> Result<Option<MasterKeyRecord>, StoreError>;

    /// Stores or replaces `user_id`'s record; true when it is new.
    async fn put_master_key(
        &self,
        user_id: Uuid,
        record: &MasterKeyRecord,
        recovery_code_hash: &str,
    ) -> Result<bool, StoreError> {
        let tx = self.begin_write().await?;
        writes::put_master_key(tx, user_id, record, recovery_code_hash).await
    }

    /// Proves a recovery code (by its hash) for `user_id`, counting failures.
    async fn recover_device(
        &self,
        user_id: Uuid,
        recovery_code_hash: &str,
    ) -> Result<Recovery, StoreError> {
        writes::recover_device(self.begin_write().await?, user_id, recovery_code_hash).await
    }

    /// Removes a device of `user_id` with its keys and sessions; returns the sessions removed.
    async fn remove_device(&self, user_id: Uuid, device_id: &str) -> Result<u32, StoreError> {
        writes::remove_device(self.begin_write().await?, user_id, device_id).await
    }

    /// Registers or re-registers a device of `device.user_id`.
    async fn register_device(&self, device: NewDevice) -> Result<Registered, StoreError> {
        writes::register(self.begin_write().await?, &device).await
    }

    /// Appends one-time prekeys: identical stored keys are left alone, consumed ids refused.
    async fn upload_one_time_prekeys(
        &self,
        user_id: Uuid,
        device_id: &str,
        keys: Vec<NewOneTimePreKey>,
    ) -> Result<UploadReport, StoreError> {
        writes::upload(self.begin_write().await?, user_id, device_id, &keys).await
    }

    /// Makes `key` the device's only active signed prekey. Fails with
    /// [`StoreError::IdentityChanged`] when the device's identity key is no longer
    /// `signed_by` (the signature was checked against that key).
    async fn rotate_signed_prekey(
        &self,
        user_id: Uuid,
        device_id: &str,
        signed_by: PublicKey,
        key: NewSignedPreKey,
    ) -> Result<Rotated, StoreError> {
        writes::rotate(
            self.begin_write().await?,
            user_id,
            device_id,
            signed_by,
            &key,
        )
        .await
    }
}
