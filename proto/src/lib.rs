//! The keyserver wire contract, shared by the server and the client.
//!
//! - [`pb`]: the gRPC messages and service stubs generated from `keyserver/v1/*.proto`.
//! - [`wire`]: libsignal's serialized public keys (Curve25519: type byte `0x05` and 32 bytes;
//!   Kyber1024: `0x08` and 1568 bytes).
//! - [`xeddsa`]: libsignal's signature scheme over Curve25519 identity keys.
//! - [`fingerprint`]: libsignal's numeric fingerprint (safety numbers).
//! - [`checks`]: the digests of `CheckKeys` and `CheckIdentityKeys`.
//! - [`limits`]: id ranges, batch sizes and replenish thresholds.
//!
//! Both sides must agree on these byte for byte, which is why they live in one crate.

pub mod checks;
pub mod fingerprint;
pub mod limits;
pub mod wire;
pub mod xeddsa;

/// Generated gRPC code for package `keyserver.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keyserver.v1");

    /// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/keyserver_descriptor.bin"));
}
