//! Turns request messages into the store's domain types, or says precisely which field is wrong
//! and why. Nothing reaches the store before it passes here.

use keyserver_proto::limits::{MAX_KEY_ID, MAX_ONE_TIME_PREKEYS, MAX_REGISTRATION_ID};
use keyserver_proto::pb;
use keyserver_proto::wire::{self, KyberPublicKey, PublicKey};
use keyserver_proto::xeddsa;
use sha2::Digest;
use uuid::Uuid;

use crate::store::{
    BundleTarget, DeviceId, KyberPreKeyId, NewKyberPreKey, NewOneTimePreKey, NewSignedPreKey,
    PreKeyId, SessionKey, SignedPreKeyId,
};

/// Most targets one bulk fetch may name.
pub const MAX_TARGETS: usize = 256;
/// Largest encrypted Curve25519 private-key blob accepted (an AES-GCM sealed 32-byte key is
/// about 60).
pub const MAX_ENCRYPTED_BLOB: usize = 512;
/// Largest encrypted Kyber1024 private-key blob accepted: the 3168-byte secret key (3169 with
/// libsignal's type byte) sealed with a version byte, a nonce of up to 24 bytes and a 16-byte
/// tag fits; nothing much larger does.
pub const MAX_KYBER_ENCRYPTED_BLOB: usize = 3232;
/// Most identity keys one `CheckIdentityKeys` call may name.
pub const MAX_IDENTITY_CHECKS: usize = 1000;
/// Largest encrypted session state accepted.
pub const MAX_SESSION_STATE: usize = 64 * 1024;
/// Most sessions per page, and the page size when none is asked for.
pub const MAX_PAGE_SIZE: u32 = 500;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// A field that failed validation, named by its path in the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.into(),
        reason: reason.into(),
    }
}

pub type Result<T> = std::result::Result<T, InvalidField>;

pub fn device_id(field: &str, value: &str) -> Result<DeviceId> {
    DeviceId::parse(value).map_err(|reason| invalid(field, reason))
}

pub fn user_id(field: &str, value: &str) -> Result<Uuid> {
    Uuid::parse_str(value).map_err(|_| invalid(field, "must be a UUID"))
}

/// Longest idempotency key a fetch may carry (a UUID is 36).
pub const MAX_IDEMPOTENCY_KEY: usize = 64;

/// A fetch's optional idempotency key: empty for none, else 1 to [`MAX_IDEMPOTENCY_KEY`] of
/// `A-Z a-z 0-9 - _ . :`, so it is never more than an opaque token in a row or a log.
pub fn idempotency_key(field: &str, value: &str) -> Result<Option<String>> {
    if value.is_empty() {
        return Ok(None);
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if value.len() > MAX_IDEMPOTENCY_KEY || !value.chars().all(allowed) {
        return Err(invalid(
            field,
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY} of A-Z a-z 0-9 - _ . :"),
        ));
    }
    Ok(Some(value.to_owned()))
}

pub fn registration_id(field: &str, value: u32) -> Result<u16> {
    if !(1..=MAX_REGISTRATION_ID).contains(&value) {
        return Err(invalid(
            field,
            format!("must be 1 to {MAX_REGISTRATION_ID}"),
        ));
    }
    Ok(value as u16)
}

/// A key id of the kind `new` makes, in range.
fn key_id<I>(field: &str, value: u32, new: fn(u32) -> Option<I>) -> Result<I> {
    new(value).ok_or_else(|| invalid(field, format!("must be at most {MAX_KEY_ID}")))
}

pub fn public_key(field: &str, bytes: &[u8]) -> Result<PublicKey> {
    PublicKey::from_serialized(bytes).map_err(|e| invalid(field, e.to_string()))
}

pub fn encrypted_blob(field: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    sized_blob(field, bytes, MAX_ENCRYPTED_BLOB)
}

