//! A device: its local state opened with the passphrase, and what it does with the server
//! (register, replenish, rotate, check its keys, report status, fetch peers, run PQXDH).
//!
//! A device keeps two kinds of each prekey on the server, Curve25519 and Kyber1024: one-time
//! keys (topped up to 100 when fewer than 10 are left) and a signed key every peer gets until
//! it is replaced (the signed prekey and the last-resort Kyber prekey, rotated together).

use std::path::{Path, PathBuf};

use anyhow::Context;
use keyserver_proto::checks;
use keyserver_proto::pb;
use keyserver_proto::wire::{KyberPublicKey, PublicKey};
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::api::{self, KeyClient, MasterKeyClient, SessionClient, VerifiedBundle};
use crate::keys::{KYBER1024_CIPHERTEXT_LEN, KeyPair, KyberKeyPair, random_bytes};
use crate::pqxdh::{self, InitialMessage, OwnPreKeys, SessionSecret};
use crate::state::{
    DeviceState, Kdf, STATE_VERSION, StoredIdentity, StoredKyberPreKey, StoredPreKey,
    StoredSignedPreKey,
};
use crate::vault::{self, VaultKey};

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
fn kyber_label(id: u32) -> String {
    format!("kyber-prekey:{id}")
}

/// The id after `id`, wrapping below 2^24 and skipping 0.
fn next_id(id: u32) -> u32 {
    if id >= MAX_KEY_ID { 1 } else { id + 1 }
}

/// A random starting id in 1..2^24, so ids of a reinstalled device rarely collide.
fn random_start_id() -> u32 {
    u32::from_le_bytes(random_bytes()) % MAX_KEY_ID + 1
}

/// What [`Device::replenish`] uploaded; None where nothing was needed.
#[derive(Debug, Clone, Default)]
pub struct Replenished {
    pub one_time: Option<pb::UploadOneTimePreKeysResponse>,
    pub kyber: Option<pb::UploadKyberPreKeysResponse>,
}

/// What [`Device::rotate`] did; None where nothing was done.
#[derive(Debug, Clone, Default)]
pub struct Rotated {
    pub signed: Option<pb::RotateSignedPreKeyResponse>,
    pub kyber_last_resort: Option<pb::RotateKyberLastResortPreKeyResponse>,
}

