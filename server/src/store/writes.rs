//! What registration, upload and rotation mean, written once for every backend.
//!
//! A backend provides the primitive statements of one write transaction ([`KeyTx`]); the rules
//! (retry-safety, refusing consumed ids, one active signed prekey, replacing keys on a new
//! identity, the audit event in the same transaction) live here and nowhere else.

use std::collections::HashMap;

use async_trait::async_trait;
use keyserver_proto::fingerprint;
use keyserver_proto::wire::PublicKey;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::jobs::{KeyKind, is_retired};
use super::{
    MasterKeyRecord, NewDevice, NewOneTimePreKey, NewSignedPreKey, RecoverableDevice, Recovery,
    RegisterOutcome, Registered, Rotated, SessionKey, StoreError, UploadReport, VerificationMethod,
};
use crate::audit::AuditEvent;

/// A stored one-time prekey, as a re-upload is compared with it.
pub struct StoredOneTimePreKey {
    pub public: Vec<u8>,
    pub consumed: bool,
}

/// A stored signed prekey, as a rotation is compared with it.
pub struct StoredSignedPreKey {
    pub key_id: u32,
    pub public: Vec<u8>,
    pub active: bool,
}

/// The statements of one write transaction. Dropping it without [`KeyTx::commit`] rolls back.
#[async_trait]
pub trait KeyTx: Send {
    /// Makes sure the user exists; [`StoreError::UnknownUser`] when it cannot be created.
    async fn ensure_user(&mut self, user_id: Uuid) -> Result<(), StoreError>;
    /// Inserts the device's identity row unless the device id exists; true when inserted.
    async fn insert_device(&mut self, device: &NewDevice) -> Result<bool, StoreError>;
    /// Locks the device against other writers until commit; its owner and identity key.
    async fn lock_device(
        &mut self,
        device_id: &str,
    ) -> Result<Option<(Uuid, PublicKey)>, StoreError>;
    /// Rewrites the identity row; `new_identity` restarts its creation time.
    async fn update_device(
        &mut self,
        device: &NewDevice,
        new_identity: bool,
    ) -> Result<(), StoreError>;
    /// Deletes every signed and one-time prekey of the device, and its retired ids.
    async fn delete_prekeys(&mut self, device_id: &str) -> Result<(), StoreError>;
    /// The stored one-time prekeys among `ids`.
    async fn one_time_prekeys(
        &mut self,
        device_id: &str,
        ids: &[u32],
    ) -> Result<HashMap<u32, StoredOneTimePreKey>, StoreError>;
    /// The device's ranges (first, last) of ids that cleanup deleted. Read after the stored
    /// keys: a cleanup committing in between moved ids from those rows into these ranges.
    async fn retired_ids(
        &mut self,
        device_id: &str,
        kind: KeyKind,
    ) -> Result<Vec<(u32, u32)>, StoreError>;
    /// Inserts one-time prekeys in the given order (their serial ids record upload order).
    async fn insert_one_time_prekeys(
        &mut self,
        device_id: &str,
        keys: &[&NewOneTimePreKey],
    ) -> Result<(), StoreError>;
    /// The signed prekeys with id `key_id`, and the active one.
    async fn signed_prekeys(
        &mut self,
        device_id: &str,
        key_id: u32,
    ) -> Result<Vec<StoredSignedPreKey>, StoreError>;
    /// Deactivates the active signed prekey, recording now as the time it was superseded.
    async fn deactivate_signed_prekeys(&mut self, device_id: &str) -> Result<(), StoreError>;
    /// Inserts an active signed prekey.
    async fn insert_signed_prekey(
        &mut self,
        device_id: &str,
        key: &NewSignedPreKey,
    ) -> Result<(), StoreError>;
    async fn count_available(&mut self, device_id: &str) -> Result<u32, StoreError>;
    async fn user_exists(&mut self, user_id: Uuid) -> Result<bool, StoreError>;
    /// The session's version and whether it is active.
    async fn session_version(
        &mut self,
        key: &SessionKey,
    ) -> Result<Option<(u64, bool)>, StoreError>;
    /// Stores a new active session at version 1.
    async fn insert_session(
        &mut self,
        key: &SessionKey,
        state: &[u8],
        is_initiator: bool,
    ) -> Result<(), StoreError>;
    /// Rewrites a session's state and activity at `version`; `is_initiator` None keeps it.
    async fn update_session(
        &mut self,
        key: &SessionKey,
        state: &[u8],
        is_initiator: Option<bool>,
        active: bool,
        version: u64,
    ) -> Result<(), StoreError>;
    /// Sets an active session's last message time to now; None when there is no such session.
    async fn touch_session(
        &mut self,
        key: &SessionKey,
    ) -> Result<Option<OffsetDateTime>, StoreError>;
    async fn audit(
        &mut self,
        event: AuditEvent,
        user_id: Uuid,
        device_id: Option<&str>,
        metadata: serde_json::Value,
    ) -> Result<(), StoreError>;
    /// The user's master-key record with its recovery state, locked until commit:
    /// (record, recovery-code hash, failed attempts in a row, locked until).
    async fn master_key_for_update(
        &mut self,
        user_id: Uuid,
    ) -> Result<Option<(MasterKeyRecord, String, u32, Option<OffsetDateTime>)>, StoreError>;
    /// Stores or replaces the record and resets its recovery state.
    async fn upsert_master_key(
        &mut self,
        user_id: Uuid,
        record: &MasterKeyRecord,
        recovery_code_hash: &str,
    ) -> Result<(), StoreError>;
    async fn set_recovery_state(
        &mut self,
        user_id: Uuid,
        failed_attempts: u32,
        locked_until: Option<OffsetDateTime>,
    ) -> Result<(), StoreError>;
    /// Every device of the user as a restoring device needs it, ordered by device id.
    async fn recoverable_devices(
        &mut self,
        user_id: Uuid,
    ) -> Result<Vec<RecoverableDevice>, StoreError>;
    /// Deletes the device's identity row; the schema's cascades delete its signed and one-time
    /// prekeys and its sessions. Returns how many sessions it had.
    async fn delete_device(&mut self, device_id: &str) -> Result<u32, StoreError>;
    /// Serializes the transactions that read or change a user's identity keys together with
    /// their safety numbers (a no-op where every write transaction is already serialized).
    async fn lock_user(&mut self, user_id: Uuid) -> Result<(), StoreError>;
    /// The identity keys of every device of the user.
    async fn identity_keys(&mut self, user_id: Uuid) -> Result<Vec<PublicKey>, StoreError>;
    /// Every stored safety number the user is a party of: (id, owner, peer, number).
    async fn safety_numbers_involving(
        &mut self,
        user_id: Uuid,
    ) -> Result<Vec<(i64, Uuid, Uuid, String)>, StoreError>;
    /// Replaces a stored safety number and clears its verification.
    async fn replace_safety_number(&mut self, id: i64, number: &str) -> Result<(), StoreError>;
    /// Stores `number` as verified by `user_id` now; returns the time recorded.
    async fn store_verified_safety_number(
        &mut self,
        user_id: Uuid,
        peer_user_id: Uuid,
        number: &str,
        method: VerificationMethod,
    ) -> Result<OffsetDateTime, StoreError>;
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// Locks the device and checks that `user_id` owns it.
async fn lock_owned(
    tx: &mut dyn KeyTx,
    user_id: Uuid,
    device_id: &str,
) -> Result<PublicKey, StoreError> {
    match tx.lock_device(device_id).await? {
        None => Err(StoreError::DeviceNotFound),
        Some((owner, _)) if owner != user_id => Err(StoreError::NotYourDevice),
        Some((_, identity)) => Ok(identity),
    }
}

/// Stores the keys that are new, leaves identical unconsumed ones alone and refuses consumed
/// ids, including those cleanup has since deleted; any id stored with a different public key
/// fails the whole call.
async fn merge_one_time_prekeys(
    tx: &mut dyn KeyTx,
    device_id: &str,
    keys: &[NewOneTimePreKey],
) -> Result<UploadReport, StoreError> {
    let ids: Vec<u32> = keys.iter().map(|k| k.key_id).collect();
    let existing = tx.one_time_prekeys(device_id, &ids).await?;
    let retired = if ids.iter().any(|id| !existing.contains_key(id)) {
        tx.retired_ids(device_id, KeyKind::OneTime).await?
    } else {
        Vec::new()
    };
    let mut report = UploadReport::default();
    let mut new_keys = Vec::new();
    for key in keys {
        match existing.get(&key.key_id) {
            None if is_retired(&retired, key.key_id) => report.refused_consumed.push(key.key_id),
            None => {
                report.stored.push(key.key_id);
                new_keys.push(key);
            }
            Some(stored) if stored.public.as_slice() != key.public.as_raw() => {
                return Err(StoreError::OneTimePreKeyConflict { key_id: key.key_id });
            }
            Some(stored) if stored.consumed => report.refused_consumed.push(key.key_id),
            Some(_) => report.unchanged.push(key.key_id),
        }
    }
    tx.insert_one_time_prekeys(device_id, &new_keys).await?;
    Ok(report)
}

/// Makes `key` the only active signed prekey of a locked device.
async fn install_signed_prekey(
    tx: &mut dyn KeyTx,
    device_id: &str,
    key: &NewSignedPreKey,
) -> Result<Rotated, StoreError> {
    let mut previous = None;
    let stored_keys = tx.signed_prekeys(device_id, key.key_id).await?;
    if !stored_keys.iter().any(|k| k.key_id == key.key_id)
        && is_retired(
            &tx.retired_ids(device_id, KeyKind::Signed).await?,
            key.key_id,
        )
    {
        return Err(StoreError::SignedPreKeySuperseded { key_id: key.key_id });
    }
    for stored in stored_keys {
        if stored.key_id == key.key_id {
            if stored.public.as_slice() != key.public.as_raw() {
                return Err(StoreError::SignedPreKeyConflict { key_id: key.key_id });
            }
            if !stored.active {
                return Err(StoreError::SignedPreKeySuperseded { key_id: key.key_id });
            }
            return Ok(Rotated {
                rotated: false,
                previous_key_id: None,
            });
        }
        if stored.active {
            previous = Some(stored.key_id);
        }
    }
    tx.deactivate_signed_prekeys(device_id).await?;
    tx.insert_signed_prekey(device_id, key).await?;
    Ok(Rotated {
        rotated: true,
        previous_key_id: previous,
    })
}

/// The 60-digit safety number of two users from their device identity keys; None when either
/// has no device.
pub fn safety_number(a: (Uuid, &[PublicKey]), b: (Uuid, &[PublicKey])) -> Option<String> {
    if a.1.is_empty() || b.1.is_empty() {
        return None;
    }
    let a_digits = fingerprint::user_digits(a.0.as_bytes(), a.1.iter().copied());
    let b_digits = fingerprint::user_digits(b.0.as_bytes(), b.1.iter().copied());
    Some(fingerprint::safety_number(&a_digits, &b_digits))
}

/// After `user_id`'s identity keys changed: recomputes every stored safety number that
/// involves the user, clears the verification of each that changed, and audits
/// `safety_number_changed` for the user who had verified it.
async fn refresh_safety_numbers(tx: &mut dyn KeyTx, user_id: Uuid) -> Result<(), StoreError> {
    let rows = tx.safety_numbers_involving(user_id).await?;
    let mut keys: HashMap<Uuid, Vec<PublicKey>> = HashMap::new();
    for (id, owner, peer, stored) in rows {
        for user in [owner, peer] {
            if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry(user) {
                slot.insert(tx.identity_keys(user).await?);
            }
        }
        let current = safety_number((owner, &keys[&owner]), (peer, &keys[&peer]));
        let Some(current) = current else {
            continue; // a party has no device left: nothing to compare until one registers
        };
        if current != stored {
            tx.replace_safety_number(id, &current).await?;
            tx.audit(
                AuditEvent::SafetyNumberChanged,
                owner,
                None,
                json!({ "peer_user_id": peer, "because_of_user_id": user_id }),
            )
            .await?;
        }
    }
    Ok(())
}

/// Records a verification if `number` is the two users' current safety number, audited
/// `safety_number_verified`.
pub async fn verify_safety_number(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    peer_user_id: Uuid,
    number: &str,
    method: VerificationMethod,
) -> Result<OffsetDateTime, StoreError> {
    let (first, second) = if user_id < peer_user_id {
        (user_id, peer_user_id)
    } else {
        (peer_user_id, user_id)
    };
    tx.lock_user(first).await?;
    tx.lock_user(second).await?;
    let mine = tx.identity_keys(user_id).await?;
    if mine.is_empty() {
        return Err(StoreError::CallerHasNoDevices);
    }
    let theirs = tx.identity_keys(peer_user_id).await?;
    if theirs.is_empty() {
        return Err(StoreError::PeerHasNoDevices);
    }
    if safety_number((user_id, &mine), (peer_user_id, &theirs)).as_deref() != Some(number) {
        return Err(StoreError::SafetyNumberMismatch);
    }
    let at = tx
        .store_verified_safety_number(user_id, peer_user_id, number, method)
        .await?;
    tx.audit(
        AuditEvent::SafetyNumberVerified,
        user_id,
        None,
        json!({ "peer_user_id": peer_user_id, "method": method.as_str() }),
    )
    .await?;
    tx.commit().await?;
    Ok(at)
}

async fn register_keys(
    tx: &mut dyn KeyTx,
    device: &NewDevice,
) -> Result<RegisterOutcome, StoreError> {
    tx.ensure_user(device.user_id).await?;
    tx.lock_user(device.user_id).await?;
    let all_keys: Vec<&NewOneTimePreKey> = device.one_time_prekeys.iter().collect();
    if tx.insert_device(device).await? {
        tx.insert_signed_prekey(&device.device_id, &device.signed_prekey)
            .await?;
        tx.insert_one_time_prekeys(&device.device_id, &all_keys)
            .await?;
        return Ok(RegisterOutcome::Created);
    }
    let stored_identity = lock_owned(tx, device.user_id, &device.device_id)
        .await
        .map_err(|e| match e {
            StoreError::NotYourDevice => StoreError::DeviceTaken,
            e => e,
        })?;
    let same_identity = stored_identity == device.identity_key;
    tx.update_device(device, !same_identity).await?;
    if same_identity {
        install_signed_prekey(tx, &device.device_id, &device.signed_prekey).await?;
        merge_one_time_prekeys(tx, &device.device_id, &device.one_time_prekeys).await?;
        return Ok(RegisterOutcome::Updated);
    }
    // A new identity key makes every old key of the device meaningless: replace them all.
    tx.delete_prekeys(&device.device_id).await?;
    tx.insert_signed_prekey(&device.device_id, &device.signed_prekey)
        .await?;
    tx.insert_one_time_prekeys(&device.device_id, &all_keys)
        .await?;
    Ok(RegisterOutcome::Replaced)
}

/// Registers or re-registers a device, with its `device_keys_generated` event.
pub async fn register(
    mut tx: Box<dyn KeyTx>,
    device: &NewDevice,
) -> Result<Registered, StoreError> {
    let outcome = register_keys(tx.as_mut(), device).await?;
    // A new device or a new identity key changes the user's safety numbers.
    if outcome != RegisterOutcome::Updated {
        refresh_safety_numbers(tx.as_mut(), device.user_id).await?;
    }
    let available = tx.count_available(&device.device_id).await?;
    tx.audit(
        AuditEvent::DeviceKeysGenerated,
        device.user_id,
        Some(&device.device_id),
        json!({
            "outcome": outcome.as_str(),
            "registration_id": device.registration_id,
            "signed_prekey_id": device.signed_prekey.key_id,
            "one_time_prekeys_uploaded": device.one_time_prekeys.len(),
            "one_time_prekeys_available": available,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(Registered { outcome, available })
}

/// Appends one-time prekeys, with a `prekeys_replenished` event when any was stored.
pub async fn upload(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    device_id: &str,
    keys: &[NewOneTimePreKey],
) -> Result<UploadReport, StoreError> {
    lock_owned(tx.as_mut(), user_id, device_id).await?;
    let mut report = merge_one_time_prekeys(tx.as_mut(), device_id, keys).await?;
    report.available = tx.count_available(device_id).await?;
    if !report.stored.is_empty() {
        tx.audit(
            AuditEvent::PrekeysReplenished,
            user_id,
            Some(device_id),
            json!({
                "stored": report.stored.len(),
                "unchanged": report.unchanged.len(),
                "refused_consumed": report.refused_consumed.len(),
                "one_time_prekeys_available": report.available,
            }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Installs a signed prekey verified against `signed_by`, with a `signed_prekey_rotated` event.
pub async fn rotate(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    device_id: &str,
    signed_by: PublicKey,
    key: &NewSignedPreKey,
) -> Result<Rotated, StoreError> {
    if lock_owned(tx.as_mut(), user_id, device_id).await? != signed_by {
        return Err(StoreError::IdentityChanged);
    }
    let rotated = install_signed_prekey(tx.as_mut(), device_id, key).await?;
    if rotated.rotated {
        tx.audit(
            AuditEvent::SignedPrekeyRotated,
            user_id,
            Some(device_id),
            json!({
                "signed_prekey_id": key.key_id,
                "previous_signed_prekey_id": rotated.previous_key_id,
            }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(rotated)
}

/// Writes a session's state if `expected_version` is the stored version (0 for none). Storing a
/// session that was not active is audited `session_established`.
pub async fn put_session(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    key: &SessionKey,
    state: &[u8],
    is_initiator: bool,
    expected_version: u64,
) -> Result<u64, StoreError> {
    lock_owned(tx.as_mut(), user_id, &key.device_id).await?;
    if !tx.user_exists(key.peer_user_id).await? {
        return Err(StoreError::UnknownPeer);
    }
    let current = tx.session_version(key).await?;
    let current_version = current.map_or(0, |(version, _)| version);
    if current_version != expected_version {
        return Err(StoreError::StaleSession {
            expected: expected_version,
            current: current_version,
        });
    }
    let version = match current {
        None => {
            tx.insert_session(key, state, is_initiator).await?;
            1
        }
        Some((version, _)) => {
            tx.update_session(key, state, Some(is_initiator), true, version + 1)
                .await?;
            version + 1
        }
    };
    if !matches!(current, Some((_, true))) {
        tx.audit(
            AuditEvent::SessionEstablished,
            user_id,
            Some(&key.device_id),
            json!({
                "peer_user_id": key.peer_user_id,
                "peer_device_id": key.peer_device_id,
                "is_initiator": is_initiator,
            }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(version)
}

/// Marks a session inactive and wipes its state, audited `session_destroyed`. Destroying an
/// inactive session at its version changes nothing.
pub async fn destroy_session(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    key: &SessionKey,
    expected_version: u64,
) -> Result<u64, StoreError> {
    lock_owned(tx.as_mut(), user_id, &key.device_id).await?;
    let (version, active) = tx
        .session_version(key)
        .await?
        .ok_or(StoreError::SessionNotFound)?;
    if version != expected_version {
        return Err(StoreError::StaleSession {
            expected: expected_version,
            current: version,
        });
    }
    if !active {
        return Ok(version);
    }
    tx.update_session(key, &[], None, false, version + 1)
        .await?;
    tx.audit(
        AuditEvent::SessionDestroyed,
        user_id,
        Some(&key.device_id),
        json!({
            "peer_user_id": key.peer_user_id,
            "peer_device_id": key.peer_device_id,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(version + 1)
}

/// Records a message on an active session of the caller's device.
pub async fn touch_session(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    key: &SessionKey,
) -> Result<OffsetDateTime, StoreError> {
    lock_owned(tx.as_mut(), user_id, &key.device_id).await?;
    let at = tx
        .touch_session(key)
        .await?
        .ok_or(StoreError::SessionNotFound)?;
    tx.commit().await?;
    Ok(at)
}

/// Removes a device of `user_id` with everything that hangs off it, recomputes the user's
/// safety numbers, and audits the removal (as `device_keys_generated` with outcome
/// `removed`: the schema has no event type of its own for it).
pub async fn remove_device(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    device_id: &str,
) -> Result<u32, StoreError> {
    tx.lock_user(user_id).await?;
    lock_owned(tx.as_mut(), user_id, device_id).await?;
    let sessions = tx.delete_device(device_id).await?;
    refresh_safety_numbers(tx.as_mut(), user_id).await?;
    tx.audit(
        AuditEvent::DeviceKeysGenerated,
        user_id,
        Some(device_id),
        json!({ "outcome": "removed", "sessions_removed": sessions }),
    )
    .await?;
    tx.commit().await?;
    Ok(sessions)
}

/// Failed recovery attempts in a row before recovery locks.
pub const RECOVERY_ATTEMPTS: u32 = 5;
/// How long recovery stays locked after that many failures.
pub const RECOVERY_LOCKOUT: time::Duration = time::Duration::hours(1);

/// Stores or replaces a master-key record; the first is audited `master_key_created`.
pub async fn put_master_key(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    record: &MasterKeyRecord,
    recovery_code_hash: &str,
) -> Result<bool, StoreError> {
    tx.ensure_user(user_id).await?;
    let created = tx.master_key_for_update(user_id).await?.is_none();
    tx.upsert_master_key(user_id, record, recovery_code_hash)
        .await?;
    if created {
        tx.audit(
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

/// Compares the recovery-code hash in constant time. A failure is counted (and committed: the
/// count is what limits guessing); the fifth in a row locks recovery for an hour. Success
/// resets the count, is audited `recovery_code_used`, and returns the devices' sealed keys.
pub async fn recover_device(
    mut tx: Box<dyn KeyTx>,
    user_id: Uuid,
    recovery_code_hash: &str,
) -> Result<Recovery, StoreError> {
    use subtle::ConstantTimeEq;

    let now = OffsetDateTime::now_utc();
    let (record, stored_hash, failed, locked_until) = tx
        .master_key_for_update(user_id)
        .await?
        .ok_or(StoreError::NoMasterKey)?;
    if let Some(until) = locked_until.filter(|until| *until > now) {
        return Err(StoreError::RecoveryLocked { until });
    }
    let matches: bool = stored_hash
        .as_bytes()
        .ct_eq(recovery_code_hash.as_bytes())
        .into();
    if !matches {
        let failed = failed + 1;
        let (count, lock) = if failed >= RECOVERY_ATTEMPTS {
            (0, Some(now + RECOVERY_LOCKOUT))
        } else {
            (failed, None)
        };
        tx.set_recovery_state(user_id, count, lock).await?;
        tx.commit().await?;
        return Err(StoreError::WrongRecoveryCode {
            attempts_left: RECOVERY_ATTEMPTS.saturating_sub(failed),
        });
    }
    tx.set_recovery_state(user_id, 0, None).await?;
    let devices = tx.recoverable_devices(user_id).await?;
    tx.audit(
        AuditEvent::RecoveryCodeUsed,
        user_id,
        None,
        json!({ "devices": devices.len() }),
    )
    .await?;
    tx.commit().await?;
    Ok(Recovery { record, devices })
}
