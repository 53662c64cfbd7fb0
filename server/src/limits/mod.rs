//! Rate limits: how much one caller may take or write in a while, so that draining a device's
//! one-time prekeys, walking the directory and flooding writes cost time instead of nothing.
//!
//! Every limit is a token bucket ([`gcra`]) charged before the store is touched, all buckets
//! of one call or none, so a refused call consumes nothing, neither keys nor tokens:
//! - a fetch charges one token per target in the bucket of (requesting user and device →
//!   target device, or target user for an all-devices fetch), as Signal's prekey limiter does,
//!   and as many in the requesting user's budget over all targets;
//! - key uploads and rotations charge the device's upload bucket, registrations the user's.
//!
//! The buckets live in this process ([`memory`], the embedded default) or in Redis
//! ([`redis`], shared by every process). When Redis does not answer, calls are refused
//! UNAVAILABLE (fail closed) unless `--rate-limit-fail-open` lets them through uncounted.
//! How many devices a user may have is a quota the store checks in the registration's
//! transaction, not a bucket.

pub mod gcra;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::auth::Caller;
use crate::clock::Clock;
use crate::config::LimitArgs;
use crate::edge::metrics as m;
use crate::store::{BundleTarget, DeviceId};
use gcra::Rule;

/// The limits a server enforces.
#[derive(Clone)]
pub struct Limits {
    rules: Rules,
    buckets: Arc<Buckets>,
    clock: Clock,
    fail_open: bool,
}

#[derive(Debug, Clone, Copy)]
struct Rules {
    fetch: Option<Rule>,
    fetch_budget: Option<Rule>,
    upload: Option<Rule>,
    registration: Option<Rule>,
}

enum Buckets {
    Memory(memory::MemoryBuckets),
    Redis(redis::RedisBuckets),
}

/// Which limit refused a call, as messages and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Fetches by one requester of one target.
    Fetch,
    /// Fetches by one requester over all targets.
    FetchBudget,
    /// Key uploads and rotations of one device.
    Upload,
    /// Registrations by one user.
    Registration,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fetch => "fetch",
            Self::FetchBudget => "fetch_budget",
            Self::Upload => "upload",
            Self::Registration => "registration",
        }
    }
}

/// Why a call was not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{} rate limit reached; retry in {retry_after:?}", .limit.as_str())]
    Exhausted { limit: Limit, retry_after: Duration },
    #[error("the rate limiter is unavailable")]
    Unavailable,
}

/// One bucket's share of a call.
#[derive(Debug, Clone)]
pub struct Charge {
    pub key: String,
    pub rule: Rule,
    pub cost: u32,
    limit: Limit,
}

impl Limits {
    /// The limits of `args`, kept in Redis when it names one, else in this process.
    pub fn new(args: &LimitArgs, clock: Clock) -> anyhow::Result<Self> {
        let buckets = match &args.redis_url {
            Some(url) => Buckets::Redis(redis::RedisBuckets::new(url, args.redis_timeout)?),
            None => Buckets::Memory(memory::MemoryBuckets::default()),
        };
        Ok(Self {
            rules: Rules {
                fetch: Rule::burst(args.fetch_burst, args.fetch_refill_every),
                fetch_budget: Rule::per(args.fetch_budget, args.fetch_budget_period),
                upload: Rule::per(args.uploads_per_hour, HOUR),
                registration: Rule::per(args.registrations_per_hour, HOUR),
            },
            buckets: Arc::new(buckets),
            clock,
            fail_open: args.rate_limit_fail_open,
        })
    }

    /// Charges a fetch of `targets` by `caller`.
    pub async fn fetch(&self, caller: &Caller, targets: &[BundleTarget]) -> Result<(), LimitError> {
        let user = caller.user_id;
        let requester = caller.device_id.as_ref().map_or("", DeviceId::as_str);
        let mut charges = Vec::with_capacity(targets.len() + 1);
        if let Some(rule) = self.rules.fetch {
            for t in targets {
                let device = t.device_id.as_ref().map_or("*", DeviceId::as_str);
                charges.push(Charge {
                    key: format!("{}f/{requester}/{}/{device}", prefix(user), t.user_id),
                    rule,
                    cost: 1,
                    limit: Limit::Fetch,
                });
            }
        }
        if let Some(rule) = self.rules.fetch_budget {
            charges.push(Charge {
                key: format!("{}b", prefix(user)),
                rule,
                cost: targets.len() as u32,
                limit: Limit::FetchBudget,
            });
        }
        self.take(charges).await
    }

    /// Charges an upload or rotation of keys of `device`.
    pub async fn upload(&self, user: Uuid, device: &DeviceId) -> Result<(), LimitError> {
        let key = format!("{}u/{device}", prefix(user));
        self.take_one(self.rules.upload, key, Limit::Upload).await
    }

    /// Charges a registration by `user`.
    pub async fn register(&self, user: Uuid) -> Result<(), LimitError> {
        let key = format!("{}r", prefix(user));
        self.take_one(self.rules.registration, key, Limit::Registration)
            .await
    }

    /// Charges one token of one bucket, when its limit is on.
    async fn take_one(
        &self,
        rule: Option<Rule>,
        key: String,
        limit: Limit,
    ) -> Result<(), LimitError> {
        let charge = rule.map(|rule| Charge {
            key,
            rule,
            cost: 1,
            limit,
        });
        self.take(charge.into_iter().collect()).await
    }

    /// Charges every bucket or none. Each bucket is named once (a bulk fetch names each
    /// target once, validation refuses duplicates), as the script reads each bucket once.
    async fn take(&self, charges: Vec<Charge>) -> Result<(), LimitError> {
        if charges.is_empty() {
            return Ok(());
        }
        let now = self.clock.now_millis();
        let refused = match self.buckets.as_ref() {
            Buckets::Memory(b) => b.take(&charges, now).err(),
            Buckets::Redis(b) => match b.take(&charges, now).await {
                Ok(wait) => wait,
                Err(e) => {
                    metrics::counter!(m::RATE_LIMITER_ERRORS).increment(1);
                    if self.fail_open {
                        tracing::warn!(error = %e, "rate limiter unavailable; call let through (fail open)");
                        return Ok(());
                    }
                    tracing::warn!(error = %e, "rate limiter unavailable; call refused (fail closed)");
                    return Err(LimitError::Unavailable);
                }
            },
        };
        let Some((wait, worst)) = refused else {
            return Ok(());
        };
        let limit = charges[worst].limit;
        metrics::counter!(m::RATE_LIMITED, "limit" => limit.as_str()).increment(1);
        tracing::info!(
            limit = limit.as_str(),
            retry_after_ms = wait,
            "rate limited"
        );
        Err(LimitError::Exhausted {
            limit,
            retry_after: Duration::from_millis(wait as u64),
        })
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Every bucket of one user shares a Redis hash tag, so one script may charge them together
/// on a Redis Cluster too.
fn prefix(user: Uuid) -> String {
    format!("ks:rl:{{{user}}}:")
}
