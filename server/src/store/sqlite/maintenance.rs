//! The SQLite side of [`JobStore`].
//!
//! Every process that opens the database file runs on this machine, so a job's lock is an
//! exclusive lock on a file beside the database: the kernel releases it when a killed process
//! dies. Each deletion batch is one `BEGIN IMMEDIATE` transaction; the single writer lock is
//! released between batches so fetches and uploads get their turn.

use async_trait::async_trait;
use sqlx::{Row, SqliteConnection};
use time::OffsetDateTime;

use super::{NOW, SqliteStore, timestamp_text};
use crate::store::StoreError;
use crate::store::jobs::{
    Expiring, Job, JobLock, JobRun, JobStore, KeyKind, Outcome, OverdueDevice, RotationScan,
    Trigger, plan_retirement, run_names,
};

/// Deletes up to `limit` expired rows of one key table and records their ids as retired.
/// `select` picks ids of expired rows; `delete` deletes the rows whose ids are in the JSON array
/// `?1`, returning (device_id, key_id).
async fn retire_keys(
    tx: &mut SqliteConnection,
    kind: KeyKind,
    select: &str,
    delete: &str,
    before: OffsetDateTime,
    limit: u32,
) -> Result<u64, StoreError> {
    let ids: Vec<i64> = sqlx::query_scalar(select)
        .bind(timestamp_text(before))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let deleted: Vec<(String, i64)> = sqlx::query_as(delete)
        .bind(serde_json::to_string(&ids).expect("ids serialize"))
        .fetch_all(&mut *tx)
        .await?;
    let mut devices: Vec<&str> = deleted.iter().map(|(d, _)| d.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    let existing: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT device_id, id, first_id, last_id FROM keyserver_retired_prekeys
         WHERE device_id IN (SELECT value FROM json_each(?1)) AND key_kind = ?2",
    )
    .bind(serde_json::to_string(&devices).expect("device ids serialize"))
    .bind(kind.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let count = deleted.len() as u64;
    let plan = plan_retirement(
        existing
            .into_iter()
            .map(|(d, row, first, last)| (d, (row, first as u32, last as u32)))
            .collect(),
        deleted.into_iter().map(|(d, id)| (d, id as u32)).collect(),
    );
    for row in plan.delete {
        sqlx::query("DELETE FROM keyserver_retired_prekeys WHERE id = ?1")
            .bind(row)
            .execute(&mut *tx)
            .await?;
    }
    for (row, first, last) in plan.update {
        sqlx::query(
            "UPDATE keyserver_retired_prekeys SET first_id = ?2, last_id = ?3 WHERE id = ?1",
        )
        .bind(row)
        .bind(i64::from(first))
        .bind(i64::from(last))
        .execute(&mut *tx)
        .await?;
    }
    for (device, first, last) in plan.insert {
        sqlx::query(
            "INSERT INTO keyserver_retired_prekeys (device_id, key_kind, first_id, last_id)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(device)
        .bind(kind.as_str())
        .bind(i64::from(first))
        .bind(i64::from(last))
        .execute(&mut *tx)
        .await?;
    }
    Ok(count)
}

fn job_run(row: &sqlx::sqlite::SqliteRow) -> Result<JobRun, StoreError> {
    let (job, trigger, outcome) =
        run_names(row.get("job"), row.get("trigger"), row.get("outcome"))?;
    let counts: String = row.get("counts");
    Ok(JobRun {
        id: row.get("id"),
        job,
        trigger,
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        outcome,
        counts: serde_json::from_str(&counts)
            .map_err(|e| StoreError::Database(sqlx::Error::Decode(e.into())))?,
        message: row.get("message"),
    })
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn try_lock(&self, job: Job) -> Result<Option<JobLock>, StoreError> {
        JobLock::try_file(&self.path, job)
    }

    async fn start_run(&self, job: Job, trigger: Trigger) -> Result<i64, StoreError> {
        let mut tx = self.begin_immediate().await?;
        sqlx::query(&format!(
            "UPDATE keyserver_job_runs SET outcome = 'abandoned', finished_at = {NOW},
                 message = 'the process running it stopped before it finished'
             WHERE job = ?1 AND outcome = 'running'"
        ))
        .bind(job.as_str())
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO keyserver_job_runs (job, trigger, outcome) VALUES (?1, ?2, 'running')
             RETURNING id",
        )
        .bind(job.as_str())
        .bind(trigger.as_str())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn finish_run(
        &self,
        id: i64,
        outcome: Outcome,
        counts: &serde_json::Value,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        sqlx::query(&format!(
            "UPDATE keyserver_job_runs SET finished_at = {NOW}, outcome = ?2, counts = ?3,
                 message = ?4
             WHERE id = ?1"
        ))
        .bind(id)
        .bind(outcome.as_str())
        .bind(counts.to_string())
        .bind(message)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_skipped(
        &self,
        job: Job,
        trigger: Trigger,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        sqlx::query(&format!(
            "INSERT INTO keyserver_job_runs (job, trigger, finished_at, outcome, message)
             VALUES (?1, ?2, {NOW}, 'skipped', ?3)"
        ))
        .bind(job.as_str())
        .bind(trigger.as_str())
        .bind(message)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn job_runs(&self, job: Option<Job>, limit: u32) -> Result<Vec<JobRun>, StoreError> {
        sqlx::query(
            "SELECT id, job, trigger, started_at, finished_at, outcome, counts, message
             FROM keyserver_job_runs WHERE ?1 IS NULL OR job = ?1
             ORDER BY started_at DESC, id DESC LIMIT ?2",
        )
        .bind(job.map(Job::as_str))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(job_run)
        .collect()
    }

    async fn count_expired(
        &self,
        kind: Expiring,
        before: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let (table, time, filter) = kind.location("1", "0");
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE {filter}{time} < ?1"
        ))
        .bind(timestamp_text(before))
        .fetch_one(self.pool())
        .await?;
        Ok(n as u64)
    }

    async fn delete_expired(
        &self,
        kind: Expiring,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let (table, time, filter) = kind.location("1", "0");
        let oldest =
            format!("SELECT id FROM {table} WHERE {filter}{time} < ?1 ORDER BY {time} LIMIT ?2");
        let mut tx = self.begin_immediate().await?;
        let deleted = match kind {
            Expiring::ConsumedOneTimePreKeys => {
                let delete = "DELETE FROM nchat_one_time_prekeys
                     WHERE id IN (SELECT value FROM json_each(?1)) AND is_consumed = 1
                     RETURNING device_id, prekey_id";
                retire_keys(&mut tx, KeyKind::OneTime, &oldest, delete, before, limit).await?
            }
            Expiring::SupersededSignedPreKeys => {
                let delete = "DELETE FROM nchat_signed_prekeys
                     WHERE id IN (SELECT value FROM json_each(?1)) AND is_active = 0
                     RETURNING device_id, signed_prekey_id";
                retire_keys(&mut tx, KeyKind::Signed, &oldest, delete, before, limit).await?
            }
            Expiring::AuditEvents | Expiring::JobRuns => {
                sqlx::query(&format!("DELETE FROM {table} WHERE id IN ({oldest})"))
                    .bind(timestamp_text(before))
                    .bind(i64::from(limit))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
            }
        };
        tx.commit().await?;
        Ok(deleted)
    }

    async fn scan_rotation(
        &self,
        due_before: OffsetDateTime,
        stale_before: OffsetDateTime,
        list: u32,
    ) -> Result<RotationScan, StoreError> {
        let (due, stale): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE rotation_date < ?2)
             FROM nchat_signed_prekeys WHERE is_active = 1 AND rotation_date < ?1",
        )
        .bind(timestamp_text(due_before))
        .bind(timestamp_text(stale_before))
        .fetch_one(self.pool())
        .await?;
        let rows = sqlx::query(
            "SELECT ik.user_id, sp.device_id, sp.rotation_date
             FROM nchat_signed_prekeys sp JOIN nchat_identity_keys ik USING (device_id)
             WHERE sp.is_active = 1 AND sp.rotation_date < ?1
             ORDER BY sp.rotation_date LIMIT ?2",
        )
        .bind(timestamp_text(due_before))
        .bind(i64::from(list))
        .fetch_all(self.pool())
        .await?;
        let oldest = rows
            .iter()
            .map(|r| {
                Ok(OverdueDevice {
                    user_id: super::stored_user(r.get("user_id"))?,
                    device_id: r.get("device_id"),
                    rotated_at: r.get("rotation_date"),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(RotationScan {
            due: due as u64,
            stale: stale as u64,
            oldest,
        })
    }

    fn bundle_view_is_materialized(&self) -> bool {
        false
    }

    async fn refresh_bundle_view(&self) -> Result<(), StoreError> {
        // A plain view: always current, nothing to refresh.
        Ok(())
    }
}
