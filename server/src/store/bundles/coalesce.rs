//! Fetch coalescing (group commit): concurrent fetches of one server process go to the
//! database together, as one statement in one transaction on PostgreSQL and one write
//! transaction with one fsync on SQLite, instead of one each.
//!
//! There is no timer. A fetch that finds fewer than the allowed batches in flight starts a
//! batch at once, with itself and whatever else is queued, so an idle server adds no latency.
//! A fetch that finds them all busy queues; when a batch returns, its task takes everything
//! queued (up to [`MAX_BATCH_TARGETS`]) as the next batch. Batches run in tasks of their own, so
//! a caller that goes away (a cancelled call) never abandons the others' work half done.
//!
//! Each request keeps its own result: two requests naming one device get two different
//! one-time keys (the backends rank a device's unconsumed keys across the batch). A batch that
//! fails answers every request in it with the same error and has taken nothing (its one
//! transaction rolled back). A server that dies after a batch committed and before the answers
//! left loses at most that batch's keys: at most [`MAX_BATCH_TARGETS`] targets' worth per batch
//! in flight, the same keys a fetch at a time would lose for its calls in flight.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::{BundleTarget, DeviceBundle, FetchKey, Serve};
use crate::store::StoreError;
use crate::store::database::Database;

/// Most targets one batch gathers from queued requests. A request is never split, so a batch
/// holds at least one request, even one with more targets.
pub const MAX_BATCH_TARGETS: usize = 256;

/// Batches one process runs at once on PostgreSQL by default: one can run on the database
/// while the next gathers, and another core can serve it. SQLite runs one, having one writer.
pub const DEFAULT_BATCHES_IN_FLIGHT: usize = 2;

/// One caller's fetch.
pub(crate) struct FetchRequest {
    /// The fetching user, recorded on the keys taken for drain detection.
    pub requester: Uuid,
    pub targets: Vec<BundleTarget>,
    pub serve: Serve,
    /// The client's key for this fetch, so a retry takes nothing more.
    pub retry: Option<FetchKey>,
}

/// Per target of a request, the bundles of its devices.
pub(super) type FetchResult = Vec<Vec<DeviceBundle>>;

struct Queued {
    request: FetchRequest,
    answer: oneshot::Sender<Result<FetchResult, StoreError>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Queued>,
    /// Batches running now.
    running: usize,
}

/// The fetch queue of one store.
pub(crate) struct Coalescer {
    queue: Mutex<Queue>,
    max_in_flight: usize,
    /// Batches sent to the database, and the requests they carried.
    sent: [AtomicU64; 2],
}

impl Coalescer {
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            queue: Mutex::default(),
            max_in_flight: max_in_flight.max(1),
            sent: Default::default(),
        }
    }

    /// Batches sent to the database so far, and the requests they carried.
    pub fn sent(&self) -> (u64, u64) {
        let [batches, requests] = &self.sent;
        (
            batches.load(Ordering::Relaxed),
            requests.load(Ordering::Relaxed),
        )
    }

    /// Answers `request`, in a batch with whatever other fetches are queued beside it.
    pub async fn fetch(
        self: &Arc<Self>,
        db: &Database,
        request: FetchRequest,
    ) -> Result<FetchResult, StoreError> {
        let (answer, answered) = oneshot::channel();
        let batch = {
            let mut queue = self.lock();
            queue.waiting.push_back(Queued { request, answer });
            if queue.running < self.max_in_flight {
                queue.running += 1;
                Some(take_batch(&mut queue.waiting))
            } else {
                None
            }
        };
        if let Some(batch) = batch {
            tokio::spawn(self.clone().drive(db.clone(), batch));
        }
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the fetch batch stopped before answering".to_owned(),
            ))
        })
    }

    /// Runs `batch`, then the queued requests batch by batch until none are left.
    async fn drive(self: Arc<Self>, db: Database, mut batch: Vec<Queued>) {
        loop {
            let [batches, requests] = &self.sent;
            batches.fetch_add(1, Ordering::Relaxed);
            requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
            // In a task of its own, so that even a panic in it (its callers then hear
            // UNAVAILABLE) leaves this loop to serve the queue: a dead driver would hold its
            // place in `running` and, with every place held, no fetch would run again.
            if let Err(e) = tokio::spawn(run(db.clone(), batch)).await {
                tracing::error!(error = %e, "a fetch batch failed unexpectedly");
            }
            let mut queue = self.lock();
            if queue.waiting.is_empty() {
                queue.running -= 1;
                return;
            }
            batch = take_batch(&mut queue.waiting);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue's invariants hold between statements, so a panic elsewhere cannot break it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The retry window of a batch, in seconds: the longest of its requests' (every request of a
/// process has the server's), 0 when none carries an idempotency key.
pub(super) fn retry_window(requests: &[FetchRequest]) -> f64 {
    requests
        .iter()
        .filter_map(|r| r.retry.as_ref())
        .map(|k| k.window.as_secs_f64())
        .fold(0.0, f64::max)
}

/// The oldest queued requests, up to [`MAX_BATCH_TARGETS`] targets and at least one request.
fn take_batch(waiting: &mut VecDeque<Queued>) -> Vec<Queued> {
    let mut targets = 0;
    let mut batch = Vec::new();
    while let Some(next) = waiting.front() {
        let n = next.request.targets.len();
        if !batch.is_empty() && targets + n > MAX_BATCH_TARGETS {
            break;
        }
        targets += n;
        batch.extend(waiting.pop_front());
    }
    batch
}

/// One batch on the database; every request of it gets its answer.
async fn run(db: Database, batch: Vec<Queued>) {
    let (requests, answers): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|q| (q.request, q.answer)).unzip();
    metrics::histogram!(crate::edge::metrics::FETCH_BATCH_REQUESTS).record(requests.len() as f64);
    let results = match &db {
        Database::Postgres(pg) => super::postgres::fetch(pg, &requests).await,
        Database::Sqlite(_) => super::sqlite::fetch(&db, &requests).await,
    };
    match results {
        Ok(results) => {
            for (answer, result) in answers.into_iter().zip(results) {
                // A caller that went away loses its bundles, as it would have alone.
                let _ = answer.send(Ok(result));
            }
        }
        Err(e) => {
            for answer in answers {
                let _ = answer.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(targets: usize) -> Queued {
        let target = BundleTarget {
            user_id: Uuid::nil(),
            device_id: None,
        };
        Queued {
            request: FetchRequest {
                requester: Uuid::nil(),
                targets: vec![target; targets],
                serve: Serve::Mixed,
                retry: None,
            },
            answer: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_takes_the_oldest_requests_up_to_the_target_cap_and_never_splits_one() {
        let mut waiting: VecDeque<Queued> = [1, 200, 50, 10, 1].map(queued).into();
        let sizes = |b: &[Queued]| {
            b.iter()
                .map(|q| q.request.targets.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(&take_batch(&mut waiting)), [1, 200, 50]);
        assert_eq!(sizes(&take_batch(&mut waiting)), [10, 1]);
        assert!(take_batch(&mut waiting).is_empty());
        // One request over the cap still goes, alone.
        let mut waiting: VecDeque<Queued> = [300, 1].map(queued).into();
        assert_eq!(sizes(&take_batch(&mut waiting)), [300]);
        assert_eq!(sizes(&take_batch(&mut waiting)), [1]);
    }
}
