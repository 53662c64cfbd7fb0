//! PQXDH key agreement from a fetched prekey bundle, as Signal specifies it and libsignal's
//! session setup does it: four Diffie-Hellman results and, when the bundle has a Kyber prekey,
//! the Kyber1024 shared secret appended to them, through HKDF-SHA256. A bundle without a Kyber
//! prekey (a device that never published one) gets X3DH, the same without the KEM part.
//!
//! It shows that what the server hands out is usable: both devices derive the same secret.

use hkdf::Hkdf;
use keyserver_proto::wire::{KyberPublicKey, PublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keys::{self, KYBER1024_CIPHERTEXT_LEN, KeyPair, KyberKeyPair};

/// HKDF's info for X3DH (libsignal's).
const X3DH_INFO: &[u8] = b"WhisperText";
/// HKDF's info for PQXDH with X25519, SHA-256 and Kyber1024 (libsignal's).
const PQXDH_INFO: &[u8] = b"WhisperText_X25519_SHA-256_CRYSTALS-KYBER-1024";

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
    /// The Kyber prekey (one-time or last resort); None only for an X3DH-only device.
    pub kyber_prekey: Option<(u32, KyberPublicKey)>,
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
    /// The Kyber prekey encapsulated to; absent for X3DH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kyber_prekey_id: Option<u32>,
    /// The Kyber1024 ciphertext (1568 bytes), hex; absent for X3DH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kyber_ciphertext: Option<String>,
}

/// HKDF-SHA256 over `0xFF × 32 ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4] [‖ SS]` with a zero salt.
fn derive(dhs: &[&[u8; 32]], kem_secret: Option<&[u8; 32]>) -> SessionSecret {
    let mut ikm = Zeroizing::new(vec![0xFFu8; 32]);
    for dh in dhs {
        ikm.extend_from_slice(*dh);
    }
    if let Some(secret) = kem_secret {
        ikm.extend_from_slice(secret);
    }
    let info = if kem_secret.is_some() {
        PQXDH_INFO
    } else {
        X3DH_INFO
    };
    let mut out = Zeroizing::new([0u8; 64]);
    Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm)
        .expand(info, &mut *out)
        .expect("64 bytes is a valid HKDF-SHA256 length");
    SessionSecret(out)
}

/// The initiator's side: agree with the peer's bundle using a fresh ephemeral key (and a fresh
/// encapsulation to its Kyber prekey).
pub fn initiate(
    device_id: &str,
    identity: &KeyPair,
    peer: &PeerPreKeys,
) -> (SessionSecret, InitialMessage) {
    let encapsulated = peer
        .kyber_prekey
        .as_ref()
        .map(|(id, key)| (*id, keys::encapsulate(key)));
    initiate_with(
        device_id,
        identity,
        &KeyPair::generate(),
        peer,
        encapsulated,
    )
}

type Encapsulated = (u32, ([u8; KYBER1024_CIPHERTEXT_LEN], Zeroizing<[u8; 32]>));

fn initiate_with(
    device_id: &str,
    identity: &KeyPair,
    ephemeral: &KeyPair,
    peer: &PeerPreKeys,
    encapsulated: Option<Encapsulated>,
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
        kyber_prekey_id: encapsulated.as_ref().map(|(id, _)| *id),
        kyber_ciphertext: encapsulated.as_ref().map(|(_, (ct, _))| hex::encode(ct)),
    };
    let secret = derive(&dhs, encapsulated.as_ref().map(|(_, (_, ss))| &**ss));
    (secret, message)
}

/// The responder's private keys an initial message names.
pub struct OwnPreKeys<'a> {
    pub identity: &'a KeyPair,
    pub signed_prekey: &'a KeyPair,
    pub one_time_prekey: Option<&'a KeyPair>,
    /// The Kyber prekey and the ciphertext made for it.
    pub kyber: Option<(&'a KyberKeyPair, &'a [u8; KYBER1024_CIPHERTEXT_LEN])>,
}

