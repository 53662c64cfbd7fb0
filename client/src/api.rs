//! Talking to the key server: an authenticated gRPC client, and the checks a device makes on a
//! fetched bundle before trusting it.

use std::path::Path;

use anyhow::Context;
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
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

/// Longest wait a call refused by a rate limit is retried after; a longer one is reported.
pub const MAX_RETRY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a call refused RESOURCE_EXHAUSTED asks to be retried after (its
/// `google.rpc.RetryInfo`); None for any other answer.
pub fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
    use tonic_types::StatusExt;
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    status.get_details_retry_info()?.retry_delay
}

/// Runs `call`, and once more after the server's RetryInfo wait when a rate limit refused it
/// and the wait is at most [`MAX_RETRY_WAIT`]; a longer wait is an error that says when.
pub async fn honouring_retry_info<T, F, Fut>(mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    match call().await {
        Err(status) => match retry_after(&status) {
            Some(wait) if wait <= MAX_RETRY_WAIT => {
                eprintln!(
                    "rate limited; retrying in {} s as the server asks",
                    wait.as_secs_f64().ceil()
                );
                tokio::time::sleep(wait).await;
                Ok(call().await?)
            }
            Some(wait) => Err(anyhow::anyhow!(
                "rate limited: {}; the server asks to wait {} s",
                status.message(),
                wait.as_secs_f64().ceil()
            )),
            None => Err(status.into()),
        },
        ok => Ok(ok?),
    }
}

/// Waits before each retry of a call whose answer may have been lost.
const LOST_ANSWER_RETRIES: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(250),
    std::time::Duration::from_secs(1),
];

/// Whether a call that failed with `status` may have run on the server without its answer
/// arriving (the connection broke, the server went away or was unavailable, the deadline
/// passed), so that only a retry that is safe to repeat should follow.
pub fn answer_may_be_lost(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
    ) || disconnected(status)
}

/// Whether `status` is tonic's report of a connection that broke under a call: CANCELLED
/// (hyper's "connection closed", though the caller cancelled nothing) or UNKNOWN (a reset or
/// broken pipe, before or after the response headers) made by the transport, not answered by
/// a server.
fn disconnected(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown)
        && server_unreachable(status)
}

/// Whether the call never reached a server or lost its connection to it (the transport made
/// `status`; a server's own answer carries no transport error): another server may answer.
/// A connection lost before the call was answered shows as tonic's transport error; one lost
/// after the response headers, while the message was read, as hyper's error.
pub fn server_unreachable(status: &tonic::Status) -> bool {
    std::error::Error::source(status)
        .is_some_and(|source| source.is::<tonic::transport::Error>() || source.is::<hyper::Error>())
}

/// `status`, with a connection that broke under the call reported as UNAVAILABLE, the code
/// gRPC gives connection failures (tonic says CANCELLED or UNKNOWN when a server goes away
/// mid-call), so that callers and reports tell it from a cancelled call or a server's error.
pub fn unavailable_if_disconnected(status: tonic::Status) -> tonic::Status {
    if disconnected(&status) {
        tonic::Status::unavailable(format!(
            "the connection closed before the call was answered ({})",
            status.message()
        ))
    } else {
        status
    }
}

/// Runs `call`, a call safe to repeat (a fetch with its idempotency key), and runs it again,
/// up to twice, while its answer may have been lost.
pub async fn retrying_lost_answers<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    for wait in LOST_ANSWER_RETRIES {
        match call().await.map_err(unavailable_if_disconnected) {
            Err(status) if answer_may_be_lost(&status) => tokio::time::sleep(wait).await,
            done => return done,
        }
    }
    call().await.map_err(unavailable_if_disconnected)
}

