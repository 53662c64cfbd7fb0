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

    // Signatures made by an independent Signal implementation (python-axolotl-curve25519, the C
    // XEdDSA of libsignal-protocol-c) from fixed private key, message and randomness; generated
    // once by docs/vectors/xeddsa_crosscheck.py. (private, message, random, signature)
    const CROSS_CHECKED: [(&str, &str, &str, &str); 6] = [
        (
            "38ac7312f5b05f78623ae9f105b7b0b7845278e76786d3d0765c3769bf9bb264",
            "0502f8782f4c3f2ddbcae510af0acb158105dd1ce63b32efca0be5c0eccff7c6b8",
            "f1f9c36199336c0df57f3c80fe75dba5e1351d22ad8d5aff99713fd85003d2c69bff74c99a2fb0d882aca927ab76977804be9330af550bdb5e3b2557ad11ec74",
            "8ea4c9497fa77d9e6abac53479556998aa4b8ea5626c2cb82145188c9fae934efd677a4ac6d87c8ba43e6e80c8af4f263fae59d50edbaf377917e90113f4160d",
        ),
        (
            "18e2007a4b1e1cc61a8adcc6ee13e8703490c638ba04babc6b7c3059c190376f",
            "05f2c8775fa38639b1fbe7a49998916e789ac02f2b070ead7f343feb18477b7024",
            "fa92193eb5c29369af7ed60ce9e0222a056ffe9b1bab1a26f2127d71727e72c6ec294fdaec4e667dc9d2dca73c1c5da2a0bc5686d0312abb01030f9a2d2c074b",
            "6b3de61089fc7fdeb16bfba255dbc1badd73e505827f218ec8b59a6dba3e112b125f9692efd514c58a2773f95bb98faab49a08621039dffb7e0c608c99aaa90f",
        ),
        (
            "b0a0d422109f76beaa021587b4ff79d36a8aeeed78391f405cca5fe7aeb06a79",
            "0542e42c00acdfaa82b76535a755ec7c196a88dd5c730b482fed4d4885c2f0455e",
            "8296b3b0a9f81236cba8f44893ebc6b969b3bc2a03edc12f60763f9b608add197e8e0021eda63aba1ac75dad51df8a9772b0da16f69b928a81a67ee9e910097d",
            "65a90d75cb16df12fcdbc04a966bc53543212bff686b62dcaf29dbf7cc6cf5fab63cd39924977f4076c3afdd0422ff4755e88e71011e510fce4f8ee62de81900",
        ),
        (
            "e03c174f29adb145aaae13f723006468751130c968cdde2e574e8fabd23d377b",
            "0507a321ac15080b7d299e894729fcd6e104be31eda18c5bb5b7e644ed4b40f395",
            "dd6203196e27535fb6ad4b71bede775f7228bf898b67e472eaae234bbf545db5ee9cedec146538e1cc5c234d11880d4e6341bbe929bfc4044d4826932c9888d4",
            "c20bdcc5c42bbff49f2e5293669533a80a285a9e4140b1bc1f367f3a9bd13ea788ba425c11fee53b4164dfeea32274a58cd164822671d68a43b9a759e1a3910b",
        ),
        (
            "88c8c8c9ef4ed829fcb30f9695477000ef21ec9e2c9751e0b0b74237173b0d72",
            "0533a4ba3fe1db3f3f7648493a75fb6ebf302d02d00dcd7da78043ae8d0ef5dec8",
            "7632d138b05532cb62afe12eff856ccbbacb39bfb2621e770669da032bf0960ad895f5f751153495a9d94f09035d93f9cae083ec755dc4d12b23541887e90621",
            "f7d3290b71f0e36833ace4115c21012ad066ced0fa5479922e90f261f9cee4360d036b42d779f5cad871d76c3c377f87fe4680d5481762865f14c3f8feeb008e",
        ),
        (
            "3840f6387386284c86e71adb687a86b26d0345634d8e8a2bd642810832549041",
            "05e84e7e21bcaa5990bd5f0de665c29f2502c6aa2de89b4c59188f2db28f9f7aea",
            "45e91fb0ac0b02c8f3749d1b5a86db330c3ee9ec65b96ffc2fa413ee85f4349a8d5dc7778dde7053a4587d73f9e23439885c86cda078a0d6152d23a69aa6230e",
            "9ec1a26bd6d8c6005902a0d6d5bcd0b1de7429325393ee614403496351309fdd89f8a5048ae3f93b0a837fb412767c4d793ebea35574a791156112e43e9a8b06",
        ),
    ];

    #[test]
    fn signs_byte_for_byte_like_libsignal() {
        for (private, message, random, expected) in CROSS_CHECKED {
            let private: [u8; 32] = hex::decode(private).unwrap().try_into().unwrap();
            let message = hex::decode(message).unwrap();
            let random: [u8; 64] = hex::decode(random).unwrap().try_into().unwrap();
            let signature = sign(&private, &message, &random);
            assert_eq!(hex::encode(signature), expected);
            let public = x25519_public(&private);
            assert!(verify(&public, &message, &signature));
        }
    }

    /// X25519 public key of a private key, computed independently of the signer's Edwards path.
    fn x25519_public(private: &[u8; 32]) -> PublicKey {
        PublicKey::from_raw(MontgomeryPoint::mul_base_clamped(*private).to_bytes())
    }
}
