//! `keyserver.v1.SafetyNumberService`: the current safety number between two users and the
//! caller's verification of it.

use keyserver_proto::fingerprint::DIGITS;
use keyserver_proto::pb;
use keyserver_proto::pb::safety_number_service_server::SafetyNumberService;
use tonic::{Request, Response, Status};

use super::{timestamp, validate};
use crate::auth::caller;
use crate::store::{Store, StoreError, VerificationMethod, safety_number};

/// The safety-number service over a store.
pub struct SafetyNumberApi {
    store: Store,
}

impl SafetyNumberApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn method_message(method: VerificationMethod) -> pb::VerificationMethod {
    match method {
        VerificationMethod::Manual => pb::VerificationMethod::Manual,
        VerificationMethod::QrCode => pb::VerificationMethod::QrCode,
        VerificationMethod::OutOfBand => pb::VerificationMethod::OutOfBand,
    }
}

fn peer(caller: uuid::Uuid, peer_user_id: &str) -> Result<uuid::Uuid, Status> {
    let peer = validate::user_id("peer_user_id", peer_user_id)?;
    if peer == caller {
        return Err(validate::invalid(
            "peer_user_id",
            "a safety number is between two different users",
        )
        .into());
    }
    Ok(peer)
}

#[tonic::async_trait]
impl SafetyNumberService for SafetyNumberApi {
    async fn get_safety_number(
        &self,
        request: Request<pb::GetSafetyNumberRequest>,
    ) -> Result<Response<pb::GetSafetyNumberResponse>, Status> {
        let caller = caller(&request)?;
        let peer = peer(caller.user_id, &request.get_ref().peer_user_id)?;
        let mine = self.store.identity_keys(caller.user_id).await?;
        if mine.is_empty() {
            return Err(StoreError::CallerHasNoDevices.into());
        }
        let theirs = self.store.identity_keys(peer).await?;
        let current = safety_number((caller.user_id, &mine), (peer, &theirs))
            .ok_or(StoreError::PeerHasNoDevices)?;
        let record = self.store.safety_record(caller.user_id, peer).await?;
        let verified = record
            .as_ref()
            .filter(|r| r.number == current)
            .and_then(|r| r.verified);
        Ok(Response::new(pb::GetSafetyNumberResponse {
            safety_number: current,
            verified: verified.is_some(),
            // A record exists only once the caller verified; it loses its verification when
            // an identity key changes.
            changed_since_verification: record.is_some() && verified.is_none(),
            method: verified
                .map_or(pb::VerificationMethod::Unspecified, |(_, m)| {
                    method_message(m)
                })
                .into(),
            verified_at: verified.map(|(at, _)| timestamp(at)),
        }))
    }

    async fn verify_safety_number(
        &self,
        request: Request<pb::VerifySafetyNumberRequest>,
    ) -> Result<Response<pb::VerifySafetyNumberResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let peer = peer(caller.user_id, &r.peer_user_id)?;
        if r.safety_number.len() != DIGITS || !r.safety_number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(
                validate::invalid("safety_number", format!("must be {DIGITS} digits")).into(),
            );
        }
        let method = match r.method() {
            pb::VerificationMethod::Manual => VerificationMethod::Manual,
            pb::VerificationMethod::QrCode => VerificationMethod::QrCode,
            pb::VerificationMethod::OutOfBand => VerificationMethod::OutOfBand,
            pb::VerificationMethod::Unspecified => {
                return Err(
                    validate::invalid("method", "must be MANUAL, QR_CODE or OUT_OF_BAND").into(),
                );
            }
        };
        let at = self
            .store
            .verify_safety_number(caller.user_id, peer, &r.safety_number, method)
            .await?;
        Ok(Response::new(pb::VerifySafetyNumberResponse {
            verified_at: Some(timestamp(at)),
        }))
    }
}
