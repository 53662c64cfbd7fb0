//! The token bucket both backends enforce, in its exact integer form: the generic cell rate
//! algorithm (GCRA). A bucket's whole state is one instant, its "theoretical arrival time":
//! when it would be full again. Taking `cost` tokens moves that instant on by `cost` refill
//! intervals; the take is allowed while the instant stays within `capacity` intervals of now.
//! A missing bucket is a full one, so a bucket can be forgotten once its instant has passed.
//!
//! `take.lua` is this same function for Redis; the tests below are its known answers, and the
//! Redis tests run the same answers against the script.

use std::time::Duration;

/// How a bucket fills: `capacity` tokens at most, one more every `refill_every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub capacity: u32,
    pub refill_every: Duration,
}

impl Rule {
    /// `capacity` tokens, refilled evenly over `period`; None (no limit) for a capacity of 0.
    pub fn per(capacity: u32, period: Duration) -> Option<Self> {
        (capacity > 0).then(|| Self {
            capacity,
            refill_every: period / capacity,
        })
    }

    /// `capacity` tokens, one more every `refill_every`; None (no limit) for a capacity of 0.
    pub fn burst(capacity: u32, refill_every: Duration) -> Option<Self> {
        (capacity > 0).then_some(Self {
            capacity,
            refill_every,
        })
    }

    /// The refill interval in whole milliseconds (at least 1).
    pub fn interval_ms(&self) -> i64 {
        (self.refill_every.as_millis() as i64).max(1)
    }
}

/// Takes `cost` tokens from a bucket whose full-again instant is `tat` (None: full) at `now`
/// (milliseconds). Ok with the new instant, or Err with the milliseconds until the take would
/// be allowed.
pub fn take(tat: Option<i64>, rule: Rule, cost: u32, now: i64) -> Result<i64, i64> {
    let interval = rule.interval_ms();
    let next = tat.unwrap_or(now).max(now) + i64::from(cost) * interval;
    let over = next - now - i64::from(rule.capacity) * interval;
    if over > 0 { Err(over) } else { Ok(next) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    fn six_per_ten_minutes() -> Rule {
        Rule::burst(6, Duration::from_secs(600)).unwrap()
    }

    #[test]
    fn a_full_bucket_gives_its_capacity_then_refuses_until_one_interval_passes() {
        let rule = six_per_ten_minutes();
        let now = 1_000_000;
        let mut tat = None;
        for n in 1..=6 {
            let next = take(tat, rule, 1, now).expect("within the burst");
            assert_eq!(next, now + n * 10 * MINUTE);
            tat = Some(next);
        }
        assert_eq!(take(tat, rule, 1, now), Err(10 * MINUTE));
        assert_eq!(take(tat, rule, 1, now + 10 * MINUTE - 1), Err(1));
        assert_eq!(take(tat, rule, 1, now + 10 * MINUTE), Ok(now + 70 * MINUTE));
    }

    #[test]
    fn a_refused_take_changes_nothing_and_a_cost_is_taken_whole_or_not_at_all() {
        let rule = six_per_ten_minutes();
        let now = 5 * MINUTE;
        let tat = take(None, rule, 4, now).unwrap();
        assert_eq!(tat, now + 40 * MINUTE);
        // Three more would be seven: refused, with the wait for the one missing.
        assert_eq!(take(Some(tat), rule, 3, now), Err(10 * MINUTE));
        assert_eq!(take(Some(tat), rule, 2, now), Ok(now + 60 * MINUTE));
    }

    #[test]
    fn an_old_instant_counts_as_a_full_bucket_never_as_credit() {
        let rule = six_per_ten_minutes();
        let long_ago = Some(0);
        let now = 1_000 * MINUTE;
        assert_eq!(take(long_ago, rule, 6, now), Ok(now + 60 * MINUTE));
        assert_eq!(take(long_ago, rule, 7, now), Err(10 * MINUTE));
    }

    #[test]
    fn a_rate_per_period_spreads_its_refill_evenly() {
        let rule = Rule::per(300, Duration::from_secs(3600)).unwrap();
        assert_eq!(rule.refill_every, Duration::from_secs(12));
        assert_eq!(Rule::per(0, Duration::from_secs(3600)), None);
        assert_eq!(Rule::burst(0, Duration::from_secs(1)), None);
    }
}
