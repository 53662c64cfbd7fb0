//! What the maintenance jobs (rotation check, cleanup, bundle-view refresh) need from storage,
//! in their own terms: a lock per job shared by every process, run records, batched deletion of
//! expired rows, and the rotation scan.
//!
//! Deleting a consumed one-time prekey or a superseded signed prekey must not let a retried
//! upload of the same id succeed later. Each batch that deletes such keys also records their ids
//! as ranges of consecutive ids per device (`keyserver_retired_prekeys`), in the same
//! transaction; [`plan_retirement`] is how ranges grow, written once for both backends.

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;

/// A maintenance job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Job {
    /// Finds active signed prekeys past the rotation age and the stale limit.
    Rotate,
    /// Deletes expired rows of every kind in [`Expiring`].
    Cleanup,
    /// Refreshes the `nchat_prekey_bundles` read model.
    RefreshBundles,
}

impl Job {
    pub const ALL: [Job; 3] = [Job::Rotate, Job::Cleanup, Job::RefreshBundles];

    /// The name used on the command line and in run records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotate => "rotate",
            Self::Cleanup => "cleanup",
            Self::RefreshBundles => "refresh-bundles",
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
    /// Signed prekeys no longer active (by `superseded_at`).
    SupersededSignedPreKeys,
    /// Audit events (by `created_at`).
    AuditEvents,
    /// Finished job-run records (by `finished_at`).
    JobRuns,
}

impl Expiring {
    pub const ALL: [Expiring; 4] = [
        Expiring::ConsumedOneTimePreKeys,
        Expiring::SupersededSignedPreKeys,
        Expiring::AuditEvents,
        Expiring::JobRuns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConsumedOneTimePreKeys => "consumed_one_time_prekeys",
            Self::SupersededSignedPreKeys => "superseded_signed_prekeys",
            Self::AuditEvents => "audit_events",
            Self::JobRuns => "job_runs",
        }
    }
}

impl Expiring {
    /// Where rows of this kind live: (table, the time they expire by, the condition before it),
    /// with booleans written as the backend writes them (`yes`, `no`).
    pub fn location(self, yes: &str, no: &str) -> (&'static str, &'static str, String) {
        match self {
            Self::ConsumedOneTimePreKeys => (
                "nchat_one_time_prekeys",
                "consumed_at",
                format!("is_consumed = {yes} AND "),
            ),
            Self::SupersededSignedPreKeys => (
                "nchat_signed_prekeys",
                "superseded_at",
                format!("is_active = {no} AND "),
            ),
            Self::AuditEvents => ("nchat_e2ee_audit_log", "created_at", String::new()),
            Self::JobRuns => ("keyserver_job_runs", "finished_at", String::new()),
        }
    }
}

/// The job, trigger and outcome names of a stored run; an unknown one is a corrupt row.
pub fn run_names(
    job: &str,
    trigger: &str,
    outcome: &str,
) -> Result<(Job, Trigger, Outcome), StoreError> {
    let corrupt = |what: &str| StoreError::Database(sqlx::Error::Decode(what.to_owned().into()));
    Ok((
        Job::from_name(job).ok_or_else(|| corrupt("unknown job name"))?,
        Trigger::from_name(trigger).ok_or_else(|| corrupt("unknown job trigger"))?,
        Outcome::from_name(outcome).ok_or_else(|| corrupt("unknown job outcome"))?,
    ))
}

/// A device whose active signed prekey is past the rotation age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverdueDevice {
    pub user_id: Uuid,
    pub device_id: String,
    pub rotated_at: OffsetDateTime,
}

/// Active signed prekeys by age.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationScan {
    /// Installed before the rotation cut-off.
    pub due: u64,
    /// Installed before the stale cut-off (a subset of `due`).
    pub stale: u64,
    /// The oldest overdue devices, oldest first.
    pub oldest: Vec<OverdueDevice>,
}

/// A held job lock; dropping it (or the process dying) releases it.
pub enum JobLock {
    /// A session-level advisory lock, held by keeping its connection open.
    Postgres(sqlx::PgConnection),
    /// An exclusive lock on a file beside the SQLite database.
    File(std::fs::File),
}

