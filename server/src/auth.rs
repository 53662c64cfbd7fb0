//! Bearer-token authentication: HS256 JWTs whose `sub` is the caller's user id.
//!
//! The server verifies every call to the key service with an interceptor that puts the
//! [`Caller`] into the request; `keyserver token` mints tokens with the same secret so a person
//! can try the server. Later hardening (rate limits keyed on the caller) reads the same
//! [`Caller`].

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};
use uuid::Uuid;

/// The shortest secret accepted: 256 bits, as HS256 wants.
pub const MIN_SECRET_LEN: usize = 32;

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// Mints and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenAuthority {
    /// An authority for `secret`, which must be at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(secret: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_LEN,
            "the token secret must be at least {MIN_SECRET_LEN} bytes"
        );
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// A token for `user_id` that expires after `ttl`.
    pub fn mint(&self, user_id: Uuid, ttl: Duration) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now,
            exp: now + ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// The caller a token names, if the token is valid and unexpired.
    pub fn verify(&self, token: &str) -> Result<Caller, Status> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Status::unauthenticated("the token has expired"),
                _ => Status::unauthenticated("the token is not valid"),
            })?;
        let user_id = Uuid::parse_str(&data.claims.sub)
            .map_err(|_| Status::unauthenticated("the token's subject is not a user id"))?;
        Ok(Caller { user_id })
    }
}

impl tonic::service::Interceptor for TokenAuthority {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| Status::unauthenticated("authorization must be Bearer <token>"))?;
        let caller = self.verify(token.trim())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller the interceptor put into `request`.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .copied()
        .ok_or_else(|| Status::unauthenticated("the request was not authenticated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_others_do_not() {
        let authority = TokenAuthority::new(&[1u8; 32]).unwrap();
        let user = Uuid::new_v4();
        let token = authority.mint(user, Duration::from_secs(60));
        assert_eq!(authority.verify(&token).unwrap().user_id, user);

        let other = TokenAuthority::new(&[2u8; 32]).unwrap();
        assert_eq!(
            other.verify(&token).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(TokenAuthority::new(&[1u8; 31]).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let authority = TokenAuthority::new(&[1u8; 32]).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: Uuid::new_v4().to_string(),
            iat: now - 120,
            exp: now - 60,
        };
        let token = jsonwebtoken::encode(&Header::default(), &claims, &authority.encoding).unwrap();
        let status = authority.verify(&token).unwrap_err();
        assert_eq!(status.message(), "the token has expired");
    }
}
