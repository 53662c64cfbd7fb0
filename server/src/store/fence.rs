//! The cutover fence: a database whose keys moved to another one (`keyserver db cutover`)
//! must never hand out a key again, or a peer could get from it a key the new database also
//! hands out. The fence is a row in `keyserver_fence` naming where the keys went; every
//! key-taking and writing transaction reads it first, in the same transaction as its work, and
//! refuses with [`StoreError::Fenced`] when it is set.
//!
//! Setting it must also wait for the transactions that read it before it was set, so a copy
//! started afterwards sees everything they took. On PostgreSQL they read it `FOR SHARE`, which
//! holds a ROW SHARE lock on the table to their end, and [`set`] takes an EXCLUSIVE lock on the
//! table first: it waits for them, and blocks later readers until its row is committed (a
//! statement takes its snapshot after its table locks, so those see the row). On SQLite every
//! such transaction holds the single write lock, which [`set`] takes too.

use sqlx::PgPool;
use time::OffsetDateTime;

use super::database::{Database, Tx};
use super::sql::{Sql, sql};
use super::{StoreError, timestamp_text};

/// Where a fenced database's keys went, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub moved_to: String,
    pub fenced_at: OffsetDateTime,
}

/// Read in every write transaction, first (PostgreSQL: the table lock described above).
pub(crate) const CHECK: Sql = Sql {
    postgres: "SELECT moved_to FROM keyserver_fence FOR SHARE",
    sqlite: "SELECT moved_to FROM keyserver_fence",
};

/// Refuses the transaction's work when the database is fenced.
pub(crate) async fn check(tx: &mut Tx) -> Result<(), StoreError> {
    match tx.query(&CHECK).fetch_optional::<(String,)>().await? {
        Some((moved_to,)) => Err(StoreError::Fenced { moved_to }),
        None => Ok(()),
    }
}

/// Where the keys went, read without a lock: by the readiness check and by [`moved_to`].
pub(crate) const MOVED_TO: &str = "SELECT moved_to FROM keyserver_fence";

/// Where the keys went, for a PostgreSQL fetch that found nothing (its statement reads the
/// fence itself; this says why it matched no device).
pub(crate) async fn moved_to(pool: &PgPool) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(MOVED_TO).fetch_optional(pool).await?)
}

#[derive(sqlx::FromRow)]
struct Row {
    moved_to: String,
    fenced_at: super::sql::At,
}

const READ: Sql = sql!("SELECT moved_to, fenced_at FROM keyserver_fence");

/// The fence, if the database has one.
pub async fn get(db: &Database) -> Result<Option<Fence>, StoreError> {
    let row: Option<Row> = db.read().await?.query(&READ).fetch_optional().await?;
    Ok(row.map(|r| Fence {
        moved_to: r.moved_to,
        fenced_at: r.fenced_at.0,
    }))
}

/// Fences the database: from the moment this returns, no server on it hands out a key or
/// writes, and every call that did has committed. Setting it again names the new place.
pub async fn set(db: &Database, moved_to: &str) -> Result<Fence, StoreError> {
    let now = OffsetDateTime::now_utc();
    match db {
        Database::Postgres(pg) => {
            let mut tx = pg.pool().begin().await?;
            // Waits for every transaction that read the fence (ROW SHARE) to end.
            sqlx::query("LOCK TABLE keyserver_fence IN EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO keyserver_fence (id, moved_to, fenced_at) VALUES (1, $1, $2)
                 ON CONFLICT (id) DO UPDATE SET moved_to = EXCLUDED.moved_to",
            )
            .bind(moved_to)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Database::Sqlite(lite) => {
            let mut tx = lite.pool().begin_with("BEGIN IMMEDIATE").await?;
            sqlx::query(
                "INSERT INTO keyserver_fence (id, moved_to, fenced_at) VALUES (1, $1, $2)
                 ON CONFLICT (id) DO UPDATE SET moved_to = excluded.moved_to",
            )
            .bind(moved_to)
            .bind(timestamp_text(now))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
    }
    get(db)
        .await?
        .ok_or_else(|| StoreError::Internal("the fence just set is not there".into()))
}

/// Lifts the fence: servers on the database serve again. Only for a database whose keys were
/// not handed out anywhere else since it was fenced (see docs/DATABASES.md). Returns the fence
/// that was lifted.
pub async fn lift(db: &Database) -> Result<Option<Fence>, StoreError> {
    let fence = get(db).await?;
    let mut conn = db.read().await?;
    conn.query(&sql!("DELETE FROM keyserver_fence"))
        .execute()
        .await?;
    Ok(fence)
}
