//! Cleanup: deletes consumed one-time prekeys (EC and Kyber), superseded signed prekeys and
//! last-resort Kyber prekeys, audit events and job records past their retention, oldest first,
//! in bounded batches.
//!
//! Each batch is one short transaction, so fetches and uploads interleave with a large backlog
//! instead of waiting behind it, and a killed run leaves only whole batches done; the next run
//! continues where it stopped. Retired key ids stay refused (see [`crate::store::jobs`]).
//! Before each batch the run checks it still holds the job's lock: a PostgreSQL failover ends the
//! session holding it, another process may then start a cleanup, and this one must stop.

use std::time::{Duration, Instant};

use super::Step;
use crate::clock::Clock;
use crate::config::CleanupSettings;
use crate::shutdown::CancellationToken;
use crate::store::Store;
use crate::store::StoreError;
use crate::store::jobs::{Expiring, JobLock};

/// Whether to delete, holding the job's lock, or only count.
pub enum Mode<'a> {
    Delete(&'a mut JobLock),
    DryRun,
}

/// How long rows of `kind` are kept.
pub fn retention(settings: &CleanupSettings, kind: Expiring) -> Duration {
    match kind {
        Expiring::ConsumedOneTimePreKeys | Expiring::ConsumedKyberPreKeys => {
            settings.consumed_prekey_retention
        }
        Expiring::SupersededSignedPreKeys | Expiring::SupersededKyberLastResortPreKeys => {
            settings.superseded_signed_prekey_retention
        }
        Expiring::AuditEvents => settings.audit_retention,
        Expiring::JobRuns => settings.job_run_retention,
    }
}

/// Deletes (or counts) every expired row; the steps, notes, and whether it got through all of
/// them before `stop`.
pub async fn run(
    store: &Store,
    settings: &CleanupSettings,
    clock: &Clock,
    mut mode: Mode<'_>,
    stop: &CancellationToken,
) -> Result<(Vec<Step>, Vec<String>, bool), StoreError> {
    // One "now" for the whole run: every kind is cut at the same instant.
    let now = clock.now();
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    for kind in Expiring::ALL {
        let before = now - retention(settings, kind);
        let started = Instant::now();
        let mut count = 0;
        if let Mode::Delete(lock) = &mut mode {
            loop {
                if stop.is_cancelled() {
                    steps.push(Step {
                        name: kind.as_str(),
                        count,
                        duration: started.elapsed(),
                    });
                    return Ok((steps, notes, false));
                }
                lock.ensure_held().await?;
                let deleted = store
                    .delete_expired(kind, before, settings.cleanup_batch_size)
                    .await?;
                count += deleted;
                if deleted < u64::from(settings.cleanup_batch_size) {
                    break;
                }
                if !settings.cleanup_batch_pause.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(settings.cleanup_batch_pause) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
        } else {
            count = store.count_expired(kind, before).await?;
        }
        steps.push(Step {
            name: kind.as_str(),
            count,
            duration: started.elapsed(),
        });
        notes.push(format!(
            "{}: older than {} (before {})",
            kind.as_str(),
            super::period(retention(settings, kind)),
            super::when(before)
        ));
    }
    if matches!(mode, Mode::DryRun) {
        notes.push("dry run: nothing was deleted".to_owned());
    }
    Ok((steps, notes, true))
}
