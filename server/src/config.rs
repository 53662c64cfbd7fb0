//! Command-line and environment configuration shared by the `keyserver` subcommands.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// File name of the embedded database inside the data directory.
pub const EMBEDDED_DATABASE: &str = "keyserver.db";

/// The directory for state the server keeps itself.
#[derive(Args, Debug, Clone)]
pub struct DataDirArgs {
    /// Directory for the embedded database and the generated token secret.
    #[arg(long, env = "KEYSERVER_DATA_DIR", default_value = "keyserver-data")]
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
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Most database connections this process opens.
    #[arg(long, env = "KEYSERVER_DB_MAX_CONNECTIONS", default_value_t = 16)]
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

/// Where the token secret comes from.
#[derive(Args, Debug, Clone)]
pub struct SecretArgs {
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
    pub data: DataDirArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// After a change, how long to gather further changes before refreshing the
    /// nchat_prekey_bundles view ("0s" turns the refresher off).
    #[arg(long, env = "KEYSERVER_BUNDLE_VIEW_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    pub bundle_view_refresh: Duration,
    /// Fewest PBKDF2 iterations a master-key record may declare (the schema's default).
    #[arg(
        long,
        env = "KEYSERVER_MIN_PBKDF2_ITERATIONS",
        default_value_t = 100_000
    )]
    pub min_pbkdf2_iterations: u32,
}
