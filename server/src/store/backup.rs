//! `keyserver db backup`: a copy of the database to keep before a destructive step (reverting
//! migrations, a cutover's rollback). SQLite writes a consistent copy itself, while servers
//! run (`VACUUM INTO`); PostgreSQL's is `pg_dump`, whose command line this builds.

use std::path::Path;

use super::StoreError;
use super::database::Database;

/// How to back up one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backup {
    /// SQLite: the copy was written; its size in bytes.
    Written(u64),
    /// PostgreSQL: run `program` with `args`, and `password` (if any) in `PGPASSWORD`, so it
    /// never shows in a process list.
    PgDump {
        program: &'static str,
        args: Vec<String>,
        password: Option<String>,
    },
}

/// Backs up `db` (opened from `url`) to `out`, which must not exist yet.
pub async fn backup(db: &Database, url: &str, out: &Path) -> Result<Backup, StoreError> {
    if out.exists() {
        return Err(StoreError::Internal(format!(
            "{} exists already; name a new file",
            out.display()
        )));
    }
    match db {
        Database::Sqlite(lite) => {
            let target = out.to_str().ok_or_else(|| {
                StoreError::Internal(format!("{} is not a UTF-8 path", out.display()))
            })?;
            sqlx::query("VACUUM INTO $1")
                .bind(target)
                .execute(lite.pool())
                .await?;
            let bytes = std::fs::metadata(out)
                .map_err(|e| StoreError::Internal(format!("{}: {e}", out.display())))?
                .len();
            Ok(Backup::Written(bytes))
        }
        Database::Postgres(_) => {
            let mut parsed = url::Url::parse(url)
                .map_err(|e| StoreError::Internal(format!("the database URL: {e}")))?;
            let password = parsed.password().map(str::to_owned);
            let _ = parsed.set_password(None);
            Ok(Backup::PgDump {
                program: "pg_dump",
                args: vec![
                    "--format=custom".into(),
                    "--no-owner".into(),
                    format!("--file={}", out.display()),
                    format!("--dbname={parsed}"),
                ],
                password,
            })
        }
    }
}
