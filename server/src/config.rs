//! Command-line and environment configuration shared by the `keyserver` subcommands.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::store::bundles::coalesce::DEFAULT_BATCHES_IN_FLIGHT;
use crate::store::drain::DrainRule;

/// File name of the embedded database inside the data directory.
pub const EMBEDDED_DATABASE: &str = "keyserver.db";

/// The directory for state the server keeps itself.
#[derive(Args, Debug, Clone)]
pub struct DataDirArgs {
    /// Directory for the embedded database and the generated token secret.
    #[arg(
        long,
        env = "KEYSERVER_DATA_DIR",
        default_value = "keyserver-data",
        global = true
    )]
    pub data_dir: PathBuf,
}

impl DataDirArgs {
    /// Creates the data directory (owner-only) if it is missing.
    pub fn ensure(&self) -> anyhow::Result<&Path> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        Ok(&self.data_dir)
    }
}

/// Where the database is.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// postgres://… for PostgreSQL or sqlite://… for SQLite; when unset, the embedded SQLite
    /// database in the data directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Most database connections this process opens.
    #[arg(
        long,
        env = "KEYSERVER_DB_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub max_connections: u32,
}

impl DatabaseArgs {
    /// The configured URL, or the embedded database's. The embedded file is created
    /// owner-only (it holds encrypted key material; SQLite gives its WAL the same mode).
    pub fn url(&self, data: &DataDirArgs) -> anyhow::Result<String> {
        if let Some(url) = self.database_url.as_ref().filter(|u| !u.is_empty()) {
            return Ok(url.clone());
        }
        let path = data.ensure()?.join(EMBEDDED_DATABASE);
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(format!("sqlite://{}", path.display()))
    }
}

/// Where the token secrets come from, and what a token must say.
#[derive(Args, Debug, Clone)]
pub struct SecretArgs {
    /// HS256 secret that signs tokens (at least 32 bytes) and verifies them; when unset, the
    /// data directory's token-secret file (which `serve` creates on first start).
    #[arg(long, env = "KEYSERVER_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Further secrets whose tokens are still accepted (comma-separated), for rotating the
    /// secret without downtime: sign with the new one, keep the old one here until its tokens
    /// have expired.
    #[arg(
        long,
        env = "KEYSERVER_TOKEN_VERIFY_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub token_verify_secrets: Vec<String>,
    /// The issuer (iss) tokens must name.
    #[arg(long, env = "KEYSERVER_TOKEN_ISSUER", default_value = "keyserver")]
    pub token_issuer: String,
    /// The audience (aud) tokens must name.
    #[arg(long, env = "KEYSERVER_TOKEN_AUDIENCE", default_value = "keyserver")]
    pub token_audience: String,
    /// Longest lifetime (exp - iat) a token may have; longer ones are refused.
    #[arg(long, env = "KEYSERVER_TOKEN_MAX_TTL", default_value = "30days", value_parser = humantime::parse_duration)]
    pub token_max_ttl: Duration,
}

impl SecretArgs {
    /// What tokens must say besides their signature.
    pub fn policy(&self) -> crate::auth::TokenPolicy {
        crate::auth::TokenPolicy {
            issuer: self.token_issuer.clone(),
            audience: self.token_audience.clone(),
            max_ttl: self.token_max_ttl,
        }
    }
}

