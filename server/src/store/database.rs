//! Opens the database a URL names, with the backend it needs: `postgres://` (production) or
//! `sqlite://` (the embedded default), and hands out its connections: a write transaction or a
//! connection for a read. `serve`, `migrate`, `db copy` and the test harness all open databases
//! through here.
//!
//! PostgreSQL serializes writers of one device by locking the device's identity row, so
//! concurrent writes to different devices, and every fetch, run side by side.
//!
//! SQLite has one writer at a time per database file, across every process that opens it.
//! Every write transaction, fetches included, starts with `BEGIN IMMEDIATE`, which takes that
//! write lock up front: taking the oldest unconsumed one-time prekey and flagging it is then
//! atomic with respect to every other fetch, in this process or another. WAL lets reads go on
//! meanwhile; the busy timeout makes writers queue instead of failing; `synchronous=FULL` makes
//! a handed-out key's consumed flag durable before the bundle leaves the server.
//!
//! Within this process, SQLite writers also take turns in arrival order before asking SQLite
//! for the lock. SQLite's busy handler retries a taken lock by sleeping, longer each time, and
//! a writer that keeps losing the race can wait far longer than its place in line: under 16
//! concurrent fetches that gave a p99.9 of 0.7 s with half the CPU idle. The busy timeout still
//! orders this process against others, such as a `keyserver jobs cleanup` run from cron.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Postgres, Sqlite, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::sql::{Backend, Query, Sql};
use super::{Store, StoreError};
use crate::edge::metrics::DB_POOL_WAIT;

/// A pooled PostgreSQL connection idle this long gets a round trip before it is used, so one
/// whose database went away is found out at acquire time (within the acquire timeout) rather
/// than by a request. sqlx's default makes that round trip on every acquire, one more wake-up
/// of the database per statement (a fetch run made 1.11 times as many fetches without it, see
/// docs/PERFORMANCE.md). Under load no connection sits idle this long.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// How long a request waits for a pooled PostgreSQL connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits for a standby's connection before the primary answers it instead.
const REPLICA_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an SQLite writer waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// An open database of either backend.
#[derive(Clone)]
pub enum Database {
    Postgres(PgDb),
    Sqlite(SqliteDb),
}

/// A PostgreSQL connection pool.
#[derive(Clone)]
pub struct PgDb {
    pool: PgPool,
    /// One connection of its own for readiness checks, so a busy pool does not look like a
    /// database that went away.
    probe: PgPool,
}

/// An SQLite database file and this process's write turn on it.
#[derive(Clone)]
pub struct SqliteDb {
    pool: SqlitePool,
    /// The database file; job lock files sit beside it.
    path: Arc<PathBuf>,
    /// This process's writers' turn, handed out first come, first served.
    write_turn: Arc<Mutex<()>>,
}

/// Why a URL could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unsupported database URL (use postgres://… or sqlite://…)")]
    UnsupportedScheme,
    #[error("a read replica URL is a PostgreSQL standby's (postgres://…)")]
    ReplicaNotPostgres,
    #[error("{0}")]
    Connect(String),
}

impl PgDb {
    /// The request pool's settings: connections idle for a while are pinged before use, so a
    /// connection a failover broke is replaced rather than handed to a call.
    fn options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
    }

    /// The pools on `pool`'s server: `pool` itself and a one-connection probe beside it.
    fn with_probe(pool: PgPool) -> Self {
        let probe = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(pool.connect_options().as_ref().clone());
        Self { pool, probe }
    }

    /// Opens the pool after one direct connection, whose failure says what went wrong: the
    /// pool alone would only report that it timed out.
    async fn connect(url: &str, max_connections: u32) -> Result<Self, OpenError> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| OpenError::Connect(e.to_string()))?;
        let place = format!(
            "PostgreSQL at {}:{} (database {}, user {})",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username()),
            options.get_username()
        );
        let why = match tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
            .await
        {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                None
            }
            Ok(Err(e)) => Some(connect_failure(&e)),
            Err(_) => Some(format!(
                "no answer within {} s (a firewall, or a host that is down?)",
                ACQUIRE_TIMEOUT.as_secs()
            )),
        };
        if let Some(why) = why {
            return Err(OpenError::Connect(format!(
                "cannot connect to {place}: {why}"
            )));
        }
        let pool = Self::options(max_connections, ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| OpenError::Connect(format!("cannot connect to {place}: {e}")))?;
        Ok(Self::with_probe(pool))
    }

    /// The underlying pool, for migrations and operator tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl SqliteDb {
    async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let path = Arc::new(options.get_filename().to_owned());
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            path,
            write_turn: Arc::new(Mutex::new(())),
        })
    }

    /// The underlying pool, for migrations and operator tools.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This process's write turn, then SQLite's write lock.
    async fn begin_immediate(&self) -> Result<SqliteWrite, sqlx::Error> {
        let turn = self.write_turn.clone().lock_owned().await;
        Ok(SqliteWrite {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            _turn: turn,
        })
    }
}

/// Why a first connection to PostgreSQL failed, in words an operator can act on.
fn connect_failure(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused: is PostgreSQL running and listening on that port?".to_owned()
            }
            _ => format!("network error: {io}"),
        },
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("3D000") => "that database does not exist (createdb it first)".to_owned(),
            Some("28P01" | "28000") => {
                format!(
                    "authentication failed: {} (check the user and password)",
                    db.message()
                )
            }
            _ => db.message().to_owned(),
        },
        sqlx::Error::Tls(tls) => format!("TLS failed: {tls}"),
        other => other.to_string(),
    }
}

