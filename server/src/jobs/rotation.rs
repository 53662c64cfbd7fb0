//! The rotation check. Only a device can sign its next signed prekey, so rotation is a
//! contract: devices rotate when their key reaches the rotation age (`keyctl rotate --if-due`),
//! and the server reports the devices that did not. Bundles whose signed prekey is past the
//! stale age carry `stale` whenever they are fetched, so senders see it without waiting for
//! this job.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::Step;
use crate::clock::Clock;
use crate::config::RotationPolicy;
use crate::store::{Store, StoreError, prekeys};

/// How many of the oldest overdue devices a report names.
const LISTED: u32 = 20;

impl RotationPolicy {
    /// Whether a signed prekey installed at `rotated_at` is due for rotation at `now`.
    pub fn due(&self, rotated_at: OffsetDateTime, now: OffsetDateTime) -> bool {
        rotated_at < now - self.rotation_age
    }

    /// Whether peers should treat a signed prekey installed at `rotated_at` as out of date.
    pub fn stale(&self, rotated_at: OffsetDateTime, now: OffsetDateTime) -> bool {
        rotated_at < now - self.stale_signed_prekey_age
    }
}

/// Counts active signed prekeys and last-resort Kyber prekeys past the rotation age and the
/// stale age, naming the oldest devices of each.
pub async fn check(
    store: &Store,
    policy: &RotationPolicy,
    clock: &Clock,
) -> Result<(Vec<Step>, Vec<String>, bool), StoreError> {
    let now = clock.now();
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    for (kind, (due_step, stale_step), what) in [
        (&prekeys::SIGNED, ("rotation_due", "stale"), "signed prekey"),
        (
            &prekeys::KYBER_LAST_RESORT,
            ("kyber_rotation_due", "kyber_stale"),
            "last-resort Kyber prekey",
        ),
    ] {
        let started = Instant::now();
        let scan = store
            .scan_rotation(
                kind,
                now - policy.rotation_age,
                now - policy.stale_signed_prekey_age,
                LISTED,
            )
            .await?;
        let duration = started.elapsed();
        notes.extend(scan.oldest.iter().map(|d| {
            let age = Duration::from_secs((now - d.rotated_at).whole_seconds().max(0) as u64);
            format!(
                "user {} device {}: {what} installed {} ({} ago){}",
                d.user_id,
                d.device_id,
                super::when(d.rotated_at),
                super::period(Duration::from_secs(age.as_secs() / 60 * 60)),
                if policy.stale(d.rotated_at, now) {
                    ", stale"
                } else {
                    ""
                }
            )
        }));
        if scan.due > scan.oldest.len() as u64 {
            notes.push(format!(
                "… and {} more with an overdue {what}",
                scan.due - scan.oldest.len() as u64
            ));
        }
        steps.push(Step {
            name: due_step,
            count: scan.due,
            duration,
        });
        steps.push(Step {
            name: stale_step,
            count: scan.stale,
            duration,
        });
    }
    Ok((steps, notes, true))
}
