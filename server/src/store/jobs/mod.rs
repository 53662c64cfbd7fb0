//! What the maintenance jobs (rotation check, cleanup, bundle-view refresh, drain check) need from storage,
//! in their own terms: a lock per job shared by every process ([`locks`]), run records,
//! batched deletion of expired rows, and the rotation scan.
//!
//! Deletions go in bounded batches, each its own transaction, so a killed cleanup loses at most
//! the batch it was in, and fetches and uploads never wait long behind one. Deleting a consumed
//! or superseded key also retires its id in the same transaction (`prekeys::retired`), so a
//! retried upload of it is still refused.

pub mod locks;

use time::OffsetDateTime;
use uuid::Uuid;

use super::database::Database;
use super::ids::DeviceId;
use super::prekeys::{self, Expired, repeated_use::RepeatedUse, retired::Retired};
use super::sql::{At, Json, List, Sql, Uid, sql};
use super::{Store, StoreError};
pub use locks::JobLock;

/// A maintenance job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Job {
    /// Finds active signed prekeys past the rotation age and the stale limit.
    Rotate,
    /// Deletes expired rows of every kind in [`Expiring`].
    Cleanup,
    /// Refreshes the `nchat_prekey_bundles` read model.
    RefreshBundles,
    /// Reports devices whose one-time prekeys are being drained (`store::drain`).
    DrainCheck,
}

impl Job {
    pub const ALL: [Job; 4] = [
        Job::Rotate,
        Job::Cleanup,
        Job::RefreshBundles,
        Job::DrainCheck,
    ];

    /// The name used on the command line and in run records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotate => "rotate",
            Self::Cleanup => "cleanup",
            Self::RefreshBundles => "refresh-bundles",
            Self::DrainCheck => "drain-check",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|j| j.as_str() == name)
    }
}

/// Who started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A `keyserver jobs …` command (an operator or cron).
    Cli,
    /// The schedule inside `keyserver serve`.
    Schedule,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Schedule => "schedule",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Cli, Self::Schedule]
            .into_iter()
            .find(|t| t.as_str() == name)
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Started and not finished: running now, or killed (the next run marks it abandoned).
    Running,
    Succeeded,
    Failed,
    /// Another run of the job held its lock.
    Skipped,
    /// Was still "running" when a later run took the lock: its process died.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Abandoned => "abandoned",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Skipped,
            Self::Abandoned,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }
}

/// One recorded run of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRun {
    pub id: i64,
    pub job: Job,
    pub trigger: Trigger,
    pub started_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
    pub outcome: Outcome,
    /// What the run counted, per kind (JSON object).
    pub counts: serde_json::Value,
    pub message: Option<String>,
}

/// Rows that cleanup removes once they are older than their retention period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiring {
    /// One-time prekeys handed out (by `consumed_at`).
    ConsumedOneTimePreKeys,
    /// One-time Kyber prekeys handed out (by `consumed_at`).
    ConsumedKyberPreKeys,
    /// Signed prekeys no longer active (by `superseded_at`).
    SupersededSignedPreKeys,
    /// Last-resort Kyber prekeys no longer active (by `superseded_at`).
    SupersededKyberLastResortPreKeys,
    /// Audit events (by `created_at`).
    AuditEvents,
    /// Finished job-run records (by `finished_at`).
    JobRuns,
}

/// How cleanup finds and deletes the rows of an [`Expiring`] kind.
enum Expiry {
    /// Keys: picked, deleted and their ids retired.
    Keys(Expired, Retired),
    /// Plain rows: `$1` cut-off, and for the delete `$2` limit.
    Rows { count: Sql, delete: Sql },
}

impl Expiring {
    pub const ALL: [Expiring; 6] = [
        Expiring::ConsumedOneTimePreKeys,
        Expiring::ConsumedKyberPreKeys,
        Expiring::SupersededSignedPreKeys,
        Expiring::SupersededKyberLastResortPreKeys,
        Expiring::AuditEvents,
        Expiring::JobRuns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConsumedOneTimePreKeys => "consumed_one_time_prekeys",
            Self::ConsumedKyberPreKeys => "consumed_kyber_prekeys",
            Self::SupersededSignedPreKeys => "superseded_signed_prekeys",
            Self::SupersededKyberLastResortPreKeys => "superseded_kyber_last_resort_prekeys",
            Self::AuditEvents => "audit_events",
            Self::JobRuns => "job_runs",
        }
    }

    fn expiry(self) -> Expiry {
        match self {
            Self::ConsumedOneTimePreKeys => {
                Expiry::Keys(prekeys::ONE_TIME.expired, prekeys::ONE_TIME.retired)
            }
            Self::ConsumedKyberPreKeys => Expiry::Keys(
                prekeys::KYBER_ONE_TIME.expired,
                prekeys::KYBER_ONE_TIME.retired,
            ),
            Self::SupersededSignedPreKeys => {
                Expiry::Keys(prekeys::SIGNED.expired, prekeys::SIGNED.retired)
            }
            Self::SupersededKyberLastResortPreKeys => Expiry::Keys(
                prekeys::KYBER_LAST_RESORT.expired,
                prekeys::KYBER_LAST_RESORT.retired,
            ),
            Self::AuditEvents => Expiry::Rows {
                count: sql!("SELECT count(*) FROM nchat_e2ee_audit_log WHERE created_at < $1"),
                delete: sql!(
                    "DELETE FROM nchat_e2ee_audit_log WHERE id IN (
                         SELECT id FROM nchat_e2ee_audit_log WHERE created_at < $1
                         ORDER BY created_at LIMIT $2)"
                ),
            },
            Self::JobRuns => Expiry::Rows {
                count: sql!("SELECT count(*) FROM keyserver_job_runs WHERE finished_at < $1"),
                delete: sql!(
                    "DELETE FROM keyserver_job_runs WHERE id IN (
                         SELECT id FROM keyserver_job_runs WHERE finished_at < $1
                         ORDER BY finished_at LIMIT $2)"
                ),
            },
        }
    }
}

