//! Bearer-token authentication for every call but health checks and reflection: the token is
//! verified here, once, and the [`Caller`](crate::auth::Caller) it names rides in the
//! request's extensions to the handler. A refused token is a security event: logged with the
//! reason (never the token) and counted.

use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use super::methods;
use super::metrics as m;
use crate::auth::{AuthError, TokenAuthority};

/// Adds [`Authenticate`] around a service.
#[derive(Clone)]
pub struct AuthenticateLayer {
    tokens: TokenAuthority,
}

impl AuthenticateLayer {
    pub fn new(tokens: TokenAuthority) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    tokens: TokenAuthority,
}

impl<S> Service<Request<Body>> for Authenticate<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = super::Either<S::Future, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if methods::is_public(request.uri().path()) {
            return super::Either::inner(self.inner.call(request));
        }
        let verified = bearer(&request).and_then(|token| self.tokens.verify(token));
        match verified {
            Ok(caller) => {
                let span = tracing::Span::current();
                span.record("user", tracing::field::display(caller.user_id));
                if let Some(device) = &caller.device_id {
                    span.record("device", device.as_str());
                }
                request.extensions_mut().insert(caller);
                super::Either::inner(self.inner.call(request))
            }
            Err(why) => {
                metrics::counter!(m::SECURITY_EVENTS, "event" => "token_refused", "reason" => why.reason())
                    .increment(1);
                tracing::warn!(
                    security_event = "token_refused",
                    reason = why.reason(),
                    "refused a call's token: {why}"
                );
                super::Either::refused(Status::from(why))
            }
        }
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(request: &Request<Body>) -> Result<&str, AuthError> {
    let header = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    header
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or(AuthError::NotBearer)
}
