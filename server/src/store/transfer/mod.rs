//! `keyserver db copy` and `db verify`: moving every row between two databases of either
//! backend (SQLite to PostgreSQL when a deployment grows, PostgreSQL to SQLite to replay
//! production data locally), and proving the copy is whole.
//!
//! The source is read in one snapshot and never written (but for a cutover's fence). The
//! target is filled in one transaction, so a failed copy leaves it as it was; a PostgreSQL
//! target takes each table as one COPY. The report compares row counts and an
//! order-independent checksum over every column of every table, and checks the target's
//! foreign keys.

pub mod rows;
pub mod tables;

use sqlx::{Postgres, Sqlite, Transaction};

use super::database::Database;
use super::fence;
use super::migrations::{self, MigrationError};
use rows::{Checksum, Conn};
pub use tables::TABLES;

/// Rows read per statement (and sent to a PostgreSQL target's COPY at a time).
const BATCH: usize = 2000;

/// Why a copy did not run or did not finish (nothing was written to the target then).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(
        "the source database is not fully migrated; this keyserver never changes the source, \
         so run `keyserver migrate up` against it first"
    )]
    SourceNotMigrated,
    #[error(
        "the target already holds {rows} rows in {table}; copy into an empty database, or pass \
         --replace to delete the target's key-server rows first"
    )]
    TargetNotEmpty { table: &'static str, rows: i64 },
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// A statement of the copy failed (the driver's words); the target was left as it was.
    #[error("{0}")]
    Database(String),
}

impl From<sqlx::Error> for TransferError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e.to_string())
    }
}

/// One table's side-by-side comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: &'static str,
    pub source_rows: i64,
    pub target_rows: i64,
    pub source_checksum: Checksum,
    pub target_checksum: Checksum,
    /// Target rows whose foreign keys point nowhere.
    pub orphans: i64,
}

impl TableReport {
    pub fn matches(&self) -> bool {
        self.source_rows == self.target_rows
            && self.source_checksum == self.target_checksum
            && self.orphans == 0
    }
}

/// The validation report of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub tables: Vec<TableReport>,
}

impl Report {
    /// True when every table has the same rows on both sides and no broken foreign key.
    pub fn matches(&self) -> bool {
        self.tables.iter().all(TableReport::matches)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<24} {:>10} {:>10} {:>16} {:>16} {:>7}  result",
            "table", "source", "target", "source sum", "target sum", "orphans"
        )?;
        for t in &self.tables {
            writeln!(
                f,
                "{:<24} {:>10} {:>10} {:>16} {:>16} {:>7}  {}",
                t.table,
                t.source_rows,
                t.target_rows,
                t.source_checksum.short(),
                t.target_checksum.short(),
                t.orphans,
                if t.matches() { "ok" } else { "MISMATCH" }
            )?;
        }
        write!(
            f,
            "{}",
            if self.matches() {
                "copy verified: every row of every table matches"
            } else {
                "COPY DOES NOT MATCH THE SOURCE"
            }
        )
    }
}

/// A transaction of either backend.
enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    /// A read-only snapshot: the source stays consistent even while a server writes to it.
    async fn snapshot(db: &Database) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Database::Postgres(s) => Tx::Postgres(
                s.pool()
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?,
            ),
            Database::Sqlite(s) => Tx::Sqlite(s.pool().begin().await?),
        })
    }

    async fn write(db: &Database) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Database::Postgres(s) => Tx::Postgres(s.pool().begin().await?),
            Database::Sqlite(s) => Tx::Sqlite(s.pool().begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Postgres(tx) => Conn::Postgres(tx),
            Tx::Sqlite(tx) => Conn::Sqlite(tx),
        }
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }
}

