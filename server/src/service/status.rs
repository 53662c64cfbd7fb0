//! Maps the lower layers' errors to gRPC statuses. Messages name the field or the rule that was
//! broken and never carry key material; database details are logged, not returned.

use tonic::Status;

use super::validate::InvalidField;
use crate::store::StoreError;

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DeviceNotFound => Status::not_found("device_id: no such device"),
            StoreError::NotYourDevice => {
                Status::permission_denied("device_id: the device belongs to another user")
            }
            StoreError::DeviceTaken => {
                Status::already_exists("device_id: registered to another user")
            }
            StoreError::UnknownUser => {
                Status::failed_precondition("the caller's user is not known to the chat database")
            }
            StoreError::OneTimePreKeyConflict { field, key_id } => Status::already_exists(format!(
                "{field}: key id {key_id} is already stored with a different public key"
            )),
            StoreError::SignedPreKeyConflict { field, key_id } => Status::already_exists(format!(
                "{field}.key_id: {key_id} is already stored with a different public key"
            )),
            StoreError::SignedPreKeySuperseded { field, key_id } => Status::failed_precondition(
                format!("{field}.key_id: {key_id} was already replaced by a newer key"),
            ),
            StoreError::NoActiveKey { field } => Status::failed_precondition(format!(
                "the device has no {field}; install one first (RotateKyberLastResortPreKey)"
            )),
            StoreError::IdentityChanged => Status::aborted(
                "the device's identity key changed while the request ran; sign with the new one",
            ),
            StoreError::SessionNotFound => Status::not_found("key: no such session"),
            StoreError::StaleSession { expected, current } => Status::aborted(format!(
                "expected_version: the session is at version {current}, not {expected}; read it \
                 again and retry"
            )),
            StoreError::UnknownPeer => Status::not_found("key.peer_user_id: no such user"),
            StoreError::PeerHasNoDevices => {
                Status::not_found("peer_user_id: the user has no registered device")
            }
            StoreError::CallerHasNoDevices => Status::failed_precondition(
                "the caller has no registered device, so there is no safety number yet",
            ),
            StoreError::SafetyNumberMismatch => Status::failed_precondition(
                "safety_number: is not the current safety number; an identity key may have \
                 changed, compare again",
            ),
            StoreError::NoMasterKey => {
                Status::not_found("the user has no master-key record (PutMasterKey first)")
            }
            StoreError::WrongRecoveryCode { attempts_left } => Status::permission_denied(format!(
                "recovery_code: does not match; {attempts_left} attempts left before recovery locks"
            )),
            StoreError::RecoveryLocked { until } => Status::resource_exhausted(format!(
                "recovery is locked after repeated failures until {until}"
            )),
            StoreError::Unavailable(why) => {
                tracing::warn!(error = %why, "database unavailable");
                Status::unavailable("the database is unavailable; retry later")
            }
            StoreError::Conflict(why) => {
                tracing::info!(error = %why, "concurrent change");
                Status::aborted("a concurrent change conflicted with this call; retry it")
            }
            StoreError::Internal(why) => {
                tracing::error!(error = %why, "storage error");
                Status::internal("internal storage error")
            }
        }
    }
}
