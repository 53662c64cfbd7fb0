//! Buckets in this process's memory: the embedded single-process default. Every server
//! process has its own, so several processes need [`super::redis`] to share one limit.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Charge;
use super::gcra;

/// How often full buckets are swept out, in milliseconds of the limiter's clock.
const SWEEP_EVERY_MS: i64 = 60_000;

#[derive(Default)]
pub struct MemoryBuckets {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Each bucket's full-again instant; a bucket absent is full.
    tats: HashMap<String, i64>,
    last_sweep: i64,
}

impl MemoryBuckets {
    /// Charges every bucket or none; Err with the milliseconds until all would have enough,
    /// and the index of the charge that waits longest.
    pub fn take(&self, charges: &[Charge], now: i64) -> Result<(), (i64, usize)> {
        // The map is left consistent at every step: a panic elsewhere cannot tear it.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if now - inner.last_sweep >= SWEEP_EVERY_MS {
            inner.tats.retain(|_, tat| *tat > now);
            inner.last_sweep = now;
        }
        let mut next = Vec::with_capacity(charges.len());
        let mut worst = (0, 0);
        for (i, c) in charges.iter().enumerate() {
            match gcra::take(inner.tats.get(&c.key).copied(), c.rule, c.cost, now) {
                Ok(tat) => next.push(tat),
                Err(wait) if wait > worst.0 => worst = (wait, i),
                Err(_) => {}
            }
        }
        if worst.0 > 0 {
            return Err(worst);
        }
        for (c, tat) in charges.iter().zip(next) {
            inner.tats.insert(c.key.clone(), tat);
        }
        Ok(())
    }
}
