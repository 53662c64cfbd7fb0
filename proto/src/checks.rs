//! Digests both sides compute the same way to compare keys without sending them, as Signal's
//! `/v2/keys/check` and identity-check batch do.
//!
//! - [`published_keys_digest`]: a device's identity key, active signed prekey and active
//!   last-resort Kyber prekey, so a device can learn whether the server holds exactly those.
//! - [`identity_fingerprint`]: 4 bytes naming an identity key a sender holds, so the server
//!   can answer only with the keys that changed.

use sha2::{Digest, Sha256};

use crate::wire::{KyberPublicKey, PublicKey};

/// SHA-256 of the identity key (33 bytes), the signed prekey's id (u64 big-endian) and key (33
/// bytes), the last-resort Kyber prekey's id (u64 big-endian) and key (1569 bytes), each key
/// in its serialized form.
pub fn published_keys_digest(
    identity_key: &PublicKey,
    signed_prekey: (u32, &PublicKey),
    kyber_last_resort: (u32, &KyberPublicKey),
) -> [u8; 32] {
    Sha256::new()
        .chain_update(identity_key.serialize())
        .chain_update(u64::from(signed_prekey.0).to_be_bytes())
        .chain_update(signed_prekey.1.serialize())
        .chain_update(u64::from(kyber_last_resort.0).to_be_bytes())
        .chain_update(kyber_last_resort.1.serialize())
        .finalize()
        .into()
}

/// The first 4 bytes of SHA-256 of the serialized identity key.
pub fn identity_fingerprint(identity_key: &PublicKey) -> [u8; 4] {
    let digest = Sha256::digest(identity_key.serialize());
    [digest[0], digest[1], digest[2], digest[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed independently with Python's hashlib over the same bytes.
    #[test]
    fn known_answers() {
        let identity = PublicKey::from_raw(std::array::from_fn(|i| i as u8));
        let signed = PublicKey::from_raw([0x11; 32]);
        let kyber = KyberPublicKey::from_raw(std::array::from_fn(|i| (i % 251) as u8));
        assert_eq!(
            hex::encode(published_keys_digest(
                &identity,
                (7, &signed),
                (0xAB_CDEF, &kyber)
            )),
            "124323b5487475b6d853c85007afd1e8ca0507e83a853b1913140d4bfb8ae1b6"
        );
        assert_eq!(hex::encode(identity_fingerprint(&identity)), "52c056bb");
    }

    #[test]
    fn every_part_counts() {
        let identity = PublicKey::from_raw([1; 32]);
        let signed = PublicKey::from_raw([2; 32]);
        let kyber = KyberPublicKey::from_raw([3; 1568]);
        let base = published_keys_digest(&identity, (1, &signed), (2, &kyber));
        assert_ne!(
            base,
            published_keys_digest(&identity, (2, &signed), (2, &kyber))
        );
        assert_ne!(
            base,
            published_keys_digest(&identity, (1, &signed), (1, &kyber))
        );
        assert_ne!(
            base,
            published_keys_digest(&signed, (1, &identity), (2, &kyber))
        );
        let other = KyberPublicKey::from_raw([4; 1568]);
        assert_ne!(
            base,
            published_keys_digest(&identity, (1, &signed), (2, &other))
        );
    }
}
