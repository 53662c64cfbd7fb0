//! libsignal's serialized forms of public keys and signatures.
//!
//! A Curve25519 public key travels as 33 bytes: the type byte `0x05` and the 32-byte Montgomery
//! u-coordinate. A Kyber1024 public key travels as 1569 bytes: the type byte `0x08` and 1568
//! bytes. The database stores the raw bytes; everything on the wire carries the type byte. Any
//! other length or type byte is refused (libsignal tolerates trailing bytes; we do not).

use std::fmt;

/// libsignal's type byte for a Curve25519 ("DJB") public key.
pub const DJB_TYPE: u8 = 0x05;
/// Length of a serialized Curve25519 public key.
pub const SERIALIZED_PUBLIC_KEY_LEN: usize = 33;
/// libsignal's type byte for a Kyber1024 public key.
pub const KYBER1024_TYPE: u8 = 0x08;
/// Length of a raw Kyber1024 public key.
pub const KYBER1024_PUBLIC_KEY_LEN: usize = 1568;
/// Length of a serialized Kyber1024 public key.
pub const SERIALIZED_KYBER_PUBLIC_KEY_LEN: usize = 1 + KYBER1024_PUBLIC_KEY_LEN;
/// Length of an XEdDSA signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why bytes are not a serialized public key or a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Wrong number of bytes.
    #[error("must be {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    /// The first byte is not the key type's.
    #[error("must start with type byte 0x{expected:02x}, got 0x{got:02x}")]
    KeyType { expected: u8, got: u8 },
}

/// Splits libsignal's serialized form into the raw key, checking length and type byte.
fn parse_serialized<const N: usize>(bytes: &[u8], key_type: u8) -> Result<&[u8; N], WireError> {
    if bytes.len() != N + 1 {
        return Err(WireError::Length {
            expected: N + 1,
            got: bytes.len(),
        });
    }
    if bytes[0] != key_type {
        return Err(WireError::KeyType {
            expected: key_type,
            got: bytes[0],
        });
    }
    Ok(bytes[1..].try_into().expect("length checked"))
}

/// Checks that `bytes` is exactly `N` raw bytes.
fn parse_raw<const N: usize>(bytes: &[u8]) -> Result<&[u8; N], WireError> {
    bytes.try_into().map_err(|_| WireError::Length {
        expected: N,
        got: bytes.len(),
    })
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
        parse_serialized::<32>(bytes, DJB_TYPE).map(|raw| Self(*raw))
    }

    /// Parses 32 raw bytes as stored in the database.
    pub fn from_raw_slice(bytes: &[u8]) -> Result<Self, WireError> {
        parse_raw::<32>(bytes).map(|raw| Self(*raw))
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

/// A Kyber1024 public key: its 1568 raw bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KyberPublicKey(Box<[u8; KYBER1024_PUBLIC_KEY_LEN]>);

impl KyberPublicKey {
    /// Wraps raw bytes as stored in the database.
    pub fn from_raw(raw: [u8; KYBER1024_PUBLIC_KEY_LEN]) -> Self {
        Self(Box::new(raw))
    }

    /// Parses libsignal's 1569-byte serialized form.
    pub fn from_serialized(bytes: &[u8]) -> Result<Self, WireError> {
        parse_serialized::<KYBER1024_PUBLIC_KEY_LEN>(bytes, KYBER1024_TYPE)
            .map(|raw| Self(Box::new(*raw)))
    }

    /// Parses 1568 raw bytes as stored in the database.
    pub fn from_raw_slice(bytes: &[u8]) -> Result<Self, WireError> {
        parse_raw::<KYBER1024_PUBLIC_KEY_LEN>(bytes).map(|raw| Self(Box::new(*raw)))
    }

    /// The 1569-byte serialized form: `0x08 ‖ key`, what its signature covers.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SERIALIZED_KYBER_PUBLIC_KEY_LEN);
        out.push(KYBER1024_TYPE);
        out.extend_from_slice(&self.0[..]);
        out
    }

    /// The raw 1568 bytes.
    pub fn as_raw(&self) -> &[u8; KYBER1024_PUBLIC_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for KyberPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KyberPublicKey(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Checks that `bytes` is exactly one 64-byte signature.
pub fn parse_signature(bytes: &[u8]) -> Result<[u8; SIGNATURE_LEN], WireError> {
    parse_raw::<SIGNATURE_LEN>(bytes).copied()
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
            Err(WireError::KeyType {
                expected: 0x05,
                got: 0x08
            })
        );
        assert!(parse_signature(&[0; 63]).is_err());
        assert!(parse_signature(&[0; 64]).is_ok());
    }

    #[test]
    fn kyber_keys_are_1569_bytes_with_type_byte_0x08() {
        let mut bytes = vec![9u8; SERIALIZED_KYBER_PUBLIC_KEY_LEN];
        bytes[0] = KYBER1024_TYPE;
        let key = KyberPublicKey::from_serialized(&bytes).unwrap();
        assert_eq!(key.as_raw(), &[9u8; 1568]);
        assert_eq!(key.serialize(), bytes);
        assert_eq!(KyberPublicKey::from_raw_slice(&[9u8; 1568]).unwrap(), key);
        for len in [0, 1568, 1570, 33] {
            let mut short = vec![9u8; len];
            if let Some(first) = short.first_mut() {
                *first = KYBER1024_TYPE;
            }
            assert_eq!(
                KyberPublicKey::from_serialized(&short),
                Err(WireError::Length {
                    expected: 1569,
                    got: len
                })
            );
        }
        bytes[0] = DJB_TYPE;
        assert_eq!(
            KyberPublicKey::from_serialized(&bytes)
                .unwrap_err()
                .to_string(),
            "must start with type byte 0x08, got 0x05"
        );
    }
}