/// `keyserver serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYSERVER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub data: DataDirArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// PostgreSQL standbys (HAProxy's replica port, say) for the calls that take no key and
    /// write nothing: GetIdentityKeys, GetKeyStatus, audit and session reads, which may then be
    /// a moment behind. Never fetches. The primary answers them while no standby gives a
    /// connection within a second.
    #[arg(long, env = "KEYSERVER_READ_DATABASE_URL", hide_env_values = true)]
    pub read_database_url: Option<String>,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// Serve Prometheus metrics on this address at /metrics; off when unset.
    #[arg(long, env = "KEYSERVER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub edge: EdgeSettings,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub rotation: RotationPolicy,
    #[command(flatten)]
    pub cleanup: CleanupSettings,
    #[command(flatten)]
    pub drain: DrainArgs,
    #[command(flatten)]
    pub schedule: Schedule,
    /// Serve PQXDH only, as Signal does: refuse registrations without a last-resort Kyber
    /// prekey and leave devices without one out of every bundle answer. Off by default so
    /// existing X3DH-only devices (the nchat design's clients) stay reachable.
    #[arg(long, env = "KEYSERVER_REQUIRE_PQXDH")]
    pub require_pqxdh: bool,
    /// Most fetch batches this process has on PostgreSQL at once; concurrent fetches beyond
    /// them queue and go together as the next batch (one statement, one commit). SQLite always
    /// runs one.
    #[arg(long, env = "KEYSERVER_FETCH_BATCHES", default_value_t = DEFAULT_BATCHES_IN_FLIGHT as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub fetch_batches: u16,
    /// How long a fetch retried with the same idempotency key gets the one-time keys the first
    /// attempt took instead of taking more (at most the consumed-key retention).
    #[arg(long, env = "KEYSERVER_FETCH_RETRY_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub fetch_retry_window: Duration,
    /// Fewest PBKDF2 iterations a master-key record may declare (the schema's default).
    #[arg(
        long,
        env = "KEYSERVER_MIN_PBKDF2_ITERATIONS",
        default_value_t = 100_000
    )]
    pub min_pbkdf2_iterations: u32,
}

/// When a device's signed prekey should be replaced, and when peers should distrust it.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// A signed prekey older than this is due for rotation (the design's weekly rotation).
    #[arg(long, env = "KEYSERVER_ROTATION_AGE", default_value = "7days", value_parser = humantime::parse_duration)]
    pub rotation_age: Duration,
    /// A signed prekey older than this is marked stale in bundles (the age Signal clients treat
    /// as out of date).
    #[arg(long, env = "KEYSERVER_STALE_SIGNED_PREKEY_AGE", default_value = "14days", value_parser = humantime::parse_duration)]
    pub stale_signed_prekey_age: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            rotation_age: Duration::from_secs(7 * 86_400),
            stale_signed_prekey_age: Duration::from_secs(14 * 86_400),
        }
    }
}

/// How long expired rows are kept, and how cleanup deletes them.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupSettings {
    /// Consumed one-time prekeys (EC and Kyber) are deleted this long after they were handed out.
    #[arg(long, env = "KEYSERVER_CONSUMED_PREKEY_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub consumed_prekey_retention: Duration,
    /// Superseded signed prekeys and last-resort Kyber prekeys are deleted this long after they
    /// stopped being active (late messages to them still decrypt on the device meanwhile).
    #[arg(long, env = "KEYSERVER_SUPERSEDED_SIGNED_PREKEY_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub superseded_signed_prekey_retention: Duration,
    /// Audit events are deleted at this age.
    #[arg(long, env = "KEYSERVER_AUDIT_RETENTION", default_value = "90days", value_parser = humantime::parse_duration)]
    pub audit_retention: Duration,
    /// Records of finished job runs are deleted at this age.
    #[arg(long, env = "KEYSERVER_JOB_RUN_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub job_run_retention: Duration,
    /// Most rows one cleanup transaction deletes.
    #[arg(long, env = "KEYSERVER_CLEANUP_BATCH_SIZE", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub cleanup_batch_size: u32,
    /// Pause between cleanup batches, to leave the database to the API ("0s" for none).
    #[arg(long, env = "KEYSERVER_CLEANUP_BATCH_PAUSE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub cleanup_batch_pause: Duration,
}

impl Default for CleanupSettings {
    fn default() -> Self {
        Self {
            consumed_prekey_retention: Duration::from_secs(30 * 86_400),
            superseded_signed_prekey_retention: Duration::from_secs(30 * 86_400),
            audit_retention: Duration::from_secs(90 * 86_400),
            job_run_retention: Duration::from_secs(30 * 86_400),
            cleanup_batch_size: 5000,
            cleanup_batch_pause: Duration::ZERO,
        }
    }
}

