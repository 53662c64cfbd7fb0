//! The PostgreSQL side of [`JobStore`].
//!
//! Job locks are session-level advisory locks held on a connection taken out of the pool, so
//! they hold across any number of server and cron processes and vanish with a killed process's
//! connection. Deletions go in bounded batches, each its own transaction, so a killed cleanup
//! loses at most the batch it was in, and fetches and uploads never wait long behind one.

use async_trait::async_trait;
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::PgStore;
use crate::store::StoreError;
use crate::store::jobs::{
    Expiring, Job, JobLock, JobRun, JobStore, KeyKind, Outcome, OverdueDevice, RotationScan,
    Trigger, plan_retirement, run_names,
};

/// The advisory lock key of each job (a fixed prefix, "keysrv", and the job's number).
fn lock_key(job: Job) -> i64 {
    0x6b65_7973_7276_0000
        + match job {
            Job::RefreshBundles => 1,
            Job::Cleanup => 2,
            Job::Rotate => 3,
        }
}

/// Deletes the given rows of one key table and records their ids as retired, after taking a
/// key-share lock on their devices so a device removal cannot slip in between. `select` picks
/// (row id, device id) of expired rows; `delete` deletes rows by id, returning
/// (device_id, key_id).
async fn retire_keys(
    tx: &mut Transaction<'static, Postgres>,
    kind: KeyKind,
    select: &str,
    delete: &str,
    before: OffsetDateTime,
    limit: u32,
) -> Result<u64, StoreError> {
    let picked: Vec<(i32, String)> = sqlx::query_as(select)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&mut **tx)
        .await?;
    if picked.is_empty() {
        return Ok(0);
    }
    let (ids, mut devices): (Vec<i32>, Vec<String>) = picked.into_iter().unzip();
    devices.sort_unstable();
    devices.dedup();
    sqlx::query(
        "SELECT device_id FROM nchat_identity_keys WHERE device_id = ANY($1)
         ORDER BY device_id FOR KEY SHARE",
    )
    .bind(&devices)
    .execute(&mut **tx)
    .await?;
    let deleted: Vec<(String, i32)> = sqlx::query_as(delete)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
    let existing: Vec<(String, i32, i32, i32)> = sqlx::query_as(
        "SELECT device_id, id, first_id, last_id FROM keyserver_retired_prekeys
         WHERE device_id = ANY($1) AND key_kind = $2",
    )
    .bind(&devices)
    .bind(kind.as_str())
    .fetch_all(&mut **tx)
    .await?;
    let count = deleted.len() as u64;
    let plan = plan_retirement(
        existing
            .into_iter()
            .map(|(d, row, first, last)| (d, (i64::from(row), first as u32, last as u32)))
            .collect(),
        deleted.into_iter().map(|(d, id)| (d, id as u32)).collect(),
    );
    let rows: Vec<i32> = plan.delete.iter().map(|&r| r as i32).collect();
    sqlx::query("DELETE FROM keyserver_retired_prekeys WHERE id = ANY($1)")
        .bind(&rows)
        .execute(&mut **tx)
        .await?;
    let (rows, firsts, lasts) = split3(plan.update.iter().map(|&(r, f, l)| (r as i32, f, l)));
    sqlx::query(
        "UPDATE keyserver_retired_prekeys r SET first_id = u.first_id, last_id = u.last_id
         FROM unnest($1::int4[], $2::int4[], $3::int4[]) AS u(id, first_id, last_id)
         WHERE r.id = u.id",
    )
    .bind(&rows)
    .bind(&firsts)
    .bind(&lasts)
    .execute(&mut **tx)
    .await?;
    let (devices, firsts, lasts) = split3(plan.insert.into_iter());
    sqlx::query(
        "INSERT INTO keyserver_retired_prekeys (device_id, key_kind, first_id, last_id)
         SELECT d, $4, f, l FROM unnest($1::text[], $2::int4[], $3::int4[]) AS n(d, f, l)",
    )
    .bind(&devices)
    .bind(&firsts)
    .bind(&lasts)
    .bind(kind.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(count)
}

/// Columns of (row, first id, last id) triples, ids as INTEGER.
fn split3<T>(items: impl Iterator<Item = (T, u32, u32)>) -> (Vec<T>, Vec<i32>, Vec<i32>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (row, first, last) in items {
        out.0.push(row);
        out.1.push(first as i32);
        out.2.push(last as i32);
    }
    out
}

fn job_run(row: &sqlx::postgres::PgRow) -> Result<JobRun, StoreError> {
    let (job, trigger, outcome) =
        run_names(row.get("job"), row.get("trigger"), row.get("outcome"))?;
    Ok(JobRun {
        id: i64::from(row.get::<i32, _>("id")),
        job,
        trigger,
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        outcome,
        counts: row.get("counts"),
        message: row.get("message"),
    })
}