/// The responder's side.
pub fn respond(
    own: &OwnPreKeys<'_>,
    their_identity: &PublicKey,
    their_ephemeral: &PublicKey,
) -> SessionSecret {
    let dh1 = own.signed_prekey.agree(their_identity);
    let dh2 = own.identity.agree(their_ephemeral);
    let dh3 = own.signed_prekey.agree(their_ephemeral);
    let dh4 = own.one_time_prekey.map(|k| k.agree(their_ephemeral));
    let mut dhs = vec![&*dh1, &*dh2, &*dh3];
    if let Some(dh4) = &dh4 {
        dhs.push(dh4);
    }
    let kem_secret = own.kyber.map(|(key, ct)| key.decapsulate(ct));
    derive(&dhs, kem_secret.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(bob: &KeyPair, signed: &KeyPair, one_time: Option<&KeyPair>) -> PeerPreKeys {
        PeerPreKeys {
            identity_key: bob.public(),
            signed_prekey_id: 7,
            signed_prekey: signed.public(),
            one_time_prekey: one_time.map(|k| (9, k.public())),
            kyber_prekey: None,
        }
    }

    #[test]
    fn both_sides_agree_with_and_without_kyber_and_a_one_time_prekey() {
        let alice = KeyPair::generate();
        let bob = KeyPair::generate();
        let signed = KeyPair::generate();
        let one_time = KeyPair::generate();
        let kyber = KyberKeyPair::generate();
        for (with_one_time, with_kyber) in [(true, true), (false, true), (true, false)] {
            let mut peer = peer(&bob, &signed, with_one_time.then_some(&one_time));
            peer.kyber_prekey = with_kyber.then(|| (11, kyber.public().clone()));
            let (sent, message) = initiate("alice", &alice, &peer);
            assert_eq!(message.one_time_prekey_id, with_one_time.then_some(9));
            assert_eq!(message.kyber_prekey_id, with_kyber.then_some(11));
            let ciphertext: Option<[u8; KYBER1024_CIPHERTEXT_LEN]> = message
                .kyber_ciphertext
                .as_ref()
                .map(|ct| hex::decode(ct).unwrap().try_into().unwrap());
            let ephemeral =
                PublicKey::from_serialized(&hex::decode(&message.ephemeral_key).unwrap()).unwrap();
            let own = OwnPreKeys {
                identity: &bob,
                signed_prekey: &signed,
                one_time_prekey: with_one_time.then_some(&one_time),
                kyber: ciphertext.as_ref().map(|ct| (&kyber, ct)),
            };
            let received = respond(&own, &alice.public(), &ephemeral);
            assert_eq!(*sent.0, *received.0);
            // Any missing or wrong part gives another secret.
            let other_kyber = KyberKeyPair::generate();
            let wrong = OwnPreKeys {
                kyber: ciphertext.as_ref().map(|ct| (&other_kyber, ct)),
                ..own
            };
            if with_kyber {
                assert_ne!(*sent.0, *respond(&wrong, &alice.public(), &ephemeral).0);
                let without = OwnPreKeys { kyber: None, ..own };
                assert_ne!(*sent.0, *respond(&without, &alice.public(), &ephemeral).0);
            }
            let no_one_time = OwnPreKeys {
                one_time_prekey: None,
                ..own
            };
            if with_one_time {
                assert_ne!(
                    *sent.0,
                    *respond(&no_one_time, &alice.public(), &ephemeral).0
                );
            }
        }
    }

    #[test]
    fn x3dh_known_answer() {
        // Fixed keys pin the DH order, the 0xFF prefix, the zero salt and the info string.
        let alice = KeyPair::from_private([1; 32]);
        let ephemeral = KeyPair::from_private([2; 32]);
        let bob = KeyPair::from_private([3; 32]);
        let signed = KeyPair::from_private([4; 32]);
        let one_time = KeyPair::from_private([5; 32]);
        let mut peer = peer(&bob, &signed, Some(&one_time));
        peer.signed_prekey_id = 1;
        let (secret, _) = initiate_with("alice", &alice, &ephemeral, &peer, None);
        // Computed independently with Python's `cryptography` (X25519 and HKDF-SHA256).
        assert_eq!(secret.fingerprint(), "258baf4ef72f18dc8128fc4c3625417f");
    }

    #[test]
    fn pqxdh_known_answer() {
        let alice = KeyPair::from_private([1; 32]);
        let ephemeral = KeyPair::from_private([2; 32]);
        let bob = KeyPair::from_private([3; 32]);
        let signed = KeyPair::from_private([4; 32]);
        let one_time = KeyPair::from_private([5; 32]);
        let kyber = KyberKeyPair::from_seed(Zeroizing::new([6; 64]));
        let mut peer = peer(&bob, &signed, Some(&one_time));
        peer.kyber_prekey = Some((2, kyber.public().clone()));
        let encapsulated = keys::encapsulate_with(kyber.public(), Zeroizing::new([7; 32]));
        assert_eq!(hex::encode(*encapsulated.1), KNOWN_KEM_SECRET);
        assert_eq!(
            hex::encode(Sha256::digest(encapsulated.0)),
            KNOWN_CIPHERTEXT_SHA256
        );
        let (secret, _) =
            initiate_with("alice", &alice, &ephemeral, &peer, Some((2, encapsulated)));
        assert_eq!(secret.fingerprint(), KNOWN_PQXDH_FINGERPRINT);
    }

    // Checked independently in Python: the ciphertext decapsulates to this secret with the
    // secret key under the pure-Python Kyber1024 of `kyber-py` 1.0.1 (round 3 Kyber, as
    // libsignal's), and `cryptography`'s X25519 and HKDF-SHA256 over the DH outputs, the KEM
    // secret and libsignal's PQXDH info string give this fingerprint.
    const KNOWN_KEM_SECRET: &str =
        "61dfb3ae5da224662da0c5792a2f15b342beabd36547470c66e0803ea62bbc8e";
    const KNOWN_CIPHERTEXT_SHA256: &str =
        "286b09766f071339a9f99ba39409d232e31e0710425c838bb166c02ba8355feb";
    const KNOWN_PQXDH_FINGERPRINT: &str = "c5006d9741b8317905c3032a3c3795f4";
}
