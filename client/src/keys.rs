//! Curve25519 key pairs as a device holds them: X25519 for agreement, XEdDSA for signatures.

use keyserver_proto::wire::PublicKey;
use keyserver_proto::xeddsa;
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
}