/// A device whose active key of a kind is past the rotation age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverdueDevice {
    pub user_id: Uuid,
    pub device_id: DeviceId,
    pub rotated_at: OffsetDateTime,
}

/// Active keys of a repeated-use kind by age.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationScan {
    /// Installed before the rotation cut-off.
    pub due: u64,
    /// Installed before the stale cut-off (a subset of `due`).
    pub stale: u64,
    /// The oldest overdue devices, oldest first.
    pub oldest: Vec<OverdueDevice>,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: i32,
    job: String,
    trigger: String,
    started_at: At,
    finished_at: Option<At>,
    outcome: String,
    counts: Json,
    message: Option<String>,
}

impl TryFrom<RunRow> for JobRun {
    type Error = StoreError;

    /// An unknown job, trigger or outcome name is a corrupt row.
    fn try_from(row: RunRow) -> Result<Self, StoreError> {
        let name = |what: &str, value: &str| StoreError::corrupt(format!("{what} {value:?}"));
        Ok(JobRun {
            id: i64::from(row.id),
            job: Job::from_name(&row.job).ok_or_else(|| name("job", &row.job))?,
            trigger: Trigger::from_name(&row.trigger)
                .ok_or_else(|| name("trigger", &row.trigger))?,
            started_at: row.started_at.0,
            finished_at: row.finished_at.map(|at| at.0),
            outcome: Outcome::from_name(&row.outcome)
                .ok_or_else(|| name("outcome", &row.outcome))?,
            counts: row.counts.0,
            message: row.message,
        })
    }
}

#[derive(sqlx::FromRow)]
struct Overdue {
    user_id: Uid,
    device_id: DeviceId,
    installed_at: At,
}

impl Store {
    /// Takes `job`'s lock without waiting; None when another run, in any process, holds it.
    pub async fn try_lock(&self, job: Job) -> Result<Option<JobLock>, StoreError> {
        JobLock::try_take(&self.db, job).await
    }

    /// Records a run as started. The caller holds the job's lock, so runs of the job still
    /// recorded as running died; they are marked abandoned.
    pub async fn start_run(&self, job: Job, trigger: Trigger) -> Result<i64, StoreError> {
        let mut tx = self.db.begin_write().await?;
        tx.query(&sql!(
            "UPDATE keyserver_job_runs SET outcome = 'abandoned', finished_at = " NOW ",
                 message = 'the process running it stopped before it finished'
             WHERE job = $1 AND outcome = 'running'"
        ))
        .bind(job.as_str())
        .execute()
        .await?;
        let id: i32 = tx
            .query(&sql!(
                "INSERT INTO keyserver_job_runs (job, trigger, outcome) VALUES ($1, $2, 'running')
                 RETURNING id"
            ))
            .bind(job.as_str())
            .bind(trigger.as_str())
            .scalar()
            .await?;
        tx.commit().await?;
        Ok(i64::from(id))
    }

    /// Records how a started run ended.
    pub async fn finish_run(
        &self,
        id: i64,
        outcome: Outcome,
        counts: &serde_json::Value,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        tx.query(&sql!(
            "UPDATE keyserver_job_runs SET finished_at = " NOW ", outcome = $2, counts = $3,
                 message = $4
             WHERE id = $1"
        ))
        .bind(id as i32)
        .bind(outcome.as_str())
        .bind(Json(counts.clone()))
        .bind(message)
        .execute()
        .await?;
        tx.commit().await
    }

    /// Records a run that did not start because another held the lock.
    pub async fn record_skipped(
        &self,
        job: Job,
        trigger: Trigger,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        tx.query(&sql!(
            "INSERT INTO keyserver_job_runs (job, trigger, finished_at, outcome, message)
             VALUES ($1, $2, " NOW ", 'skipped', $3)"
        ))
        .bind(job.as_str())
        .bind(trigger.as_str())
        .bind(message)
        .execute()
        .await?;
        tx.commit().await
    }

