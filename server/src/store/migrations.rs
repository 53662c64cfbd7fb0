//! Schema migrations: applying, reverting and reporting them, and refusing a database whose
//! applied migrations this build does not know (a newer server migrated it, or the files
//! changed after they were applied).

use std::collections::HashMap;

use sqlx::migrate::{Migrate, Migrator};
use sqlx::{PgPool, Row};

/// The PostgreSQL migrations, embedded at build time from `migrations/postgres`.
pub static POSTGRES: Migrator = sqlx::migrate!("../migrations/postgres");

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
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One migration and whether the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub version: i64,
    pub description: String,
    pub applied: bool,
}

/// Checks that every migration the database has applied is one of ours, unchanged.
pub async fn check_known(pool: &PgPool) -> Result<(), MigrationError> {
    let mut conn = pool.acquire().await?;
    conn.ensure_migrations_table().await?;
    if let Some(version) = conn.dirty_version().await? {
        return Err(MigrationError::Dirty { version });
    }
    let ours: HashMap<i64, _> = POSTGRES
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| (m.version, m))
        .collect();
    for applied in conn.list_applied_migrations().await? {
        match ours.get(&applied.version) {
            None => {
                return Err(MigrationError::Unknown {
                    version: applied.version,
                });
            }
            Some(m) if m.checksum != applied.checksum => {
                return Err(MigrationError::Modified {
                    version: m.version,
                    description: m.description.to_string(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Applies every pending migration, after [`check_known`].
pub async fn up(pool: &PgPool) -> Result<(), MigrationError> {
    check_known(pool).await?;
    POSTGRES.run(pool).await?;
    Ok(())
}

/// Reverts applied migrations newer than `target` (0 reverts all).
pub async fn down_to(pool: &PgPool, target: i64) -> Result<(), MigrationError> {
    check_known(pool).await?;
    POSTGRES.undo(pool, target).await?;
    Ok(())
}

/// The newest applied migration, if any.
pub async fn current_version(pool: &PgPool) -> Result<Option<i64>, MigrationError> {
    Ok(status(pool)
        .await?
        .iter()
        .filter(|m| m.applied)
        .map(|m| m.version)
        .max())
}

/// Every migration this build has, and whether the database has applied it.
pub async fn status(pool: &PgPool) -> Result<Vec<MigrationState>, MigrationError> {
    check_known(pool).await?;
    let applied: Vec<i64> =
        sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = TRUE ORDER BY version")
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| r.get("version"))
            .collect();
    Ok(POSTGRES
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| MigrationState {
            version: m.version,
            description: m.description.to_string(),
            applied: applied.contains(&m.version),
        })
        .collect())
}