/// How often `keyserver serve` runs each job itself ("0s" leaves a job to an external cron).
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// How often to run the rotation check.
    #[arg(long, env = "KEYSERVER_ROTATION_CHECK_EVERY", default_value = "1day", value_parser = humantime::parse_duration)]
    pub rotation_check_every: Duration,
    /// How often to run cleanup.
    #[arg(long, env = "KEYSERVER_CLEANUP_EVERY", default_value = "1day", value_parser = humantime::parse_duration)]
    pub cleanup_every: Duration,
    /// After a write, how long to gather further changes before refreshing the
    /// nchat_prekey_bundles view; also the least time between refreshes, which grows to 20
    /// times a refresh's duration when refreshes are slow (at most 5% of the time).
    #[arg(long, env = "KEYSERVER_BUNDLE_VIEW_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    pub bundle_view_refresh: Duration,
    /// How often to run the drain check.
    #[arg(long, env = "KEYSERVER_DRAIN_CHECK_EVERY", default_value = "10m", value_parser = humantime::parse_duration)]
    pub drain_check_every: Duration,
}

impl Schedule {
    /// Nothing scheduled: every job is left to the command line.
    pub const NONE: Schedule = Schedule {
        rotation_check_every: Duration::ZERO,
        cleanup_every: Duration::ZERO,
        bundle_view_refresh: Duration::ZERO,
        drain_check_every: Duration::ZERO,
    };
}

/// TLS on the gRPC listener; plaintext when no certificate is given.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first) to serve TLS with; reloaded on SIGHUP or change.
    #[arg(long, env = "KEYSERVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate.
    #[arg(long, env = "KEYSERVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates; when set, clients must present a certificate one of them issued
    /// (mTLS).
    #[arg(long, env = "KEYSERVER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files to serve TLS from, when TLS is configured.
    pub fn files(&self) -> Option<crate::edge::tls::TlsFiles> {
        Some(crate::edge::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

/// Limits and checks at the request edge.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Largest request message accepted, decoded (the largest legal one, a registration with
    /// 100 one-time prekeys of each kind, is about 550 KiB).
    #[arg(long, env = "KEYSERVER_MAX_REQUEST_BYTES", default_value_t = 640 * 1024)]
    pub max_request_bytes: usize,
    /// Longest a call may run before it is answered DEADLINE_EXCEEDED (a client's own
    /// grpc-timeout is honoured when shorter).
    #[arg(long, env = "KEYSERVER_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Most calls in flight on one connection (HTTP/2 concurrent streams).
    #[arg(long, env = "KEYSERVER_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 pings on an idle connection.
    #[arg(long, env = "KEYSERVER_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "KEYSERVER_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Idle time before TCP keepalive probes.
    #[arg(long, env = "KEYSERVER_TCP_KEEPALIVE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive: Duration,
    /// After SIGTERM, how long calls in flight and open connections get to finish before the
    /// server closes what is left and exits.
    #[arg(long, env = "KEYSERVER_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Time between two readiness checks of the database.
    #[arg(long, env = "KEYSERVER_READINESS_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub readiness_interval: Duration,
    /// How long a readiness check may take before the database counts as down.
    #[arg(long, env = "KEYSERVER_READINESS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub readiness_timeout: Duration,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            max_request_bytes: 640 * 1024,
            request_timeout: Duration::from_secs(30),
            max_concurrent_streams: 256,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            readiness_interval: Duration::from_secs(1),
            readiness_timeout: Duration::from_secs(2),
        }
    }
}

