//! Command-line and environment configuration shared by the `keyserver` subcommands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Where the database is.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, for example postgres://keyserver@localhost/keyserver.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Most database connections this process opens.
    #[arg(long, env = "KEYSERVER_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub max_connections: u32,
}

/// Where the token secret comes from.
#[derive(Args, Debug, Clone)]
pub struct SecretArgs {
    /// Directory for state the server keeps itself (the generated token secret).
    #[arg(long, env = "KEYSERVER_DATA_DIR", default_value = "keyserver-data")]
    pub data_dir: PathBuf,
    /// HS256 secret for bearer tokens (at least 32 bytes); when unset, one is generated in the
    /// data directory on first use.
    #[arg(long, env = "KEYSERVER_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
}

/// `keyserver serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYSERVER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// After a change, how long to gather further changes before refreshing the
    /// nchat_prekey_bundles view ("0s" turns the refresher off).
    #[arg(long, env = "KEYSERVER_BUNDLE_VIEW_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    pub bundle_view_refresh: Duration,
}