/// A fresh idempotency key for one fetch, reused by its retries.
pub fn idempotency_key() -> String {
    uuid::Uuid::new_v4().to_string()
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

/// Where the server is and how to trust it: `http://host:port` in plaintext, or
/// `https://host:port` over TLS, verified against the system's root certificates or the given
/// CA, optionally with a client certificate (for servers that require mTLS). Several URLs,
/// comma separated, are several servers of one deployment: a client connects to one it can
/// reach, starting from a random one so that clients spread over them.
#[derive(Debug, Clone, Default)]
pub struct Address {
    pub url: String,
    /// PEM CA certificates to trust instead of the system's roots.
    pub ca_cert: Option<Vec<u8>>,
    /// PEM certificate chain and private key to present to the server.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Address {
    /// `url` with the TLS files given, read now.
    pub fn new(
        url: &str,
        ca_cert: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let identity = match (client_cert, client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => anyhow::bail!("a client certificate needs its key, and a key its certificate"),
        };
        Ok(Self {
            url: url.to_owned(),
            ca_cert: ca_cert.map(read).transpose()?,
            identity,
        })
    }

    /// The endpoint to connect to: TLS for https:// (never a plaintext fallback), plaintext
    /// for http://, and no Nagle delay on the socket either way.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let url = &self.url;
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| {
                format!("{url:?} is not a server URL (http://host:port or https://host:port)")
            })?
            .tcp_nodelay(true);
        match scheme {
            Some("https") => {
                let mut tls = ClientTlsConfig::new();
                tls = match &self.ca_cert {
                    Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                    None => tls.with_native_roots(),
                };
                if let Some((cert, key)) = &self.identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                Ok(endpoint.tls_config(tls)?)
            }
            Some("http") => {
                anyhow::ensure!(
                    self.ca_cert.is_none() && self.identity.is_none(),
                    "TLS files were given for {url}, a plaintext URL; use https://"
                );
                Ok(endpoint)
            }
            _ => {
                anyhow::bail!("{url:?} is not a server URL (http://host:port or https://host:port)")
            }
        }
    }

    /// A connected channel; for several URLs, to the first one that answers, from a random
    /// one on. (tonic's `balance_list` would spread calls, but sends them to a server it
    /// cannot reach as well.)
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        if !self.url.contains(',') {
            return self.connect_one().await;
        }
        let urls: Vec<&str> = self.url.split(',').map(str::trim).collect();
        let start = usize::from(crate::keys::random_bytes::<1>()[0]) % urls.len();
        let mut failures = Vec::with_capacity(urls.len());
        for i in 0..urls.len() {
            let one = Address {
                url: urls[(start + i) % urls.len()].to_owned(),
                ..self.clone()
            };
            match one.connect_one().await {
                Ok(channel) => return Ok(channel),
                Err(e) => failures.push(e.to_string()),
            }
        }
        anyhow::bail!("no server could be reached: {}", failures.join("; "))
    }

    async fn connect_one(&self) -> anyhow::Result<Channel> {
        let url = &self.url;
        self.endpoint()?.connect().await.map_err(|e| {
            // tonic's Display says only "transport error"; its sources say what happened.
            let mut why = e.to_string();
            let mut refused = false;
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                why = format!("{why}: {inner}");
                refused |= inner
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
                source = inner.source();
            }
            if refused {
                anyhow::anyhow!(
                    "nothing answers at {url} (connection refused): is the key server running \
                     there, and is KEYSERVER_URL (--url) right?"
                )
            } else {
                anyhow::anyhow!("connecting to {url}: {why}")
            }
        })
    }
}

impl From<&str> for Address {
    fn from(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            ..Self::default()
        }
    }
}

impl From<&String> for Address {
    fn from(url: &String) -> Self {
        Self::from(url.as_str())
    }
}

impl From<&Address> for Address {
    fn from(address: &Address) -> Self {
        address.clone()
    }
}

/// A channel to `server` and the token's interceptor.
async fn authenticated(
    server: impl Into<Address>,
    token: &str,
) -> anyhow::Result<(Channel, BearerToken)> {
    let header = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow::anyhow!("the token holds characters a header cannot carry"))?;
    let channel = server.into().connect().await?;
    Ok((channel, BearerToken(header)))
}

