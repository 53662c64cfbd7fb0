//! `keyserver.v1.KeyService`: validates each request, calls the store, shapes the answer.

use keyserver_proto::limits::REPLENISH_BELOW;
use keyserver_proto::pb;
use keyserver_proto::pb::key_service_server::KeyService;
use tonic::{Request, Response, Status};

use super::validate;
use crate::auth::caller;
use crate::clock::Clock;
use crate::config::RotationPolicy;
use crate::jobs::bundle_view::ViewChanges;
use crate::store::{DeviceBundle, KeyId, NewDevice, RegisterOutcome, Store};

/// The key service over a store.
pub struct KeyApi {
    store: Store,
    view: ViewChanges,
    rotation: RotationPolicy,
    clock: Clock,
}

impl KeyApi {
    pub fn new(store: Store, view: ViewChanges, rotation: RotationPolicy, clock: Clock) -> Self {
        Self {
            store,
            view,
            rotation,
            clock,
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

    async fn fetch(
        &self,
        targets: &[crate::store::BundleTarget],
    ) -> Result<Vec<Vec<DeviceBundle>>, Status> {
        let results = self.store.fetch_bundles(targets).await?;
        if results
            .iter()
            .flatten()
            .any(|b| b.one_time_prekey.is_some())
        {
            self.view.mark();
        }
        Ok(results)
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
        let identity_key = validate::public_key("identity_key", &r.identity_key)?;
        let device = NewDevice {
            user_id: caller.user_id,
            device_id: validate::device_id("device_id", &r.device_id)?,
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
        };
        let device_id = device.device_id.clone();
        let registered = self.store.register_device(device).await?;
        self.view.mark();
        tracing::info!(%device_id, outcome = registered.outcome.as_str(), "device registered");
        Ok(Response::new(pb::RegisterDeviceResponse {
            outcome: outcome_message(registered.outcome).into(),
            one_time_prekeys_available: registered.available,
        }))
    }

    async fn upload_one_time_pre_keys(
        &self,
        request: Request<pb::UploadOneTimePreKeysRequest>,
    ) -> Result<Response<pb::UploadOneTimePreKeysResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let device_id = validate::device_id("device_id", &r.device_id)?;
        let keys = validate::one_time_prekeys("one_time_prekeys", r.one_time_prekeys, 1)?;
        let report = self
            .store
            .upload_one_time_prekeys(caller.user_id, &device_id, keys)
            .await?;
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
        let identity = self
            .store
            .device_identity(caller.user_id, &device_id)
            .await?;
        let key = validate::signed_prekey("signed_prekey", r.signed_prekey, &identity)?;
        let rotated = self
            .store
            .rotate_signed_prekey(caller.user_id, &device_id, identity, key)
            .await?;
        if rotated.rotated {
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
        let now = self.clock.now();
        let (id, created_at, age) = match status.active_signed_prekey {
            Some((id, at)) => (
                Some(id.get()),
                Some(at),
                (now - at).whole_seconds().max(0) as u64,
            ),
            None => (None, None, 0),
        };
        Ok(Response::new(pb::GetKeyStatusResponse {
            one_time_prekeys_available: status.available,
            active_signed_prekey_id: id,
            active_signed_prekey_created_at: created_at.map(super::timestamp),
            active_signed_prekey_age_seconds: age,
            rotation_due: created_at.is_none_or(|at| self.rotation.due(at, now)),
            replenish_recommended: status.available < REPLENISH_BELOW,
        }))
    }

    async fn fetch_pre_key_bundle(
        &self,
        request: Request<pb::FetchPreKeyBundleRequest>,
    ) -> Result<Response<pb::FetchPreKeyBundleResponse>, Status> {
        caller(&request)?;
        let target = validate::target("target", request.into_inner().target)?;
        let bundles = self
            .fetch(std::slice::from_ref(&target))
            .await?
            .pop()
            .unwrap_or_default();
        if bundles.is_empty() {
            return Err(Status::not_found(match &target.device_id {
                Some(device) => format!(
                    "target: device {device} of user {} has no bundle",
                    target.user_id
                ),
                None => format!("target: no device of user {} has a bundle", target.user_id),
            }));
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
        caller(&request)?;
        let requested = request.into_inner().targets;
        let targets = validate::targets("targets", requested.clone())?;
        let results = self.fetch(&targets).await?;
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
}
