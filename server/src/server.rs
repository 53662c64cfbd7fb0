//! Assembles the gRPC server: every service behind token authentication, the standard health
//! service, and server reflection (v1 and v1alpha), served until shutdown is requested.

use keyserver_proto::pb;
use keyserver_proto::pb::key_service_server::KeyServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::auth::TokenAuthority;
use crate::clock::Clock;
use crate::config::{RotationPolicy, Schedule};
use crate::jobs::{self, Job, Jobs};
use crate::service::audit::AuditApi;
use crate::service::keys::KeyApi;
use crate::service::master_keys::MasterKeyApi;
use crate::service::safety_numbers::SafetyNumberApi;
use crate::service::sessions::SessionApi;
use crate::shutdown::CancellationToken;
use crate::store::{Serve, Store};
use keyserver_proto::pb::audit_service_server::AuditServiceServer;
use keyserver_proto::pb::master_key_service_server::MasterKeyServiceServer;
use keyserver_proto::pb::safety_number_service_server::SafetyNumberServiceServer;
use keyserver_proto::pb::session_service_server::SessionServiceServer;

/// Largest request accepted: a registration with 100 one-time prekeys of each kind, a
/// last-resort Kyber prekey and the largest private blobs allowed is about 550 KiB (a Kyber
/// prekey with its sealed secret key is nearly 5 KiB); a session state is at most 64 KiB.
const MAX_REQUEST_BYTES: usize = 640 * 1024;

/// What the server needs beyond its listener.
pub struct ServerParts {
    pub store: Store,
    pub tokens: TokenAuthority,
    /// The maintenance jobs, run here on `schedule`.
    pub jobs: Jobs,
    pub schedule: Schedule,
    /// When signed prekeys are due for rotation and when bundles mark them stale.
    pub rotation: RotationPolicy,
    pub clock: Clock,
    /// Fewest PBKDF2 iterations a master-key record may declare.
    pub min_pbkdf2_iterations: u32,
    /// Which devices fetches serve (all, or only PQXDH ones).
    pub serve: Serve,
}

/// Serves on `listener` until `shutdown` is cancelled, then finishes requests in flight.
pub async fn run(
    listener: TcpListener,
    parts: ServerParts,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (view, refresher) = jobs::bundle_view::spawn(
        parts.jobs.clone(),
        parts.schedule.bundle_view_refresh,
        shutdown.clone(),
    );
    let scheduled: Vec<_> = [
        (Job::Rotate, parts.schedule.rotation_check_every),
        (Job::Cleanup, parts.schedule.cleanup_every),
    ]
    .into_iter()
    .filter_map(|(job, every)| {
        jobs::schedule::spawn(parts.jobs.clone(), job, every, shutdown.clone())
    })
    .chain(refresher)
    .chain([jobs::metrics::spawn(parts.jobs.clone(), shutdown.clone())])
    .collect();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<KeyServiceServer<KeyApi>>().await;
    health
        .set_serving::<SessionServiceServer<SessionApi>>()
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let master_keys = tonic::service::interceptor::InterceptedService::new(
        MasterKeyServiceServer::new(MasterKeyApi::new(
            parts.store.clone(),
            parts.min_pbkdf2_iterations,
        )),
        parts.tokens.clone(),
    );
    let safety_numbers = tonic::service::interceptor::InterceptedService::new(
        SafetyNumberServiceServer::new(SafetyNumberApi::new(parts.store.clone())),
        parts.tokens.clone(),
    );
    let audit = tonic::service::interceptor::InterceptedService::new(
        AuditServiceServer::new(AuditApi::new(parts.store.clone())),
        parts.tokens.clone(),
    );
    let sessions = tonic::service::interceptor::InterceptedService::new(
        SessionServiceServer::new(SessionApi::new(parts.store.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        parts.tokens.clone(),
    );
    let keys = tonic::service::interceptor::InterceptedService::new(
        KeyServiceServer::new(KeyApi::new(
            parts.store,
            view,
            parts.rotation,
            parts.clock,
            parts.serve,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES),
        parts.tokens,
    );

    tracing::info!(addr = %listener.local_addr()?, "serving keyserver.v1.KeyService");
    // No Nagle on accepted connections: a response goes out as a data frame and then a small
    // trailers frame, and with Nagle the second waits for the client's delayed ACK (40 ms on
    // Linux). A PQXDH bundle (about 5 KB with its framing) hit that on every fetch: 51 ms
    // instead of 4 ms at concurrency 1 (docs/PERFORMANCE.md).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let stopping = shutdown.clone();
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(keys)
        .add_service(sessions)
        .add_service(audit)
        .add_service(safety_numbers)
        .add_service(master_keys)
        .serve_with_incoming_shutdown(incoming, async move {
            stopping.cancelled().await;
            health.set_not_serving::<KeyServiceServer<KeyApi>>().await;
            health
                .set_not_serving::<SessionServiceServer<SessionApi>>()
                .await;
        })
        .await?;
    for task in scheduled {
        task.await?;
    }
    Ok(())
}
