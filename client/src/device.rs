//! A device: its local state opened with the passphrase, and what it does with the server
//! (register, replenish, rotate, report status, fetch peers, run X3DH).

use std::path::{Path, PathBuf};

use anyhow::Context;
use keyserver_proto::pb;
use keyserver_proto::wire::PublicKey;
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::api::{self, KeyClient, MasterKeyClient, SessionClient, VerifiedBundle};
use crate::keys::{KeyPair, random_bytes};
use crate::state::{
    DeviceState, Kdf, STATE_VERSION, StoredIdentity, StoredPreKey, StoredSignedPreKey,
};
use crate::vault::{self, VaultKey};
use crate::x3dh::{self, InitialMessage, SessionSecret};

use keyserver_proto::limits::{MAX_KEY_ID, MAX_REGISTRATION_ID};
pub use keyserver_proto::limits::{ONE_TIME_PREKEY_TARGET, REPLENISH_BELOW};

fn identity_label(device_id: &str) -> String {
    format!("identity:{device_id}")
}
fn signed_label(id: u32) -> String {
    format!("signed-prekey:{id}")
}
fn one_time_label(id: u32) -> String {
    format!("one-time-prekey:{id}")
}

/// The id after `id`, wrapping below 2^24 and skipping 0.
fn next_id(id: u32) -> u32 {
    if id >= MAX_KEY_ID { 1 } else { id + 1 }
}

/// A random starting id in 1..2^24, so ids of a reinstalled device rarely collide.
fn random_start_id() -> u32 {
    u32::from_le_bytes(random_bytes()) % MAX_KEY_ID + 1
}

/// What [`Device::refresh`] did; None where nothing was needed.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub replenished: Option<pb::UploadOneTimePreKeysResponse>,
    pub rotated: Option<pb::RotateSignedPreKeyResponse>,
}

/// A device with its state file open and its vault key derived.
pub struct Device {
    path: PathBuf,
    state: DeviceState,
    vault: VaultKey,
}

