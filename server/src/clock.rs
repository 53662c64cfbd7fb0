//! The time that policy decisions are made against: rotation due, a stale signed prekey, the
//! cut-offs of cleanup. The database keeps its own clock for the times it records; policy asks
//! this one, so tests can place rows on either side of a boundary and decide at a fixed instant.

use time::OffsetDateTime;

/// Where "now" comes from.
#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// Always the same instant (tests).
    Fixed(OffsetDateTime),
}

impl Clock {
    pub fn now(&self) -> OffsetDateTime {
        match self {
            Self::System => OffsetDateTime::now_utc(),
            Self::Fixed(at) => *at,
        }
    }
}