fn sized_blob(field: &str, bytes: Vec<u8>, max: usize) -> Result<Vec<u8>> {
    if bytes.is_empty() || bytes.len() > max {
        return Err(invalid(
            field,
            format!("must be 1 to {max} bytes, got {}", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// A 64-byte signature by `identity` over `message`.
fn signature(field: &str, bytes: &[u8], identity: &PublicKey, message: &[u8]) -> Result<[u8; 64]> {
    let signature = wire::parse_signature(bytes).map_err(|e| invalid(field, e.to_string()))?;
    if !xeddsa::verify(identity, message, &signature) {
        return Err(invalid(
            field,
            "does not verify with the device's identity key",
        ));
    }
    Ok(signature)
}

/// A signed prekey whose signature by `identity` verifies over its serialized public key.
pub fn signed_prekey(
    field: &str,
    upload: Option<pb::SignedPreKeyUpload>,
    identity: &PublicKey,
) -> Result<NewSignedPreKey> {
    let upload = upload.ok_or_else(|| invalid(field, "is required"))?;
    let key_id = key_id(
        &format!("{field}.key_id"),
        upload.key_id,
        SignedPreKeyId::new,
    )?;
    let public = public_key(&format!("{field}.public_key"), &upload.public_key)?;
    Ok(NewSignedPreKey {
        key_id,
        public,
        signature: signature(
            &format!("{field}.signature"),
            &upload.signature,
            identity,
            &public.serialize(),
        )?,
        encrypted_private: encrypted_blob(
            &format!("{field}.encrypted_private_key"),
            upload.encrypted_private_key,
        )?,
    })
}

/// A Kyber prekey whose signature by `identity` verifies over its 1569-byte serialized form.
pub fn kyber_prekey(
    field: &str,
    upload: pb::KyberPreKeyUpload,
    identity: &PublicKey,
) -> Result<NewKyberPreKey> {
    let key_id = key_id(
        &format!("{field}.key_id"),
        upload.key_id,
        KyberPreKeyId::new,
    )?;
    let public = KyberPublicKey::from_serialized(&upload.public_key)
        .map_err(|e| invalid(format!("{field}.public_key"), e.to_string()))?;
    Ok(NewKyberPreKey {
        key_id,
        signature: signature(
            &format!("{field}.signature"),
            &upload.signature,
            identity,
            &upload.public_key,
        )?,
        public,
        encrypted_private: sized_blob(
            &format!("{field}.encrypted_private_key"),
            upload.encrypted_private_key,
            MAX_KYBER_ENCRYPTED_BLOB,
        )?,
    })
}

/// One-time Kyber prekeys: between `min` and 100 of them, with distinct ids, none of them
/// `reserved` (the last-resort key's id in the same request), each signed by `identity`.
pub fn kyber_prekeys(
    field: &str,
    uploads: Vec<pb::KyberPreKeyUpload>,
    min: usize,
    identity: &PublicKey,
    reserved: Option<KyberPreKeyId>,
) -> Result<Vec<NewKyberPreKey>> {
    distinct(
        field,
        uploads,
        min,
        |at, upload| {
            let key = kyber_prekey(at, upload, identity)?;
            if Some(key.key_id) == reserved {
                return Err(invalid(
                    format!("{at}.key_id"),
                    format!("is the last-resort Kyber prekey's id ({})", key.key_id),
                ));
            }
            Ok(key)
        },
        |key| key.key_id,
    )
}

/// One-time prekeys: between `min` and 100 of them, with distinct ids.
pub fn one_time_prekeys(
    field: &str,
    uploads: Vec<pb::OneTimePreKeyUpload>,
    min: usize,
) -> Result<Vec<NewOneTimePreKey>> {
    distinct(
        field,
        uploads,
        min,
        |at, upload| {
            Ok(NewOneTimePreKey {
                key_id: key_id(&format!("{at}.key_id"), upload.key_id, PreKeyId::new)?,
                public: public_key(&format!("{at}.public_key"), &upload.public_key)?,
                encrypted_private: encrypted_blob(
                    &format!("{at}.encrypted_private_key"),
                    upload.encrypted_private_key,
                )?,
            })
        },
        |key| key.key_id,
    )
}

/// Between `min` and 100 keys, each parsed by `parse` (given its field path), no two with the
/// same `id`.
fn distinct<U, K, I>(
    field: &str,
    uploads: Vec<U>,
    min: usize,
    parse: impl Fn(&str, U) -> Result<K>,
    id: impl Fn(&K) -> I,
) -> Result<Vec<K>>
where
    I: std::hash::Hash + Eq + std::fmt::Display,
{
    if uploads.len() < min || uploads.len() > MAX_ONE_TIME_PREKEYS {
        return Err(invalid(
            field,
            format!(
                "must hold {min} to {MAX_ONE_TIME_PREKEYS} keys, got {}",
                uploads.len()
            ),
        ));
    }
    let mut first_index = std::collections::HashMap::with_capacity(uploads.len());
    uploads
        .into_iter()
        .enumerate()
        .map(|(i, upload)| {
            let at = format!("{field}[{i}]");
            let key = parse(&at, upload)?;
            let key_id = id(&key);
            if let Some(first) = first_index.get(&key_id) {
                return Err(invalid(
                    format!("{at}.key_id"),
                    format!("duplicates {field}[{first}].key_id ({key_id})"),
                ));
            }
            first_index.insert(key_id, i);
            Ok(key)
        })
        .collect()
}

pub fn session_key(field: &str, key: Option<pb::SessionKey>) -> Result<SessionKey> {
    let key = key.ok_or_else(|| invalid(field, "is required"))?;
    Ok(SessionKey {
        device_id: device_id(&format!("{field}.device_id"), &key.device_id)?,
        peer_user_id: user_id(&format!("{field}.peer_user_id"), &key.peer_user_id)?,
        peer_device_id: device_id(&format!("{field}.peer_device_id"), &key.peer_device_id)?,
    })
}

pub fn session_state(field: &str, state: Vec<u8>) -> Result<Vec<u8>> {
    if state.is_empty() || state.len() > MAX_SESSION_STATE {
        return Err(invalid(
            field,
            format!(
                "must be 1 to {MAX_SESSION_STATE} bytes, got {}",
                state.len()
            ),
        ));
    }
    Ok(state)
}

pub fn page_size(field: &str, size: u32) -> Result<u32> {
    match size {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1..=MAX_PAGE_SIZE => Ok(size),
        _ => Err(invalid(field, format!("must be at most {MAX_PAGE_SIZE}"))),
    }
}

/// A page token is the hex of "peer user id / peer device id" of the last session listed.
pub fn page_token(field: &str, token: &str) -> Result<Option<(Uuid, DeviceId)>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid(field, "is not a token this server returned");
    let text = String::from_utf8(hex::decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let (user, device) = text.split_once('/').ok_or_else(bad)?;
    Ok(Some((
        Uuid::parse_str(user).map_err(|_| bad())?,
        device_id(field, device).map_err(|_| bad())?,
    )))
}

/// The token that continues a listing after `key`.
pub fn next_page_token(key: &SessionKey) -> String {
    hex::encode(format!("{}/{}", key.peer_user_id, key.peer_device_id))
}

/// Characters of a recovery code once dashes and spaces are removed: base32, 160 bits.
pub const RECOVERY_CODE_LEN: usize = 32;

/// The SHA-256 (hex) of a recovery code, normalized (dashes and spaces removed, upper case);
/// the code must be 32 base32 characters.
pub fn recovery_code_hash(field: &str, code: &str) -> Result<String> {
    let normalized: String = code
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if normalized.len() != RECOVERY_CODE_LEN
        || !normalized
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    {
        return Err(invalid(
            field,
            format!("must be {RECOVERY_CODE_LEN} base32 characters (A-Z, 2-7)"),
        ));
    }
    Ok(hex::encode(sha2::Sha256::digest(normalized.as_bytes())))
}

pub fn target(field: &str, target: Option<pb::Target>) -> Result<BundleTarget> {
    let target = target.ok_or_else(|| invalid(field, "is required"))?;
    Ok(BundleTarget {
        user_id: user_id(&format!("{field}.user_id"), &target.user_id)?,
        device_id: target
            .device_id
            .map(|d| device_id(&format!("{field}.device_id"), &d))
            .transpose()?,
    })
}

/// 1 to [`MAX_TARGETS`] distinct targets.
pub fn targets(field: &str, targets: Vec<pb::Target>) -> Result<Vec<BundleTarget>> {
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(invalid(
            field,
            format!(
                "must hold 1 to {MAX_TARGETS} targets, got {}",
                targets.len()
            ),
        ));
    }
    let mut first_index = std::collections::HashMap::with_capacity(targets.len());
    targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("{field}[{i}]");
            let parsed = target(&at, Some(t))?;
            if let Some(first) = first_index.insert(parsed.clone(), i) {
                return Err(invalid(at, format!("duplicates {field}[{first}]")));
            }
            Ok(parsed)
        })
        .collect()
}

/// A fingerprint of `checks::identity_fingerprint`: exactly 4 bytes.
pub fn fingerprint(field: &str, bytes: &[u8]) -> Result<[u8; 4]> {
    bytes
        .try_into()
        .map_err(|_| invalid(field, format!("must be 4 bytes, got {}", bytes.len())))
}

/// A SHA-256 digest: exactly 32 bytes.
pub fn digest(field: &str, bytes: &[u8]) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| invalid(field, format!("must be 32 bytes, got {}", bytes.len())))
}

