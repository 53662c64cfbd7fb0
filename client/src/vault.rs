//! Private keys at rest: AES-256-GCM under a key derived with PBKDF2-HMAC-SHA256 from the
//! user's passphrase and a per-user random salt.
//!
//! A sealed blob is `0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16)`. The associated data names what
//! the blob holds (for example `identity:phone-1`), so a blob cannot be swapped for another.
//! The same blobs go to the server, which cannot open them.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::keys::random_bytes;

/// PBKDF2 iterations for new vaults (OWASP's figure for PBKDF2-HMAC-SHA256).
pub const DEFAULT_ITERATIONS: u32 = 600_000;
/// Fewest iterations a vault may be created with.
pub const MIN_ITERATIONS: u32 = 100_000;
/// Length of the per-user salt (the schema's `master_key_salt`).
pub const SALT_LEN: usize = 32;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// Why a blob could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    #[error("the sealed key is malformed")]
    Malformed,
    #[error("wrong passphrase, or the sealed key was altered")]
    Unauthentic,
}

/// The key that seals a user's private keys.
pub struct VaultKey {
    cipher: Aes256Gcm,
}

impl VaultKey {
    /// Derives the key from a passphrase.
    pub fn derive(passphrase: &[u8], salt: &[u8; SALT_LEN], iterations: u32) -> Self {
        let key = derive_key(passphrase, salt, iterations);
        Self {
            cipher: Aes256Gcm::new((&*key).into()),
        }
    }

    /// Seals `plaintext` under a fresh random nonce.
    pub fn seal(&self, plaintext: &[u8], label: &str) -> Vec<u8> {
        self.seal_with_nonce(plaintext, label, random_bytes())
    }

    fn seal_with_nonce(&self, plaintext: &[u8], label: &str, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: label.as_bytes(),
                },
            )
            .expect("AES-GCM sealing of a short message cannot fail");
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        blob.push(VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        blob
    }

    /// Opens a blob sealed with the same key and label.
    pub fn open(&self, blob: &[u8], label: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if blob.len() < 1 + NONCE_LEN + 16 || blob[0] != VERSION {
            return Err(VaultError::Malformed);
        }
        let nonce: [u8; NONCE_LEN] = blob[1..1 + NONCE_LEN].try_into().expect("length checked");
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &blob[1 + NONCE_LEN..],
                    aad: label.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Unauthentic)
    }

    /// Opens a blob that holds a 32-byte private key.
    pub fn open_key(&self, blob: &[u8], label: &str) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let plain = self.open(blob, label)?;
        let key: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Malformed)?;
        Ok(Zeroizing::new(key))
    }
}

fn derive_key(passphrase: &[u8], salt: &[u8], iterations: u32) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(passphrase, salt, iterations, &mut *key);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc7914_vector() {
        // RFC 7914 §11: PBKDF2-HMAC-SHA256("passwd", "salt", 1); the first 32 bytes of its dkLen 64.
        assert_eq!(
            hex::encode(*derive_key(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn aes_gcm_matches_mcgrew_viega_test_case_14() {
        // GCM spec test case 14: AES-256, zero key, zero IV, one zero block, no AAD.
        let vault = VaultKey {
            cipher: Aes256Gcm::new((&[0u8; 32]).into()),
        };
        let blob = vault.seal_with_nonce(&[0u8; 16], "", [0u8; 12]);
        assert_eq!(
            hex::encode(&blob[13..]),
            "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
        );
    }

    #[test]
    fn seals_and_opens_only_with_the_same_passphrase_and_label() {
        let salt = [9u8; SALT_LEN];
        let vault = VaultKey::derive(b"correct horse", &salt, 1000);
        let blob = vault.seal(&[42u8; 32], "identity:phone");
        assert_eq!(blob.len(), 1 + 12 + 32 + 16);
        assert_eq!(
            *vault.open_key(&blob, "identity:phone").unwrap(),
            [42u8; 32]
        );
        assert_eq!(
            vault.open(&blob, "signed:1").unwrap_err(),
            VaultError::Unauthentic
        );
        let wrong = VaultKey::derive(b"wrong horse", &salt, 1000);
        assert_eq!(
            wrong.open(&blob, "identity:phone").unwrap_err(),
            VaultError::Unauthentic
        );
        let mut tampered = blob.clone();
        tampered[20] ^= 1;
        assert!(vault.open(&tampered, "identity:phone").is_err());
        assert_eq!(
            vault.open(&blob[..20], "x").unwrap_err(),
            VaultError::Malformed
        );
    }
}
