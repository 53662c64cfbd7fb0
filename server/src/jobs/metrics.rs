//! Job runs as Prometheus metrics (when `serve --metrics-listen` installs an exporter; without
//! one these calls do nothing).
//!
//! Counters cover the runs of this process. The last successful run of each job, wherever it
//! ran (another server, or cron), comes from the run records, read once a minute, so an alert on
//! "cleanup has not succeeded for two days" works however the jobs are scheduled.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Job, Jobs, Outcome, Report, Trigger};
use crate::edge::metrics as m;
use crate::shutdown::CancellationToken;

/// How often the last successful runs are read from the records.
const REFRESH: Duration = Duration::from_secs(60);
/// How many recent runs of a job to look through for the last successful one.
const HISTORY: u32 = 50;

/// Records one run of this process.
pub fn observe(job: Job, trigger: Trigger, outcome: Outcome, report: Option<&Report>) {
    ::metrics::counter!(
        m::JOB_RUNS,
        "job" => job.as_str(),
        "trigger" => trigger.as_str(),
        "outcome" => outcome.as_str()
    )
    .increment(1);
    if let Some(report) = report {
        ::metrics::gauge!(m::JOB_LAST_DURATION, "job" => job.as_str())
            .set(report.duration.as_secs_f64());
        for step in &report.steps {
            ::metrics::counter!(
                m::JOB_ROWS,
                "job" => job.as_str(),
                "kind" => step.name
            )
            .increment(step.count);
        }
    }
}

/// Keeps `keyserver_job_last_success_timestamp_seconds{job}` current from the run records.
pub fn spawn(jobs: Jobs, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for job in Job::ALL {
                match jobs.store().job_runs(Some(job), HISTORY).await {
                    Ok(runs) => {
                        if let Some(run) = runs.iter().find(|r| r.outcome == Outcome::Succeeded) {
                            ::metrics::gauge!(
                                m::JOB_LAST_SUCCESS,
                                "job" => job.as_str()
                            )
                            .set(run.started_at.unix_timestamp() as f64);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "reading job runs for metrics failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    })
}
