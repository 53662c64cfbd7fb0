//! Runs the rotation check and cleanup inside `keyserver serve` at a fixed period.
//!
//! The next run is due one period after the start of the last successful run, wherever it
//! ran (this process, another server, or cron), so restarts do not postpone a job forever and
//! several servers do not run it several times a period.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Job, Jobs, Outcome, Run, Trigger};
use crate::shutdown::CancellationToken;
use crate::store::StoreError;

/// How long to wait after a failed or skipped run before trying again (capped by the period).
const RETRY: Duration = Duration::from_secs(300);
/// How many recent runs to look through for the last successful one.
const HISTORY: u32 = 50;

/// Starts the periodic runner of `job`; none for a zero period.
pub fn spawn(
    jobs: Jobs,
    job: Job,
    every: Duration,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    if every.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        let retry = RETRY.min(every);
        loop {
            let wait = match until_due(&jobs, job, every).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(job = job.as_str(), error = %e, "reading job runs failed");
                    retry
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            let pause = match jobs.run(job, Trigger::Schedule, &shutdown).await {
                Ok(Run::Finished(_)) => Duration::ZERO,
                Ok(Run::Skipped(why)) => {
                    tracing::info!(job = job.as_str(), %why, "scheduled run skipped");
                    retry
                }
                Err(e) => {
                    tracing::warn!(job = job.as_str(), error = %e, "scheduled run failed");
                    retry
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }))
}

/// How long until `job` is due: one period after the start of its last successful run; now
/// when it never succeeded. (A run still going elsewhere makes this run skip and retry; a run
/// recorded as running by a killed process must not postpone the job.)
async fn until_due(jobs: &Jobs, job: Job, every: Duration) -> Result<Duration, StoreError> {
    let last = jobs
        .store()
        .job_runs(Some(job), HISTORY)
        .await?
        .into_iter()
        .find(|r| r.outcome == Outcome::Succeeded);
    let Some(last) = last else {
        return Ok(Duration::ZERO);
    };
    let elapsed = time::OffsetDateTime::now_utc() - last.started_at;
    Ok(time::Duration::try_from(every)
        .map(|every| every - elapsed)
        .ok()
        .and_then(|left| Duration::try_from(left).ok())
        .unwrap_or(Duration::ZERO))
}
