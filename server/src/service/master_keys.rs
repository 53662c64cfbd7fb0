//! `keyserver.v1.MasterKeyService`: the per-user record for restoring devices, and recovery.

use keyserver_proto::pb;
use keyserver_proto::pb::master_key_service_server::MasterKeyService;
use tonic::{Request, Response, Status};

use super::validate;
use crate::auth::caller;
use crate::store::{MasterKeyRecord, Store, StoreError};

/// Length of the PBKDF2 salt (the schema's `master_key_salt`).
pub const SALT_LEN: usize = 32;

/// The master-key service over a store.
pub struct MasterKeyApi {
    store: Store,
    min_iterations: u32,
}

impl MasterKeyApi {
    /// Refuses records with fewer than `min_iterations` PBKDF2 iterations.
    pub fn new(store: Store, min_iterations: u32) -> Self {
        Self {
            store,
            min_iterations,
        }
    }
}

#[tonic::async_trait]
impl MasterKeyService for MasterKeyApi {
    async fn put_master_key(
        &self,
        request: Request<pb::PutMasterKeyRequest>,
    ) -> Result<Response<pb::PutMasterKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        if r.salt.len() != SALT_LEN {
            return Err(validate::invalid(
                "salt",
                format!("must be {SALT_LEN} bytes, got {}", r.salt.len()),
            )
            .into());
        }
        if r.pbkdf2_iterations < self.min_iterations || r.pbkdf2_iterations > i32::MAX as u32 {
            return Err(validate::invalid(
                "pbkdf2_iterations",
                format!("must be at least {}", self.min_iterations),
            )
            .into());
        }
        let hash = validate::recovery_code_hash("recovery_code", &r.recovery_code)?;
        let record = MasterKeyRecord {
            salt: r.salt,
            pbkdf2_iterations: r.pbkdf2_iterations,
        };
        let created = self
            .store
            .put_master_key(caller.user_id, &record, &hash)
            .await?;
        Ok(Response::new(pb::PutMasterKeyResponse { created }))
    }

    async fn get_master_key(
        &self,
        request: Request<pb::GetMasterKeyRequest>,
    ) -> Result<Response<pb::GetMasterKeyResponse>, Status> {
        let caller = caller(&request)?;
        let record = self
            .store
            .master_key(caller.user_id)
            .await?
            .ok_or(StoreError::NoMasterKey)?;
        Ok(Response::new(pb::GetMasterKeyResponse {
            salt: record.salt,
            pbkdf2_iterations: record.pbkdf2_iterations,
        }))
    }

    async fn recover_device(
        &self,
        request: Request<pb::RecoverDeviceRequest>,
    ) -> Result<Response<pb::RecoverDeviceResponse>, Status> {
        let caller = caller(&request)?;
        let hash = validate::recovery_code_hash("recovery_code", &request.get_ref().recovery_code)?;
        let recovery = self.store.recover_device(caller.user_id, &hash).await?;
        tracing::info!(user_id = %caller.user_id, "recovery code used");
        Ok(Response::new(pb::RecoverDeviceResponse {
            salt: recovery.record.salt,
            pbkdf2_iterations: recovery.record.pbkdf2_iterations,
            devices: recovery
                .devices
                .into_iter()
                .map(|d| pb::RecoverableDevice {
                    device_id: d.device_id.into_string(),
                    registration_id: d.registration_id,
                    identity_key: d.identity_key.serialize().to_vec(),
                    encrypted_identity_private_key: d.encrypted_identity_private,
                })
                .collect(),
        }))
    }
}
