//! The device's local state file: public keys, sealed private keys and id counters. It never
//! holds a private key in plaintext; opening any key needs the passphrase. It is written
//! atomically with owner-only permissions. Version 1 files (before PQXDH, no Kyber keys) are
//! read as version 2 with no Kyber keys; the next `register` or `refresh` publishes them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Format version of the state file.
pub const STATE_VERSION: u32 = 2;
/// The versions this keyctl reads.
const READS: [u32; 2] = [1, STATE_VERSION];

/// How the vault key is derived from the passphrase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kdf {
    #[serde(with = "hex::serde")]
    pub salt: [u8; 32],
    pub iterations: u32,
}

/// The identity key pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredIdentity {
    /// Serialized public key (33 bytes).
    #[serde(with = "hex::serde")]
    pub public: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub sealed_private: Vec<u8>,
}

/// A signed key pair and its signature by the identity key: a signed prekey, or a Kyber prekey.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSignedPreKey {
    pub id: u32,
    #[serde(with = "hex::serde")]
    pub public: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub sealed_private: Vec<u8>,
    /// Unix seconds when it was generated.
    pub created_at: i64,
}

/// A one-time prekey pair, kept until a peer's first message uses it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPreKey {
    pub id: u32,
    #[serde(with = "hex::serde")]
    pub public: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub sealed_private: Vec<u8>,
}

/// A Kyber prekey pair and its signature: one-time (kept until a peer's first message uses it)
/// or last resort (kept after it is replaced, so late messages still decrypt). Its public key is
/// the 1569-byte serialized form.
pub type StoredKyberPreKey = StoredSignedPreKey;

/// Everything a device keeps locally.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    pub version: u32,
    pub device_id: String,
    pub registration_id: u16,
    pub kdf: Kdf,
    pub identity: StoredIdentity,
    /// Newest last; the last one is the active key.
    pub signed_prekeys: Vec<StoredSignedPreKey>,
    pub one_time_prekeys: Vec<StoredPreKey>,
    pub next_signed_prekey_id: u32,
    pub next_one_time_prekey_id: u32,
    /// One-time Kyber prekeys no peer has used yet.
    #[serde(default)]
    pub kyber_one_time_prekeys: Vec<StoredKyberPreKey>,
    /// Last-resort Kyber prekeys, newest last: the last one is the active key.
    #[serde(default)]
    pub kyber_last_resort_prekeys: Vec<StoredKyberPreKey>,
    /// The id the next Kyber prekey gets; 0 until the first one is made (one-time and
    /// last-resort Kyber prekeys share one id space).
    #[serde(default)]
    pub next_kyber_prekey_id: u32,
    /// Set by a restore: the server still holds one-time prekeys of the earlier device whose
    /// private keys this state does not have, so the next registration withdraws them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdraw_unused_prekeys: bool,
}

impl DeviceState {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading {} (run `keyctl init` first)", path.display()))?;
        let mut state: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(
            READS.contains(&state.version),
            "{} has format version {}, this keyctl reads {READS:?}",
            path.display(),
            state.version
        );
        state.version = STATE_VERSION;
        Ok(state)
    }

    /// Writes the state to a temporary file and renames it over `path`.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(())
    }
}
