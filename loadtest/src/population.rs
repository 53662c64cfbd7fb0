//! The devices a load run works on. Device `n` belongs to a user and has an identity key both
//! derived from `n`, so separate runs (a seed, then a fetch run) agree on who is who without
//! sharing any state, and a rotation can be signed by the right identity key.
//!
//! Registrations carry what a real PQXDH device sends: a signed prekey and a last-resort Kyber
//! prekey signed with XEdDSA by the identity key (every fetched bundle is verified against it),
//! 100 one-time prekeys and 100 signed one-time Kyber prekeys, sealed private parts of realistic
//! size. Public keys are random bytes of the right length: the server checks lengths, type bytes
//! and signatures, not key structure, so they load it exactly as generated keys would and cost
//! no Kyber key generation. `--x3dh` seeds devices without Kyber keys, as the nchat design's
//! clients are.

use keyserver_client::keys::{KeyPair, random_bytes};
use keyserver_proto::pb;
use keyserver_proto::wire::{KYBER1024_PUBLIC_KEY_LEN, KYBER1024_TYPE};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// One-time prekeys a seeded device starts with (a Signal client's batch).
pub const ONE_TIME_PREKEYS: u32 = 100;
/// One-time Kyber prekeys a seeded PQXDH device starts with (a Signal client's batch).
pub const KYBER_PREKEYS: u32 = 100;
/// The id of a seeded device's last-resort Kyber prekey (one-time ones count from 1).
pub const LAST_RESORT_ID: u32 = 0x7F_0000;
/// Size of a sealed private key as `keyctl` stores one (AES-256-GCM of 32 bytes, with nonce).
const SEALED_LEN: usize = 60;
/// Size of a sealed Kyber1024 secret key as `keyctl` stores one.
const SEALED_KYBER_LEN: usize = 1 + 12 + 3168 + 16;

/// The user that owns device `n`.
pub fn user(n: u32) -> Uuid {
    Uuid::from_u128(0x6c6f_6164_7465_4000_8000_0000_0000_0000 | u128::from(n))
}

pub fn device_id(n: u32) -> String {
    format!("load-{n}")
}

/// A key pair derived from `n` and a label.
fn derived(label: &str, n: u32) -> KeyPair {
    let mut digest = Sha256::new();
    digest.update(b"keyserver loadtest ");
    digest.update(label.as_bytes());
    digest.update(n.to_be_bytes());
    KeyPair::from_private(digest.finalize().into())
}

pub fn identity(n: u32) -> KeyPair {
    derived("identity", n)
}

/// A signed prekey upload for device `n`, signed by its identity key.
pub fn signed_prekey(n: u32, key_id: u32) -> pb::SignedPreKeyUpload {
    let public = derived(&format!("signed prekey {key_id}"), n)
        .public()
        .serialize();
    pb::SignedPreKeyUpload {
        key_id,
        public_key: public.to_vec(),
        signature: identity(n).sign(&public).to_vec(),
        encrypted_private_key: random_bytes::<SEALED_LEN>().to_vec(),
    }
}

/// A one-time prekey upload with a random public key.
pub fn one_time_prekey(key_id: u32) -> pb::OneTimePreKeyUpload {
    let mut public = vec![0x05];
    public.extend_from_slice(&random_bytes::<32>());
    pb::OneTimePreKeyUpload {
        key_id,
        public_key: public,
        encrypted_private_key: random_bytes::<SEALED_LEN>().to_vec(),
    }
}

/// A Kyber prekey upload of device `n` with a random public key, signed by its identity key.
pub fn kyber_prekey(n: u32, key_id: u32) -> pb::KyberPreKeyUpload {
    let mut public = Vec::with_capacity(1 + KYBER1024_PUBLIC_KEY_LEN);
    public.push(KYBER1024_TYPE);
    public.extend_from_slice(&random_bytes::<KYBER1024_PUBLIC_KEY_LEN>());
    pb::KyberPreKeyUpload {
        key_id,
        signature: identity(n).sign(&public).to_vec(),
        public_key: public,
        encrypted_private_key: random_bytes::<SEALED_KYBER_LEN>().to_vec(),
    }
}

/// Everything device `n` registers: identity, signed prekey 1, one-time prekeys 1..=100 and,
/// unless `x3dh`, a last-resort Kyber prekey and `kyber` one-time Kyber prekeys.
pub fn registration(n: u32, x3dh: bool, kyber: u32) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        device_id: device_id(n),
        registration_id: 1 + n % 16_383,
        identity_key: identity(n).public().serialize().to_vec(),
        encrypted_identity_private_key: random_bytes::<SEALED_LEN>().to_vec(),
        signed_prekey: Some(signed_prekey(n, 1)),
        one_time_prekeys: (1..=ONE_TIME_PREKEYS).map(one_time_prekey).collect(),
        kyber_last_resort_prekey: (!x3dh).then(|| kyber_prekey(n, LAST_RESORT_ID)),
        kyber_one_time_prekeys: if x3dh {
            Vec::new()
        } else {
            (1..=kyber).map(|id| kyber_prekey(n, id)).collect()
        },
        replace_one_time_prekeys: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_derived_the_same_way_every_time() {
        assert_eq!(user(7), user(7));
        assert_ne!(user(7), user(8));
        assert_eq!(identity(7).public(), identity(7).public());
        assert_ne!(identity(7).public(), identity(8).public());
        let signed = signed_prekey(7, 1);
        assert_eq!(signed.public_key, signed_prekey(7, 1).public_key);
    }
}