impl JobLock {
    /// Releases the lock now.
    pub async fn release(self) {
        match self {
            Self::Postgres(mut conn) => {
                // Unlock before closing: the server ends a closed session (and frees its locks)
                // only after the client has gone, so a run started right after this one could
                // still find the lock held. A failed unlock falls back to the close.
                let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
                    .execute(&mut conn)
                    .await;
                let _ = sqlx::Connection::close(conn).await;
            }
            Self::File(file) => drop(file),
        }
    }

    /// Takes the lock file `<database>-job-<job>.lock`, or None when another holds it.
    pub fn try_file(database: &Path, job: Job) -> Result<Option<Self>, StoreError> {
        let mut name = database.as_os_str().to_owned();
        name.push(format!("-job-{}.lock", job.as_str()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&name)
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self::File(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Database(sqlx::Error::Io(e))),
        }
    }
}

/// Storage for the maintenance jobs.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Takes `job`'s lock without waiting; None when another run, in any process, holds it.
    async fn try_lock(&self, job: Job) -> Result<Option<JobLock>, StoreError>;

    /// Records a run as started. The caller holds the job's lock, so runs of the job still
    /// recorded as running died; they are marked abandoned.
    async fn start_run(&self, job: Job, trigger: Trigger) -> Result<i64, StoreError>;

    /// Records how a started run ended.
    async fn finish_run(
        &self,
        id: i64,
        outcome: Outcome,
        counts: &serde_json::Value,
        message: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Records a run that did not start because another held the lock.
    async fn record_skipped(
        &self,
        job: Job,
        trigger: Trigger,
        message: &str,
    ) -> Result<(), StoreError>;

    /// The latest runs, newest first, of one job or of all.
    async fn job_runs(&self, job: Option<Job>, limit: u32) -> Result<Vec<JobRun>, StoreError>;

    /// How many rows of `kind` are older than `before`.
    async fn count_expired(
        &self,
        kind: Expiring,
        before: OffsetDateTime,
    ) -> Result<u64, StoreError>;

    /// Deletes up to `limit` rows of `kind` older than `before`, oldest first, in one
    /// transaction that also records retired key ids. Returns how many went.
    async fn delete_expired(
        &self,
        kind: Expiring,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Counts active signed prekeys installed before `due_before` and before `stale_before`,
    /// listing up to `list` of the oldest.
    async fn scan_rotation(
        &self,
        due_before: OffsetDateTime,
        stale_before: OffsetDateTime,
        list: u32,
    ) -> Result<RotationScan, StoreError>;

    /// False where `nchat_prekey_bundles` is a plain view (always current).
    fn bundle_view_is_materialized(&self) -> bool;

    /// Refreshes `nchat_prekey_bundles` without blocking its readers.
    async fn refresh_bundle_view(&self) -> Result<(), StoreError>;
}

/// Which kind of key a retired id belonged to (the `key_kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    OneTime,
    Signed,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneTime => "one_time",
            Self::Signed => "signed",
        }
    }
}

/// A stored range of retired ids: (row id, first, last).
pub type RetiredRange = (i64, u32, u32);

/// How to change `keyserver_retired_prekeys` so it covers newly deleted ids.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RetirementPlan {
    /// Range rows to delete (absorbed into a neighbour).
    pub delete: Vec<i64>,
    /// Range rows to widen: (row id, first, last).
    pub update: Vec<(i64, u32, u32)>,
    /// New ranges: (device, first, last).
    pub insert: Vec<(String, u32, u32)>,
}