/// Copies every row of `from` into `to` ([`load`]), then verifies the copy.
pub async fn copy(
    from: &Database,
    to: &Database,
    replace: bool,
    fence_source: Option<&str>,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Report, TransferError> {
    load(from, to, replace, fence_source, progress).await?;
    verify(from, to).await
}

/// Copies every row of `from` into `to`, migrating `to` first. With `fence_source` (where
/// the keys go, as servers on the source will say), the source is fenced once the target is known to be fit ([`fence::set`]: in-flight calls finish, later
/// ones are refused) and before its snapshot is read, so the copy holds every key the source
/// ever handed out and the source hands out no more: a cutover. The target's own fence, if it
/// had one (a cutover back), is lifted in the copy's transaction.
/// `progress` hears (table, rows copied so far, rows in the table).
pub async fn load(
    from: &Database,
    to: &Database,
    replace: bool,
    fence_source: Option<&str>,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), TransferError> {
    if !migrations::status(from).await?.iter().all(|m| m.applied) {
        return Err(TransferError::SourceNotMigrated);
    }
    migrations::up(to).await?;

    let mut target = Tx::write(to).await?;
    if replace {
        target.conn().clear(TABLES).await?;
    } else {
        for table in TABLES {
            let rows = target.conn().count(table).await?;
            if rows > 0 {
                return Err(TransferError::TargetNotEmpty {
                    table: table.name,
                    rows,
                });
            }
        }
    }
    target.conn().lift_fence().await?;
    if let Some(moved_to) = fence_source {
        fence::set(from, moved_to)
            .await
            .map_err(|e| TransferError::Database(e.to_string()))?;
    }
    let mut source = Tx::snapshot(from).await?;
    for table in TABLES {
        let total = source.conn().count(table).await? as u64;
        let mut copied = 0u64;
        progress(table.name, 0, total);
        let mut last = None;
        let mut sink = target.conn().sink(table).await?;
        loop {
            let batch = source
                .conn()
                .read_batch(table, last.as_ref(), BATCH)
                .await?;
            if batch.is_empty() {
                break;
            }
            sink.write(table, &batch).await?;
            copied += batch.len() as u64;
            progress(table.name, copied, total);
            last = batch.last().map(|row| row[0].clone());
        }
        sink.finish().await?;
        if table.serial {
            let high_water = source.conn().sequence_high_water(table).await?;
            target.conn().set_sequence(table, high_water).await?;
        }
    }
    target.conn().refresh_views().await?;
    target.commit().await?;
    Ok(())
}

/// Row count and checksum of every table in one snapshot of `db`.
async fn summarize(db: &Database) -> Result<Vec<(i64, Checksum)>, sqlx::Error> {
    let mut tx = Tx::snapshot(db).await?;
    let mut summary = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let mut checksum = Checksum::default();
        let mut rows = 0;
        let mut last = None;
        loop {
            let batch = tx.conn().read_batch(table, last.as_ref(), BATCH).await?;
            if batch.is_empty() {
                break;
            }
            for row in &batch {
                checksum.add(row);
            }
            rows += batch.len() as i64;
            last = batch.last().map(|row| row[0].clone());
        }
        summary.push((rows, checksum));
    }
    Ok(summary)
}

/// Compares every table of `from` and `to` and checks `to`'s foreign keys.
pub async fn verify(from: &Database, to: &Database) -> Result<Report, TransferError> {
    let source = summarize(from).await?;
    let target = summarize(to).await?;
    let mut check = Tx::snapshot(to).await?;
    let mut tables = Vec::with_capacity(TABLES.len());
    for ((table, (source_rows, source_checksum)), (target_rows, target_checksum)) in
        TABLES.iter().zip(source).zip(target)
    {
        let mut orphans = 0;
        for (column, parent, parent_column) in table.references {
            orphans += check
                .conn()
                .orphans(table, column, parent, parent_column)
                .await?;
        }
        tables.push(TableReport {
            table: table.name,
            source_rows,
            target_rows,
            source_checksum,
            target_checksum,
            orphans,
        });
    }
    Ok(Report { tables })
}
