//! The request edge: everything between a TCP connection and a handler, in one place.
//!
//! A connection is accepted by [`listener`] (TCP_NODELAY, TLS when configured, see [`tls`]),
//! and every call on it, to every service, passes through the same tower layers, outermost
//! first:
//!
//! 1. [`observe`]: request id, the call's span, one log event and the per-RPC metrics when it
//!    ends;
//! 2. [`authenticate`]: the bearer token becomes a [`Caller`](crate::auth::Caller), except for
//!    health checks and reflection;
//! 3. [`readiness`]: UNAVAILABLE at once while the database does not answer.
//!
//! Then tonic routes the call to its service in [`crate::service`]. [`metrics`] names and
//! describes every series and serves them; [`methods`] knows which RPCs exist.

pub mod authenticate;
pub mod listener;
pub mod methods;
pub mod metrics;
pub mod observe;
pub mod readiness;
pub mod tls;

use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use tonic::Status;
use tonic::body::Body;
use tower::layer::util::{Identity, Stack};

use crate::auth::TokenAuthority;
use authenticate::AuthenticateLayer;
use observe::ObserveLayer;
use readiness::{GateLayer, Readiness};

/// The layers every call goes through, in order (see the module documentation).
pub type Pipeline = Stack<GateLayer, Stack<AuthenticateLayer, Stack<ObserveLayer, Identity>>>;

/// The pipeline for a server with these tokens and this readiness.
pub fn pipeline(tokens: TokenAuthority, readiness: Readiness) -> Pipeline {
    tower::ServiceBuilder::new()
        .layer(ObserveLayer)
        .layer(AuthenticateLayer::new(tokens))
        .layer(GateLayer::new(readiness))
        .into_inner()
}

pin_project_lite::pin_project! {
    /// The inner service's answer, or a layer's refusal.
    #[project = EitherProj]
    pub enum Either<F, E> {
        Inner { #[pin] future: F },
        Refused { status: Option<Status>, _error: std::marker::PhantomData<E> },
    }
}

impl<F, E> Either<F, E> {
    fn inner(future: F) -> Self {
        Self::Inner { future }
    }

    fn refused(status: Status) -> Self {
        Self::Refused {
            status: Some(status),
            _error: std::marker::PhantomData,
        }
    }
}

impl<F, E> Future for Either<F, E>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            EitherProj::Inner { future } => future.poll(cx),
            EitherProj::Refused { status, .. } => Poll::Ready(Ok(status
                .take()
                .expect("a refusal is answered once")
                .into_http())),
        }
    }
}