/// Rate limits and quotas (docs/ABUSE.md). A limit of 0 turns that limit off.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct LimitArgs {
    /// Fetches one requesting device may make of one target device (or of one user's devices
    /// together) at once, as Signal allows.
    #[arg(long, env = "KEYSERVER_FETCH_BURST", default_value_t = 6)]
    pub fetch_burst: u32,
    /// After the burst, one more fetch of the same target every this long.
    #[arg(long, env = "KEYSERVER_FETCH_REFILL_EVERY", default_value = "10m", value_parser = humantime::parse_duration)]
    pub fetch_refill_every: Duration,
    /// Targets one user may fetch over all targets per --fetch-budget-period, so one account
    /// cannot walk the directory.
    #[arg(long, env = "KEYSERVER_FETCH_BUDGET", default_value_t = 300)]
    pub fetch_budget: u32,
    #[arg(long, env = "KEYSERVER_FETCH_BUDGET_PERIOD", default_value = "1h", value_parser = humantime::parse_duration)]
    pub fetch_budget_period: Duration,
    /// Key uploads and rotations per device per hour.
    #[arg(long, env = "KEYSERVER_UPLOADS_PER_HOUR", default_value_t = 60)]
    pub uploads_per_hour: u32,
    /// Device registrations (new or again) per user per hour.
    #[arg(long, env = "KEYSERVER_REGISTRATIONS_PER_HOUR", default_value_t = 20)]
    pub registrations_per_hour: u32,
    /// Most devices one user may have (Signal's device-id cap).
    #[arg(long, env = "KEYSERVER_MAX_DEVICES_PER_USER", default_value_t = 128)]
    pub max_devices_per_user: u32,
    /// redis://… to keep the buckets in Redis, shared by every server process; when unset,
    /// in this process only.
    #[arg(long, env = "KEYSERVER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// How long a rate-limit check may wait for Redis before Redis counts as unreachable.
    #[arg(long, env = "KEYSERVER_REDIS_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,
    /// While Redis is unreachable, let calls through unlimited instead of refusing them
    /// UNAVAILABLE.
    #[arg(long, env = "KEYSERVER_RATE_LIMIT_FAIL_OPEN")]
    pub rate_limit_fail_open: bool,
}

impl Default for LimitArgs {
    fn default() -> Self {
        Self {
            fetch_burst: 6,
            fetch_refill_every: Duration::from_secs(600),
            fetch_budget: 300,
            fetch_budget_period: Duration::from_secs(3600),
            uploads_per_hour: 60,
            registrations_per_hour: 20,
            max_devices_per_user: 128,
            redis_url: None,
            redis_timeout: Duration::from_millis(500),
            rate_limit_fail_open: false,
        }
    }
}

impl LimitArgs {
    /// No rate limit and no device quota (benchmarks and tests of other things).
    pub fn off() -> Self {
        Self {
            fetch_burst: 0,
            fetch_budget: 0,
            uploads_per_hour: 0,
            registrations_per_hour: 0,
            max_devices_per_user: 0,
            ..Self::default()
        }
    }
}

/// What drain detection counts as a drain (docs/ABUSE.md).
#[derive(Args, Debug, Clone, Copy, PartialEq)]
pub struct DrainArgs {
    /// How far back one-time prekeys taken are counted ("0s" turns drain detection off).
    #[arg(long, env = "KEYSERVER_DRAIN_WINDOW", default_value = "24h", value_parser = humantime::parse_duration)]
    pub drain_window: Duration,
    /// A device is suspected when this many one-time prekeys of a kind (EC or Kyber) were taken
    /// within the window (0: never for the count alone).
    #[arg(long, env = "KEYSERVER_DRAIN_THRESHOLD", default_value_t = 100)]
    pub drain_threshold: u32,
    /// ... or when one requesting user took at least this share of them ...
    #[arg(long, env = "KEYSERVER_DRAIN_REQUESTER_SHARE", default_value_t = 0.5, value_parser = share)]
    pub drain_requester_share: f64,
    /// ... and at least this many (0 turns the one-requester test off).
    #[arg(long, env = "KEYSERVER_DRAIN_REQUESTER_KEYS", default_value_t = 10)]
    pub drain_requester_keys: u32,
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if share > 0.0 && share <= 1.0 => Ok(share),
        _ => Err("expected a share above 0 and at most 1, such as 0.5".to_owned()),
    }
}

impl Default for DrainArgs {
    fn default() -> Self {
        Self {
            drain_window: Duration::from_secs(86_400),
            drain_threshold: 100,
            drain_requester_share: 0.5,
            drain_requester_keys: 10,
        }
    }
}

impl DrainArgs {
    pub fn rule(&self) -> DrainRule {
        DrainRule {
            window: self.drain_window,
            threshold: self.drain_threshold,
            requester_share: self.drain_requester_share,
            requester_keys: self.drain_requester_keys,
        }
    }
}
