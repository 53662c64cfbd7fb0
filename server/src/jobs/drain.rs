//! The drain check: finds devices whose one-time prekeys went faster than the drain rule
//! allows within its window, or mostly to one requesting user, and reports each once per window
//! on its owner's audit trail, in the metrics and in the log (`store::drain`).

use std::time::Instant;

use super::Step;
use crate::clock::Clock;
use crate::edge::metrics as m;
use crate::store::drain::DrainRule;
use crate::store::{Store, StoreError};

/// How many reported devices a run's report lists by name.
const LISTED: usize = 20;

/// Reports every suspected device not yet reported within the window.
pub async fn check(
    store: &Store,
    rule: &DrainRule,
    clock: &Clock,
) -> Result<(Vec<Step>, Vec<String>, bool), StoreError> {
    let started = Instant::now();
    let since = clock.now() - rule.window;
    let drained = store.drain_suspects(rule, since).await?;
    store.report_drains(rule, &drained).await?;
    let mut notes = Vec::new();
    for d in &drained {
        let f = &d.finding;
        let reason = if f.requester.is_some() {
            "one_requester"
        } else {
            "rate"
        };
        ::metrics::counter!(m::DRAINS_SUSPECTED, "kind" => f.kind.clone(), "reason" => reason)
            .increment(1);
        tracing::warn!(
            user_id = %d.user_id,
            device_id = %d.device_id,
            kind = %f.kind,
            keys_taken = f.taken,
            requester_user_id = f.requester.map(|(u, _)| u.to_string()),
            requester_keys = f.requester.map(|(_, n)| n),
            "one-time prekeys drain suspected"
        );
        if notes.len() < LISTED {
            let by = f
                .requester
                .map(|(user, keys)| format!(", {keys} of them by user {user}"))
                .unwrap_or_default();
            notes.push(format!(
                "device {} of user {}: {} {} prekeys taken{by}",
                d.device_id, d.user_id, f.taken, f.kind
            ));
        }
    }
    if drained.len() > LISTED {
        notes.push(format!("and {} more devices", drained.len() - LISTED));
    }
    notes.push(if rule.is_off() {
        "the drain check is off (a zero window, or no threshold and no requester rule)".to_owned()
    } else {
        format!(
            "keys taken since {} ({}): {} or more of a kind, or at least {} and {:.0}% by one \
             requester",
            super::when(since),
            super::period(rule.window),
            rule.threshold,
            rule.requester_keys,
            rule.requester_share * 100.0
        )
    });
    Ok((
        vec![Step {
            name: "devices_reported",
            count: drained.len() as u64,
            duration: started.elapsed(),
        }],
        notes,
        true,
    ))
}