#[async_trait]
impl JobStore for PgStore {
    async fn try_lock(&self, job: Job) -> Result<Option<JobLock>, StoreError> {
        let mut conn = self.pool().acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(lock_key(job))
            .fetch_one(&mut *conn)
            .await?;
        // The lock lives as long as this session: keep the connection out of the pool.
        Ok(locked.then(|| JobLock::Postgres(conn.detach())))
    }

    async fn start_run(&self, job: Job, trigger: Trigger) -> Result<i64, StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "UPDATE keyserver_job_runs SET outcome = 'abandoned', finished_at = NOW(),
                 message = 'the process running it stopped before it finished'
             WHERE job = $1 AND outcome = 'running'",
        )
        .bind(job.as_str())
        .execute(&mut *tx)
        .await?;
        let id: i32 = sqlx::query_scalar(
            "INSERT INTO keyserver_job_runs (job, trigger, outcome) VALUES ($1, $2, 'running')
             RETURNING id",
        )
        .bind(job.as_str())
        .bind(trigger.as_str())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(i64::from(id))
    }

    async fn finish_run(
        &self,
        id: i64,
        outcome: Outcome,
        counts: &serde_json::Value,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE keyserver_job_runs SET finished_at = NOW(), outcome = $2, counts = $3,
                 message = $4
             WHERE id = $1",
        )
        .bind(id as i32)
        .bind(outcome.as_str())
        .bind(counts)
        .bind(message)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn record_skipped(
        &self,
        job: Job,
        trigger: Trigger,
        message: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO keyserver_job_runs (job, trigger, finished_at, outcome, message)
             VALUES ($1, $2, NOW(), 'skipped', $3)",
        )
        .bind(job.as_str())
        .bind(trigger.as_str())
        .bind(message)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn job_runs(&self, job: Option<Job>, limit: u32) -> Result<Vec<JobRun>, StoreError> {
        sqlx::query(
            "SELECT id, job, trigger, started_at, finished_at, outcome, counts, message
             FROM keyserver_job_runs WHERE $1::text IS NULL OR job = $1
             ORDER BY started_at DESC, id DESC LIMIT $2",
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
        let (table, time, filter) = kind.location("TRUE", "FALSE");
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE {filter}{time} < $1"
        ))
        .bind(before)
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
        let (table, time, filter) = kind.location("TRUE", "FALSE");
        let oldest = |columns: &str| {
            format!(
                "SELECT {columns} FROM {table} WHERE {filter}{time} < $1 ORDER BY {time} LIMIT $2"
            )
        };
        let mut tx = self.pool().begin().await?;
        let deleted = match kind {
            Expiring::ConsumedOneTimePreKeys => {
                let delete =
                    "DELETE FROM nchat_one_time_prekeys WHERE id = ANY($1) AND is_consumed = TRUE
                     RETURNING device_id, prekey_id";
                let select = oldest("id, device_id");
                retire_keys(&mut tx, KeyKind::OneTime, &select, delete, before, limit).await?
            }
            Expiring::SupersededSignedPreKeys => {
                let delete =
                    "DELETE FROM nchat_signed_prekeys WHERE id = ANY($1) AND is_active = FALSE
                     RETURNING device_id, signed_prekey_id";
                let select = oldest("id, device_id");
                retire_keys(&mut tx, KeyKind::Signed, &select, delete, before, limit).await?
            }
            Expiring::AuditEvents | Expiring::JobRuns => sqlx::query(&format!(
                "DELETE FROM {table} WHERE id IN ({})",
                oldest("id")
            ))
            .bind(before)
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?
            .rows_affected(),
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
        // Both statements stay on idx_signed_prekeys_rotation (rotation_date WHERE is_active).
        let (due, stale): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE rotation_date < $2)
             FROM nchat_signed_prekeys WHERE is_active = TRUE AND rotation_date < $1",
        )
        .bind(due_before)
        .bind(stale_before)
        .fetch_one(self.pool())
        .await?;
        let oldest = sqlx::query_as::<_, (Uuid, String, OffsetDateTime)>(
            "SELECT ik.user_id, sp.device_id, sp.rotation_date
             FROM nchat_signed_prekeys sp JOIN nchat_identity_keys ik USING (device_id)
             WHERE sp.is_active = TRUE AND sp.rotation_date < $1
             ORDER BY sp.rotation_date LIMIT $2",
        )
        .bind(due_before)
        .bind(i64::from(list))
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|(user_id, device_id, rotated_at)| OverdueDevice {
            user_id,
            device_id,
            rotated_at,
        })
        .collect();
        Ok(RotationScan {
            due: due as u64,
            stale: stale as u64,
            oldest,
        })
    }

    fn bundle_view_is_materialized(&self) -> bool {
        true
    }

    async fn refresh_bundle_view(&self) -> Result<(), StoreError> {
        sqlx::query("REFRESH MATERIALIZED VIEW CONCURRENTLY nchat_prekey_bundles")
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