/// What [`Device::refresh`] did.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// The registration sent again because the server's keys differed from this device's
    /// (`CheckKeys`); None when they matched.
    pub reuploaded: Option<pb::RegisterDeviceResponse>,
    pub replenished: Replenished,
    pub rotated: Rotated,
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
            kyber_one_time_prekeys: Vec::new(),
            kyber_last_resort_prekeys: Vec::new(),
            next_kyber_prekey_id: random_start_id(),
            withdraw_unused_prekeys: false,
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
    /// `register` publishes fresh ones and withdraws the earlier device's unused one-time
    /// prekeys, whose private keys went with it.
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
        let mut restored = Self::start(
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
        )?;
        restored.state.withdraw_unused_prekeys = true;
        restored.save()?;
        Ok(restored)
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

    /// The id for the next Kyber prekey (a state written before PQXDH starts its counter now).
    fn next_kyber_id(&mut self) -> u32 {
        let id = match self.state.next_kyber_prekey_id {
            0 => random_start_id(),
            id => id,
        };
        self.state.next_kyber_prekey_id = next_id(id);
        id
    }

    /// Generates, signs and seals a Kyber prekey.
    fn new_kyber_prekey(&mut self, identity: &KeyPair) -> StoredKyberPreKey {
        let id = self.next_kyber_id();
        let pair = KyberKeyPair::generate();
        let public = pair.public().serialize();
        StoredKyberPreKey {
            id,
            signature: identity.sign(&public).to_vec(),
            public,
            sealed_private: self.vault.seal(pair.private_bytes(), &kyber_label(id)),
            created_at: OffsetDateTime::now_utc().unix_timestamp(),
        }
    }

    /// Generates and stores `count` one-time Kyber prekeys.
    fn new_kyber_one_time_prekeys(&mut self, count: u32) -> anyhow::Result<Vec<StoredKyberPreKey>> {
        let identity = self.identity()?;
        let keys: Vec<StoredKyberPreKey> = (0..count)
            .map(|_| self.new_kyber_prekey(&identity))
            .collect();
        self.state
            .kyber_one_time_prekeys
            .extend(keys.iter().cloned());
        Ok(keys)
    }

    /// Generates and stores a last-resort Kyber prekey, which becomes the active one.
    fn new_kyber_last_resort(&mut self) -> anyhow::Result<StoredKyberPreKey> {
        let identity = self.identity()?;
        let key = self.new_kyber_prekey(&identity);
        self.state.kyber_last_resort_prekeys.push(key.clone());
        Ok(key)
    }

    fn active_signed_prekey(&self) -> Option<&StoredSignedPreKey> {
        self.state.signed_prekeys.last()
    }

    fn active_kyber_last_resort(&self) -> Option<&StoredKyberPreKey> {
        self.state.kyber_last_resort_prekeys.last()
    }

    /// Registers the device: its identity, its active signed prekey and last-resort Kyber
    /// prekey (made if it has none) and up to 100 one-time prekeys of each kind (made if it has
    /// none). Safe to repeat; it also brings a device registered before PQXDH up to date. The
    /// first registration after a restore withdraws the server's other unused one-time
    /// prekeys of the device in the same transaction.
    pub async fn register(
        &mut self,
        client: &mut KeyClient,
    ) -> anyhow::Result<pb::RegisterDeviceResponse> {
        let signed = match self.active_signed_prekey() {
            Some(key) => key.clone(),
            None => self.new_signed_prekey()?,
        };
        let last_resort = match self.active_kyber_last_resort() {
            Some(key) => key.clone(),
            None => self.new_kyber_last_resort()?,
        };
        if self.state.one_time_prekeys.is_empty() {
            self.new_one_time_prekeys(ONE_TIME_PREKEY_TARGET);
        }
        if self.state.kyber_one_time_prekeys.is_empty() {
            self.new_kyber_one_time_prekeys(ONE_TIME_PREKEY_TARGET)?;
        }
        self.save()?;
        let request = pb::RegisterDeviceRequest {
            device_id: self.state.device_id.clone(),
            registration_id: u32::from(self.state.registration_id),
            identity_key: self.state.identity.public.clone(),
            encrypted_identity_private_key: self.state.identity.sealed_private.clone(),
            signed_prekey: Some(signed_upload(&signed)),
            one_time_prekeys: newest(&self.state.one_time_prekeys)
                .iter()
                .map(one_time_upload)
                .collect(),
            kyber_last_resort_prekey: Some(kyber_upload(&last_resort)),
            kyber_one_time_prekeys: newest(&self.state.kyber_one_time_prekeys)
                .iter()
                .map(kyber_upload)
                .collect(),
            replace_one_time_prekeys: self.state.withdraw_unused_prekeys,
        };
        let response = client.register_device(request).await?.into_inner();
        if self.state.withdraw_unused_prekeys {
            self.state.withdraw_unused_prekeys = false;
            self.save()?;
        }
        Ok(response)
    }

    pub async fn status(&self, client: &mut KeyClient) -> anyhow::Result<pb::GetKeyStatusResponse> {
        Ok(client
            .get_key_status(pb::GetKeyStatusRequest {
                device_id: self.state.device_id.clone(),
            })
            .await?
            .into_inner())
    }

    /// Tops the server up to `target` one-time prekeys of each kind where fewer than `below`
    /// are left (Kyber ones only once the server has this device's last-resort Kyber prekey).
    pub async fn replenish(
        &mut self,
        client: &mut KeyClient,
        below: u32,
        target: u32,
    ) -> anyhow::Result<Replenished> {
        anyhow::ensure!(
            (1..=ONE_TIME_PREKEY_TARGET).contains(&target),
            "one upload carries 1 to {ONE_TIME_PREKEY_TARGET} one-time prekeys; --to {target} is not possible"
        );
        let status = self.status(client).await?;
        let wanted =
            |available: u32| (available < below && available < target).then(|| target - available);
        let mut done = Replenished::default();
        if let Some(count) = wanted(status.one_time_prekeys_available) {
            let keys = self.new_one_time_prekeys(count);
            self.save()?;
            done.one_time = Some(
                client
                    .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
                        device_id: self.state.device_id.clone(),
                        one_time_prekeys: keys.iter().map(one_time_upload).collect(),
                    })
                    .await?
                    .into_inner(),
            );
        }
        if status.kyber_last_resort_prekey_id.is_some()
            && let Some(count) = wanted(status.kyber_one_time_prekeys_available)
        {
            let keys = self.new_kyber_one_time_prekeys(count)?;
            self.save()?;
            done.kyber = Some(
                client
                    .upload_kyber_pre_keys(pb::UploadKyberPreKeysRequest {
                        device_id: self.state.device_id.clone(),
                        kyber_one_time_prekeys: keys.iter().map(kyber_upload).collect(),
                    })
                    .await?
                    .into_inner(),
            );
        }
        Ok(done)
    }

    /// Rotates the signed prekey and the last-resort Kyber prekey together: always, or with
    /// `if_due` only when the server says either is due (or has no last-resort key yet).
    ///
    /// Retry-safe: a key made by an earlier call whose answer never arrived (the local newest
    /// key is not the server's active one) is sent again instead of a new one, and the server
    /// treats a repeat of its active key as done. So a device's cron can run this until it
    /// succeeds without piling up keys.
    pub async fn rotate(
        &mut self,
        client: &mut KeyClient,
        if_due: bool,
    ) -> anyhow::Result<Rotated> {
        let status = self.status(client).await?;
        let pending_signed = self
            .active_signed_prekey()
            .filter(|k| Some(k.id) != status.active_signed_prekey_id)
            .cloned();
        let pending_kyber = self
            .active_kyber_last_resort()
            .filter(|k| Some(k.id) != status.kyber_last_resort_prekey_id)
            .cloned();
        let due = !if_due || status.rotation_due || status.kyber_rotation_due;
        let signed = match pending_signed {
            Some(key) => Some(key),
            None if due => Some(self.new_signed_prekey()?),
            None => None,
        };
        let kyber = match pending_kyber {
            Some(key) => Some(key),
            None if due => Some(self.new_kyber_last_resort()?),
            None => None,
        };
        self.save()?;
        let mut done = Rotated::default();
        if let Some(key) = signed {
            done.signed = Some(
                client
                    .rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
                        device_id: self.state.device_id.clone(),
                        signed_prekey: Some(signed_upload(&key)),
                    })
                    .await?
                    .into_inner(),
            );
        }
        if let Some(key) = kyber {
            done.kyber_last_resort = Some(
                client
                    .rotate_kyber_last_resort_pre_key(pb::RotateKyberLastResortPreKeyRequest {
                        device_id: self.state.device_id.clone(),
                        kyber_last_resort_prekey: Some(kyber_upload(&key)),
                    })
                    .await?
                    .into_inner(),
            );
        }
        Ok(done)
    }

    /// Whether the server holds exactly this device's identity key, active signed prekey and
    /// active last-resort Kyber prekey (`CheckKeys`); false when this device has not made them.
    pub async fn check_keys(&self, client: &mut KeyClient) -> anyhow::Result<bool> {
        let (Some(signed), Some(kyber)) =
            (self.active_signed_prekey(), self.active_kyber_last_resort())
        else {
            return Ok(false);
        };
        let identity = PublicKey::from_serialized(&self.state.identity.public)?;
        let digest = checks::published_keys_digest(
            &identity,
            (signed.id, &PublicKey::from_serialized(&signed.public)?),
            (kyber.id, &KyberPublicKey::from_serialized(&kyber.public)?),
        );
        Ok(client
            .check_keys(pb::CheckKeysRequest {
                device_id: self.state.device_id.clone(),
                digest: digest.to_vec(),
            })
            .await?
            .into_inner()
            .matches)
    }

    /// What a device does periodically: checks that the server holds its keys and registers
    /// them again if not (which also brings a device registered before PQXDH up to date), tops
    /// up one-time prekeys of each kind when fewer than [`REPLENISH_BELOW`] are left, and
    /// rotates the signed keys when they are due.
    pub async fn refresh(&mut self, client: &mut KeyClient) -> anyhow::Result<Refreshed> {
        let reuploaded = if self.check_keys(client).await? {
            None
        } else {
            Some(self.register(client).await?)
        };
        Ok(Refreshed {
            reuploaded,
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
        Ok(pqxdh::initiate(
            &self.state.device_id,
            &self.identity()?,
            &bundle.keys,
        ))
    }

    /// Derives the secret a peer's initial message established, and forgets the one-time
    /// prekeys it used (they must never serve twice).
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
        let kyber = match (message.kyber_prekey_id, &message.kyber_ciphertext) {
            (Some(id), Some(ciphertext)) => {
                let ciphertext: [u8; KYBER1024_CIPHERTEXT_LEN] = hex::decode(ciphertext)
                    .context("kyber_ciphertext is not hex")?
                    .try_into()
                    .map_err(|_| {
                        anyhow::anyhow!("kyber_ciphertext is not {KYBER1024_CIPHERTEXT_LEN} bytes")
                    })?;
                // A one-time key is used once; a last-resort key, old ones included, until
                // cleanup would have removed it.
                let key = self
                    .state
                    .kyber_one_time_prekeys
                    .iter()
                    .chain(&self.state.kyber_last_resort_prekeys)
                    .find(|k| k.id == id)
                    .with_context(|| format!("Kyber prekey {id} is unknown or already used"))?;
                let private = self.vault.open(&key.sealed_private, &kyber_label(id))?;
                Some((KyberKeyPair::from_private(&private)?, ciphertext))
            }
            (None, None) => None,
            _ => anyhow::bail!(
                "the message names a Kyber prekey without a ciphertext, or the other way round"
            ),
        };
        let secret = pqxdh::respond(
            &OwnPreKeys {
                identity: &self.identity()?,
                signed_prekey: &signed,
                one_time_prekey: one_time.as_ref(),
                kyber: kyber.as_ref().map(|(key, ct)| (key, ct)),
            },
            &their_identity,
            &their_ephemeral,
        );
        if let Some(id) = message.one_time_prekey_id {
            self.state.one_time_prekeys.retain(|k| k.id != id);
        }
        if let Some(id) = message.kyber_prekey_id {
            self.state.kyber_one_time_prekeys.retain(|k| k.id != id);
        }
        if message.one_time_prekey_id.is_some() || message.kyber_prekey_id.is_some() {
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

fn kyber_upload(key: &StoredKyberPreKey) -> pb::KyberPreKeyUpload {
    pb::KyberPreKeyUpload {
        key_id: key.id,
        public_key: key.public.clone(),
        signature: key.signature.clone(),
        encrypted_private_key: key.sealed_private.clone(),
    }
}

/// The newest keys that fit one upload.
fn newest<T>(keys: &[T]) -> &[T] {
    &keys[keys.len().saturating_sub(ONE_TIME_PREKEY_TARGET as usize)..]
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
    // One key for every attempt: a retry after a lost answer gets the keys the first took.
    let request = pb::FetchPreKeyBundleRequest {
        target: Some(pb::Target {
            user_id: user_id.to_owned(),
            device_id: device_id.map(str::to_owned),
        }),
        idempotency_key: api::idempotency_key(),
    };
    let response = api::honouring_retry_info(|| {
        let (client, request) = (client.clone(), request.clone());
        api::retrying_lost_answers(move || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.fetch_pre_key_bundle(request).await }
        })
    })
    .await?
    .into_inner();
    response
        .devices
        .iter()
        .map(|b| api::verify_bundle(b).map_err(anyhow::Error::from))
        .collect()
}