/// Connects a key-service client to `server` with a bearer token.
pub async fn connect(server: impl Into<Address>, token: &str) -> anyhow::Result<KeyClient> {
    let (channel, bearer) = authenticated(server, token).await?;
    Ok(KeyServiceClient::with_interceptor(channel, bearer))
}

/// Connects a session-service client to `server` with a bearer token.
pub async fn connect_sessions(
    server: impl Into<Address>,
    token: &str,
) -> anyhow::Result<SessionClient> {
    let (channel, bearer) = authenticated(server, token).await?;
    Ok(SessionServiceClient::with_interceptor(channel, bearer))
}

/// Connects a safety-number-service client to `server` with a bearer token.
pub async fn connect_safety_numbers(
    server: impl Into<Address>,
    token: &str,
) -> anyhow::Result<SafetyNumberClient> {
    let (channel, bearer) = authenticated(server, token).await?;
    Ok(SafetyNumberServiceClient::with_interceptor(channel, bearer))
}

/// Connects a master-key-service client to `server` with a bearer token.
pub async fn connect_master_keys(
    server: impl Into<Address>,
    token: &str,
) -> anyhow::Result<MasterKeyClient> {
    let (channel, bearer) = authenticated(server, token).await?;
    Ok(MasterKeyServiceClient::with_interceptor(channel, bearer))
}

/// Connects an audit-service client to `server` with a bearer token.
pub async fn connect_audit(server: impl Into<Address>, token: &str) -> anyhow::Result<AuditClient> {
    let (channel, bearer) = authenticated(server, token).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A CANCELLED or UNKNOWN that the transport made (a connection that closed or broke)
    /// becomes UNAVAILABLE and may have lost its answer; one a server or the caller gave stays
    /// as it is.
    #[tokio::test]
    async fn a_connection_broken_under_a_call_is_unavailable() {
        for (code, message) in [
            (tonic::Code::Cancelled, "operation was canceled"),
            (tonic::Code::Unknown, "transport error"),
        ] {
            let refused = Endpoint::from_static("http://127.0.0.1:1")
                .connect()
                .await
                .expect_err("nothing listens on port 1");
            let mut broken = tonic::Status::new(code, message);
            broken.set_source(std::sync::Arc::new(refused));
            assert!(answer_may_be_lost(&broken) && server_unreachable(&broken));
            let status = unavailable_if_disconnected(broken);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(status.message().contains(message), "{status:?}");

            let answered = tonic::Status::new(code, "from the server");
            assert!(!server_unreachable(&answered));
            assert_eq!(unavailable_if_disconnected(answered).code(), code);
        }
        assert!(!answer_may_be_lost(&tonic::Status::cancelled(
            "the caller gave up"
        )));
    }

    /// A server killed after it sent a call's response headers but before its message: tonic
    /// reads the body, fails with hyper's error and says UNKNOWN. That is a connection lost
    /// under the call too (found by the failover test), not a server's answer.
    #[tokio::test]
    async fn a_connection_lost_after_the_response_headers_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("the client connects");
            let mut connection = h2::server::handshake(socket).await.expect("HTTP/2");
            let (_request, mut respond) = connection
                .accept()
                .await
                .expect("a call")
                .expect("a well-formed call");
            let headers = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .expect("valid headers");
            let _body = respond.send_response(headers, false).expect("headers sent");
            // Drives the connection until the headers are written, then drops it.
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), connection.accept())
                    .await;
        });
        let channel = Endpoint::from_shared(url)
            .expect("a URL")
            .connect()
            .await
            .expect("connected");
        let status = KeyServiceClient::new(channel)
            .get_key_status(pb::GetKeyStatusRequest::default())
            .await
            .expect_err("the server went away before answering");
        server.await.expect("the server task ran");
        assert!(server_unreachable(&status), "{status:?}");
        assert!(answer_may_be_lost(&status), "{status:?}");
        let status = unavailable_if_disconnected(status);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
}
