//! Bearer tokens: HS256 JWTs that name a user (`sub`) and, for a device's own writes, the
//! device (`dev`), issued by a chat backend or by `keyserver token`.
//!
//! A token is accepted when it is signed with one of the active secrets (the header's `kid`
//! says which, so a secret can be rotated without downtime: add the new one, move signing to
//! it, drop the old one once its tokens expired), carries the expected issuer and audience,
//! has not expired, and was issued for no longer than the server's maximum lifetime. The edge
//! verifies it once per call and hands the [`Caller`] to the handler; a write on a device
//! needs a token bound to that device ([`Caller::may_write`]).

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::DeviceId;

/// The shortest secret accepted: 256 bits, as HS256 wants.
pub const MIN_SECRET_LEN: usize = 32;

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    /// The device the token is bound to; None for a token of the user alone, which may read,
    /// fetch and register a new device, but not change an existing one.
    pub device_id: Option<DeviceId>,
}

impl Caller {
    /// Whether this caller may change `device`: its token must be bound to it.
    pub fn may_write(&self, device: &DeviceId) -> Result<(), AuthError> {
        match &self.device_id {
            Some(bound) if bound == device => Ok(()),
            Some(_) => Err(AuthError::OtherDevice),
            None => Err(AuthError::NoDevice),
        }
    }

    /// Whether this caller may register `device` by its chosen id: only with a token bound to
    /// it, so nobody can squat another's id, and never an id in another user's issued space.
    pub fn may_register(&self, device: &DeviceId) -> Result<(), AuthError> {
        if let Some((owner, _)) = device.as_str().split_once('.')
            && Uuid::try_parse(owner).is_ok_and(|owner| owner != self.user_id)
        {
            return Err(AuthError::ReservedDevice);
        }
        match &self.device_id {
            Some(bound) if bound == device => Ok(()),
            Some(_) => Err(AuthError::OtherDevice),
            None => Err(AuthError::UnboundNewDevice),
        }
    }

    /// A new device id in this user's own space (`<user>.<n>`), which nobody else may
    /// register and nobody can guess.
    pub fn issue_device_id(&self) -> DeviceId {
        let mut n = [0u8; 8];
        getrandom::fill(&mut n).expect("the system's random source");
        DeviceId::parse(&format!("{}.{}", self.user_id, u64::from_le_bytes(n)))
            .expect("a user id, a dot and digits make a valid device id")
    }
}

/// Why a token was refused, or a call not allowed with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing authorization: Bearer <token>")]
    Missing,
    #[error("authorization must be Bearer <token>")]
    NotBearer,
    #[error("the token is not a well-formed JWT signed with HS256")]
    Malformed,
    #[error("the token names no key (kid) or one this server does not know")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token's issuer is not the one this server accepts")]
    WrongIssuer,
    #[error("the token's audience is not this server")]
    WrongAudience,
    #[error("the token lacks a required claim (sub, iss, aud, iat, exp)")]
    MissingClaim,
    #[error("the token was issued for longer than the server's maximum lifetime")]
    TooLong,
    #[error("the token's subject is not a user id")]
    BadSubject,
    #[error("the token's dev claim is not a device id")]
    BadDevice,
    #[error("device_id: changing a device needs a token bound to it (a dev claim)")]
    NoDevice,
    #[error("device_id: the token is bound to another device")]
    OtherDevice,
    #[error(
        "device_id: registering a chosen device id needs a token bound to it (a dev claim); \
         omit device_id to have the server issue one"
    )]
    UnboundNewDevice,
    #[error("device_id: ids that begin with another user's id are reserved for that user")]
    ReservedDevice,
}

impl AuthError {
    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotBearer => "not_bearer",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim => "missing_claim",
            Self::TooLong => "too_long",
            Self::BadSubject => "bad_subject",
            Self::BadDevice => "bad_device",
            Self::NoDevice => "no_device",
            Self::OtherDevice => "other_device",
            Self::UnboundNewDevice => "unbound_new_device",
            Self::ReservedDevice => "reserved_device",
        }
    }
}

