//! Assembles the gRPC server: every service behind the one request pipeline of [`crate::edge`],
//! the standard health service (one status per service, kept true by the readiness check) and
//! server reflection (v1 and v1alpha), served until shutdown is requested.

use keyserver_proto::pb;
use keyserver_proto::pb::key_service_server::KeyServiceServer;
use tokio::net::TcpListener;

use crate::auth::TokenAuthority;
use crate::clock::Clock;
use crate::config::{EdgeSettings, RotationPolicy, Schedule};
use crate::edge::{
    self, listener,
    readiness::{Probe, Readiness},
    tls::{Tls, TlsFiles},
};
use crate::jobs::{self, Job, Jobs};
use crate::limits::Limits;
use crate::service::audit::AuditApi;
use crate::service::keys::{KeyApi, KeyPolicy};
use crate::service::master_keys::MasterKeyApi;
use crate::service::safety_numbers::SafetyNumberApi;
use crate::service::sessions::SessionApi;
use crate::shutdown::CancellationToken;
use crate::store::{Serve, Store};
use keyserver_proto::pb::audit_service_server::AuditServiceServer;
use keyserver_proto::pb::master_key_service_server::MasterKeyServiceServer;
use keyserver_proto::pb::safety_number_service_server::SafetyNumberServiceServer;
use keyserver_proto::pb::session_service_server::SessionServiceServer;

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
    /// TLS on the listener, when configured.
    pub tls: Option<TlsFiles>,
    /// Limits and checks at the edge.
    pub edge: EdgeSettings,
    /// Rate limits on fetches and writes.
    pub limits: Limits,
    /// Most devices one user may have (0: no quota).
    pub max_devices_per_user: u32,
    /// How long a fetch retried with its idempotency key gets the same keys.
    pub fetch_retry_window: std::time::Duration,
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
        (Job::DrainCheck, parts.schedule.drain_check_every),
    ]
    .into_iter()
    .filter_map(|(job, every)| {
        jobs::schedule::spawn(parts.jobs.clone(), job, every, shutdown.clone())
    })
    .chain(refresher)
    .chain([jobs::metrics::spawn(parts.jobs.clone(), shutdown.clone())])
    .collect();
    let tls = parts.tls.map(Tls::new).transpose()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let (readiness, checker) = Readiness::start(
        parts.store.clone(),
        health,
        Probe {
            every: parts.edge.readiness_interval,
            timeout: parts.edge.readiness_timeout,
        },
        shutdown.clone(),
    )
    .await;
    let watcher = tls
        .as_ref()
        .map(|tls| tls.watch(shutdown.clone()))
        .transpose()?;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let limit = parts.edge.max_request_bytes;
    let master_keys = MasterKeyServiceServer::new(MasterKeyApi::new(
        parts.store.clone(),
        parts.min_pbkdf2_iterations,
    ))
    .max_decoding_message_size(limit);
    let safety_numbers = SafetyNumberServiceServer::new(SafetyNumberApi::new(parts.store.clone()))
        .max_decoding_message_size(limit);
    let audit = AuditServiceServer::new(AuditApi::new(parts.store.clone()))
        .max_decoding_message_size(limit);
    let sessions = SessionServiceServer::new(SessionApi::new(parts.store.clone()))
        .max_decoding_message_size(limit);
    let keys = KeyServiceServer::new(KeyApi::new(
        parts.store,
        view,
        KeyPolicy {
            rotation: parts.rotation,
            clock: parts.clock,
            serve: parts.serve,
            limits: parts.limits,
            max_devices: parts.max_devices_per_user,
            drain: *parts.jobs.drain_rule(),
            retry_window: parts.fetch_retry_window,
        },
    ))
    .max_decoding_message_size(limit);

    tracing::info!(
        addr = %listener.local_addr()?,
        tls = tls.is_some(),
        "serving the keyserver.v1 services"
    );
    let incoming = listener::incoming(
        listener,
        tls,
        Some(parts.edge.tcp_keepalive),
        shutdown.clone(),
    );
    let stopping = shutdown.clone();
    let draining = readiness.clone();
    let serving = tonic::transport::Server::builder()
        .timeout(parts.edge.request_timeout)
        .max_concurrent_streams(parts.edge.max_concurrent_streams)
        .http2_keepalive_interval(Some(parts.edge.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(parts.edge.http2_keepalive_timeout))
        .layer(edge::pipeline(parts.tokens, readiness))
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
            draining.stopping().await;
        });
    // A client that never closes its connection must not hold the shutdown up for good.
    let grace = parts.edge.shutdown_grace;
    let overdue = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = serving => served?,
        () = overdue => tracing::warn!(
            ?grace,
            "connections were still open at the end of the shutdown grace period; closing them"
        ),
    }
    checker.await?;
    if let Some(watcher) = watcher {
        watcher.await?;
    }
    for task in scheduled {
        task.await?;
    }
    Ok(())
}
