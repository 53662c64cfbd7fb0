//! The maintenance jobs: the rotation check, cleanup of expired rows, the refresh of the
//! `nchat_prekey_bundles` read model, and the drain check.
//!
//! `keyserver serve` runs them on its schedule ([`schedule`], [`bundle_view`]) and
//! `keyserver jobs …` runs them for an external cron; both go through [`Jobs::run`], which takes
//! the job's lock (one run at a time across every process), records the run, and reports what
//! it did.

pub mod bundle_view;
pub mod cleanup;
pub mod drain;
pub mod metrics;
pub mod rotation;
pub mod schedule;

use std::fmt;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::clock::Clock;
use crate::config::{CleanupSettings, RotationPolicy};
use crate::shutdown::CancellationToken;
use crate::store::drain::DrainRule;
use crate::store::jobs::JobLock;
pub use crate::store::jobs::{Job, JobRun, Outcome, Trigger};
use crate::store::{Store, StoreError};

/// A time as reports show it: RFC 3339, UTC, whole seconds.
pub fn when(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// A period as reports show it: whole days as days ("30 days"), anything else as humantime.
pub fn period(d: Duration) -> String {
    match d.as_secs() {
        s if s > 0 && s % 86_400 == 0 => format!("{} days", s / 86_400),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// What one part of a job did: a kind of row and how many, or a step and how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: &'static str,
    /// Rows deleted (or, in a dry run, that would be), or rows found.
    pub count: u64,
    pub duration: Duration,
}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub job: Job,
    pub steps: Vec<Step>,
    /// Findings for the operator (the devices overdue for rotation, for example).
    pub notes: Vec<String>,
    /// False when shutdown stopped the run before it finished.
    pub completed: bool,
    pub duration: Duration,
}

impl Report {
    fn counts(&self) -> serde_json::Value {
        let mut counts = serde_json::Map::new();
        for step in &self.steps {
            counts.insert(
                step.name.to_owned(),
                json!({ "count": step.count, "seconds": step.duration.as_secs_f64() }),
            );
        }
        serde_json::Value::Object(counts)
    }

    /// The count of one step, 0 when there is no such step.
    pub fn count(&self, name: &str) -> u64 {
        self.steps
            .iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.count)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            writeln!(
                f,
                "  {:<28} {:>10}  {:>9.2?}",
                step.name, step.count, step.duration
            )?;
        }
        for note in &self.notes {
            writeln!(f, "  {note}")?;
        }
        write!(
            f,
            "{} {} in {:.2?}",
            self.job.as_str(),
            if self.completed {
                "finished"
            } else {
                "stopped early (shutdown); the next run continues"
            },
            self.duration
        )
    }
}

/// How a call to [`Jobs::run`] went.
#[derive(Debug)]
pub enum Run {
    Finished(Report),
    /// Another run of the job holds its lock; says which, when it is recorded.
    Skipped(String),
}

/// Runs jobs against one database with one configuration.
#[derive(Clone)]
pub struct Jobs {
    store: Store,
    rotation: RotationPolicy,
    cleanup: CleanupSettings,
    drain: DrainRule,
    clock: Clock,
}

impl Jobs {
    pub fn new(
        store: Store,
        rotation: RotationPolicy,
        cleanup: CleanupSettings,
        drain: DrainRule,
        clock: Clock,
    ) -> Self {
        Self {
            store,
            rotation,
            cleanup,
            drain,
            clock,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What the drain check and `GetKeyStatus` count as a drain.
    pub fn drain_rule(&self) -> &DrainRule {
        &self.drain
    }

    /// Runs `job` unless another run holds its lock, recording the run either way. `stop`
    /// ends a cleanup between two batches.
    pub async fn run(
        &self,
        job: Job,
        trigger: Trigger,
        stop: &CancellationToken,
    ) -> Result<Run, StoreError> {
        let Some(mut lock) = self.store.try_lock(job).await? else {
            let reason = self.holder(job).await?;
            self.store.record_skipped(job, trigger, &reason).await?;
            metrics::observe(job, trigger, Outcome::Skipped, None);
            return Ok(Run::Skipped(reason));
        };
        let result = self.run_locked(job, trigger, stop, &mut lock).await;
        lock.release().await;
        result
    }

    async fn run_locked(
        &self,
        job: Job,
        trigger: Trigger,
        stop: &CancellationToken,
        lock: &mut JobLock,
    ) -> Result<Run, StoreError> {
        let id = self.store.start_run(job, trigger).await?;
        let started = Instant::now();
        let done = match job {
            Job::Rotate => rotation::check(&self.store, &self.rotation, &self.clock).await,
            Job::Cleanup => {
                cleanup::run(
                    &self.store,
                    &self.cleanup,
                    &self.clock,
                    cleanup::Mode::Delete(lock),
                    stop,
                )
                .await
            }
            Job::RefreshBundles => bundle_view::refresh(&self.store).await,
            Job::DrainCheck => drain::check(&self.store, &self.drain, &self.clock).await,
        };
        match done {
            Ok((steps, notes, completed)) => {
                let report = Report {
                    job,
                    steps,
                    notes,
                    completed,
                    duration: started.elapsed(),
                };
                let (outcome, message) = if completed {
                    (Outcome::Succeeded, None)
                } else {
                    (
                        Outcome::Abandoned,
                        Some("stopped by shutdown between batches"),
                    )
                };
                self.store
                    .finish_run(id, outcome, &report.counts(), message)
                    .await?;
                metrics::observe(job, trigger, outcome, Some(&report));
                tracing::info!(
                    job = job.as_str(),
                    trigger = trigger.as_str(),
                    outcome = outcome.as_str(),
                    counts = %report.counts(),
                    "job run finished"
                );
                Ok(Run::Finished(report))
            }
            Err(e) => {
                let message = e.to_string();
                metrics::observe(job, trigger, Outcome::Failed, None);
                if let Err(record) = self
                    .store
                    .finish_run(id, Outcome::Failed, &json!({}), Some(&message))
                    .await
                {
                    tracing::warn!(error = %record, "recording a failed job run failed");
                }
                Err(e)
            }
        }
    }

    /// Changes nothing: counts what cleanup would delete now.
    pub async fn cleanup_dry_run(&self) -> Result<Report, StoreError> {
        let started = Instant::now();
        let (steps, notes, completed) = cleanup::run(
            &self.store,
            &self.cleanup,
            &self.clock,
            cleanup::Mode::DryRun,
            &CancellationToken::new(),
        )
        .await?;
        Ok(Report {
            job: Job::Cleanup,
            steps,
            notes,
            completed,
            duration: started.elapsed(),
        })
    }

    /// Why `job`'s lock is taken, from the run records.
    async fn holder(&self, job: Job) -> Result<String, StoreError> {
        let running = self
            .store
            .job_runs(Some(job), 20)
            .await?
            .into_iter()
            .find(|r| r.outcome == Outcome::Running);
        Ok(match running {
            Some(run) => format!(
                "another {} run holds the lock (run {}, started {} by {})",
                job.as_str(),
                run.id,
                when(run.started_at),
                run.trigger.as_str()
            ),
            None => format!("another {} run holds the lock", job.as_str()),
        })
    }
}
