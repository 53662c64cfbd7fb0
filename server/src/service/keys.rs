//! `keyserver.v1.KeyService`: validates each request, calls the store, shapes the answer.

use std::collections::HashMap;
use std::time::Duration;

use keyserver_proto::checks;
use keyserver_proto::limits::REPLENISH_BELOW;
use keyserver_proto::pb;
use keyserver_proto::pb::key_service_server::KeyService;
use tonic::{Request, Response, Status};

use super::{status, validate};
use crate::auth::{Caller, caller};
use crate::clock::Clock;
use crate::config::RotationPolicy;
use crate::edge::metrics as m;
use crate::jobs::bundle_view::ViewChanges;
use crate::limits::Limits;
use crate::store::drain::DrainRule;
use crate::store::{DeviceBundle, FetchKey, KeyId, NewDevice, RegisterOutcome, Serve, Store};

/// The key service over a store.
pub struct KeyApi {
    store: Store,
    view: ViewChanges,
    rotation: RotationPolicy,
    clock: Clock,
    /// Which devices fetches serve: all, or only PQXDH ones (`--require-pqxdh`, which also
    /// refuses registrations without a last-resort Kyber prekey).
    serve: Serve,
    /// Rate limits, charged before the store is touched.
    limits: Limits,
    /// Most devices one user may have (0: no quota).
    max_devices: u32,
    /// What `GetKeyStatus` reports as a drain.
    drain: DrainRule,
    /// How long a fetch retried with its idempotency key gets the keys it took again.
    retry_window: Duration,
}

/// How the key service behaves, beyond its store.
pub struct KeyPolicy {
    pub rotation: RotationPolicy,
    pub clock: Clock,
    pub serve: Serve,
    pub limits: Limits,
    pub max_devices: u32,
    pub drain: DrainRule,
    pub retry_window: Duration,
}

impl KeyApi {
    pub fn new(store: Store, view: ViewChanges, policy: KeyPolicy) -> Self {
        Self {
            store,
            view,
            rotation: policy.rotation,
            clock: policy.clock,
            serve: policy.serve,
            limits: policy.limits,
            max_devices: policy.max_devices,
            drain: policy.drain,
            retry_window: policy.retry_window,
        }
    }

    /// The age in whole seconds of a key installed at `at`, and whether it is due for rotation.
    fn age(&self, installed: Option<time::OffsetDateTime>) -> (u64, bool) {
        let now = self.clock.now();
        match installed {
            Some(at) => (
                (now - at).whole_seconds().max(0) as u64,
                self.rotation.due(at, now),
            ),
            None => (0, true),
        }
    }

    /// The bundles as sent, each marked stale by the rotation policy at one instant.
    fn bundle_messages(&self, bundles: Vec<DeviceBundle>) -> Vec<pb::DevicePreKeyBundle> {
        let now = self.clock.now();
        bundles
            .into_iter()
            .map(|b| {
                let stale = self.rotation.stale(b.signed_prekey.rotated_at, now);
                bundle_message(b, stale)
            })
            .collect()
    }

    /// Charges the caller's limits, then takes the bundles: a refused fetch takes no key. A
    /// retry with the same idempotency key is charged again (it is a call like any other) and
    /// takes no more keys.
    async fn fetch(
        &self,
        caller: &Caller,
        targets: &[crate::store::BundleTarget],
        idempotency_key: Option<String>,
    ) -> Result<Vec<Vec<DeviceBundle>>, Status> {
        self.limits.fetch(caller, targets).await?;
        let retry = idempotency_key.map(|key| FetchKey {
            key,
            window: self.retry_window,
        });
        let results = self
            .store
            .fetch_bundles(caller.user_id, targets, self.serve, retry)
            .await?;
        // No view mark: fetches alone never re-arm the read model's refresh (jobs::bundle_view).
        served(&results);
        Ok(results)
    }
}

/// The kinds of key an upload stores, as the metrics label them.
#[derive(Clone, Copy)]
enum KeyKind {
    OneTimeEc,
    OneTimeKyber,
    SignedEc,
    KyberLastResort,
}

impl KeyKind {
    fn uploaded(self, n: usize) {
        let kind = match self {
            Self::OneTimeEc => "one_time_ec",
            Self::OneTimeKyber => "one_time_kyber",
            Self::SignedEc => "signed_ec",
            Self::KyberLastResort => "kyber_last_resort",
        };
        metrics::counter!(m::KEYS_UPLOADED, "kind" => kind).increment(n as u64);
    }
}

