//! The devices a load run works on. Device `n` belongs to a user and has an identity key both
//! derived from `n`, so separate runs (a seed, then a fetch run) agree on who is who without
//! sharing any state, and a rotation can be signed by the right identity key.
//!
//! Registrations carry what a real device sends: a signed prekey signed with XEdDSA by the
//! identity key (every fetched bundle is verified against it), 100 one-time prekeys, sealed
//! private parts of realistic size. One-time public keys are random 32-byte values, which are as
//! valid to X25519 as any generated key and cost nothing to make, so seeding 10 M of them takes
//! no CPU from the server under test.

use keyserver_client::keys::{KeyPair, random_bytes};
use keyserver_proto::pb;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// One-time prekeys a seeded device starts with (a Signal client's batch).
pub const ONE_TIME_PREKEYS: u32 = 100;
/// Size of a sealed private key as `keyctl` stores one (AES-256-GCM of 32 bytes, with nonce).
const SEALED_LEN: usize = 60;

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

/// Everything device `n` registers: identity, signed prekey 1, one-time prekeys 1..=100.
pub fn registration(n: u32) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        device_id: device_id(n),
        registration_id: 1 + n % 16_383,
        identity_key: identity(n).public().serialize().to_vec(),
        encrypted_identity_private_key: random_bytes::<SEALED_LEN>().to_vec(),
        signed_prekey: Some(signed_prekey(n, 1)),
        one_time_prekeys: (1..=ONE_TIME_PREKEYS).map(one_time_prekey).collect(),
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
