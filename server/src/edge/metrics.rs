//! Every Prometheus series the server exports, named and described in one place, and the HTTP
//! listener that serves them at `/metrics` (and answers 404 anywhere else).
//!
//! The series are recorded through the `metrics` facade wherever the thing happens (a call
//! ending, a key handed out, a job run); without `--metrics-listen` no recorder is installed
//! and those calls cost next to nothing.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::shutdown::CancellationToken;

pub const RPC_REQUESTS: &str = "keyserver_rpc_requests_total";
pub const RPC_DURATION: &str = "keyserver_rpc_duration_seconds";
pub const RPC_IN_FLIGHT: &str = "keyserver_rpc_in_flight";
pub const SECURITY_EVENTS: &str = "keyserver_security_events_total";
pub const RATE_LIMITED: &str = "keyserver_rate_limited_total";
pub const RATE_LIMITER_ERRORS: &str = "keyserver_rate_limiter_errors_total";
pub const DRAINS_SUSPECTED: &str = "keyserver_drains_suspected_total";
pub const DB_UP: &str = "keyserver_db_up";
pub const DB_FENCED: &str = "keyserver_db_fenced";
pub const DB_POOL_CONNECTIONS: &str = "keyserver_db_pool_connections";
pub const DB_POOL_IDLE: &str = "keyserver_db_pool_idle_connections";
pub const DB_POOL_WAIT: &str = "keyserver_db_pool_wait_seconds";
pub const DB_REPLICA_UNAVAILABLE: &str = "keyserver_db_replica_unavailable_total";
pub const ONE_TIME_PREKEYS_SERVED: &str = "keyserver_one_time_prekeys_served_total";
pub const BUNDLES_SERVED: &str = "keyserver_bundles_served_total";
pub const BUNDLES_WITHOUT_ONE_TIME_PREKEY: &str = "keyserver_bundles_without_one_time_prekey_total";
pub const KEYS_UPLOADED: &str = "keyserver_keys_uploaded_total";
pub const FETCH_BATCH_REQUESTS: &str = "keyserver_fetch_batch_requests";
pub const LOG_LINES_DROPPED: &str = "keyserver_log_lines_dropped_total";
pub const TLS_RELOADS: &str = "keyserver_tls_reloads_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "keyserver_tls_handshake_failures_total";
pub const JOB_RUNS: &str = "keyserver_job_runs_total";
pub const JOB_LAST_DURATION: &str = "keyserver_job_last_duration_seconds";
pub const JOB_ROWS: &str = "keyserver_job_rows_total";
pub const JOB_LAST_SUCCESS: &str = "keyserver_job_last_success_timestamp_seconds";

/// Latency buckets, in seconds: from a cached read to a pool timeout.
const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Fetch batch sizes, in requests: one (an idle server) up to the batch cap.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// How often histograms are compacted (the exporter leaves that to its user).
const UPKEEP: Duration = Duration::from_secs(5);

fn describe() {
    describe_counter!(
        RPC_REQUESTS,
        "Calls finished, by service, method and gRPC code (CANCELLED: the client went away)."
    );
    describe_histogram!(
        RPC_DURATION,
        Unit::Seconds,
        "Time from a call's arrival to its last byte, by service and method."
    );
    describe_gauge!(RPC_IN_FLIGHT, "Calls being handled now.");
    describe_counter!(
        SECURITY_EVENTS,
        "Refused tokens, denied permissions and failed recovery attempts, by event and reason."
    );
    describe_counter!(
        RATE_LIMITED,
        "Calls refused by a rate limit or the device quota, by limit (fetch, fetch_budget, \
         upload, registration, devices)."
    );
    describe_counter!(
        RATE_LIMITER_ERRORS,
        "Rate-limit checks Redis did not answer (refused, or let through with fail-open)."
    );
    describe_counter!(
        DRAINS_SUSPECTED,
        "Devices the drain check reported (audit event prekeys_drain_suspected), by kind of \
         one-time prekey (one_time, kyber) and reason (rate, one_requester)."
    );
    describe_gauge!(
        DB_UP,
        "1 when the last readiness check reached the database, 0 when it did not."
    );
    describe_gauge!(
        DB_FENCED,
        "1 when the database is fenced by a cutover (its keys moved; health says NOT_SERVING)."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Open connections in the database pool."
    );
    describe_gauge!(DB_POOL_IDLE, "Idle connections in the database pool.");
    describe_histogram!(
        DB_POOL_WAIT,
        Unit::Seconds,
        "Time a call waited for a database connection (on SQLite: for the write turn too)."
    );
    describe_counter!(
        DB_REPLICA_UNAVAILABLE,
        "Times the read replicas (--read-database-url) gave no connection, so reads went to the primary for a while."
    );
    describe_counter!(
        ONE_TIME_PREKEYS_SERVED,
        "One-time prekeys handed out in bundles, by kind (ec, kyber)."
    );
    describe_counter!(BUNDLES_SERVED, "Device bundles handed out.");
    describe_counter!(
        BUNDLES_WITHOUT_ONE_TIME_PREKEY,
        "Bundles handed out without a one-time prekey of a kind (ec; kyber: only the last-resort \
         key), because the device had none left."
    );
    describe_counter!(
        KEYS_UPLOADED,
        "Keys stored from uploads and registrations, by kind (one_time_ec, one_time_kyber, \
         signed_ec, kyber_last_resort)."
    );
    describe_histogram!(
        FETCH_BATCH_REQUESTS,
        "Fetch calls the database served together in one batch (one statement and commit on \
         PostgreSQL, one transaction on SQLite)."
    );
    describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines that could not be written because stderr's reader had gone away."
    );
    describe_counter!(
        TLS_RELOADS,
        "Certificate reloads (SIGHUP or a changed file), by outcome."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed (a plaintext client, an untrusted client certificate)."
    );
    describe_counter!(
        JOB_RUNS,
        "Maintenance job runs of this process, by job, trigger and outcome."
    );
    describe_gauge!(
        JOB_LAST_DURATION,
        Unit::Seconds,
        "How long the last finished run of each job took in this process."
    );
    describe_counter!(JOB_ROWS, "Rows each job step handled, by job and kind.");
    describe_gauge!(
        JOB_LAST_SUCCESS,
        "When each job last succeeded anywhere (unix seconds), from the run records."
    );
}

/// Installs the process's Prometheus recorder and serves it on `addr` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .expect("the buckets are not empty")
        .set_buckets_for_metric(Matcher::Full(FETCH_BATCH_REQUESTS.into()), BATCH_BUCKETS)
        .expect("the buckets are not empty")
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(UPKEEP);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = upkeep.tick() => handle.run_upkeep(),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let handle = handle.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |request| {
                                let handle = handle.clone();
                                async move { Ok::<_, std::convert::Infallible>(answer(&handle, &request)) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting a metrics connection failed"),
                },
            }
        }
    }))
}

fn answer(handle: &PrometheusHandle, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, handle.render()),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_owned(),
        ),
    };
    let content_type = if status == StatusCode::OK {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}