/// A database URL as it may be shown or stored: without its password, or the query string
/// (which may carry one). A SQLite URL is shown as written.
pub fn display_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme() != "sqlite" => {
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

impl Database {
    /// Connects to `url` with a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, OpenError> {
        let connect = |e: sqlx::Error| OpenError::Connect(e.to_string());
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(PgDb::connect(url, max_connections).await?))
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(
                SqliteDb::connect(url, max_connections)
                    .await
                    .map_err(connect)?,
            ))
        } else {
            Err(OpenError::UnsupportedScheme)
        }
    }

    /// A pool on PostgreSQL standbys for the reads that take no key: it connects on first use
    /// (the server starts while they are away) and gives up on a connection after
    /// [`REPLICA_ACQUIRE_TIMEOUT`], since the primary can answer instead.
    pub fn connect_replica(url: &str, max_connections: u32) -> Result<Self, OpenError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(OpenError::ReplicaNotPostgres);
        }
        let pool = PgDb::options(max_connections, REPLICA_ACQUIRE_TIMEOUT)
            .connect_lazy(url)
            .map_err(|e| OpenError::Connect(e.to_string()))?;
        Ok(Self::Postgres(PgDb::with_probe(pool)))
    }

    /// The key store on this database.
    pub fn store(&self) -> Store {
        Store::new(self.clone())
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match self {
            Self::Postgres(db) => {
                db.pool.close().await;
                db.probe.close().await;
            }
            Self::Sqlite(db) => db.pool.close().await,
        }
    }

    /// One round trip to the database, outside the request pool on PostgreSQL, that reads the
    /// cutover fence: where the keys went if the database is fenced.
    pub(crate) async fn ping(&self) -> Result<Option<String>, StoreError> {
        use super::fence::MOVED_TO;
        Ok(match self {
            Self::Postgres(db) => {
                sqlx::query_scalar(MOVED_TO)
                    .fetch_optional(&db.probe)
                    .await?
            }
            Self::Sqlite(db) => {
                sqlx::query_scalar(MOVED_TO)
                    .fetch_optional(&db.pool)
                    .await?
            }
        })
    }

    /// The request pool's open and idle connections.
    pub(crate) fn pool_figures(&self) -> (u32, usize) {
        match self {
            Self::Postgres(db) => (db.pool.size(), db.pool.num_idle()),
            Self::Sqlite(db) => (db.pool.size(), db.pool.num_idle()),
        }
    }

    /// Starts a write transaction. On PostgreSQL writers of one device serialize on its
    /// identity row (see the devices module); on SQLite every write transaction holds the
    /// database's single write lock. Its first statement reads the cutover fence and refuses
    /// on a fenced database ([`super::fence`]).
    pub(crate) async fn begin_write(&self) -> Result<Tx, StoreError> {
        let waited = Instant::now();
        let mut tx = match self {
            Self::Postgres(db) => Tx::Postgres(db.pool.begin().await?),
            Self::Sqlite(db) => Tx::Sqlite(db.begin_immediate().await?),
        };
        metrics::histogram!(DB_POOL_WAIT).record(waited.elapsed().as_secs_f64());
        super::fence::check(&mut tx).await?;
        Ok(tx)
    }

    /// A connection for statements that read, or write a single row on their own.
    pub(crate) async fn read(&self) -> Result<ReadConn, StoreError> {
        let waited = Instant::now();
        let conn = match self {
            Self::Postgres(db) => ReadConn::Postgres(db.pool.acquire().await?),
            Self::Sqlite(db) => ReadConn::Sqlite(db.pool.acquire().await?),
        };
        metrics::histogram!(DB_POOL_WAIT).record(waited.elapsed().as_secs_f64());
        Ok(conn)
    }
}

/// A write transaction on SQLite: this process's write turn, then SQLite's write lock
/// (`BEGIN IMMEDIATE`), both held until it commits or is dropped.
pub(crate) struct SqliteWrite {
    tx: Transaction<'static, Sqlite>,
    /// Declared after `tx`, so it is released after the transaction ends.
    _turn: OwnedMutexGuard<()>,
}

/// One write transaction of either backend. Dropping it without [`Tx::commit`] rolls back.
pub(crate) enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(SqliteWrite),
}

impl Tx {
    /// Starts `sql` in this transaction.
    pub fn query(&mut self, sql: &Sql) -> Query<'_> {
        match self {
            Self::Postgres(tx) => Query::Postgres(tx, sqlx::query(sql.postgres)),
            Self::Sqlite(w) => Query::Sqlite(&mut w.tx, sqlx::query(sql.sqlite)),
        }
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        match self {
            Self::Postgres(tx) => tx.commit().await?,
            Self::Sqlite(w) => w.tx.commit().await?,
        }
        Ok(())
    }
}

/// A pooled connection, outside any transaction.
pub(crate) enum ReadConn {
    Postgres(PoolConnection<Postgres>),
    Sqlite(PoolConnection<Sqlite>),
}

impl ReadConn {
    pub fn query(&mut self, sql: &Sql) -> Query<'_> {
        match self {
            Self::Postgres(c) => Query::Postgres(c, sqlx::query(sql.postgres)),
            Self::Sqlite(c) => Query::Sqlite(c, sqlx::query(sql.sqlite)),
        }
    }
}