/// What a token must say besides its signature.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    pub issuer: String,
    pub audience: String,
    /// Longest lifetime (exp - iat) accepted, and the most `keyserver token` mints.
    pub max_ttl: Duration,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self {
            issuer: "keyserver".to_owned(),
            audience: "keyserver".to_owned(),
            max_ttl: Duration::from_secs(30 * 86_400),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dev: Option<String>,
    iss: String,
    aud: String,
    /// Optional to serde so that its absence is reported as a missing claim.
    #[serde(default)]
    iat: Option<u64>,
    exp: u64,
}

/// The key id of a secret: the first 16 hex digits of its SHA-256, so every party that holds
/// the secret derives the same `kid` with nothing else to configure.
pub fn key_id(secret: &[u8]) -> String {
    hex::encode(&Sha256::digest(secret)[..8])
}

/// Mints with one secret and verifies with any active one.
#[derive(Clone)]
pub struct TokenAuthority {
    signing_kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
    policy: TokenPolicy,
}

impl TokenAuthority {
    /// An authority that signs with `secrets[0]` and accepts tokens of any of `secrets`, each
    /// at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(secrets: &[Vec<u8>], policy: TokenPolicy) -> anyhow::Result<Self> {
        let signing = secrets
            .first()
            .ok_or_else(|| anyhow::anyhow!("no token secret"))?;
        for secret in secrets {
            anyhow::ensure!(
                secret.len() >= MIN_SECRET_LEN,
                "a token secret must be at least {MIN_SECRET_LEN} bytes"
            );
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[&policy.issuer]);
        validation.set_audience(&[&policy.audience]);
        validation.leeway = 5;
        Ok(Self {
            signing_kid: key_id(signing),
            encoding: EncodingKey::from_secret(signing),
            decoding: secrets
                .iter()
                .map(|s| (key_id(s), DecodingKey::from_secret(s)))
                .collect(),
            validation,
            policy,
        })
    }

    /// The key id tokens are signed under.
    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// A token for `user_id` (bound to `device` when given) that expires after `ttl`, which
    /// must be more than zero and at most the policy's maximum.
    pub fn mint(
        &self,
        user_id: Uuid,
        device: Option<&DeviceId>,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        anyhow::ensure!(
            ttl.as_secs() > 0,
            "the lifetime must be at least one second"
        );
        anyhow::ensure!(
            ttl <= self.policy.max_ttl,
            "the lifetime {} is longer than the maximum of {} (--token-max-ttl)",
            humantime::format_duration(ttl),
            humantime::format_duration(self.policy.max_ttl)
        );
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id.to_string(),
            dev: device.map(|d| d.as_str().to_owned()),
            iss: self.policy.issuer.clone(),
            aud: self.policy.audience.clone(),
            iat: Some(now),
            exp: now + ttl.as_secs(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing_kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }

    /// The caller a token names, if it is valid.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::Malformed);
        }
        let key = header
            .kid
            .as_ref()
            .and_then(|kid| self.decoding.get(kid))
            .ok_or(AuthError::UnknownKey)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                    ErrorKind::InvalidAudience => AuthError::WrongAudience,
                    ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim,
                    _ => AuthError::Malformed,
                }
            })?;
        let claims = data.claims;
        let issued = claims.iat.ok_or(AuthError::MissingClaim)?;
        if claims.exp.saturating_sub(issued) > self.policy.max_ttl.as_secs() {
            return Err(AuthError::TooLong);
        }
        let user_id = Uuid::parse_str(&claims.sub).map_err(|_| AuthError::BadSubject)?;
        let device_id = claims
            .dev
            .map(|d| DeviceId::parse(&d).map_err(|_| AuthError::BadDevice))
            .transpose()?;
        Ok(Caller { user_id, device_id })
    }
}

