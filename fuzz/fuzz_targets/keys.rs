//! The 33-byte Curve25519 and 1569-byte Kyber1024 key parsers and the signature parser: no
//! panic on any input, and whatever parses serializes back to exactly the bytes it came from.
#![no_main]

use keyserver_proto::wire::{self, KyberPublicKey, PublicKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(key) = PublicKey::from_serialized(bytes) {
        assert_eq!(key.serialize().as_slice(), bytes);
    }
    if let Ok(key) = KyberPublicKey::from_serialized(bytes) {
        assert_eq!(key.serialize(), bytes);
    }
    if let Ok(signature) = wire::parse_signature(bytes) {
        assert_eq!(signature.as_slice(), bytes);
    }
});