    /// The latest runs, newest first, of one job or of all.
    pub async fn job_runs(&self, job: Option<Job>, limit: u32) -> Result<Vec<JobRun>, StoreError> {
        let rows: Vec<RunRow> = self
            .db
            .read()
            .await?
            .query(&sql!(
                "SELECT id, job, trigger, started_at, finished_at, outcome, counts, message
                 FROM keyserver_job_runs WHERE $1 IS NULL OR job = $1
                 ORDER BY started_at DESC, id DESC LIMIT $2"
            ))
            .bind(job.map(Job::as_str))
            .bind(i64::from(limit))
            .fetch_all()
            .await?;
        rows.into_iter().map(JobRun::try_from).collect()
    }

    /// How many rows of `kind` are older than `before`.
    pub async fn count_expired(
        &self,
        kind: Expiring,
        before: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let count = match kind.expiry() {
            Expiry::Keys(expired, _) => expired.count,
            Expiry::Rows { count, .. } => count,
        };
        let n: i64 = self
            .db
            .read()
            .await?
            .query(&count)
            .bind(At(before))
            .scalar()
            .await?;
        Ok(n as u64)
    }

    /// Deletes up to `limit` rows of `kind` older than `before`, oldest first, in one
    /// transaction that also retires deleted key ids. Returns how many went.
    pub async fn delete_expired(
        &self,
        kind: Expiring,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let deleted = match kind.expiry() {
            Expiry::Keys(expired, retired) => {
                let picked: Vec<(i32, DeviceId)> = tx
                    .query(&expired.pick)
                    .bind(At(before))
                    .bind(i64::from(limit))
                    .fetch_all()
                    .await?;
                if picked.is_empty() {
                    return Ok(0);
                }
                let (ids, devices): (Vec<i32>, Vec<DeviceId>) = picked.into_iter().unzip();
                let mut devices: Vec<String> =
                    devices.into_iter().map(DeviceId::into_string).collect();
                devices.sort_unstable();
                devices.dedup();
                // A key-share lock on the devices, so a device removal cannot slip in between
                // (SQLite's single writer already keeps it out).
                tx.query(&sql!(PG(
                    "SELECT device_id FROM nchat_identity_keys WHERE device_id = ANY($1)
                     ORDER BY device_id FOR KEY SHARE"
                )))
                .bind(List(devices))
                .execute()
                .await?;
                let deleted: Vec<(DeviceId, i32)> = tx
                    .query(&expired.delete)
                    .bind(List(ids))
                    .fetch_all()
                    .await?;
                let count = deleted.len() as u64;
                retired
                    .retire(
                        &mut tx,
                        deleted.into_iter().map(|(d, id)| (d, id as u32)).collect(),
                    )
                    .await?;
                count
            }
            Expiry::Rows { delete, .. } => {
                tx.query(&delete)
                    .bind(At(before))
                    .bind(i64::from(limit))
                    .execute()
                    .await?
            }
        };
        tx.commit().await?;
        Ok(deleted)
    }

    /// Counts the active keys of `kind` installed before `due_before` and before
    /// `stale_before`, listing up to `list` of the oldest.
    pub async fn scan_rotation(
        &self,
        kind: &RepeatedUse,
        due_before: OffsetDateTime,
        stale_before: OffsetDateTime,
        list: u32,
    ) -> Result<RotationScan, StoreError> {
        let mut conn = self.db.read().await?;
        // Both statements stay on the kind's partial index of active keys by installation time
        // (idx_signed_prekeys_rotation, idx_kyber_prekeys_rotation).
        let (due, stale): (i64, i64) = conn
            .query(&kind.overdue_counts)
            .bind(At(due_before))
            .bind(At(stale_before))
            .fetch_one()
            .await?;
        let oldest: Vec<Overdue> = conn
            .query(&kind.overdue_oldest)
            .bind(At(due_before))
            .bind(i64::from(list))
            .fetch_all()
            .await?;
        Ok(RotationScan {
            due: due as u64,
            stale: stale as u64,
            oldest: oldest
                .into_iter()
                .map(|o| OverdueDevice {
                    user_id: o.user_id.0,
                    device_id: o.device_id,
                    rotated_at: o.installed_at.0,
                })
                .collect(),
        })
    }

    /// False where `nchat_prekey_bundles` is a plain view (always current).
    pub fn bundle_view_is_materialized(&self) -> bool {
        matches!(self.db, Database::Postgres(_))
    }

    /// Refreshes `nchat_prekey_bundles` without blocking its readers.
    pub async fn refresh_bundle_view(&self) -> Result<(), StoreError> {
        self.db
            .read()
            .await?
            .query(&sql!(PG(
                "REFRESH MATERIALIZED VIEW CONCURRENTLY nchat_prekey_bundles"
            )))
            .execute()
            .await?;
        Ok(())
    }
}