/// Counts what a fetch handed out: bundles, one-time keys of each kind, and bundles that went
/// without one because the device had none left (a device to warn, or a drain).
fn served(results: &[Vec<DeviceBundle>]) {
    for bundle in results.iter().flatten() {
        metrics::counter!(m::BUNDLES_SERVED).increment(1);
        let ec = if bundle.one_time_prekey.is_some() {
            m::ONE_TIME_PREKEYS_SERVED
        } else {
            m::BUNDLES_WITHOUT_ONE_TIME_PREKEY
        };
        metrics::counter!(ec, "kind" => "ec").increment(1);
        if bundle.kyber_prekey.is_some() {
            let kyber = if bundle.kyber_one_time {
                m::ONE_TIME_PREKEYS_SERVED
            } else {
                m::BUNDLES_WITHOUT_ONE_TIME_PREKEY
            };
            metrics::counter!(kyber, "kind" => "kyber").increment(1);
        }
    }
}

fn bundle_message(b: DeviceBundle, stale: bool) -> pb::DevicePreKeyBundle {
    pb::DevicePreKeyBundle {
        device_id: b.device_id.into_string(),
        registration_id: b.registration_id,
        identity_key: b.identity_key.serialize().to_vec(),
        signed_prekey: Some(pb::SignedPreKey {
            key_id: b.signed_prekey.key_id.get(),
            public_key: b.signed_prekey.public.serialize().to_vec(),
            signature: b.signed_prekey.signature.to_vec(),
            rotated_at: Some(super::timestamp(b.signed_prekey.rotated_at)),
            stale,
        }),
        one_time_prekey: b.one_time_prekey.map(|(key_id, public)| pb::OneTimePreKey {
            key_id: key_id.get(),
            public_key: public.serialize().to_vec(),
        }),
        kyber_prekey: b.kyber_prekey.map(|k| pb::KyberPreKey {
            key_id: k.key_id.get(),
            public_key: k.public.serialize(),
            signature: k.signature.to_vec(),
        }),
    }
}

/// Key ids as the wire carries them.
fn ids<I: KeyId>(ids: Vec<I>) -> Vec<u32> {
    ids.into_iter().map(KeyId::get).collect()
}

