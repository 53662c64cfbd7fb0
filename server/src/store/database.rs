//! Opens the database a URL names, with the backend it needs: `postgres://` (production) or
//! `sqlite://` (the embedded default). `serve`, `migrate`, `db copy` and the test harness all
//! open databases through here.

use std::sync::Arc;

use super::KeyStore;
use super::jobs::JobStore;
use super::postgres::PgStore;
use super::sqlite::SqliteStore;

/// An open database of either backend.
#[derive(Clone)]
pub enum Database {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// Why a URL could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unsupported database URL (use postgres://… or sqlite://…)")]
    UnsupportedScheme,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl Database {
    /// Connects to `url` with a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, OpenError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(
                PgStore::connect(url, max_connections).await?,
            ))
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(
                SqliteStore::connect(url, max_connections).await?,
            ))
        } else {
            Err(OpenError::UnsupportedScheme)
        }
    }

    /// The key store on this database.
    pub fn store(&self) -> Arc<dyn KeyStore> {
        match self {
            Self::Postgres(store) => Arc::new(store.clone()),
            Self::Sqlite(store) => Arc::new(store.clone()),
        }
    }

    /// The maintenance jobs' storage on this database.
    pub fn job_store(&self) -> Arc<dyn JobStore> {
        match self {
            Self::Postgres(store) => Arc::new(store.clone()),
            Self::Sqlite(store) => Arc::new(store.clone()),
        }
    }

    /// "postgres" or "sqlite", for logs and reports.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match self {
            Self::Postgres(store) => store.pool().close().await,
            Self::Sqlite(store) => store.pool().close().await,
        }
    }
}
