//! Typed ids, so a signed prekey id is never passed where a one-time prekey id belongs, and a
//! device id is a checked one wherever it appears. Each is stored as the schema's column type
//! (TEXT for devices, INTEGER for key ids) on both backends.

use std::fmt;

use keyserver_proto::limits::MAX_KEY_ID;
use sqlx::error::BoxDynError;

use super::sql::dual_type;

/// Longest device id.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// A device id: the schema's text key of a device, unique across all users.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// A device id of 1 to 64 characters from A-Z, a-z, 0-9, '.', '_', '-' and ':', or why not.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() || value.len() > MAX_DEVICE_ID_LEN {
            return Err(format!("must be 1 to {MAX_DEVICE_ID_LEN} characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        {
            return Err("may hold only A-Z, a-z, 0-9, '.', '_', '-' and ':'".to_owned());
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Stored ids are trusted as they are: a chat database may hold ids this server would not
// issue, and they must still be served and removable.
dual_type!(DeviceId,
    postgres: String, |v: &DeviceId| v.0.clone(), String, |v| Ok(DeviceId(v)),
    sqlite: String, |v: &DeviceId| v.0.clone(), String, |v| Ok(DeviceId(v)));

/// What every kind of prekey id is: a number below 2^24 that the device chose.
pub trait KeyId: Copy + Eq + Ord + std::hash::Hash + fmt::Debug + Send + Sync + 'static {
    fn get(self) -> u32;
    /// An id from the store or from a checked request.
    fn from_stored(id: u32) -> Self;
}

macro_rules! key_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u32);

        impl $name {
            /// The id, if it is in range (0 to [`MAX_KEY_ID`]).
            pub fn new(id: u32) -> Option<Self> {
                (id <= MAX_KEY_ID).then_some(Self(id))
            }
        }

        impl KeyId for $name {
            fn get(self) -> u32 {
                self.0
            }
            fn from_stored(id: u32) -> Self {
                Self(id)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        // Ids are below 2^24, so they fit the schema's INTEGER (int4) on both backends.
        dual_type!($name,
            postgres: i32, |v: &$name| v.0 as i32, i32, |v: i32| stored_id(v).map($name),
            sqlite: i32, |v: &$name| v.0 as i32, i32, |v: i32| stored_id(v).map($name));
    };
}

fn stored_id(id: i32) -> Result<u32, BoxDynError> {
    u32::try_from(id).map_err(|_| format!("stored key id {id} is negative").into())
}

key_id!(
    /// The id of a one-time Curve25519 prekey.
    PreKeyId
);
key_id!(
    /// The id of a signed Curve25519 prekey.
    SignedPreKeyId
);
key_id!(
    /// The id of a Kyber1024 prekey, one-time or last resort (one id space per device).
    KyberPreKeyId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_and_key_ids_are_checked() {
        assert!(DeviceId::parse("phone-1.a_b:c").is_ok());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse("has space").is_err());
        assert!(DeviceId::parse(&"x".repeat(65)).is_err());
        assert_eq!(PreKeyId::new(MAX_KEY_ID).map(KeyId::get), Some(MAX_KEY_ID));
        assert_eq!(SignedPreKeyId::new(MAX_KEY_ID + 1), None);
        assert!(stored_id(-1).is_err());
    }
}
