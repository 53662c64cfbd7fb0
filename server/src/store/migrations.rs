//! Schema migrations of both backends: applying, reverting and reporting them, and refusing a
//! database whose applied migrations this build does not know (a newer server migrated it, or
//! the files changed after they were applied). Each backend has its own folder under
//! `migrations/`, with the same versions.

use std::collections::HashMap;

use sqlx::migrate::{Migrate, Migrator};

use super::database::Database;

/// The PostgreSQL migrations, embedded at build time from `migrations/postgres`.
pub static POSTGRES: Migrator = sqlx::migrate!("../migrations/postgres");
/// The SQLite migrations, embedded at build time from `migrations/sqlite`.
pub static SQLITE: Migrator = sqlx::migrate!("../migrations/sqlite");

/// Why the schema cannot be used or changed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "the database has migration {version} applied, which this keyserver does not know; \
         it was migrated by a newer keyserver: run that version, or revert with it first"
    )]
    Unknown { version: i64 },
    #[error(
        "migration {version} ({description}) differs from the one applied to the database; \
         the migration files must not change after release"
    )]
    Modified { version: i64, description: String },
    #[error("migration {version} was left half-applied; repair the database by hand")]
    Dirty { version: i64 },
    /// Applying or reverting failed, or the database could not be read (the driver's words).
    #[error("{0}")]
    Failed(String),
}

impl From<sqlx::migrate::MigrateError> for MigrationError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Failed(e.to_string())
    }
}

impl From<sqlx::Error> for MigrationError {
    fn from(e: sqlx::Error) -> Self {
        Self::Failed(e.to_string())
    }
}

/// One migration and whether the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub version: i64,
    pub description: String,
    pub applied: bool,
}

fn migrator(db: &Database) -> &'static Migrator {
    match db {
        Database::Postgres(_) => &POSTGRES,
        Database::Sqlite(_) => &SQLITE,
    }
}

/// Checks the applied migrations against ours; returns every migration with its state.
async fn inspect<C: Migrate + ?Sized>(
    conn: &mut C,
    migrator: &Migrator,
) -> Result<Vec<MigrationState>, MigrationError> {
    conn.ensure_migrations_table().await?;
    if let Some(version) = conn.dirty_version().await? {
        return Err(MigrationError::Dirty { version });
    }
    let ours: HashMap<i64, _> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| (m.version, m))
        .collect();
    let applied = conn.list_applied_migrations().await?;
    for a in &applied {
        match ours.get(&a.version) {
            None => return Err(MigrationError::Unknown { version: a.version }),
            Some(m) if m.checksum != a.checksum => {
                return Err(MigrationError::Modified {
                    version: m.version,
                    description: m.description.to_string(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| MigrationState {
            version: m.version,
            description: m.description.to_string(),
            applied: applied.iter().any(|a| a.version == m.version),
        })
        .collect())
}

/// Every migration this build has, and whether the database has applied it; fails when the
/// database has one this build does not know.
pub async fn status(db: &Database) -> Result<Vec<MigrationState>, MigrationError> {
    match db {
        Database::Postgres(s) => inspect(&mut *s.pool().acquire().await?, &POSTGRES).await,
        Database::Sqlite(s) => inspect(&mut *s.pool().acquire().await?, &SQLITE).await,
    }
}

/// Checks that every migration the database has applied is one of ours, unchanged.
pub async fn check_known(db: &Database) -> Result<(), MigrationError> {
    status(db).await.map(drop)
}

/// Applies every pending migration, after [`check_known`].
pub async fn up(db: &Database) -> Result<(), MigrationError> {
    check_known(db).await?;
    match db {
        Database::Postgres(s) => POSTGRES.run(s.pool()).await?,
        Database::Sqlite(s) => SQLITE.run(s.pool()).await?,
    }
    Ok(())
}

/// Reverts applied migrations newer than `target` (0 reverts all).
pub async fn down_to(db: &Database, target: i64) -> Result<(), MigrationError> {
    check_known(db).await?;
    match db {
        Database::Postgres(s) => migrator(db).undo(s.pool(), target).await?,
        Database::Sqlite(s) => migrator(db).undo(s.pool(), target).await?,
    }
    Ok(())
}

/// The newest applied migration, if any.
pub async fn current_version(db: &Database) -> Result<Option<i64>, MigrationError> {
    Ok(status(db)
        .await?
        .iter()
        .filter(|m| m.applied)
        .map(|m| m.version)
        .max())
}
