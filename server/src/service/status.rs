//! Maps the lower layers' errors to gRPC statuses. Messages name the field or the rule that was
//! broken and never carry key material; database details are logged, not returned.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::validate::InvalidField;
use crate::auth::AuthError;
use crate::edge::metrics as m;
use crate::limits::LimitError;
use crate::store::{BundleTarget, StoreError};

/// An invalid field: INVALID_ARGUMENT naming it in the message and, for clients that read
/// details rather than text, as a `google.rpc.BadRequest` field violation.
impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        let message = e.to_string();
        Status::with_error_details(
            Code::InvalidArgument,
            message,
            ErrorDetails::with_bad_request_violation(e.field, e.reason),
        )
    }
}

/// A refused token is UNAUTHENTICATED (the edge logs it); a write with a token of another
/// device, or of no device, is PERMISSION_DENIED and a security event.
impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NoDevice
            | AuthError::OtherDevice
            | AuthError::UnboundNewDevice
            | AuthError::ReservedDevice => {
                security_event("permission_denied", e.reason());
                Status::permission_denied(e.to_string())
            }
            _ => Status::unauthenticated(e.to_string()),
        }
    }
}

/// Counts and logs a security event: never with a token, key or blob.
fn security_event(event: &'static str, reason: &'static str) {
    metrics::counter!(m::SECURITY_EVENTS, "event" => event, "reason" => reason).increment(1);
    tracing::warn!(security_event = event, reason, "security event");
}

/// A rate limit is RESOURCE_EXHAUSTED with the wait until the call would pass as a
/// `google.rpc.RetryInfo` (whole seconds, rounded up, in the message); a limiter that does
/// not answer is UNAVAILABLE, as a database that does not.
impl From<LimitError> for Status {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::Exhausted { limit, retry_after } => {
                let seconds = retry_after.as_millis().div_ceil(1000);
                Status::with_error_details(
                    Code::ResourceExhausted,
                    format!(
                        "{} rate limit reached; retry in {seconds} s",
                        limit.as_str().replace('_', " ")
                    ),
                    ErrorDetails::with_retry_info(Some(retry_after)),
                )
            }
            LimitError::Unavailable => {
                Status::unavailable("the rate limiter is unavailable; retry later")
            }
        }
    }
}

/// What the edge answers while the database does not answer.
pub fn database_unavailable() -> Status {
    Status::unavailable("the database is unavailable; retry later")
}

/// A fetch found no bundle for its target.
pub fn no_bundle(target: &BundleTarget) -> Status {
    Status::not_found(match &target.device_id {
        Some(device) => format!(
            "target: device {device} of user {} has no bundle",
            target.user_id
        ),
        None => format!("target: no device of user {} has a bundle", target.user_id),
    })
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DeviceNotFound => Status::not_found("device_id: no such device"),
            StoreError::NotYourDevice => {
                security_event("permission_denied", "not_your_device");
                Status::permission_denied("device_id: the device belongs to another user")
            }
            StoreError::DeviceTokenRequired => Status::from(AuthError::NoDevice),
            StoreError::DeviceTaken => {
                Status::already_exists("device_id: registered to another user")
            }
            StoreError::TooManyDevices { max } => {
                metrics::counter!(m::RATE_LIMITED, "limit" => "devices").increment(1);
                tracing::info!(max, "device quota reached");
                Status::resource_exhausted(format!(
                    "device_id: the user already has the most devices allowed ({max}); remove \
                     one first"
                ))
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
            StoreError::WrongRecoveryCode { attempts_left } => {
                security_event("recovery_failed", "wrong_code");
                Status::permission_denied(format!(
                    "recovery_code: does not match; {attempts_left} attempts left before \
                     recovery locks"
                ))
            }
            StoreError::RecoveryLocked { until } => {
                security_event("recovery_locked", "too_many_failures");
                Status::resource_exhausted(format!(
                    "recovery is locked after repeated failures until {until}"
                ))
            }
            StoreError::Fenced { moved_to } => Status::failed_precondition(format!(
                "this key server's database was moved to {moved_to} (keyserver db cutover): \
                 it hands out and stores no keys any more; use the servers on the new database"
            )),
            StoreError::Unavailable(why) => {
                tracing::warn!(error = %why, "database unavailable");
                database_unavailable()
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
