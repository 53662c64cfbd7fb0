//! Drain detection: a device whose one-time keys go faster than a threshold, or mostly to one
//! requesting user, may be the target of someone using up its keys so that its peers get
//! bundles without them (docs/ABUSE.md). The fetch records who took each key (`consumed_by`);
//! this concept reads the keys taken within a window, judges them by one [`DrainRule`], and
//! writes the finding to the owner's audit trail once per window.
//!
//! One rule serves both readers: the drain-check job over every device, and `GetKeyStatus`
//! for one. Each kind (EC and Kyber one-time prekeys) is judged on its own, as a fetch takes one
//! of each while both last.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::audit::{self, AuditEvent};
use super::ids::DeviceId;
use super::sql::{At, Sql, Uid, sql};
use super::{Store, StoreError};

/// What counts as a drain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrainRule {
    /// How far back keys taken are counted.
    pub window: Duration,
    /// A device is suspected when this many keys of one kind were taken within the window
    /// (0: never for the count alone).
    pub threshold: u32,
    /// ... or when one requesting user took at least this share of them ...
    pub requester_share: f64,
    /// ... and at least this many (0: the share rule is off).
    pub requester_keys: u32,
}

impl DrainRule {
    /// No drain is ever suspected.
    pub const OFF: DrainRule = DrainRule {
        window: Duration::ZERO,
        threshold: 0,
        requester_share: 1.0,
        requester_keys: 0,
    };

    pub fn is_off(&self) -> bool {
        self.window.is_zero() || (self.threshold == 0 && self.requester_keys == 0)
    }

    /// Fewest keys of a kind a device must have lost in the window for either test to pass.
    fn least(&self) -> i64 {
        match (self.threshold, self.requester_keys) {
            (0, n) | (n, 0) => i64::from(n),
            (a, b) => i64::from(a.min(b)),
        }
    }

    /// The finding for one device's kind, from its keys taken per requester.
    fn judge(&self, kind: &str, total: u64, top: Option<(Uuid, u64)>) -> Option<Finding> {
        let by_one = top.filter(|&(_, keys)| {
            self.requester_keys > 0
                && keys >= u64::from(self.requester_keys)
                && keys as f64 >= self.requester_share * total as f64
        });
        let too_many = self.threshold > 0 && total >= u64::from(self.threshold);
        (too_many || by_one.is_some()).then(|| Finding {
            kind: kind.to_owned(),
            taken: total,
            requester: by_one,
        })
    }
}

/// Why a device is suspected: how many keys of which kind went, and the requesting user who
/// took the share that tripped the rule, if that was the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// "one_time" or "kyber".
    pub kind: String,
    pub taken: u64,
    pub requester: Option<(Uuid, u64)>,
}

/// A device the drain check reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainedDevice {
    pub user_id: Uuid,
    pub device_id: DeviceId,
    pub finding: Finding,
}

/// Keys of a kind a device lost to one requester (unknown for keys taken before migration
/// 0007), with the device's total of that kind; devices with fewer than `$2` keys taken are
/// left out. `$1` is the start of the window; `FILTER` narrows both tables' rows.
macro_rules! taken_per_requester {
    ($filter:literal, $unreported:literal) => {
        sql!(
            "WITH taken AS (
                 SELECT device_id, 'one_time' AS kind, consumed_by FROM nchat_one_time_prekeys
                 WHERE is_consumed = TRUE AND consumed_at >= $1" $filter "
                 UNION ALL
                 SELECT device_id, 'kyber' AS kind, consumed_by FROM nchat_kyber_prekeys
                 WHERE is_consumed = TRUE AND is_last_resort = FALSE AND consumed_at >= $1"
                 $filter "
             ),
             per_requester AS (
                 SELECT device_id, kind, consumed_by, count(*) AS keys
                 FROM taken GROUP BY device_id, kind, consumed_by
             ),
             per_device AS (
                 SELECT device_id, kind, CAST(sum(keys) AS BIGINT) AS total
                 FROM per_requester GROUP BY device_id, kind
                 HAVING CAST(sum(keys) AS BIGINT) >= $2
             )
             SELECT ik.user_id, p.device_id, p.kind, p.consumed_by, p.keys, d.total
             FROM per_requester p
             JOIN per_device d ON d.device_id = p.device_id AND d.kind = p.kind
             JOIN nchat_identity_keys ik ON ik.device_id = p.device_id"
             $unreported "
             ORDER BY p.device_id, p.kind, p.keys DESC"
        )
    };
}

/// Every device, leaving out those already reported within the window.
const SCAN: Sql = taken_per_requester!(
    "",
    " WHERE NOT EXISTS (
         SELECT 1 FROM nchat_e2ee_audit_log a
         WHERE a.device_id = p.device_id AND a.event_type = 'prekeys_drain_suspected'
           AND a.created_at >= $1)"
);