/// The caller the edge put into `request`.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, AuthError> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(AuthError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(secrets: &[&[u8]]) -> TokenAuthority {
        let secrets: Vec<Vec<u8>> = secrets.iter().map(|s| s.to_vec()).collect();
        TokenAuthority::new(&secrets, TokenPolicy::default()).unwrap()
    }

    fn sign(claims: &serde_json::Value, secret: &[u8], kid: Option<String>) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid;
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_name_user_and_device() {
        let authority = authority(&[&[1u8; 32]]);
        let user = Uuid::new_v4();
        let phone = DeviceId::parse("phone").unwrap();
        let token = authority
            .mint(user, Some(&phone), Duration::from_secs(60))
            .unwrap();
        let caller = authority.verify(&token).unwrap();
        assert_eq!(caller.user_id, user);
        assert_eq!(caller.device_id.as_ref(), Some(&phone));
        assert_eq!(caller.may_write(&phone), Ok(()));
        let laptop = DeviceId::parse("laptop").unwrap();
        assert_eq!(caller.may_write(&laptop), Err(AuthError::OtherDevice));

        let token = authority.mint(user, None, Duration::from_secs(60)).unwrap();
        let caller = authority.verify(&token).unwrap();
        assert_eq!(caller.device_id, None);
        assert_eq!(caller.may_write(&phone), Err(AuthError::NoDevice));

        assert_eq!(
            self::authority(&[&[2u8; 32]]).verify(&token),
            Err(AuthError::UnknownKey)
        );
        assert!(TokenAuthority::new(&[vec![1u8; 31]], TokenPolicy::default()).is_err());
    }

    #[test]
    fn lifetimes_outside_the_policy_are_refused_both_ways() {
        let authority = authority(&[&[1u8; 32]]);
        let user = Uuid::new_v4();
        assert!(authority.mint(user, None, Duration::ZERO).is_err());
        assert!(
            authority
                .mint(user, None, Duration::from_secs(31 * 86_400))
                .is_err()
        );
        let now = jsonwebtoken::get_current_timestamp();
        let kid = Some(key_id(&[1u8; 32]));
        let long = serde_json::json!({
            "sub": user.to_string(), "iss": "keyserver", "aud": "keyserver",
            "iat": now, "exp": now + 100 * 365 * 86_400,
        });
        assert_eq!(
            authority.verify(&sign(&long, &[1u8; 32], kid.clone())),
            Err(AuthError::TooLong)
        );
        let expired = serde_json::json!({
            "sub": user.to_string(), "iss": "keyserver", "aud": "keyserver",
            "iat": now - 120, "exp": now - 60,
        });
        assert_eq!(
            authority.verify(&sign(&expired, &[1u8; 32], kid)),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn issuer_audience_kid_and_claims_are_checked() {
        let secret = [3u8; 32];
        let authority = authority(&[&secret]);
        let now = jsonwebtoken::get_current_timestamp();
        let kid = Some(key_id(&secret));
        let claims = |iss: &str, aud: &str| {
            serde_json::json!({
                "sub": Uuid::new_v4().to_string(), "iss": iss, "aud": aud,
                "iat": now, "exp": now + 60,
            })
        };
        assert!(
            authority
                .verify(&sign(
                    &claims("keyserver", "keyserver"),
                    &secret,
                    kid.clone()
                ))
                .is_ok()
        );
        assert_eq!(
            authority.verify(&sign(&claims("evil", "keyserver"), &secret, kid.clone())),
            Err(AuthError::WrongIssuer)
        );
        assert_eq!(
            authority.verify(&sign(&claims("keyserver", "other"), &secret, kid.clone())),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(
            authority.verify(&sign(&claims("keyserver", "keyserver"), &secret, None)),
            Err(AuthError::UnknownKey)
        );
        let no_iat = serde_json::json!({
            "sub": Uuid::new_v4().to_string(), "iss": "keyserver", "aud": "keyserver",
            "exp": now + 60,
        });
        assert_eq!(
            authority.verify(&sign(&no_iat, &secret, kid.clone())),
            Err(AuthError::MissingClaim)
        );
        // Signed with another secret under this secret's kid.
        assert_eq!(
            authority.verify(&sign(&claims("keyserver", "keyserver"), &[4u8; 32], kid)),
            Err(AuthError::BadSignature)
        );
        assert_eq!(authority.verify("not a jwt"), Err(AuthError::Malformed));
    }

    #[test]
    fn an_old_secret_still_verifies_while_the_new_one_signs() {
        let (old, new) = ([5u8; 32], [6u8; 32]);
        let before = authority(&[&old]);
        let during = authority(&[&new, &old]);
        let user = Uuid::new_v4();
        let old_token = before.mint(user, None, Duration::from_secs(60)).unwrap();
        assert_eq!(during.verify(&old_token).unwrap().user_id, user);
        let new_token = during.mint(user, None, Duration::from_secs(60)).unwrap();
        assert_eq!(before.verify(&new_token), Err(AuthError::UnknownKey));
        assert_eq!(during.signing_kid(), key_id(&new));
    }
}
