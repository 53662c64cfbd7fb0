//! Key pairs as a device holds them: Curve25519 (X25519 for agreement, XEdDSA for signatures)
//! and Kyber1024 (the KEM of PQXDH, by libcrux as libsignal has it).

use keyserver_proto::wire::{KYBER1024_PUBLIC_KEY_LEN, KyberPublicKey, PublicKey};
use keyserver_proto::xeddsa;
use libcrux_ml_kem::kyber1024;
use libcrux_ml_kem::mlkem1024::{MlKem1024Ciphertext, MlKem1024PrivateKey, MlKem1024PublicKey};
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

/// Fills a buffer from the operating system's randomness.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("the operating system has no randomness");
    out
}

/// A Curve25519 key pair: identity key, signed prekey, one-time prekey or ephemeral key.
#[derive(Clone)]
pub struct KeyPair {
    private: StaticSecret,
    public: PublicKey,
}

impl KeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        Self::from_private(random_bytes())
    }

    /// The key pair of 32 private bytes (clamped by X25519 when used).
    pub fn from_private(private: [u8; 32]) -> Self {
        let private = StaticSecret::from(private);
        let public = PublicKey::from_raw(x25519_dalek::PublicKey::from(&private).to_bytes());
        Self { private, public }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The private bytes, to be sealed in the vault; wiped when dropped.
    pub fn private_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.private.to_bytes())
    }

    /// XEdDSA signature over `message`, with fresh randomness in the nonce.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        xeddsa::sign(&self.private_bytes(), message, &random_bytes())
    }

    /// X25519 agreement with `their` public key.
    pub fn agree(&self, their: &PublicKey) -> Zeroizing<[u8; 32]> {
        let their = x25519_dalek::PublicKey::from(*their.as_raw());
        Zeroizing::new(self.private.diffie_hellman(&their).to_bytes())
    }
}

/// Length of a Kyber1024 secret key.
pub const KYBER1024_SECRET_KEY_LEN: usize = 3168;
/// Length of a Kyber1024 ciphertext.
pub const KYBER1024_CIPHERTEXT_LEN: usize = 1568;
/// Where the public key sits inside a Kyber secret key (after the 1536-byte CPA secret key):
/// the secret key is `s ‖ pk ‖ H(pk) ‖ z`.
const PUBLIC_IN_SECRET: std::ops::Range<usize> = 1536..1536 + KYBER1024_PUBLIC_KEY_LEN;

/// A Kyber1024 key pair: a one-time or last-resort Kyber prekey.
pub struct KyberKeyPair {
    /// Always [`KYBER1024_SECRET_KEY_LEN`] bytes.
    private: Zeroizing<Vec<u8>>,
    public: KyberPublicKey,
}

/// Why bytes are not a Kyber secret key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a Kyber1024 secret key is {KYBER1024_SECRET_KEY_LEN} bytes, got {0}")]
pub struct KyberKeyLength(usize);

impl KyberKeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        Self::from_seed(Zeroizing::new(random_bytes()))
    }

    /// The key pair generated from 64 bytes of randomness (tests pass fixed bytes).
    pub fn from_seed(seed: Zeroizing<[u8; 64]>) -> Self {
        let pair = kyber1024::generate_key_pair(*seed);
        Self {
            public: KyberPublicKey::from_raw(*pair.public_key().as_slice()),
            private: Zeroizing::new(pair.private_key().as_slice().to_vec()),
        }
    }

    /// The key pair of a stored secret key, which holds its public key.
    pub fn from_private(private: &[u8]) -> Result<Self, KyberKeyLength> {
        if private.len() != KYBER1024_SECRET_KEY_LEN {
            return Err(KyberKeyLength(private.len()));
        }
        let public = KyberPublicKey::from_raw_slice(&private[PUBLIC_IN_SECRET])
            .expect("the range is a public key's length");
        Ok(Self {
            private: Zeroizing::new(private.to_vec()),
            public,
        })
    }

    pub fn public(&self) -> &KyberPublicKey {
        &self.public
    }

    /// The secret key, to be sealed in the vault.
    pub fn private_bytes(&self) -> &[u8] {
        &self.private[..]
    }

    /// The shared secret of a ciphertext made for this key.
    pub fn decapsulate(&self, ciphertext: &[u8; KYBER1024_CIPHERTEXT_LEN]) -> Zeroizing<[u8; 32]> {
        let mut bytes = Zeroizing::new([0u8; KYBER1024_SECRET_KEY_LEN]);
        bytes.copy_from_slice(&self.private);
        let private = MlKem1024PrivateKey::from(*bytes);
        Zeroizing::new(kyber1024::decapsulate(
            &private,
            &MlKem1024Ciphertext::from(*ciphertext),
        ))
    }
}