/// An identity key a sender holds, by fingerprint: of one device, or any of the user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityCheck {
    pub user_id: Uuid,
    pub device_id: Option<DeviceId>,
    pub fingerprint: [u8; 4],
}

/// 1 to [`MAX_IDENTITY_CHECKS`] checks.
pub fn identity_checks(
    field: &str,
    checks: Vec<pb::IdentityKeyCheck>,
) -> Result<Vec<IdentityCheck>> {
    if checks.is_empty() || checks.len() > MAX_IDENTITY_CHECKS {
        return Err(invalid(
            field,
            format!(
                "must hold 1 to {MAX_IDENTITY_CHECKS} checks, got {}",
                checks.len()
            ),
        ));
    }
    checks
        .into_iter()
        .enumerate()
        .map(|(i, check)| {
            let at = format!("{field}[{i}]");
            Ok(IdentityCheck {
                user_id: user_id(&format!("{at}.user_id"), &check.user_id)?,
                device_id: check
                    .device_id
                    .map(|d| device_id(&format!("{at}.device_id"), &d))
                    .transpose()?,
                fingerprint: fingerprint(&format!("{at}.fingerprint"), &check.fingerprint)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn otk(id: u32) -> pb::OneTimePreKeyUpload {
        let mut public_key = vec![0x05];
        public_key.extend([id as u8; 32]);
        pb::OneTimePreKeyUpload {
            key_id: id,
            public_key,
            encrypted_private_key: vec![1; 60],
        }
    }

    #[test]
    fn names_the_offending_field() {
        let err = one_time_prekeys("keys", vec![otk(1), otk(2), otk(1)], 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "keys[2].key_id: duplicates keys[0].key_id (1)"
        );

        let mut short = otk(3);
        short.public_key.pop();
        let err = one_time_prekeys("keys", vec![otk(1), short], 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "keys[1].public_key: must be 33 bytes, got 32"
        );

        let err = one_time_prekeys("keys", (0..101).map(otk).collect(), 1).unwrap_err();
        assert_eq!(err.field, "keys");
        assert!(one_time_prekeys("keys", vec![], 1).is_err());
        assert!(one_time_prekeys("keys", vec![], 0).unwrap().is_empty());
        assert!(one_time_prekeys("keys", vec![otk(MAX_KEY_ID + 1)], 1).is_err());
    }

    #[test]
    fn checks_ids_and_names() {
        assert!(device_id("d", "phone-1.a_b:c").is_ok());
        assert!(device_id("d", "").is_err());
        assert!(device_id("d", "has space").is_err());
        assert!(device_id("d", &"x".repeat(65)).is_err());
        assert!(registration_id("r", 0).is_err());
        assert_eq!(registration_id("r", 16383).unwrap(), 16383);
        assert!(registration_id("r", 16384).is_err());
        assert!(encrypted_blob("b", vec![]).is_err());
        assert!(encrypted_blob("b", vec![0; 513]).is_err());
    }
}
