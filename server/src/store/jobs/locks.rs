//! One lock per job, shared by every server and cron process, that vanishes with a killed
//! process. On PostgreSQL it is a session-level advisory lock held on a connection taken out
//! of the pool; every process that opens an SQLite file runs on its machine, so there it is an
//! exclusive lock on a file beside the database, which the kernel releases when the holder dies.

use std::path::Path;

use sqlx::Connection;

use super::Job;
use crate::store::StoreError;
use crate::store::database::Database;

/// A held job lock; dropping it (or the process dying) releases it.
pub struct JobLock {
    held: Held,
    job: Job,
}

enum Held {
    /// A session-level advisory lock, held by keeping its connection open.
    Postgres(sqlx::PgConnection),
    /// An exclusive lock on a file beside the SQLite database.
    File(std::fs::File),
}

/// The advisory lock key of each job (a fixed prefix, "keysrv", and the job's number).
fn lock_key(job: Job) -> i64 {
    0x6b65_7973_7276_0000
        + match job {
            Job::RefreshBundles => 1,
            Job::Cleanup => 2,
            Job::Rotate => 3,
            Job::DrainCheck => 4,
        }
}

impl JobLock {
    /// Takes `job`'s lock, or None when another holds it.
    pub(crate) async fn try_take(db: &Database, job: Job) -> Result<Option<Self>, StoreError> {
        match db {
            Database::Postgres(pg) => {
                let mut conn = pg.pool().acquire().await?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(lock_key(job))
                    .fetch_one(&mut *conn)
                    .await?;
                // The lock lives as long as this session: keep the connection out of the pool.
                Ok(locked.then(|| Self {
                    held: Held::Postgres(conn.detach()),
                    job,
                }))
            }
            Database::Sqlite(lite) => Self::try_file(lite.path(), job),
        }
    }

    /// Takes the lock file `<database>-job-<job>.lock`, or None when another holds it.
    fn try_file(database: &Path, job: Job) -> Result<Option<Self>, StoreError> {
        let mut name = database.as_os_str().to_owned();
        name.push(format!("-job-{}.lock", job.as_str()));
        let unavailable =
            |e: std::io::Error| StoreError::Unavailable(format!("job lock file: {e}"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&name)
            .map_err(unavailable)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self {
                held: Held::File(file),
                job,
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(unavailable(e)),
        }
    }

    /// Fails unless the lock is still this process's. A PostgreSQL session lock ends with its
    /// connection: a failover, or a terminated backend, drops it without telling the holder, and
    /// another process may then take it. Jobs that work in batches ask before each batch, so
    /// two runs never go on side by side. A lock file is held until the process ends.
    pub async fn ensure_held(&mut self) -> Result<(), StoreError> {
        let Held::Postgres(conn) = &mut self.held else {
            return Ok(());
        };
        let held = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                            WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
                              AND (classid::int8 << 32 | objid::int8) = $1 AND objsubid = 1)",
        )
        .bind(lock_key(self.job))
        .fetch_one(&mut *conn)
        .await;
        let why = match held {
            Ok(true) => return Ok(()),
            Ok(false) => "its database session no longer holds it".to_owned(),
            Err(e) => format!("its database session ended: {e}"),
        };
        Err(StoreError::Unavailable(format!(
            "the {} run lost its lock ({why}); it stops before its next batch",
            self.job.as_str()
        )))
    }

    /// Releases the lock now.
    pub async fn release(self) {
        match self.held {
            Held::Postgres(mut conn) => {
                // Unlock before closing: the server ends a closed session (and frees its locks)
                // only after the client has gone, so a run started right after this one could
                // still find the lock held. A failed unlock falls back to the close.
                let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
                    .execute(&mut conn)
                    .await;
                let _ = conn.close().await;
            }
            Held::File(file) => drop(file),
        }
    }
}
