//! Safety numbers: libsignal's numeric fingerprint, computed the same way by the server and by
//! every client.
//!
//! Per party, `d = SHA-512(0x00 0x00 ‖ key ‖ id ‖ key)` and 5199 more rounds of
//! `d = SHA-512(d ‖ key)`; the first 30 bytes of `d` as six 5-byte big-endian numbers, each
//! mod 100000 and zero-padded, give 30 digits. The 60-digit safety number joins both parties'
//! 30 digits, the smaller first, so both sides see the same number.
//!
//! With several devices per user, a party's `key` is every device identity key of the user,
//! serialized (33 bytes each) and concatenated in ascending byte order; for a user with one
//! device that is exactly libsignal's single-key fingerprint. Its stable identifier `id` is the
//! user id's 16 bytes. Any identity key change, a device added or removed, changes the number.

use sha2::{Digest, Sha512};

use crate::wire::PublicKey;

/// Hash rounds per party, as libsignal's displayable fingerprint uses.
pub const ITERATIONS: usize = 5200;
/// Digits in a safety number.
pub const DIGITS: usize = 60;

/// One party's 30 digits from its key input and stable identifier.
pub fn party_digits(key: &[u8], id: &[u8]) -> String {
    let mut digest: [u8; 64] = Sha512::new()
        .chain_update([0u8, 0u8])
        .chain_update(key)
        .chain_update(id)
        .chain_update(key)
        .finalize()
        .into();
    for _ in 1..ITERATIONS {
        digest = Sha512::new()
            .chain_update(digest)
            .chain_update(key)
            .finalize()
            .into();
    }
    digest[..30]
        .chunks(5)
        .map(|chunk| {
            let value = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", value % 100_000)
        })
        .collect()
}

/// The 60-digit safety number of two parties, the same whichever side computes it.
pub fn safety_number(a_digits: &str, b_digits: &str) -> String {
    if a_digits <= b_digits {
        format!("{a_digits}{b_digits}")
    } else {
        format!("{b_digits}{a_digits}")
    }
}

/// A user's key input: every device identity key, serialized, in ascending byte order.
pub fn user_key_input(keys: impl IntoIterator<Item = PublicKey>) -> Vec<u8> {
    let mut serialized: Vec<[u8; 33]> = keys.into_iter().map(|k| k.serialize()).collect();
    serialized.sort_unstable();
    serialized.concat()
}

/// A user's 30 digits from the identity keys of all their devices and their user id.
pub fn user_digits(user_id: &[u8; 16], keys: impl IntoIterator<Item = PublicKey>) -> String {
    party_digits(&user_key_input(keys), user_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    // libsignal's displayable-fingerprint test vector.
    const ALICE_IDENTITY: &str =
        "0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868";
    const BOB_IDENTITY: &str = "05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b";
    const EXPECTED: &str = "300354477692869396892869876765458257569162576843440918079131";

    #[test]
    fn matches_libsignals_vector_from_both_sides() {
        let alice = party_digits(&hex::decode(ALICE_IDENTITY).unwrap(), b"+14152222222");
        let bob = party_digits(&hex::decode(BOB_IDENTITY).unwrap(), b"+14153333333");
        assert_eq!(safety_number(&alice, &bob), EXPECTED);
        assert_eq!(safety_number(&bob, &alice), EXPECTED);
        assert_eq!(EXPECTED.len(), DIGITS);
    }

    #[test]
    fn a_single_device_user_is_libsignals_single_key_fingerprint() {
        let key = PublicKey::from_serialized(&hex::decode(ALICE_IDENTITY).unwrap()).unwrap();
        let id = [7u8; 16];
        assert_eq!(
            user_digits(&id, [key]),
            party_digits(&hex::decode(ALICE_IDENTITY).unwrap(), &id)
        );
    }

    #[test]
    fn device_order_does_not_matter_and_any_key_change_does() {
        let a = PublicKey::from_raw([1; 32]);
        let b = PublicKey::from_raw([2; 32]);
        let c = PublicKey::from_raw([3; 32]);
        let id = [9u8; 16];
        assert_eq!(user_digits(&id, [a, b]), user_digits(&id, [b, a]));
        assert_ne!(user_digits(&id, [a, b]), user_digits(&id, [a, c]));
        assert_ne!(user_digits(&id, [a, b]), user_digits(&id, [a]));
        assert_ne!(user_digits(&id, [a]), user_digits(&[8u8; 16], [a]));
    }
}