fn outcome_message(outcome: RegisterOutcome) -> pb::RegistrationOutcome {
    match outcome {
        RegisterOutcome::Created => pb::RegistrationOutcome::Created,
        RegisterOutcome::Updated => pb::RegistrationOutcome::Updated,
        RegisterOutcome::Replaced => pb::RegistrationOutcome::Replaced,
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        // A chosen id needs a token bound to it, so nobody can squat another's id; without
        // one the server issues an id in the user's own space.
        let (device_id, issued) = match r.device_id.as_str() {
            "" => (caller.issue_device_id(), true),
            chosen => {
                let device_id = validate::device_id("device_id", chosen)?;
                caller.may_register(&device_id)?;
                (device_id, false)
            }
        };
        let identity_key = validate::public_key("identity_key", &r.identity_key)?;
        let kyber_last_resort = match r.kyber_last_resort_prekey {
            Some(key) => Some(validate::kyber_prekey(
                "kyber_last_resort_prekey",
                key,
                &identity_key,
            )?),
            None if self.serve == Serve::PqxdhOnly => {
                return Err(validate::invalid(
                    "kyber_last_resort_prekey",
                    "is required: this server serves PQXDH only",
                )
                .into());
            }
            None if !r.kyber_one_time_prekeys.is_empty() => {
                return Err(validate::invalid(
                    "kyber_last_resort_prekey",
                    "is required with kyber_one_time_prekeys",
                )
                .into());
            }
            None => None,
        };
        let device = NewDevice {
            user_id: caller.user_id,
            may_change: !issued,
            max_devices: self.max_devices,
            device_id,
            registration_id: validate::registration_id("registration_id", r.registration_id)?,
            identity_key,
            encrypted_identity_private: validate::encrypted_blob(
                "encrypted_identity_private_key",
                r.encrypted_identity_private_key,
            )?,
            signed_prekey: validate::signed_prekey(
                "signed_prekey",
                r.signed_prekey,
                &identity_key,
            )?,
            one_time_prekeys: validate::one_time_prekeys(
                "one_time_prekeys",
                r.one_time_prekeys,
                0,
            )?,
            kyber_one_time_prekeys: validate::kyber_prekeys(
                "kyber_one_time_prekeys",
                r.kyber_one_time_prekeys,
                0,
                &identity_key,
                kyber_last_resort.as_ref().map(|k| k.key_id),
            )?,
            kyber_last_resort,
            replace_one_time: r.replace_one_time_prekeys,
        };
        let device_id = device.device_id.clone();
        let uploaded = [
            (KeyKind::OneTimeEc, device.one_time_prekeys.len()),
            (KeyKind::OneTimeKyber, device.kyber_one_time_prekeys.len()),
            (KeyKind::SignedEc, 1),
            (
                KeyKind::KyberLastResort,
                usize::from(device.kyber_last_resort.is_some()),
            ),
        ];
        self.limits.register(caller.user_id).await?;
        let registered = self.store.register_device(device).await?;
        for (kind, n) in uploaded {
            kind.uploaded(n);
        }
        self.view.mark();
        tracing::info!(%device_id, outcome = registered.outcome.as_str(), "device registered");
        Ok(Response::new(pb::RegisterDeviceResponse {
            device_id: device_id.into_string(),
            outcome: outcome_message(registered.outcome).into(),
            one_time_prekeys_available: registered.available,
            kyber_one_time_prekeys_available: registered.kyber_available,
            one_time_prekeys_withdrawn: registered.withdrawn.one_time,
            kyber_one_time_prekeys_withdrawn: registered.withdrawn.kyber_one_time,
        }))
    }

    async fn upload_one_time_pre_keys(
        &self,
        request: Request<pb::UploadOneTimePreKeysRequest>,
    ) -> Result<Response<pb::UploadOneTimePreKeysResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let device_id = validate::device_id("device_id", &r.device_id)?;
        caller.may_write(&device_id)?;
        let keys = validate::one_time_prekeys("one_time_prekeys", r.one_time_prekeys, 1)?;
        self.limits.upload(caller.user_id, &device_id).await?;
        let report = self
            .store
            .upload_one_time_prekeys(caller.user_id, &device_id, keys)
            .await?;
        KeyKind::OneTimeEc.uploaded(report.stored.len());
        if !report.stored.is_empty() {
            self.view.mark();
        }
        tracing::debug!(
            %device_id,
            stored = report.stored.len(),
            refused = report.refused_consumed.len(),
            "one-time prekeys uploaded"
        );
        Ok(Response::new(pb::UploadOneTimePreKeysResponse {
            stored_key_ids: ids(report.stored),
            unchanged_key_ids: ids(report.unchanged),
            refused_consumed_key_ids: ids(report.refused_consumed),
            one_time_prekeys_available: report.available,
        }))
    }

    async fn rotate_signed_pre_key(
        &self,
        request: Request<pb::RotateSignedPreKeyRequest>,
    ) -> Result<Response<pb::RotateSignedPreKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let device_id = validate::device_id("device_id", &r.device_id)?;
        caller.may_write(&device_id)?;
        let identity = self
            .store
            .device_identity(caller.user_id, &device_id)
            .await?;
        let key = validate::signed_prekey("signed_prekey", r.signed_prekey, &identity)?;
        self.limits.upload(caller.user_id, &device_id).await?;
        let rotated = self
            .store
            .rotate_signed_prekey(caller.user_id, &device_id, identity, key)
            .await?;
        if rotated.rotated {
            KeyKind::SignedEc.uploaded(1);
            self.view.mark();
            tracing::info!(%device_id, "signed prekey rotated");
        }
        Ok(Response::new(pb::RotateSignedPreKeyResponse {
            rotated: rotated.rotated,
            previous_key_id: rotated.previous_key_id.map(KeyId::get),
        }))
    }

    async fn get_key_status(
        &self,
        request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        let caller = caller(&request)?;
        let device_id = validate::device_id("device_id", &request.get_ref().device_id)?;
        let status = self.store.key_status(caller.user_id, &device_id).await?;
        let since = self.clock.now() - self.drain.window;
        let drain = self
            .store
            .drain_finding(&self.drain, &device_id, since)
            .await?;
        let signed_at = status.active_signed_prekey.map(|(_, at)| at);
        let (age, rotation_due) = self.age(signed_at);
        let kyber_at = status.kyber_last_resort.map(|(_, at)| at);
        let (kyber_age, kyber_rotation_due) = self.age(kyber_at);
        let kyber_replenish = status.kyber_available < REPLENISH_BELOW;
        // A device without Kyber keys is not told to rotate or top up what it never had; its
        // kyber_* fields say what it lacks.
        let pqxdh = status.kyber_last_resort.is_some();
        Ok(Response::new(pb::GetKeyStatusResponse {
            one_time_prekeys_available: status.available,
            active_signed_prekey_id: status.active_signed_prekey.map(|(id, _)| id.get()),
            active_signed_prekey_created_at: signed_at.map(super::timestamp),
            active_signed_prekey_age_seconds: age,
            rotation_due: rotation_due || (pqxdh && kyber_rotation_due),
            replenish_recommended: status.available < REPLENISH_BELOW || (pqxdh && kyber_replenish),
            kyber_one_time_prekeys_available: status.kyber_available,
            kyber_last_resort_prekey_id: status.kyber_last_resort.map(|(id, _)| id.get()),
            kyber_last_resort_prekey_created_at: kyber_at.map(super::timestamp),
            kyber_last_resort_prekey_age_seconds: kyber_age,
            kyber_rotation_due,
            kyber_replenish_recommended: kyber_replenish,
            drain_suspected: drain.is_some(),
        }))
    }

    async fn fetch_pre_key_bundle(
        &self,
        request: Request<pb::FetchPreKeyBundleRequest>,
    ) -> Result<Response<pb::FetchPreKeyBundleResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let target = validate::target("target", r.target)?;
        let key = validate::idempotency_key("idempotency_key", &r.idempotency_key)?;
        let bundles = self
            .fetch(&caller, std::slice::from_ref(&target), key)
            .await?
            .pop()
            .unwrap_or_default();
        if bundles.is_empty() {
            return Err(status::no_bundle(&target));
        }
        Ok(Response::new(pb::FetchPreKeyBundleResponse {
            devices: self.bundle_messages(bundles),
        }))
    }

    async fn remove_device(
        &self,
        request: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
        let caller = caller(&request)?;
        let device_id = validate::device_id("device_id", &request.get_ref().device_id)?;
        caller.may_write(&device_id)?;
        let sessions_removed = self.store.remove_device(caller.user_id, &device_id).await?;
        self.view.mark();
        tracing::info!(%device_id, "device removed");
        Ok(Response::new(pb::RemoveDeviceResponse { sessions_removed }))
    }

    async fn get_identity_keys(
        &self,
        request: Request<pb::GetIdentityKeysRequest>,
    ) -> Result<Response<pb::GetIdentityKeysResponse>, Status> {
        let caller = caller(&request)?;
        let user_id = match request.get_ref().user_id.as_str() {
            "" => caller.user_id,
            user => validate::user_id("user_id", user)?,
        };
        let mut identity_keys: Vec<Vec<u8>> = self
            .store
            .identity_keys(user_id)
            .await?
            .iter()
            .map(|k| k.serialize().to_vec())
            .collect();
        identity_keys.sort_unstable();
        Ok(Response::new(pb::GetIdentityKeysResponse {
            user_id: user_id.to_string(),
            identity_keys,
        }))
    }

    async fn fetch_pre_key_bundles(
        &self,
        request: Request<pb::FetchPreKeyBundlesRequest>,
    ) -> Result<Response<pb::FetchPreKeyBundlesResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let requested = r.targets;
        let targets = validate::targets("targets", requested.clone())?;
        let key = validate::idempotency_key("idempotency_key", &r.idempotency_key)?;
        let results = self.fetch(&caller, &targets, key).await?;
        Ok(Response::new(pb::FetchPreKeyBundlesResponse {
            results: requested
                .into_iter()
                .zip(results)
                .map(|(target, bundles)| pb::TargetResult {
                    target: Some(target),
                    status: if bundles.is_empty() {
                        pb::TargetStatus::NotFound
                    } else {
                        pb::TargetStatus::Found
                    }
                    .into(),
                    devices: self.bundle_messages(bundles),
                })
                .collect(),
        }))
    }

    async fn upload_kyber_pre_keys(
        &self,
        request: Request<pb::UploadKyberPreKeysRequest>,
    ) -> Result<Response<pb::UploadKyberPreKeysResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let device_id = validate::device_id("device_id", &r.device_id)?;
        caller.may_write(&device_id)?;
        let identity = self
            .store
            .device_identity(caller.user_id, &device_id)
            .await?;
        let keys = validate::kyber_prekeys(
            "kyber_one_time_prekeys",
            r.kyber_one_time_prekeys,
            1,
            &identity,
            None,
        )?;
        self.limits.upload(caller.user_id, &device_id).await?;
        let report = self
            .store
            .upload_kyber_prekeys(caller.user_id, &device_id, identity, keys)
            .await?;
        KeyKind::OneTimeKyber.uploaded(report.stored.len());
        tracing::debug!(
            %device_id,
            stored = report.stored.len(),
            refused = report.refused_consumed.len(),
            "one-time Kyber prekeys uploaded"
        );
        Ok(Response::new(pb::UploadKyberPreKeysResponse {
            stored_key_ids: ids(report.stored),
            unchanged_key_ids: ids(report.unchanged),
            refused_consumed_key_ids: ids(report.refused_consumed),
            kyber_one_time_prekeys_available: report.available,
        }))
    }

    async fn rotate_kyber_last_resort_pre_key(
        &self,
        request: Request<pb::RotateKyberLastResortPreKeyRequest>,
    ) -> Result<Response<pb::RotateKyberLastResortPreKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let device_id = validate::device_id("device_id", &r.device_id)?;
        caller.may_write(&device_id)?;
        let field = "kyber_last_resort_prekey";
        let upload = r
            .kyber_last_resort_prekey
            .ok_or_else(|| validate::invalid(field, "is required"))?;
        let identity = self
            .store
            .device_identity(caller.user_id, &device_id)
            .await?;
        let key = validate::kyber_prekey(field, upload, &identity)?;
        self.limits.upload(caller.user_id, &device_id).await?;
        let rotated = self
            .store
            .rotate_kyber_last_resort_prekey(caller.user_id, &device_id, identity, key)
            .await?;
        if rotated.rotated {
            KeyKind::KyberLastResort.uploaded(1);
            tracing::info!(%device_id, "last-resort Kyber prekey rotated");
        }
        Ok(Response::new(pb::RotateKyberLastResortPreKeyResponse {
            rotated: rotated.rotated,
            previous_key_id: rotated.previous_key_id.map(KeyId::get),
        }))
    }

    async fn check_keys(
        &self,
        request: Request<pb::CheckKeysRequest>,
    ) -> Result<Response<pb::CheckKeysResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let device_id = validate::device_id("device_id", &r.device_id)?;
        let digest = validate::digest("digest", &r.digest)?;
        let keys = self
            .store
            .published_keys(caller.user_id, &device_id)
            .await?;
        let matches = match (&keys.signed_prekey, &keys.kyber_last_resort) {
            (Some((signed_id, signed)), Some((kyber_id, kyber))) => {
                checks::published_keys_digest(
                    &keys.identity_key,
                    (signed_id.get(), signed),
                    (kyber_id.get(), kyber),
                ) == digest
            }
            _ => false,
        };
        Ok(Response::new(pb::CheckKeysResponse { matches }))
    }

    async fn check_identity_keys(
        &self,
        request: Request<pb::CheckIdentityKeysRequest>,
    ) -> Result<Response<pb::CheckIdentityKeysResponse>, Status> {
        caller(&request)?;
        let checks = validate::identity_checks("checks", request.into_inner().checks)?;
        let mut users: Vec<_> = checks.iter().map(|c| c.user_id).collect();
        users.sort_unstable();
        users.dedup();
        let mut devices: HashMap<_, Vec<_>> = HashMap::new();
        for (user, device, key) in self.store.device_identities(&users).await? {
            devices.entry(user).or_default().push((device, key));
        }
        let mismatch = |user: uuid::Uuid, device: String, key: Vec<u8>| pb::IdentityKeyMismatch {
            user_id: user.to_string(),
            device_id: device,
            identity_key: key,
        };
        let mut mismatches = Vec::new();
        for check in checks {
            let user = check.user_id;
            let current = devices.get(&user).map(Vec::as_slice).unwrap_or_default();
            let matches = |key| checks::identity_fingerprint(key) == check.fingerprint;
            match check.device_id {
                Some(device) => match current.iter().find(|(d, _)| *d == device) {
                    Some((_, key)) if matches(key) => {}
                    Some((_, key)) => mismatches.push(mismatch(
                        user,
                        device.into_string(),
                        key.serialize().to_vec(),
                    )),
                    None => mismatches.push(mismatch(user, device.into_string(), Vec::new())),
                },
                None if current.iter().any(|(_, key)| matches(key)) => {}
                None if current.is_empty() => {
                    mismatches.push(mismatch(user, String::new(), Vec::new()));
                }
                None => mismatches.extend(
                    current
                        .iter()
                        .map(|(d, key)| mismatch(user, d.to_string(), key.serialize().to_vec())),
                ),
            }
        }
        Ok(Response::new(pb::CheckIdentityKeysResponse { mismatches }))
    }
}
