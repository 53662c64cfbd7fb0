//! Retired ids: the ids of keys cleanup deleted, kept so that a retried upload of a key
//! consumed or superseded long ago is still refused (a device chooses its ids, so such a key is
//! recognised only by its id). They are ranges of consecutive ids per device and id space
//! (`keyserver_retired_prekeys`), at a few rows per device. Each cleanup batch that deletes keys
//! records their ids here in the same transaction; [`plan`] is how ranges grow.

use std::collections::BTreeMap;

use crate::store::StoreError;
use crate::store::database::Tx;
use crate::store::ids::DeviceId;
use crate::store::sql::{List, Sql, sql};

/// An id space of retired ids (the `key_kind` column). Kinds of keys that share ids on a
/// device share one space: libsignal keeps one-time and last-resort Kyber prekeys in one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// One-time Curve25519 prekeys.
    OneTime,
    /// Signed Curve25519 prekeys.
    Signed,
    /// Kyber prekeys, one-time and last resort.
    Kyber,
}

impl Retired {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneTime => "one_time",
            Self::Signed => "signed",
            Self::Kyber => "kyber",
        }
    }

    /// The device's ranges (first, last) of retired ids in this space.
    pub(crate) async fn ranges(
        self,
        tx: &mut Tx,
        device: &DeviceId,
    ) -> Result<Vec<(u32, u32)>, StoreError> {
        let rows: Vec<(i32, i32)> = tx
            .query(&sql!(
                "SELECT first_id, last_id FROM keyserver_retired_prekeys
                 WHERE device_id = $1 AND key_kind = $2"
            ))
            .bind(device)
            .bind(self.as_str())
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|(first, last)| (first as u32, last as u32))
            .collect())
    }

    /// Records the ids of deleted keys, (device, id), as retired in this space.
    pub(crate) async fn retire(
        self,
        tx: &mut Tx,
        deleted: Vec<(DeviceId, u32)>,
    ) -> Result<(), StoreError> {
        let mut devices: Vec<String> = deleted.iter().map(|(d, _)| d.to_string()).collect();
        devices.sort_unstable();
        devices.dedup();
        let existing: Vec<(DeviceId, i32, i32, i32)> = tx
            .query(&sql!(
                "SELECT device_id, id, first_id, last_id FROM keyserver_retired_prekeys
                 WHERE key_kind = $2 AND device_id" IN_LIST("$1")
            ))
            .bind(List(devices))
            .bind(self.as_str())
            .fetch_all()
            .await?;
        let plan = plan(
            existing
                .into_iter()
                .map(|(d, row, first, last)| (d, (row, first as u32, last as u32)))
                .collect(),
            deleted,
        );
        tx.query(&sql!(
            "DELETE FROM keyserver_retired_prekeys WHERE id" IN_LIST("$1")
        ))
        .bind(List(plan.delete))
        .execute()
        .await?;
        match tx {
            // A batch can touch thousands of devices: one statement each, not one per range.
            Tx::Postgres(pg) => {
                let (rows, firsts, lasts) = columns(plan.update.into_iter());
                sqlx::query(UPDATE_RANGES.postgres)
                    .bind(rows)
                    .bind(firsts)
                    .bind(lasts)
                    .execute(&mut **pg)
                    .await?;
                let (devices, firsts, lasts) = columns(
                    plan.insert
                        .into_iter()
                        .map(|(d, f, l)| (d.into_string(), f, l)),
                );
                sqlx::query(INSERT_RANGES.postgres)
                    .bind(devices)
                    .bind(firsts)
                    .bind(lasts)
                    .bind(self.as_str())
                    .execute(&mut **pg)
                    .await?;
            }
            Tx::Sqlite(_) => {
                for (row, first, last) in plan.update {
                    tx.query(&UPDATE_RANGES)
                        .bind(row)
                        .bind(first as i32)
                        .bind(last as i32)
                        .execute()
                        .await?;
                }
                for (device, first, last) in plan.insert {
                    tx.query(&INSERT_RANGES)
                        .bind(device)
                        .bind(first as i32)
                        .bind(last as i32)
                        .bind(self.as_str())
                        .execute()
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Widens ranges: PostgreSQL from arrays (`$1` rows, `$2` firsts, `$3` lasts), SQLite one.
const UPDATE_RANGES: Sql = Sql {
    postgres: "UPDATE keyserver_retired_prekeys r SET first_id = u.first_id, last_id = u.last_id
               FROM unnest($1::int4[], $2::int4[], $3::int4[]) AS u(id, first_id, last_id)
               WHERE r.id = u.id",
    sqlite: "UPDATE keyserver_retired_prekeys SET first_id = $2, last_id = $3 WHERE id = $1",
};

/// Adds ranges of the space `$4`: PostgreSQL from arrays (`$1` devices, `$2` firsts, `$3`
/// lasts), SQLite one.
const INSERT_RANGES: Sql = Sql {
    postgres: "INSERT INTO keyserver_retired_prekeys (device_id, key_kind, first_id, last_id)
               SELECT d, $4, f, l FROM unnest($1::text[], $2::int4[], $3::int4[]) AS n(d, f, l)",
    sqlite: "INSERT INTO keyserver_retired_prekeys (device_id, key_kind, first_id, last_id)
             VALUES ($1, $4, $2, $3)",
};

/// Columns of (row, first id, last id) triples, ids as INTEGER.
fn columns<T>(items: impl Iterator<Item = (T, u32, u32)>) -> (Vec<T>, Vec<i32>, Vec<i32>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (row, first, last) in items {
        out.0.push(row);
        out.1.push(first as i32);
        out.2.push(last as i32);
    }
    out
}

/// A stored range of retired ids: (row id, first, last).
pub type Range = (i32, u32, u32);

/// How to change the stored ranges so they cover newly deleted ids.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Range rows to delete (absorbed into a neighbour).
    pub delete: Vec<i32>,
    /// Range rows to widen: (row id, first, last).
    pub update: Vec<(i32, u32, u32)>,
    /// New ranges: (device, first, last).
    pub insert: Vec<(DeviceId, u32, u32)>,
}

/// Merges each device's deleted ids into its stored ranges. Only consecutive ids join a range,
/// so an id the device never used is never refused. `existing` holds the stored ranges of the
/// devices in `deleted`.
pub fn plan(existing: Vec<(DeviceId, Range)>, deleted: Vec<(DeviceId, u32)>) -> Plan {
    let mut by_device: BTreeMap<DeviceId, (Vec<Range>, Vec<u32>)> = BTreeMap::new();
    for (device, range) in existing {
        by_device.entry(device).or_default().0.push(range);
    }
    for (device, id) in deleted {
        by_device.entry(device).or_default().1.push(id);
    }
    let mut plan = Plan::default();
    for (device, (mut ranges, mut ids)) in by_device {
        if ids.is_empty() {
            continue;
        }
        // Every stored range and every new id as an interval, sorted, then joined where
        // consecutive. Each joined interval keeps the first stored row it covers.
        let mut intervals: Vec<(u32, u32, Option<i32>)> = ranges
            .drain(..)
            .map(|(row, first, last)| (first, last, Some(row)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        intervals.extend(ids.into_iter().map(|id| (id, id, None)));
        intervals.sort_unstable_by_key(|&(first, last, row)| (first, last, row.is_none()));
        let mut merged: Vec<(u32, u32, Option<i32>, bool)> = Vec::new();
        for (first, last, row) in intervals {
            match merged.last_mut() {
                Some((_, m_last, m_row, changed)) if first <= m_last.saturating_add(1) => {
                    if last > *m_last {
                        *m_last = last;
                        *changed = true;
                    }
                    match (row, *m_row) {
                        (Some(row), Some(_)) => {
                            plan.delete.push(row);
                            *changed = true;
                        }
                        (Some(row), None) => *m_row = Some(row),
                        (None, _) => *changed = true,
                    }
                }
                _ => merged.push((first, last, row, row.is_none())),
            }
        }
        for (first, last, row, changed) in merged {
            match row {
                Some(row) if changed => plan.update.push((row, first, last)),
                Some(_) => {}
                None => plan.insert.push((device.clone(), first, last)),
            }
        }
    }
    plan
}

/// True when `id` lies in one of `ranges` (first, last).
pub fn contains(ranges: &[(u32, u32)], id: u32) -> bool {
    ranges
        .iter()
        .any(|&(first, last)| first <= id && id <= last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str) -> DeviceId {
        DeviceId::parse(name).unwrap()
    }

    fn plan_for(existing: &[(i32, u32, u32)], deleted: &[u32]) -> Plan {
        plan(
            existing.iter().map(|&r| (d("d"), r)).collect(),
            deleted.iter().map(|&id| (d("d"), id)).collect(),
        )
    }

    #[test]
    fn consecutive_ids_become_one_range() {
        let p = plan_for(&[], &[7, 5, 6, 9]);
        assert_eq!(p.insert, vec![(d("d"), 5, 7), (d("d"), 9, 9)]);
        assert!(p.update.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn ids_extend_a_stored_range_in_place() {
        let p = plan_for(&[(1, 10, 19)], &[20, 21]);
        assert_eq!(p.update, vec![(1, 10, 21)]);
        assert!(p.insert.is_empty() && p.delete.is_empty());
        let p = plan_for(&[(1, 10, 19)], &[9]);
        assert_eq!(p.update, vec![(1, 9, 19)]);
    }

    #[test]
    fn an_id_that_closes_a_gap_joins_two_ranges() {
        let p = plan_for(&[(1, 10, 19), (2, 21, 30)], &[20]);
        assert_eq!(p.update, vec![(1, 10, 30)]);
        assert_eq!(p.delete, vec![2]);
        assert!(p.insert.is_empty());
    }

    #[test]
    fn a_gap_is_never_covered() {
        let p = plan_for(&[(1, 10, 19)], &[25]);
        assert!(p.update.is_empty());
        assert_eq!(p.insert, vec![(d("d"), 25, 25)]);
        let ranges = [(10, 19), (25, 25)];
        assert!(contains(&ranges, 10) && contains(&ranges, 19) && contains(&ranges, 25));
        assert!(!contains(&ranges, 20) && !contains(&ranges, 24) && !contains(&ranges, 9));
    }

    #[test]
    fn untouched_ranges_and_devices_are_left_alone() {
        let p = plan(
            vec![(d("a"), (1, 1, 5)), (d("b"), (2, 1, 5))],
            vec![(d("b"), 100), (d("c"), u32::MAX)],
        );
        assert_eq!(
            p.insert,
            vec![(d("b"), 100, 100), (d("c"), u32::MAX, u32::MAX)]
        );
        assert!(p.update.is_empty() && p.delete.is_empty());
    }
}
