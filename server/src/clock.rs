//! The time that policy decisions are made against: rotation due, a stale signed prekey, the
//! cut-offs of cleanup, the refill of rate-limit buckets. The database keeps its own clock for
//! the times it records; policy asks this one, so tests can place rows on either side of a
//! boundary and decide at a fixed instant, or move time on without sleeping.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

/// Where "now" comes from.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// Always the same instant (tests).
    Fixed(OffsetDateTime),
    /// An instant that stands still until a test moves it on.
    Manual(ManualClock),
}

impl Clock {
    pub fn now(&self) -> OffsetDateTime {
        match self {
            Self::System => OffsetDateTime::now_utc(),
            Self::Fixed(at) => *at,
            Self::Manual(clock) => *clock.lock(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_millis(&self) -> i64 {
        (self.now().unix_timestamp_nanos() / 1_000_000) as i64
    }
}

/// A clock a test moves by hand; clones share the instant.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<OffsetDateTime>>);

impl ManualClock {
    pub fn starting_at(at: OffsetDateTime) -> Self {
        Self(Arc::new(Mutex::new(at)))
    }

    pub fn advance(&self, by: Duration) {
        *self.lock() += by;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OffsetDateTime> {
        // The instant is a plain value: a panic while it was held cannot leave it torn.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
