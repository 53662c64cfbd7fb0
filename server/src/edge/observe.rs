//! The outermost layer: every call gets a request id (returned as `x-request-id`), a span that
//! the layers and the handler log into, and, when it ends, one log event and its metrics
//! (count by gRPC code, latency, in flight).
//!
//! A gRPC call's code is known only at its end: in the response headers when the call failed
//! before any message (a "trailers-only" response), otherwise in the trailers after the body.
//! So the response body is wrapped and watched for its trailers; a body dropped before them
//! is a call the client cancelled.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Frame, SizeHint};
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use super::methods::{self, Rpc};
use super::metrics as m;

/// The response header that carries the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// Adds [`Observe`] around a service.
#[derive(Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let rpc = methods::rpc(request.uri().path());
        let id = uuid::Uuid::new_v4().to_string();
        let span = tracing::info_span!(
            "rpc",
            method = rpc.full,
            request_id = %id,
            user = tracing::field::Empty,
            device = tracing::field::Empty,
        );
        metrics::gauge!(m::RPC_IN_FLIGHT).increment(1.0);
        let call = Finish {
            rpc,
            started,
            span: span.clone(),
        };
        // Ready, as poll_ready said; the clone waits its turn for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = span.in_scope(|| inner.call(request)).instrument(span);
        Box::pin(async move {
            let mut response = match future.await {
                Ok(response) => response,
                Err(e) => {
                    call.done(Code::Unknown);
                    return Err(e);
                }
            };
            if let Ok(value) = HeaderValue::from_str(&id) {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            match code_of(response.headers()) {
                // A trailers-only response: the call is over.
                Some(code) => {
                    call.done(code);
                    Ok(response)
                }
                None => Ok(response.map(|body| {
                    Body::new(Watched {
                        body,
                        call: Some(call),
                    })
                })),
            }
        })
    }
}

/// The gRPC code in `headers` (or trailers), if there is one.
fn code_of(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// What to record when a call ends.
struct Finish {
    rpc: Rpc,
    started: Instant,
    span: tracing::Span,
}

impl Finish {
    fn done(self, code: Code) {
        let elapsed = self.started.elapsed();
        metrics::gauge!(m::RPC_IN_FLIGHT).decrement(1.0);
        metrics::counter!(
            m::RPC_REQUESTS,
            "service" => self.rpc.service,
            "method" => self.rpc.method,
            "code" => code_name(code),
        )
        .increment(1);
        metrics::histogram!(
            m::RPC_DURATION,
            "service" => self.rpc.service,
            "method" => self.rpc.method,
        )
        .record(elapsed.as_secs_f64());
        let _entered = self.span.enter();
        let duration_ms = elapsed.as_secs_f64() * 1e3;
        let status = code_name(code);
        match class(status) {
            Class::Ok => tracing::debug!(status, duration_ms, "request finished"),
            Class::Refused => tracing::info!(status, duration_ms, "request refused"),
            Class::Failed => tracing::warn!(status, duration_ms, "request failed"),
        }
    }
}

enum Class {
    Ok,
    /// The caller's mistake or the caller's choice.
    Refused,
    /// The server could not do it.
    Failed,
}

fn class(code: &str) -> Class {
    match code {
        "OK" => Class::Ok,
        "UNKNOWN" | "DEADLINE_EXCEEDED" | "UNAVAILABLE" | "INTERNAL" | "DATA_LOSS" => Class::Failed,
        _ => Class::Refused,
    }
}

/// The code as gRPC spells it, the label value of the metrics.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response body whose trailers end the call.
struct Watched {
    body: Body,
    call: Option<Finish>,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(code_of),
            Poll::Ready(Some(Err(status))) => Some(Some(status.code())),
            // The body ended without trailers, which a gRPC response never does.
            Poll::Ready(None) => Some(None),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(call) = self.call.take()
        {
            call.done(code.unwrap_or(Code::Unknown));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // The client went away before the call ended.
        if let Some(call) = self.call.take() {
            call.done(Code::Cancelled);
        }
    }
}
