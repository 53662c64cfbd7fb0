//! Readiness that tells the truth: whether the database answers, checked in the background on
//! a connection of its own (so a busy pool is not mistaken for a dead database), published as
//! the gRPC health of every service, and enforced at the edge: while the database is down
//! every call but health and reflection is answered UNAVAILABLE at once instead of waiting
//! out the pool's acquire timeout. A call that still meets an unavailable database wakes the
//! check at once, and the first good answer puts everything back to SERVING by itself.
//!
//! A database a cutover fenced answers, but serves no key: health says NOT_SERVING so load
//! balancers send calls to the servers on the new database, while calls that still arrive
//! pass the gate and are told where the keys went (FAILED_PRECONDITION from the store).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::{Layer, Service};

use super::methods;
use super::metrics as m;
use crate::service::status;
use crate::shutdown::CancellationToken;
use crate::store::Store;

/// How the database is checked.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Time between two checks while the database answers.
    pub every: Duration,
    /// How long a check may take before the database counts as down.
    pub timeout: Duration,
}

/// Whether the database answers, shared by the check, the health service and the gate.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Shared>,
}

struct Shared {
    /// Whether the database answers: the gate lets calls through.
    ready: AtomicBool,
    /// Wakes the check early: a call met an unavailable database.
    suspect: Notify,
    /// Serializes health updates.
    health: Mutex<Published>,
}

/// What the health service was last told, and why.
struct Published {
    reporter: HealthReporter,
    /// SERVING or not; `None` until the first check (tonic starts the server as SERVING).
    serving: Option<bool>,
    /// Where a cutover moved the keys, as the last check that reached the database read it.
    fenced: Option<String>,
    /// The server is draining: health stays NOT_SERVING.
    stopping: bool,
}

impl Readiness {
    /// Starts checking `store` as `probe` says, publishing the result in `health` for every
    /// service. The first check runs before this returns, so the server never claims SERVING
    /// for a database it has not reached.
    pub async fn start(
        store: Store,
        health: HealthReporter,
        probe: Probe,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let readiness = Self {
            inner: Arc::new(Shared {
                ready: AtomicBool::new(false),
                suspect: Notify::new(),
                health: Mutex::new(Published {
                    reporter: health,
                    serving: None,
                    fenced: None,
                    stopping: false,
                }),
            }),
        };
        readiness.check(&store, probe).await;
        let checker = readiness.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(probe.every) => {}
                    _ = checker.inner.suspect.notified() => {}
                }
                checker.check(&store, probe).await;
            }
        });
        (readiness, task)
    }

    /// Whether the last check reached the database.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Marks every service NOT_SERVING for good: the server is draining.
    pub async fn stopping(&self) {
        let mut health = self.inner.health.lock().await;
        health.stopping = true;
        set_all(&health.reporter, ServingStatus::NotServing).await;
    }

    async fn check(&self, store: &Store, probe: Probe) {
        let answered = match tokio::time::timeout(probe.timeout, store.ping()).await {
            Ok(Ok(fence)) => Ok(fence),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", probe.timeout)),
        };
        let (size, idle) = store.pool_figures();
        metrics::gauge!(m::DB_POOL_CONNECTIONS).set(size as f64);
        metrics::gauge!(m::DB_POOL_IDLE).set(idle as f64);
        let ready = answered.is_ok();
        metrics::gauge!(m::DB_UP).set(if ready { 1.0 } else { 0.0 });
        let mut health = self.inner.health.lock().await;
        let was = self.inner.ready.swap(ready, Ordering::AcqRel);
        match (&answered, was) {
            (Err(why), true) => tracing::error!(error = %why, "the database stopped answering"),
            (Err(why), false) => tracing::debug!(error = %why, "the database is still down"),
            (Ok(_), false) => tracing::info!("the database answers"),
            (Ok(_), true) => {}
        }
        if let Ok(fence) = answered
            && fence != health.fenced
        {
            match &fence {
                Some(moved_to) => tracing::warn!(
                    %moved_to,
                    "the database is fenced: its keys moved to another database (keyserver db \
                     cutover); health says NOT_SERVING, calls are told where the keys went"
                ),
                None => tracing::info!("the cutover fence was lifted: the database serves again"),
            }
            health.fenced = fence;
        }
        metrics::gauge!(m::DB_FENCED).set(if health.fenced.is_some() { 1.0 } else { 0.0 });
        let serving = ready && health.fenced.is_none();
        if health.serving != Some(serving) && !health.stopping {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&health.reporter, status).await;
            health.serving = Some(serving);
        }
    }
}

/// Sets the health of the whole server ("") and of each of its services.
async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in methods::own_services() {
        health.set_service_status(*service, status).await;
    }
}

/// Adds [`Gate`] around a service.
#[derive(Clone)]
pub struct GateLayer {
    readiness: Readiness,
}

impl GateLayer {
    pub fn new(readiness: Readiness) -> Self {
        Self { readiness }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gate {
            inner,
            readiness: self.readiness.clone(),
        }
    }
}

/// Refuses calls at once while the database is down, and wakes the check when a handler met
/// an unavailable database.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    readiness: Readiness,
}

impl<S> Service<Request<Body>> for Gate<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = super::Either<Watched<S::Future>, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if methods::is_public(request.uri().path()) || self.readiness.is_ready() {
            return super::Either::inner(Watched {
                inner: self.inner.call(request),
                readiness: self.readiness.clone(),
            });
        }
        super::Either::refused(status::database_unavailable())
    }
}

pin_project_lite::pin_project! {
    /// A handler's answer, watched for UNAVAILABLE (a trailers-only response, as a handler's
    /// error is) so the database is looked at now rather than at the next tick.
    pub struct Watched<F> {
        #[pin]
        inner: F,
        readiness: Readiness,
    }
}

impl<F, E> Future for Watched<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = this.inner.poll(cx);
        if let Poll::Ready(Ok(response)) = &polled
            && response
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"14")
        {
            this.readiness.inner.suspect.notify_one();
        }
        polled
    }
}
