//! libsignal's serialized forms of public keys and signatures.
//!
//! A Curve25519 public key travels as 33 bytes: the type byte `0x05` and the 32-byte Montgomery
//! u-coordinate. The database stores the 32 raw bytes; everything on the wire carries 33. Any
//! other length or type byte is refused (libsignal tolerates trailing bytes; we do not).

use std::fmt;

/// libsignal's type byte for a Curve25519 ("DJB") public key.
pub const DJB_TYPE: u8 = 0x05;
/// Length of a serialized Curve25519 public key.
pub const SERIALIZED_PUBLIC_KEY_LEN: usize = 33;
/// Length of an XEdDSA signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why bytes are not a serialized public key or a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Wrong number of bytes.
    #[error("must be {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    /// The first byte is not `0x05`.
    #[error("must start with type byte 0x05, got 0x{got:02x}")]
    KeyType { got: u8 },
}

/// A Curve25519 public key: the 32-byte Montgomery u-coordinate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps 32 raw bytes as stored in the database.
    pub const fn from_raw(raw: [u8; 32]) -> Self {
        Self(raw)
    }

    /// Parses libsignal's 33-byte serialized form.
    pub fn from_serialized(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != SERIALIZED_PUBLIC_KEY_LEN {
            return Err(WireError::Length {
                expected: SERIALIZED_PUBLIC_KEY_LEN,
                got: bytes.len(),
            });
        }
        if bytes[0] != DJB_TYPE {
            return Err(WireError::KeyType { got: bytes[0] });
        }
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&bytes[1..]);
        Ok(Self(raw))
    }

    /// Parses 32 raw bytes as stored in the database.
    pub fn from_raw_slice(bytes: &[u8]) -> Result<Self, WireError> {
        let raw: [u8; 32] = bytes.try_into().map_err(|_| WireError::Length {
            expected: 32,
            got: bytes.len(),
        })?;
        Ok(Self(raw))
    }

    /// The 33-byte serialized form: `0x05 ‖ u`.
    pub fn serialize(&self) -> [u8; SERIALIZED_PUBLIC_KEY_LEN] {
        let mut out = [0u8; SERIALIZED_PUBLIC_KEY_LEN];
        out[0] = DJB_TYPE;
        out[1..].copy_from_slice(&self.0);
        out
    }

    /// The raw 32-byte u-coordinate.
    pub fn as_raw(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Checks that `bytes` is exactly one 64-byte signature.
pub fn parse_signature(bytes: &[u8]) -> Result<[u8; SIGNATURE_LEN], WireError> {
    bytes.try_into().map_err(|_| WireError::Length {
        expected: SIGNATURE_LEN,
        got: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_serialized_form() {
        let mut bytes = [7u8; 33];
        bytes[0] = 0x05;
        let key = PublicKey::from_serialized(&bytes).unwrap();
        assert_eq!(key.as_raw(), &[7u8; 32]);
        assert_eq!(key.serialize(), bytes);
    }

    #[test]
    fn refuses_wrong_length_and_type() {
        assert_eq!(
            PublicKey::from_serialized(&[0x05; 32]),
            Err(WireError::Length {
                expected: 33,
                got: 32
            })
        );
        assert_eq!(
            PublicKey::from_serialized(&[0x05; 34]),
            Err(WireError::Length {
                expected: 33,
                got: 34
            })
        );
        let mut bytes = [1u8; 33];
        bytes[0] = 0x08;
        assert_eq!(
            PublicKey::from_serialized(&bytes),
            Err(WireError::KeyType { got: 0x08 })
        );
        assert!(parse_signature(&[0; 63]).is_err());
        assert!(parse_signature(&[0; 64]).is_ok());
    }
}