/// A shared secret and the ciphertext that carries it to the holder of `their` private key,
/// with fresh randomness.
pub fn encapsulate(
    their: &KyberPublicKey,
) -> ([u8; KYBER1024_CIPHERTEXT_LEN], Zeroizing<[u8; 32]>) {
    encapsulate_with(their, Zeroizing::new(random_bytes()))
}

/// [`encapsulate`] with given randomness (known-answer tests).
pub fn encapsulate_with(
    their: &KyberPublicKey,
    randomness: Zeroizing<[u8; 32]>,
) -> ([u8; KYBER1024_CIPHERTEXT_LEN], Zeroizing<[u8; 32]>) {
    let (ciphertext, shared) =
        kyber1024::encapsulate(&MlKem1024PublicKey::from(*their.as_raw()), *randomness);
    (*ciphertext.as_slice(), Zeroizing::new(shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    // libsignal's agreement vector (libsignal-protocol-c test_curve25519_agreement).
    const ALICE_PRIVATE: &str = "c806439dc9d2c476ffed8f2580c0888d58ab406bf7ae3698879021b96bb4bf59";
    const ALICE_PUBLIC: &str = "051bb75966f2e93a3691dfff942bb2a466a1c08b8d78ca3f4d6df8b8bfa2e4ee28";
    const BOB_PRIVATE: &str = "b03b34c33a1c44f225b662d2bf4859b8135411fa7b0386d45fb75dc5b91b4466";
    const BOB_PUBLIC: &str = "05653614993d2b15ee9e5fd3d86ce719ef4ec1daae1886a87b3f5fa9565a27a22f";
    const SHARED: &str = "325f239328941ced6e673b86ba41017448e99b649a9c3806c1dd7ca4c477e629";

    #[test]
    fn matches_libsignals_public_keys_and_agreement() {
        let alice = KeyPair::from_private(bytes32(ALICE_PRIVATE));
        let bob = KeyPair::from_private(bytes32(BOB_PRIVATE));
        assert_eq!(hex::encode(alice.public().serialize()), ALICE_PUBLIC);
        assert_eq!(hex::encode(bob.public().serialize()), BOB_PUBLIC);
        assert_eq!(hex::encode(*alice.agree(&bob.public())), SHARED);
        assert_eq!(hex::encode(*bob.agree(&alice.public())), SHARED);
    }

    #[test]
    fn signatures_verify_with_the_public_key() {
        let pair = KeyPair::generate();
        let other = KeyPair::generate();
        let message = other.public().serialize();
        let signature = pair.sign(&message);
        assert!(xeddsa::verify(&pair.public(), &message, &signature));
        assert!(!xeddsa::verify(&other.public(), &message, &signature));
    }

    #[test]
    fn kyber_pairs_agree_and_restore_from_their_secret_key() {
        let pair = KyberKeyPair::generate();
        assert_eq!(pair.public().serialize().len(), 1569);
        assert_eq!(pair.public().serialize()[0], 0x08);
        let (ciphertext, sent) = encapsulate(pair.public());
        assert_eq!(*pair.decapsulate(&ciphertext), *sent);
        let restored = KyberKeyPair::from_private(pair.private_bytes()).unwrap();
        assert_eq!(restored.public(), pair.public());
        assert_eq!(*restored.decapsulate(&ciphertext), *sent);
        let other = KyberKeyPair::generate();
        assert_ne!(*other.decapsulate(&ciphertext), *sent, "implicit rejection");
        assert_eq!(
            KyberKeyPair::from_private(&[0; 32]).err(),
            Some(KyberKeyLength(32))
        );
    }
}
