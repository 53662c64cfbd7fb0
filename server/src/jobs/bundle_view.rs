//! Keeps the `nchat_prekey_bundles` materialized view fresh, off the request path, at a cost
//! sized to its worth.
//!
//! Bundles are served from the base tables; the view is a read model for operator reports
//! that nothing on the request path reads. A write that changes what the view shows (a
//! registration, an upload, a rotation, a removal) marks it stale; fetches do not, or under
//! constant fetches the view would be refreshed back to back (at 100,000 devices a refresh took
//! 5.5 to 11.7 s and ran about half the time). A background task runs the `refresh-bundles` job
//! after a change, but never sooner than [`gap`] after the previous refresh started, so
//! refreshing takes at most [`MAX_SHARE`] of the time however big the view grows. The job's
//! lock keeps refreshes of all processes one at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Job, Jobs, Run, Step, Trigger};
use crate::shutdown::CancellationToken;
use crate::store::{Store, StoreError};

/// The largest share of wall time the refresher spends refreshing.
pub const MAX_SHARE: f64 = 0.05;

/// The job itself: one concurrent refresh.
pub async fn refresh(store: &Store) -> Result<(Vec<Step>, Vec<String>, bool), StoreError> {
    if !store.bundle_view_is_materialized() {
        return Ok((
            Vec::new(),
            vec!["nchat_prekey_bundles is a plain view here: always current".to_owned()],
            true,
        ));
    }
    let started = Instant::now();
    store.refresh_bundle_view().await?;
    Ok((
        vec![Step {
            name: "refreshed",
            count: 1,
            duration: started.elapsed(),
        }],
        Vec::new(),
        true,
    ))
}

/// Marks the view stale; cheap enough to call after every write.
#[derive(Clone, Default)]
pub struct ViewChanges(Arc<Notify>);

impl ViewChanges {
    /// Records that the base tables changed in a way the view shows.
    pub fn mark(&self) {
        self.0.notify_one();
    }
}

/// The least time from one refresh's start to the next one's: `min_period`, or longer when the
/// last refresh took so long that refreshing sooner would spend more than [`MAX_SHARE`] of the
/// time on it.
pub fn gap(min_period: Duration, last_took: Duration) -> Duration {
    min_period.max(last_took.div_f64(MAX_SHARE))
}

/// Starts the refresher: after a change it waits `min_period` (gathering further changes), or
/// until [`gap`] has passed since the last refresh started if that is later, then runs the job.
/// No task starts for a zero period or a plain view; changes are then ignored.
pub fn spawn(
    jobs: Jobs,
    min_period: Duration,
    shutdown: CancellationToken,
) -> (ViewChanges, Option<JoinHandle<()>>) {
    let changes = ViewChanges::default();
    if min_period.is_zero() || !jobs.store().bundle_view_is_materialized() {
        return (changes, None);
    }
    let notify = changes.0.clone();
    let task = tokio::spawn(async move {
        // When the last refresh started, and how long it took.
        let mut last: Option<(Instant, Duration)> = None;
        loop {
            tokio::select! {
                _ = notify.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            let due = match last {
                Some((started, took)) => started + gap(min_period, took),
                None => Instant::now(),
            }
            .max(Instant::now() + min_period);
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = shutdown.cancelled() => return,
            }
            let started = Instant::now();
            let outcome = jobs
                .run(Job::RefreshBundles, Trigger::Schedule, &shutdown)
                .await;
            last = Some((started, started.elapsed()));
            match outcome {
                Ok(Run::Finished(_)) => {}
                Ok(Run::Skipped(why)) => {
                    tracing::debug!(%why, "bundle view refresh skipped; retrying later");
                    notify.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refreshing nchat_prekey_bundles failed; retrying later");
                    notify.notify_one();
                }
            }
        }
    });
    (changes, Some(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_take_at_most_their_share_of_the_time() {
        let ten = Duration::from_secs(10);
        // A quick refresh waits the minimum period.
        assert_eq!(gap(ten, Duration::from_millis(40)), ten);
        // A slow one (100,000 devices) waits twenty times its own duration.
        assert_eq!(gap(ten, Duration::from_secs(6)), Duration::from_secs(120));
        let took = Duration::from_millis(11_700);
        assert!(took.as_secs_f64() / gap(ten, took).as_secs_f64() <= MAX_SHARE + 1e-9);
    }
}
