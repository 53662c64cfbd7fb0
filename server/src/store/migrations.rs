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
    #[error(
        "this database is fenced (its keys moved to {moved_to}); reverting the fence would let \
         it serve them again: lift it first with `keyserver db unfence` if that is really meant"
    )]
    Fenced { moved_to: String },
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

/// Data a revert would drop: a whole table, or one column of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drop {
    pub table: String,
    pub column: Option<String>,
    /// The rows holding data that would go (for a column, those where it is not null).
    pub rows: i64,
}

/// One migration a revert would undo, and what its down script drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revert {
    pub version: i64,
    pub description: String,
    pub drops: Vec<Drop>,
}

/// The migration that adds the cutover fence: reverting it would let a fenced database serve.
const FENCE_VERSION: i64 = 9;

/// The tables and columns a down script drops, read from its `DROP TABLE` and `ALTER TABLE …
/// DROP COLUMN` statements (views and indexes hold no data of their own; a table SQLite
/// rebuilds under its old name is not dropped).
fn dropped(sql: &str) -> Vec<(String, Option<String>)> {
    let words: Vec<String> = sql
        .lines()
        .map(|line| line.split("--").next().unwrap_or_default())
        .flat_map(|line| line.split(|c: char| c.is_whitespace() || c == ',' || c == ';'))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let name_after = |mut i: usize| {
        while matches!(
            words.get(i).map(String::as_str),
            Some("if" | "exists" | "only")
        ) {
            i += 1;
        }
        words.get(i).cloned()
    };
    let (mut altered, mut found, mut rebuilt) = (None, Vec::new(), Vec::new());
    for (i, pair) in words.windows(2).enumerate() {
        match (pair[0].as_str(), pair[1].as_str()) {
            ("alter", "table") => altered = name_after(i + 2),
            ("drop", "table") => found.extend(name_after(i + 2).map(|t| (t, None))),
            ("drop", "column") => {
                if let (Some(table), Some(column)) = (altered.clone(), name_after(i + 2)) {
                    found.push((table, Some(column)));
                }
            }
            // SQLite changes a table by building a new one and renaming it over the old.
            ("rename", "to") => rebuilt.extend(name_after(i + 2)),
            _ => {}
        }
    }
    found.retain(|(table, column)| column.is_some() || !rebuilt.contains(table));
    found
}

/// What reverting every migration newer than `target` would undo, newest first, with the rows
/// each drop would delete (tables and columns that do not exist are left out).
pub async fn plan_down(db: &Database, target: i64) -> Result<Vec<Revert>, MigrationError> {
    let applied: Vec<MigrationState> = status(db)
        .await?
        .into_iter()
        .filter(|m| m.applied && m.version > target)
        .collect();
    let mut plan = Vec::new();
    for m in applied.iter().rev() {
        let script = migrator(db)
            .iter()
            .find(|d| d.version == m.version && d.migration_type.is_down_migration())
            .map(|d| d.sql.to_string())
            .unwrap_or_default();
        let mut drops = Vec::new();
        for (table, column) in dropped(&script) {
            let count = match &column {
                None => format!("SELECT count(*) FROM {table}"),
                Some(c) => format!("SELECT count(*) FROM {table} WHERE {c} IS NOT NULL"),
            };
            // A table or column an earlier revert or the chat app removed is not there.
            let rows: Option<i64> = match db {
                Database::Postgres(s) => sqlx::query_scalar(&count).fetch_one(s.pool()).await,
                Database::Sqlite(s) => sqlx::query_scalar(&count).fetch_one(s.pool()).await,
            }
            .ok();
            if let Some(rows) = rows {
                drops.push(Drop {
                    table,
                    column,
                    rows,
                });
            }
        }
        plan.push(Revert {
            version: m.version,
            description: m.description.clone(),
            drops,
        });
    }
    Ok(plan)
}

/// Reverts applied migrations newer than `target` (0 reverts all). Refuses to revert the
/// cutover fence of a fenced database: it would serve keys that moved elsewhere.
pub async fn down_to(db: &Database, target: i64) -> Result<(), MigrationError> {
    check_known(db).await?;
    if target < FENCE_VERSION
        && let Ok(Some(fence)) = super::fence::get(db).await
    {
        return Err(MigrationError::Fenced {
            moved_to: fence.moved_to,
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_scripts_name_the_tables_and_columns_they_drop() {
        let script = "-- DROP TABLE commented_out;\n\
            DROP INDEX IF EXISTS idx_a;\n\
            ALTER TABLE nchat_user_master_keys\n    DROP COLUMN IF EXISTS failed_recovery_attempts,\n\
                DROP COLUMN recovery_locked_until;\n\
            DROP MATERIALIZED VIEW IF EXISTS nchat_prekey_bundles;\n\
            DROP TABLE IF EXISTS keyserver_job_runs;";
        assert_eq!(
            dropped(script),
            [
                (
                    "nchat_user_master_keys".to_owned(),
                    Some("failed_recovery_attempts".to_owned())
                ),
                (
                    "nchat_user_master_keys".to_owned(),
                    Some("recovery_locked_until".to_owned())
                ),
                ("keyserver_job_runs".to_owned(), None),
            ]
        );
    }

    #[test]
    fn every_down_script_of_both_backends_drops_the_same() {
        for (pg, lite) in POSTGRES.iter().zip(SQLITE.iter()) {
            assert_eq!(pg.version, lite.version);
            if pg.migration_type.is_down_migration() {
                let tables = |sql: &str| {
                    let mut d = dropped(sql);
                    d.sort();
                    d.dedup();
                    d
                };
                assert_eq!(
                    tables(&pg.sql),
                    tables(&lite.sql),
                    "migration {}",
                    pg.version
                );
            }
        }
    }
}