/// Merges each device's deleted ids into its stored ranges. Only consecutive ids join a range,
/// so an id the device never used is never refused. `existing` holds the stored ranges of the
/// devices in `deleted`.
pub fn plan_retirement(
    existing: Vec<(String, RetiredRange)>,
    deleted: Vec<(String, u32)>,
) -> RetirementPlan {
    let mut by_device: BTreeMap<String, (Vec<RetiredRange>, Vec<u32>)> = BTreeMap::new();
    for (device, range) in existing {
        by_device.entry(device).or_default().0.push(range);
    }
    for (device, id) in deleted {
        by_device.entry(device).or_default().1.push(id);
    }
    let mut plan = RetirementPlan::default();
    for (device, (mut ranges, mut ids)) in by_device {
        if ids.is_empty() {
            continue;
        }
        // Every stored range and every new id as an interval, sorted, then joined where
        // consecutive. Each joined interval keeps the first stored row it covers.
        let mut intervals: Vec<(u32, u32, Option<i64>)> = ranges
            .drain(..)
            .map(|(row, first, last)| (first, last, Some(row)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        intervals.extend(ids.into_iter().map(|id| (id, id, None)));
        intervals.sort_unstable_by_key(|&(first, last, row)| (first, last, row.is_none()));
        let mut merged: Vec<(u32, u32, Option<i64>, bool)> = Vec::new();
        for (first, last, row) in intervals {
            match merged.last_mut() {
                Some((_, m_last, m_row, changed)) if first <= m_last.saturating_add(1) => {
                    if last > *m_last {
                        *m_last = last;
                        *changed = true;
                    }
                    match (row, *m_row) {
                        (Some(row), Some(_)) => {
                            plan.delete.push(row);
                            *changed = true;
                        }
                        (Some(row), None) => *m_row = Some(row),
                        (None, _) => *changed = true,
                    }
                }
                _ => merged.push((first, last, row, row.is_none())),
            }
        }
        for (first, last, row, changed) in merged {
            match row {
                Some(row) if changed => plan.update.push((row, first, last)),
                Some(_) => {}
                None => plan.insert.push((device.clone(), first, last)),
            }
        }
    }
    plan
}

/// True when `id` lies in one of `ranges` (first, last).
pub fn is_retired(ranges: &[(u32, u32)], id: u32) -> bool {
    ranges
        .iter()
        .any(|&(first, last)| first <= id && id <= last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(existing: &[(i64, u32, u32)], deleted: &[u32]) -> RetirementPlan {
        plan_retirement(
            existing.iter().map(|&r| ("d".to_owned(), r)).collect(),
            deleted.iter().map(|&id| ("d".to_owned(), id)).collect(),
        )
    }

    #[test]
    fn consecutive_ids_become_one_range() {
        let p = plan(&[], &[7, 5, 6, 9]);
        assert_eq!(
            p.insert,
            vec![("d".to_owned(), 5, 7), ("d".to_owned(), 9, 9)]
        );
        assert!(p.update.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn ids_extend_a_stored_range_in_place() {
        let p = plan(&[(1, 10, 19)], &[20, 21]);
        assert_eq!(p.update, vec![(1, 10, 21)]);
        assert!(p.insert.is_empty() && p.delete.is_empty());
        let p = plan(&[(1, 10, 19)], &[9]);
        assert_eq!(p.update, vec![(1, 9, 19)]);
    }

    #[test]
    fn an_id_that_closes_a_gap_joins_two_ranges() {
        let p = plan(&[(1, 10, 19), (2, 21, 30)], &[20]);
        assert_eq!(p.update, vec![(1, 10, 30)]);
        assert_eq!(p.delete, vec![2]);
        assert!(p.insert.is_empty());
    }

    #[test]
    fn a_gap_is_never_covered() {
        let p = plan(&[(1, 10, 19)], &[25]);
        assert!(p.update.is_empty());
        assert_eq!(p.insert, vec![("d".to_owned(), 25, 25)]);
        let ranges = [(10, 19), (25, 25)];
        assert!(is_retired(&ranges, 10) && is_retired(&ranges, 19) && is_retired(&ranges, 25));
        assert!(!is_retired(&ranges, 20) && !is_retired(&ranges, 24) && !is_retired(&ranges, 9));
    }

    #[test]
    fn untouched_ranges_and_devices_are_left_alone() {
        let p = plan_retirement(
            vec![("a".to_owned(), (1, 1, 5)), ("b".to_owned(), (2, 1, 5))],
            vec![("b".to_owned(), 100), ("c".to_owned(), u32::MAX)],
        );
        assert_eq!(
            p.insert,
            vec![
                ("b".to_owned(), 100, 100),
                ("c".to_owned(), u32::MAX, u32::MAX)
            ]
        );
        assert!(p.update.is_empty() && p.delete.is_empty());
    }
}
