//! Keeps the `nchat_prekey_bundles` materialized view fresh, off the request path.
//!
//! Bundles are served from the base tables; the view is a read model for operator reports. A
//! write marks it stale, and a background task refreshes it concurrently at most once per
//! interval. The store's advisory lock keeps refreshes of all server processes one at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::shutdown::CancellationToken;
use crate::store::KeyStore;

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
/// refreshes. A zero interval starts no task and changes are ignored.
pub fn spawn(
    store: Arc<dyn KeyStore>,
    interval: Duration,
    shutdown: CancellationToken,
) -> (ViewChanges, Option<JoinHandle<()>>) {
    let changes = ViewChanges::default();
    if interval.is_zero() {
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
            let started = std::time::Instant::now();
            match store.refresh_bundle_view().await {
                Ok(true) => {
                    tracing::debug!(elapsed = ?started.elapsed(), "refreshed nchat_prekey_bundles")
                }
                Ok(false) => {
                    tracing::debug!(
                        "another process is refreshing nchat_prekey_bundles; retrying later"
                    );
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