impl Device {
    /// Creates a new device: identity key, registration id, salt; writes the state file.
    pub fn create(
        path: &Path,
        device_id: &str,
        passphrase: &[u8],
        iterations: u32,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            iterations >= vault::MIN_ITERATIONS,
            "PBKDF2 iterations must be at least {}",
            vault::MIN_ITERATIONS
        );
        let salt = random_bytes();
        let vault = VaultKey::derive(passphrase, &salt, iterations);
        let identity = KeyPair::generate();
        let sealed_private = vault.seal(&*identity.private_bytes(), &identity_label(device_id));
        Self::start(
            path,
            vault,
            Kdf { salt, iterations },
            device_id,
            (u32::from(u16::from_le_bytes(random_bytes())) % MAX_REGISTRATION_ID + 1) as u16,
            StoredIdentity {
                public: identity.public().serialize().to_vec(),
                sealed_private,
            },
        )
    }

    /// Writes the state of a device that has an identity and no prekeys yet. Never overwrites
    /// an existing state file: it holds a device's keys.
    fn start(
        path: &Path,
        vault: VaultKey,
        kdf: Kdf,
        device_id: &str,
        registration_id: u16,
        identity: StoredIdentity,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !path.exists(),
            "{} already exists; it holds a device's keys and is never overwritten",
            path.display()
        );
        let state = DeviceState {
            version: STATE_VERSION,
            device_id: device_id.to_owned(),
            registration_id,
            kdf,
            identity,
            signed_prekeys: Vec::new(),
            one_time_prekeys: Vec::new(),
            next_signed_prekey_id: random_start_id(),
            next_one_time_prekey_id: random_start_id(),
        };
        state.save(path)?;
        Ok(Self {
            path: path.to_owned(),
            state,
            vault,
        })
    }

    /// Restores a device from what recovery returned: its identity key sealed under the
    /// user's passphrase and the record's salt. Fails unless the passphrase opens the sealed
    /// key and it matches the identity public key. The restored device has no prekeys yet:
    /// `register` publishes fresh ones.
    pub fn restore(
        path: &Path,
        passphrase: &[u8],
        recovery: &pb::RecoverDeviceResponse,
        device: &pb::RecoverableDevice,
    ) -> anyhow::Result<Self> {
        let salt: [u8; 32] = recovery
            .salt
            .as_slice()
            .try_into()
            .context("the recovered salt is not 32 bytes")?;
        let vault = VaultKey::derive(passphrase, &salt, recovery.pbkdf2_iterations);
        let private = vault
            .open_key(
                &device.encrypted_identity_private_key,
                &identity_label(&device.device_id),
            )
            .context("the passphrase does not open this device's identity key")?;
        let identity = KeyPair::from_private(*private);
        anyhow::ensure!(
            identity.public().serialize().as_slice() == device.identity_key.as_slice(),
            "the recovered identity key does not match its public key"
        );
        Self::start(
            path,
            vault,
            Kdf {
                salt,
                iterations: recovery.pbkdf2_iterations,
            },
            &device.device_id,
            u16::try_from(device.registration_id)
                .context("the recovered registration id is out of range")?,
            StoredIdentity {
                public: device.identity_key.clone(),
                sealed_private: device.encrypted_identity_private_key.clone(),
            },
        )
    }

    /// Makes a recovery code (160 random bits in base32, shown in groups of four) and stores
    /// the user's master-key record: this device's salt and iterations and the code's hash.
    pub async fn backup(&self, client: &mut MasterKeyClient) -> anyhow::Result<String> {
        let code = data_encoding::BASE32_NOPAD.encode(&random_bytes::<20>());
        client
            .put_master_key(pb::PutMasterKeyRequest {
                salt: self.state.kdf.salt.to_vec(),
                pbkdf2_iterations: self.state.kdf.iterations,
                recovery_code: code.clone(),
            })
            .await?;
        Ok(code
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-"))
    }

    /// Opens an existing device; fails on a wrong passphrase.
    pub fn open(path: &Path, passphrase: &[u8]) -> anyhow::Result<Self> {
        let state = DeviceState::load(path)?;
        let vault = VaultKey::derive(passphrase, &state.kdf.salt, state.kdf.iterations);
        let device = Self {
            path: path.to_owned(),
            state,
            vault,
        };
        device.identity().context("opening the identity key")?;
        Ok(device)
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    fn save(&self) -> anyhow::Result<()> {
        self.state.save(&self.path)
    }

    fn open_pair(&self, sealed: &[u8], label: &str) -> anyhow::Result<KeyPair> {
        let private: Zeroizing<[u8; 32]> = self.vault.open_key(sealed, label)?;
        Ok(KeyPair::from_private(*private))
    }

    /// The identity key pair.
    pub fn identity(&self) -> anyhow::Result<KeyPair> {
        self.open_pair(
            &self.state.identity.sealed_private,
            &identity_label(&self.state.device_id),
        )
    }

    /// Generates, signs and stores a new signed prekey, which becomes the active one.
    fn new_signed_prekey(&mut self) -> anyhow::Result<StoredSignedPreKey> {
        let identity = self.identity()?;
        let id = self.state.next_signed_prekey_id;
        self.state.next_signed_prekey_id = next_id(id);
        let pair = KeyPair::generate();
        let public = pair.public().serialize();
        let key = StoredSignedPreKey {
            id,
            public: public.to_vec(),
            signature: identity.sign(&public).to_vec(),
            sealed_private: self.vault.seal(&*pair.private_bytes(), &signed_label(id)),
            created_at: OffsetDateTime::now_utc().unix_timestamp(),
        };
        self.state.signed_prekeys.push(key.clone());
        Ok(key)
    }

    /// Generates and stores `count` one-time prekeys.
    fn new_one_time_prekeys(&mut self, count: u32) -> Vec<StoredPreKey> {
        let keys: Vec<StoredPreKey> = (0..count)
            .map(|_| {
                let id = self.state.next_one_time_prekey_id;
                self.state.next_one_time_prekey_id = next_id(id);
                let pair = KeyPair::generate();
                StoredPreKey {
                    id,
                    public: pair.public().serialize().to_vec(),
                    sealed_private: self.vault.seal(&*pair.private_bytes(), &one_time_label(id)),
                }
            })
            .collect();
        self.state.one_time_prekeys.extend(keys.iter().cloned());
        keys
    }

    fn active_signed_prekey(&self) -> Option<&StoredSignedPreKey> {
        self.state.signed_prekeys.last()
    }

    /// Registers the device: its identity, its active signed prekey (made if it has none) and
    /// up to 100 one-time prekeys (made if it has none). Safe to repeat.
    pub async fn register(
        &mut self,
        client: &mut KeyClient,
    ) -> anyhow::Result<pb::RegisterDeviceResponse> {
        let signed = match self.active_signed_prekey() {
            Some(key) => key.clone(),
            None => self.new_signed_prekey()?,
        };
        if self.state.one_time_prekeys.is_empty() {
            self.new_one_time_prekeys(ONE_TIME_PREKEY_TARGET);
        }
        self.save()?;
        let skip = self
            .state
            .one_time_prekeys
            .len()
            .saturating_sub(ONE_TIME_PREKEY_TARGET as usize);
        let request = pb::RegisterDeviceRequest {
            device_id: self.state.device_id.clone(),
            registration_id: u32::from(self.state.registration_id),
            identity_key: self.state.identity.public.clone(),
            encrypted_identity_private_key: self.state.identity.sealed_private.clone(),
            signed_prekey: Some(signed_upload(&signed)),
            one_time_prekeys: self.state.one_time_prekeys[skip..]
                .iter()
                .map(one_time_upload)
                .collect(),
        };
        Ok(client.register_device(request).await?.into_inner())
    }

    pub async fn status(&self, client: &mut KeyClient) -> anyhow::Result<pb::GetKeyStatusResponse> {
        Ok(client
            .get_key_status(pb::GetKeyStatusRequest {
                device_id: self.state.device_id.clone(),
            })
            .await?
            .into_inner())
    }

    /// Tops the server up to `target` one-time prekeys when fewer than `below` are left.
    /// Returns the upload's answer, or None when nothing was needed.
    pub async fn replenish(
        &mut self,
        client: &mut KeyClient,
        below: u32,
        target: u32,
    ) -> anyhow::Result<Option<pb::UploadOneTimePreKeysResponse>> {
        let available = self.status(client).await?.one_time_prekeys_available;
        if available >= below || available >= target {
            return Ok(None);
        }
        let keys = self.new_one_time_prekeys((target - available).min(ONE_TIME_PREKEY_TARGET));
        self.save()?;
        let response = client
            .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
                device_id: self.state.device_id.clone(),
                one_time_prekeys: keys.iter().map(one_time_upload).collect(),
            })
            .await?
            .into_inner();
        Ok(Some(response))
    }

    /// Rotates the signed prekey: always, or with `if_due` only when the server says it is due.
    /// Returns the rotation's answer, or None when nothing was done.
    ///
    /// Retry-safe: a key made by an earlier call whose answer never arrived (the local newest
    /// key is not the server's active one) is sent again instead of a new one, and the server
    /// treats a repeat of its active key as done. So a device's cron can run this until it
    /// succeeds without piling up keys.
    pub async fn rotate(
        &mut self,
        client: &mut KeyClient,
        if_due: bool,
    ) -> anyhow::Result<Option<pb::RotateSignedPreKeyResponse>> {
        let status = self.status(client).await?;
        let pending = self
            .active_signed_prekey()
            .filter(|k| Some(k.id) != status.active_signed_prekey_id)
            .cloned();
        let key = match pending {
            Some(key) => key,
            None if if_due && !status.rotation_due => return Ok(None),
            None => {
                let key = self.new_signed_prekey()?;
                self.save()?;
                key
            }
        };
        let response = client
            .rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
                device_id: self.state.device_id.clone(),
                signed_prekey: Some(signed_upload(&key)),
            })
            .await?
            .into_inner();
        Ok(Some(response))
    }

    /// What a device does periodically: tops up one-time prekeys when fewer than
    /// [`REPLENISH_BELOW`] are left and rotates the signed prekey when it is due.
    pub async fn refresh(&mut self, client: &mut KeyClient) -> anyhow::Result<Refreshed> {
        Ok(Refreshed {
            replenished: self
                .replenish(client, REPLENISH_BELOW, ONE_TIME_PREKEY_TARGET)
                .await?,
            rotated: self.rotate(client, true).await?,
        })
    }

    /// Starts a session with one of the peer's verified bundles: returns the secret and the
    /// message the peer needs to derive it too.
    pub fn initiate(
        &self,
        bundle: &VerifiedBundle,
    ) -> anyhow::Result<(SessionSecret, InitialMessage)> {
        Ok(x3dh::initiate(
            &self.state.device_id,
            &self.identity()?,
            &bundle.keys,
        ))
    }

    /// Derives the secret a peer's initial message established, and forgets the one-time
    /// prekey it used (it must never serve twice).
    pub fn respond(&mut self, message: &InitialMessage) -> anyhow::Result<SessionSecret> {
        let parse = |hex_key: &str, what: &str| -> anyhow::Result<PublicKey> {
            let bytes = hex::decode(hex_key).with_context(|| format!("{what} is not hex"))?;
            PublicKey::from_serialized(&bytes).with_context(|| what.to_owned())
        };
        let their_identity = parse(&message.identity_key, "identity_key")?;
        let their_ephemeral = parse(&message.ephemeral_key, "ephemeral_key")?;
        let signed = self
            .state
            .signed_prekeys
            .iter()
            .find(|k| k.id == message.signed_prekey_id)
            .with_context(|| {
                format!(
                    "no signed prekey {} on this device",
                    message.signed_prekey_id
                )
            })?;
        let signed = self.open_pair(&signed.sealed_private, &signed_label(signed.id))?;
        let one_time = match message.one_time_prekey_id {
            Some(id) => {
                let key = self
                    .state
                    .one_time_prekeys
                    .iter()
                    .find(|k| k.id == id)
                    .with_context(|| format!("one-time prekey {id} is unknown or already used"))?;
                Some(self.open_pair(&key.sealed_private, &one_time_label(id))?)
            }
            None => None,
        };
        let secret = x3dh::respond(
            &self.identity()?,
            &signed,
            one_time.as_ref(),
            &their_identity,
            &their_ephemeral,
        );
        if let Some(id) = message.one_time_prekey_id {
            self.state.one_time_prekeys.retain(|k| k.id != id);
            self.save()?;
        }
        Ok(secret)
    }

    fn session_key(&self, peer_user: Uuid, peer_device: &str) -> pb::SessionKey {
        pb::SessionKey {
            device_id: self.state.device_id.clone(),
            peer_user_id: peer_user.to_string(),
            peer_device_id: peer_device.to_owned(),
        }
    }

    /// Stores a session's secret on the server, sealed under the passphrase, replacing the
    /// stored version of that session (compare-and-swap). Returns the new version.
    pub async fn save_session(
        &self,
        client: &mut SessionClient,
        peer_user: Uuid,
        peer_device: &str,
        secret: &SessionSecret,
        is_initiator: bool,
    ) -> anyhow::Result<u64> {
        let key = self.session_key(peer_user, peer_device);
        let current = match client
            .get_session(pb::GetSessionRequest {
                key: Some(key.clone()),
            })
            .await
        {
            Ok(found) => found.into_inner().session.map_or(0, |s| s.version),
            Err(status) if status.code() == tonic::Code::NotFound => 0,
            Err(status) => return Err(status.into()),
        };
        let state = self.vault.seal(
            secret.expose(),
            &format!("session:{peer_user}:{peer_device}"),
        );
        let saved = client
            .put_session(pb::PutSessionRequest {
                key: Some(key),
                state,
                is_initiator,
                expected_version: current,
            })
            .await?
            .into_inner();
        Ok(saved.version)
    }

    /// Every session of this device, a page at a time.
    pub async fn sessions(
        &self,
        client: &mut SessionClient,
        include_inactive: bool,
    ) -> anyhow::Result<Vec<pb::Session>> {
        let mut sessions = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_sessions(pb::ListSessionsRequest {
                    device_id: self.state.device_id.clone(),
                    peer_user_id: None,
                    include_inactive,
                    page_size: 0,
                    page_token,
                })
                .await?
                .into_inner();
            sessions.extend(page.sessions);
            if page.next_page_token.is_empty() {
                return Ok(sessions);
            }
            page_token = page.next_page_token;
        }
    }

    /// Ends a session on the server.
    pub async fn destroy_session(
        &self,
        client: &mut SessionClient,
        peer_user: Uuid,
        peer_device: &str,
    ) -> anyhow::Result<u64> {
        let key = self.session_key(peer_user, peer_device);
        let session = client
            .get_session(pb::GetSessionRequest {
                key: Some(key.clone()),
            })
            .await?
            .into_inner()
            .session
            .context("the server returned no session")?;
        Ok(client
            .destroy_session(pb::DestroySessionRequest {
                key: Some(key),
                expected_version: session.version,
            })
            .await?
            .into_inner()
            .version)
    }
}

fn signed_upload(key: &StoredSignedPreKey) -> pb::SignedPreKeyUpload {
    pb::SignedPreKeyUpload {
        key_id: key.id,
        public_key: key.public.clone(),
        signature: key.signature.clone(),
        encrypted_private_key: key.sealed_private.clone(),
    }
}

fn one_time_upload(key: &StoredPreKey) -> pb::OneTimePreKeyUpload {
    pb::OneTimePreKeyUpload {
        key_id: key.id,
        public_key: key.public.clone(),
        encrypted_private_key: key.sealed_private.clone(),
    }
}

/// Fetches a peer's bundles and verifies every one; any bad signature fails the whole fetch.
pub async fn fetch_verified(
    client: &mut KeyClient,
    user_id: &str,
    device_id: Option<&str>,
) -> anyhow::Result<Vec<VerifiedBundle>> {
    let response = client
        .fetch_pre_key_bundle(pb::FetchPreKeyBundleRequest {
            target: Some(pb::Target {
                user_id: user_id.to_owned(),
                device_id: device_id.map(str::to_owned),
            }),
        })
        .await?
        .into_inner();
    response
        .devices
        .iter()
        .map(|b| api::verify_bundle(b).map_err(anyhow::Error::from))
        .collect()
}
