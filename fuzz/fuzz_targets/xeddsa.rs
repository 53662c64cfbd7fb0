//! XEdDSA: a signature made with a key verifies, and no change of one bit of it, of the
//! message or of the key is ever accepted; arbitrary signatures never panic the verifier.
#![no_main]

use keyserver_proto::wire::PublicKey;
use keyserver_proto::xeddsa;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 + 64 + 2 {
        return;
    }
    let (private, rest) = data.split_at(32);
    let (random, rest) = rest.split_at(64);
    let (flip, message) = rest.split_first().expect("two bytes are left");
    let private: [u8; 32] = private.try_into().expect("32 bytes");
    let random: [u8; 64] = random.try_into().expect("64 bytes");
    let secret = x25519_dalek::StaticSecret::from(private);
    let public = PublicKey::from_raw(x25519_dalek::PublicKey::from(&secret).to_bytes());
    let signature = xeddsa::sign(&private, message, &random);
    assert!(xeddsa::verify(&public, message, &signature));

    // One bit flipped anywhere in the signature (its 512 bits) or the message.
    let bit = usize::from(*flip) % (512 + 8 * message.len().min(32));
    if bit < 512 {
        let mut mutated = signature;
        mutated[bit / 8] ^= 1 << (bit % 8);
        assert!(!xeddsa::verify(&public, message, &mutated));
    } else {
        let bit = bit - 512;
        let mut mutated = message.to_vec();
        mutated[bit / 8] ^= 1 << (bit % 8);
        assert!(!xeddsa::verify(&public, &mutated, &signature));
    }
    // The fuzzer's own bytes as a signature over the message, under the same key.
    let mut arbitrary = [0u8; 64];
    for (a, b) in arbitrary.iter_mut().zip(message) {
        *a = *b;
    }
    if arbitrary != signature {
        assert!(!xeddsa::verify(&public, message, &arbitrary));
    }
});
