//! What the fuzz targets and their seed generator share: the identity key that the request
//! target's uploads are checked against, as a stored device's would be.

use keyserver_proto::wire::PublicKey;

/// The private key of the device the request seeds are signed by.
pub const IDENTITY_PRIVATE: [u8; 32] = [0x42; 32];

/// Its public identity key.
pub fn identity() -> PublicKey {
    let secret = x25519_dalek::StaticSecret::from(IDENTITY_PRIVATE);
    PublicKey::from_raw(x25519_dalek::PublicKey::from(&secret).to_bytes())
}