/// One device (`$3`).
const DEVICE: Sql = taken_per_requester!(" AND device_id = $3", "");

#[derive(sqlx::FromRow)]
struct Row {
    user_id: Uid,
    device_id: DeviceId,
    kind: String,
    consumed_by: Option<Uid>,
    keys: i64,
    total: i64,
}

/// The findings of rows ordered by device, kind and keys (most first): at most one per device,
/// its worst kind's.
fn findings(rule: &DrainRule, rows: Vec<Row>) -> Vec<DrainedDevice> {
    let mut found: Vec<DrainedDevice> = Vec::new();
    let mut last: Option<(DeviceId, String)> = None;
    for row in rows {
        let group = (row.device_id.clone(), row.kind.clone());
        if last.as_ref() == Some(&group) {
            continue;
        }
        last = Some(group);
        // The first row of a group is its biggest requester; keys of unknown requesters count
        // toward the total only.
        let top = row.consumed_by.map(|u| (u.0, row.keys as u64));
        let Some(finding) = rule.judge(&row.kind, row.total as u64, top) else {
            continue;
        };
        match found.last_mut() {
            Some(d) if d.device_id == row.device_id => {
                if finding.taken > d.finding.taken {
                    d.finding = finding;
                }
            }
            _ => found.push(DrainedDevice {
                user_id: row.user_id.0,
                device_id: row.device_id,
                finding,
            }),
        }
    }
    found
}

impl Store {
    /// Devices whose keys taken since `since` the rule suspects and that have no
    /// `prekeys_drain_suspected` event since then.
    pub async fn drain_suspects(
        &self,
        rule: &DrainRule,
        since: OffsetDateTime,
    ) -> Result<Vec<DrainedDevice>, StoreError> {
        if rule.is_off() {
            return Ok(Vec::new());
        }
        let rows = self
            .db
            .read()
            .await?
            .query(&SCAN)
            .bind(At(since))
            .bind(rule.least())
            .fetch_all()
            .await?;
        Ok(findings(rule, rows))
    }

    /// What the rule finds in `device`'s keys taken since `since` (the caller checked that the
    /// device is theirs).
    pub async fn drain_finding(
        &self,
        rule: &DrainRule,
        device: &DeviceId,
        since: OffsetDateTime,
    ) -> Result<Option<Finding>, StoreError> {
        if rule.is_off() {
            return Ok(None);
        }
        let rows = self
            .db
            .read()
            .await?
            .query(&DEVICE)
            .bind(At(since))
            .bind(rule.least())
            .bind(device)
            .fetch_all()
            .await?;
        Ok(findings(rule, rows).pop().map(|d| d.finding))
    }

    /// Writes one `prekeys_drain_suspected` event per device on its owner's trail, in one
    /// transaction. The requester is named by user id only.
    pub async fn report_drains(
        &self,
        rule: &DrainRule,
        drained: &[DrainedDevice],
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        for d in drained {
            let f = &d.finding;
            let mut metadata = json!({
                "kind": f.kind,
                "keys_taken": f.taken,
                "window_seconds": rule.window.as_secs(),
            });
            if let Some((user, keys)) = f.requester {
                metadata["requester_user_id"] = json!(user);
                metadata["requester_keys"] = json!(keys);
            }
            audit::record(
                &mut tx,
                AuditEvent::PrekeysDrainSuspected,
                d.user_id,
                Some(&d.device_id),
                metadata,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: DrainRule = DrainRule {
        window: Duration::from_secs(86_400),
        threshold: 100,
        requester_share: 0.5,
        requester_keys: 10,
    };

    #[test]
    fn many_keys_from_many_requesters_trip_the_threshold_alone() {
        let found = RULE.judge("one_time", 100, Some((Uuid::nil(), 3))).unwrap();
        assert_eq!((found.taken, found.requester), (100, None));
        assert!(RULE.judge("one_time", 99, Some((Uuid::nil(), 3))).is_none());
    }

    #[test]
    fn one_requester_needs_both_the_share_and_the_count() {
        let who = Uuid::from_u128(7);
        assert_eq!(
            RULE.judge("kyber", 20, Some((who, 10))).unwrap().requester,
            Some((who, 10))
        );
        assert!(RULE.judge("kyber", 21, Some((who, 10))).is_none(), "share");
        assert!(RULE.judge("kyber", 9, Some((who, 9))).is_none(), "count");
        assert!(
            RULE.judge("kyber", 50, None).is_none(),
            "unknown requesters"
        );
    }

    #[test]
    fn the_least_count_to_look_at_is_the_smaller_active_test() {
        assert_eq!(RULE.least(), 10);
        let counts_only = DrainRule {
            requester_keys: 0,
            ..RULE
        };
        assert_eq!(counts_only.least(), 100);
        assert!(
            counts_only
                .judge("one_time", 99, Some((Uuid::nil(), 99)))
                .is_none()
        );
        assert!(DrainRule::OFF.is_off());
    }
}
