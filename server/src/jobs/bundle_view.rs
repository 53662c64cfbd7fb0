//! Keeps the `nchat_prekey_bundles` materialized view fresh, off the request path.
//!
//! Bundles are served from the base tables; the view is a read model for operator reports. A
//! write marks it stale, and a background task runs the `refresh-bundles` job at most once per
//! interval; the job's lock keeps refreshes of all processes one at a time.

use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Job, Jobs, Run, Step, Trigger};
use crate::shutdown::CancellationToken;
use crate::store::{Store, StoreError};
use std::sync::Arc;

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
    /// Records that the base tables changed.
    pub fn mark(&self) {
        self.0.notify_one();
    }
}

/// Starts the refresher: after a change it waits `interval` (gathering further changes), then
/// runs the job. No task starts for a zero interval or a plain view; changes are then ignored.
pub fn spawn(
    jobs: Jobs,
    interval: Duration,
    shutdown: CancellationToken,
) -> (ViewChanges, Option<JoinHandle<()>>) {
    let changes = ViewChanges::default();
    if interval.is_zero() || !jobs.store().bundle_view_is_materialized() {
        return (changes, None);
    }
    let notify = changes.0.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = notify.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
            match jobs
                .run(Job::RefreshBundles, Trigger::Schedule, &shutdown)
                .await
            {
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
