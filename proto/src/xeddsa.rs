//! XEdDSA over Curve25519, as libsignal signs prekeys with an identity key.
//!
//! An identity key is an X25519 (Montgomery) key, yet it signs. XEdDSA maps the Montgomery
//! u-coordinate to an Edwards point, carrying the one bit the map loses (the sign of x) in the
//! top bit of the signature's last byte. What remains is an ordinary Ed25519 signature, so
//! verification is ed25519-dalek's `verify_strict` against the mapped key.

use curve25519_dalek::{EdwardsPoint, MontgomeryPoint, Scalar};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha512};

use crate::wire::PublicKey;

/// Checks `signature` over `message` by the Montgomery public key `signer`.
///
/// Returns false for any signature libsignal would refuse, for a key that maps to no Edwards
/// point, and for a non-canonical `s` (which ed25519-dalek refuses and real clients never make).
pub fn verify(signer: &PublicKey, message: &[u8], signature: &[u8; 64]) -> bool {
    let sign_bit = (signature[63] & 0x80) >> 7;
    let mut sig = *signature;
    sig[63] &= 0x7F;
    if sig[63] & 0xE0 != 0 {
        return false;
    }
    let Some(edwards) = MontgomeryPoint(*signer.as_raw()).to_edwards(sign_bit) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&edwards.compress().to_bytes()) else {
        return false;
    };
    key.verify_strict(message, &Signature::from_bytes(&sig))
        .is_ok()
}

/// Signs `message` with the X25519 private key `private` (clamped here, as X25519 would), using
/// the 64 bytes of `random` in the nonce. Callers pass fresh randomness; known-answer tests pass
/// fixed bytes.
pub fn sign(private: &[u8; 32], message: &[u8], random: &[u8; 64]) -> [u8; 64] {
    let mut a_bytes = *private;
    a_bytes[0] &= 248;
    a_bytes[31] &= 127;
    a_bytes[31] |= 64;
    let a = Scalar::from_bytes_mod_order(a_bytes);
    let public = EdwardsPoint::mul_base(&a).compress().to_bytes();
    let sign_bit = public[31] & 0x80;

    let mut prefix = [0xFFu8; 32];
    prefix[0] = 0xFE;
    let nonce: [u8; 64] = Sha512::new()
        .chain_update(prefix)
        .chain_update(a_bytes)
        .chain_update(message)
        .chain_update(random)
        .finalize()
        .into();
    let r = Scalar::from_bytes_mod_order_wide(&nonce);
    let big_r = EdwardsPoint::mul_base(&r).compress().to_bytes();
    let hram: [u8; 64] = Sha512::new()
        .chain_update(big_r)
        .chain_update(public)
        .chain_update(message)
        .finalize()
        .into();
    let h = Scalar::from_bytes_mod_order_wide(&hram);
    let s = h * a + r;

    let mut signature = [0u8; 64];
    signature[..32].copy_from_slice(&big_r);
    signature[32..].copy_from_slice(s.as_bytes());
    signature[63] &= 0x7F;
    signature[63] |= sign_bit;
    signature
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hex_str: &str) -> PublicKey {
        PublicKey::from_serialized(&hex::decode(hex_str).unwrap()).unwrap()
    }

    fn sig(hex_str: &str) -> [u8; 64] {
        hex::decode(hex_str).unwrap().try_into().unwrap()
    }

    // libsignal's own signature vector (libsignal-protocol-c test_curve25519_signature):
    // Alice's identity key signs her serialized ephemeral key.
    const LIBSIGNAL_IDENTITY: &str =
        "05ab7e717d4a163b7d9a1d8071dfe9dcf8cdcd1cea3339b6356be84d887e322c64";
    const LIBSIGNAL_MESSAGE: &str =
        "05edce9d9c415ca78cb7252e72c2c4a554d3eb29485a0e1d503118d1a82d99fb4a";
    const LIBSIGNAL_SIGNATURE: &str = "5de88ca9a89b4a115da79109c67c9c7464a3e4180274f1cb8c63c2984e286dfbede82deb9dcd9fae0bfbb821569b3d9001bd8130cd11d486cef047bd60b86e88";

    #[test]
    fn verifies_libsignals_vector() {
        let message = hex::decode(LIBSIGNAL_MESSAGE).unwrap();
        assert!(verify(
            &key(LIBSIGNAL_IDENTITY),
            &message,
            &sig(LIBSIGNAL_SIGNATURE)
        ));
    }

    #[test]
    fn refuses_every_single_bit_flip_of_libsignals_vector() {
        let message = hex::decode(LIBSIGNAL_MESSAGE).unwrap();
        let good = sig(LIBSIGNAL_SIGNATURE);
        for byte in 0..64 {
            for bit in 0..8 {
                let mut bad = good;
                bad[byte] ^= 1 << bit;
                assert!(
                    !verify(&key(LIBSIGNAL_IDENTITY), &message, &bad),
                    "flip of byte {byte} bit {bit} verified"
                );
            }
        }
        let mut other = message.clone();
        other[5] ^= 1;
        assert!(!verify(&key(LIBSIGNAL_IDENTITY), &other, &good));
    }

    #[test]
    fn signatures_verify_for_both_sign_bits() {
        // About half of all keys have an Edwards sign bit of 1; both kinds must round-trip.
        let mut seen = [false; 2];
        for seed in 0u8..32 {
            let private = [seed.wrapping_mul(37).wrapping_add(1); 32];
            let public = x25519_public(&private);
            let signature = sign(&private, b"message", &[seed; 64]);
            seen[usize::from(signature[63] >> 7)] = true;
            assert!(verify(&public, b"message", &signature), "seed {seed}");
            assert!(!verify(&public, b"messagf", &signature), "seed {seed}");
        }
        assert_eq!(seen, [true, true], "both sign bits must be exercised");
    }

    /// X25519 public key of a private key, computed independently of the signer's Edwards path.
    fn x25519_public(private: &[u8; 32]) -> PublicKey {
        PublicKey::from_raw(MontgomeryPoint::mul_base_clamped(*private).to_bytes())
    }
}
