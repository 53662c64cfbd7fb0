//! X3DH key agreement from a fetched prekey bundle, as libsignal's session setup does it
//! (without the post-quantum part): four Diffie-Hellman results through HKDF-SHA256.
//!
//! It shows that what the server hands out is usable: both devices derive the same secret.

use hkdf::Hkdf;
use keyserver_proto::wire::PublicKey;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keys::KeyPair;

const INFO: &[u8] = b"WhisperText";

/// The root key and first chain key a session starts from.
pub struct SessionSecret(Zeroizing<[u8; 64]>);

impl SessionSecret {
    /// A short public fingerprint of the secret, to compare two sides without revealing it.
    pub fn fingerprint(&self) -> String {
        hex::encode(&Sha256::digest(*self.0)[..16])
    }

    /// The secret itself (root key and chain key), to seal into stored session state.
    pub fn expose(&self) -> &[u8; 64] {
        &self.0
    }
}

/// The peer's keys an initiator uses, taken from a verified bundle.
pub struct PeerPreKeys {
    pub identity_key: PublicKey,
    pub signed_prekey_id: u32,
    pub signed_prekey: PublicKey,
    pub one_time_prekey: Option<(u32, PublicKey)>,
}

/// What the initiator sends the responder in its first message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InitialMessage {
    /// The initiator's device id, so the responder knows which session this starts.
    pub device_id: String,
    /// The initiator's serialized identity key, hex.
    pub identity_key: String,
    /// The initiator's serialized ephemeral key, hex.
    pub ephemeral_key: String,
    pub signed_prekey_id: u32,
    pub one_time_prekey_id: Option<u32>,
}

fn derive(dhs: &[&[u8; 32]]) -> SessionSecret {
    let mut ikm = Zeroizing::new(vec![0xFFu8; 32]);
    for dh in dhs {
        ikm.extend_from_slice(*dh);
    }
    let mut out = Zeroizing::new([0u8; 64]);
    Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm)
        .expand(INFO, &mut *out)
        .expect("64 bytes is a valid HKDF-SHA256 length");
    SessionSecret(out)
}

/// The initiator's side: agree with the peer's bundle using a fresh ephemeral key.
pub fn initiate(
    device_id: &str,
    identity: &KeyPair,
    peer: &PeerPreKeys,
) -> (SessionSecret, InitialMessage) {
    initiate_with(device_id, identity, &KeyPair::generate(), peer)
}

fn initiate_with(
    device_id: &str,
    identity: &KeyPair,
    ephemeral: &KeyPair,
    peer: &PeerPreKeys,
) -> (SessionSecret, InitialMessage) {
    let dh1 = identity.agree(&peer.signed_prekey);
    let dh2 = ephemeral.agree(&peer.identity_key);
    let dh3 = ephemeral.agree(&peer.signed_prekey);
    let dh4 = peer.one_time_prekey.map(|(_, key)| ephemeral.agree(&key));
    let mut dhs = vec![&*dh1, &*dh2, &*dh3];
    if let Some(dh4) = &dh4 {
        dhs.push(dh4);
    }
    let message = InitialMessage {
        device_id: device_id.to_owned(),
        identity_key: hex::encode(identity.public().serialize()),
        ephemeral_key: hex::encode(ephemeral.public().serialize()),
        signed_prekey_id: peer.signed_prekey_id,
        one_time_prekey_id: peer.one_time_prekey.map(|(id, _)| id),
    };
    (derive(&dhs), message)
}

/// The responder's side, with the private keys the initial message names.
pub fn respond(
    identity: &KeyPair,
    signed_prekey: &KeyPair,
    one_time_prekey: Option<&KeyPair>,
    their_identity: &PublicKey,
    their_ephemeral: &PublicKey,
) -> SessionSecret {
    let dh1 = signed_prekey.agree(their_identity);
    let dh2 = identity.agree(their_ephemeral);
    let dh3 = signed_prekey.agree(their_ephemeral);
    let dh4 = one_time_prekey.map(|k| k.agree(their_ephemeral));
    let mut dhs = vec![&*dh1, &*dh2, &*dh3];
    if let Some(dh4) = &dh4 {
        dhs.push(dh4);
    }
    derive(&dhs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_with_and_without_a_one_time_prekey() {
        let alice = KeyPair::generate();
        let bob = KeyPair::generate();
        let signed = KeyPair::generate();
        let one_time = KeyPair::generate();
        for with_one_time in [true, false] {
            let peer = PeerPreKeys {
                identity_key: bob.public(),
                signed_prekey_id: 7,
                signed_prekey: signed.public(),
                one_time_prekey: with_one_time.then(|| (9, one_time.public())),
            };
            let ephemeral = KeyPair::generate();
            let (sent, message) = initiate_with("alice", &alice, &ephemeral, &peer);
            assert_eq!(message.one_time_prekey_id, with_one_time.then_some(9));
            let received = respond(
                &bob,
                &signed,
                with_one_time.then_some(&one_time),
                &alice.public(),
                &ephemeral.public(),
            );
            assert_eq!(*sent.0, *received.0);
            let wrong = respond(&bob, &signed, None, &bob.public(), &ephemeral.public());
            assert_ne!(*sent.0, *wrong.0);
        }
    }

    #[test]
    fn known_answer() {
        // Fixed keys pin the DH order, the 0xFF prefix, the zero salt and the info string.
        let alice = KeyPair::from_private([1; 32]);
        let ephemeral = KeyPair::from_private([2; 32]);
        let bob = KeyPair::from_private([3; 32]);
        let signed = KeyPair::from_private([4; 32]);
        let one_time = KeyPair::from_private([5; 32]);
        let peer = PeerPreKeys {
            identity_key: bob.public(),
            signed_prekey_id: 1,
            signed_prekey: signed.public(),
            one_time_prekey: Some((2, one_time.public())),
        };
        let (secret, _) = initiate_with("alice", &alice, &ephemeral, &peer);
        assert_eq!(secret.fingerprint(), KNOWN_FINGERPRINT);
    }

    // Computed independently with Python's `cryptography` (X25519 and HKDF-SHA256).
    const KNOWN_FINGERPRINT: &str = "258baf4ef72f18dc8128fc4c3625417f";
}
