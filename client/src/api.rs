//! Talking to the key server: an authenticated gRPC client, and the checks a device makes on a
//! fetched bundle before trusting it.

use keyserver_proto::pb;
use keyserver_proto::pb::audit_service_client::AuditServiceClient;
use keyserver_proto::pb::key_service_client::KeyServiceClient;
use keyserver_proto::pb::master_key_service_client::MasterKeyServiceClient;
use keyserver_proto::pb::safety_number_service_client::SafetyNumberServiceClient;
use keyserver_proto::pb::session_service_client::SessionServiceClient;
use keyserver_proto::wire::{self, KyberPublicKey, PublicKey};
use keyserver_proto::xeddsa;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::pqxdh::PeerPreKeys;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// An authenticated key-service client.
pub type KeyClient = KeyServiceClient<InterceptedService<Channel, BearerToken>>;

/// An authenticated session-service client.
pub type SessionClient = SessionServiceClient<InterceptedService<Channel, BearerToken>>;
/// An authenticated safety-number-service client.
pub type SafetyNumberClient = SafetyNumberServiceClient<InterceptedService<Channel, BearerToken>>;
/// An authenticated master-key-service client.
pub type MasterKeyClient = MasterKeyServiceClient<InterceptedService<Channel, BearerToken>>;
/// An authenticated audit-service client.
pub type AuditClient = AuditServiceClient<InterceptedService<Channel, BearerToken>>;

/// A channel to `url` (for example `http://127.0.0.1:50051`) and the token's interceptor.
async fn authenticated(url: &str, token: &str) -> anyhow::Result<(Channel, BearerToken)> {
    let header = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow::anyhow!("the token holds characters a header cannot carry"))?;
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {url}: {e}"))?;
    Ok((channel, BearerToken(header)))
}

/// Connects a key-service client to `url` with a bearer token.
pub async fn connect(url: &str, token: &str) -> anyhow::Result<KeyClient> {
    let (channel, bearer) = authenticated(url, token).await?;
    Ok(KeyServiceClient::with_interceptor(channel, bearer))
}

/// Connects a session-service client to `url` with a bearer token.
pub async fn connect_sessions(url: &str, token: &str) -> anyhow::Result<SessionClient> {
    let (channel, bearer) = authenticated(url, token).await?;
    Ok(SessionServiceClient::with_interceptor(channel, bearer))
}

/// Connects a safety-number-service client to `url` with a bearer token.
pub async fn connect_safety_numbers(url: &str, token: &str) -> anyhow::Result<SafetyNumberClient> {
    let (channel, bearer) = authenticated(url, token).await?;
    Ok(SafetyNumberServiceClient::with_interceptor(channel, bearer))
}

/// Connects a master-key-service client to `url` with a bearer token.
pub async fn connect_master_keys(url: &str, token: &str) -> anyhow::Result<MasterKeyClient> {
    let (channel, bearer) = authenticated(url, token).await?;
    Ok(MasterKeyServiceClient::with_interceptor(channel, bearer))
}

/// Connects an audit-service client to `url` with a bearer token.
pub async fn connect_audit(url: &str, token: &str) -> anyhow::Result<AuditClient> {
    let (channel, bearer) = authenticated(url, token).await?;
    Ok(AuditServiceClient::with_interceptor(channel, bearer))
}

/// A bundle whose keys parsed and whose signed prekey verified against its identity key.
pub struct VerifiedBundle {
    pub device_id: String,
    pub registration_id: u32,
    pub keys: PeerPreKeys,
    /// The server marked the signed prekey stale: the device stopped rotating it.
    pub stale: bool,
}

/// Why a fetched bundle must not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("device {device}: {field} {reason}")]
    Malformed {
        device: String,
        field: &'static str,
        reason: String,
    },
    #[error("device {device}: the {key}'s signature does not verify with its identity key")]
    BadSignature { device: String, key: &'static str },
}

/// Parses a bundle and verifies its signed prekey's and Kyber prekey's signatures.
pub fn verify_bundle(bundle: &pb::DevicePreKeyBundle) -> Result<VerifiedBundle, BundleError> {
    let device = bundle.device_id.clone();
    let malformed = |field: &'static str, reason: String| BundleError::Malformed {
        device: device.clone(),
        field,
        reason,
    };
    let identity_key = PublicKey::from_serialized(&bundle.identity_key)
        .map_err(|e| malformed("identity_key", e.to_string()))?;
    let signed = bundle
        .signed_prekey
        .as_ref()
        .ok_or_else(|| malformed("signed_prekey", "is missing".into()))?;
    let signed_prekey = PublicKey::from_serialized(&signed.public_key)
        .map_err(|e| malformed("signed_prekey.public_key", e.to_string()))?;
    let signature = wire::parse_signature(&signed.signature)
        .map_err(|e| malformed("signed_prekey.signature", e.to_string()))?;
    if !xeddsa::verify(&identity_key, &signed.public_key, &signature) {
        return Err(BundleError::BadSignature {
            device,
            key: "signed prekey",
        });
    }
    let kyber_prekey = match &bundle.kyber_prekey {
        Some(k) => {
            let public = KyberPublicKey::from_serialized(&k.public_key)
                .map_err(|e| malformed("kyber_prekey.public_key", e.to_string()))?;
            let signature = wire::parse_signature(&k.signature)
                .map_err(|e| malformed("kyber_prekey.signature", e.to_string()))?;
            if !xeddsa::verify(&identity_key, &k.public_key, &signature) {
                return Err(BundleError::BadSignature {
                    device,
                    key: "Kyber prekey",
                });
            }
            Some((k.key_id, public))
        }
        None => None,
    };
    let one_time_prekey = match &bundle.one_time_prekey {
        Some(k) => Some((
            k.key_id,
            PublicKey::from_serialized(&k.public_key)
                .map_err(|e| malformed("one_time_prekey.public_key", e.to_string()))?,
        )),
        None => None,
    };
    Ok(VerifiedBundle {
        device_id: bundle.device_id.clone(),
        registration_id: bundle.registration_id,
        keys: PeerPreKeys {
            identity_key,
            signed_prekey_id: signed.key_id,
            signed_prekey,
            one_time_prekey,
            kyber_prekey,
        },
        stale: signed.stale,
    })
}
