//! The fetch on PostgreSQL: one statement on the base tables for any number of targets, which
//! takes each device's oldest unconsumed one-time prekey and one-time Kyber prekey with
//! `FOR UPDATE SKIP LOCKED` and flags them consumed, so concurrent fetchers in any number of
//! processes never get the same key, and serves the last-resort Kyber prekey where no one-time
//! Kyber prekey was taken.

use sqlx::FromRow;
use uuid::Uuid;

use super::{BundleTarget, DeviceBundle, DeviceRow, KyberRow};
use crate::store::StoreError;
use crate::store::database::PgDb;
use crate::store::ids::PreKeyId;
use crate::store::sql::Key;

/// The bundle fetch after its `targets` CTE (ord, user_id, device_id, pqxdh_only, requester,
/// from the parameters $1 order, $2 user ids, $3 optional device ids, $4 whether only devices
/// with a last-resort Kyber prekey are served, $5 the requesting user): takes one one-time prekey and one one-time Kyber prekey
/// per device of the targets and returns their bundles. `devices` holds each device once however
/// many targets name it, so one statement never takes two keys of a kind of a device nor hands
/// one key to two results. The last-resort key is read only for devices that got no one-time
/// Kyber key (it is 1.5 KB). Taken keys record their requester for drain detection
/// (`store::drain`).
macro_rules! fetch_bundles {
    ($targets:literal) => {
        concat!(
            "WITH targets AS (",
            $targets,
            "),
             devices AS (
                 SELECT DISTINCT ik.device_id, ik.user_id, ik.registration_id, ik.identity_key_public,
                        sp.signed_prekey_id, sp.signed_prekey_public, sp.signature, sp.rotation_date
                 FROM targets t
                 JOIN nchat_identity_keys ik
                   ON ik.user_id = t.user_id AND (t.device_id IS NULL OR ik.device_id = t.device_id)
                 JOIN nchat_signed_prekeys sp ON sp.device_id = ik.device_id AND sp.is_active = TRUE
                 WHERE NOT t.pqxdh_only OR EXISTS (
                     SELECT 1 FROM nchat_kyber_prekeys lr
                     WHERE lr.device_id = ik.device_id AND lr.is_last_resort = TRUE
                       AND lr.is_active = TRUE)
             ),
             picked AS (
                 SELECT next.id
                 FROM devices d
                 CROSS JOIN LATERAL (
                     SELECT o.id FROM nchat_one_time_prekeys o
                     WHERE o.device_id = d.device_id AND o.is_consumed = FALSE
                     ORDER BY o.id
                     LIMIT 1
                     FOR UPDATE SKIP LOCKED
                 ) next
             ),
             taken AS (
                 UPDATE nchat_one_time_prekeys o
                 SET is_consumed = TRUE, consumed_at = NOW(),
                     consumed_by = (SELECT requester FROM targets LIMIT 1)
                 FROM picked
                 WHERE o.id = picked.id AND o.is_consumed = FALSE
                 RETURNING o.device_id, o.prekey_id, o.prekey_public
             ),
             kyber_picked AS (
                 SELECT next.id
                 FROM devices d
                 CROSS JOIN LATERAL (
                     SELECT q.id FROM nchat_kyber_prekeys q
                     WHERE q.device_id = d.device_id AND q.is_last_resort = FALSE
                       AND q.is_consumed = FALSE
                     ORDER BY q.id
                     LIMIT 1
                     FOR UPDATE SKIP LOCKED
                 ) next
             ),
             kyber_taken AS (
                 UPDATE nchat_kyber_prekeys q
                 SET is_consumed = TRUE, consumed_at = NOW(),
                     consumed_by = (SELECT requester FROM targets LIMIT 1)
                 FROM kyber_picked
                 WHERE q.id = kyber_picked.id AND q.is_consumed = FALSE
                 RETURNING q.device_id, q.kyber_prekey_id, q.kyber_prekey_public, q.signature
             )
             SELECT t.ord, d.device_id, COALESCE(d.registration_id, 0) AS registration_id,
                    d.identity_key_public, d.signed_prekey_id, d.signed_prekey_public, d.signature,
                    d.rotation_date, k.prekey_id, k.prekey_public,
                    COALESCE(kt.kyber_prekey_id, lr.kyber_prekey_id) AS kyber_prekey_id,
                    COALESCE(kt.kyber_prekey_public, lr.kyber_prekey_public) AS kyber_prekey_public,
                    COALESCE(kt.signature, lr.signature) AS kyber_signature,
                    kt.device_id IS NOT NULL AS kyber_one_time
             FROM targets t
             JOIN devices d
               ON d.user_id = t.user_id AND (t.device_id IS NULL OR d.device_id = t.device_id)
             LEFT JOIN taken k ON k.device_id = d.device_id
             LEFT JOIN kyber_taken kt ON kt.device_id = d.device_id
             LEFT JOIN nchat_kyber_prekeys lr
               ON kt.device_id IS NULL AND lr.device_id = d.device_id
              AND lr.is_last_resort = TRUE AND lr.is_active = TRUE
             ORDER BY t.ord, d.device_id"
        )
    };
}

/// Any number of targets.
const FETCH_BUNDLES: &str = fetch_bundles!(
    "SELECT u.*, $4::bool AS pqxdh_only, $5::uuid AS requester
     FROM unnest($1::int4[], $2::uuid[], $3::text[]) AS u(ord, user_id, device_id)"
);

/// One target, the common case (`FetchPreKeyBundle`). An array of unknown length is planned as
/// ten rows, which makes the generic plan of [`FETCH_BUNDLES`] look four times dearer than a
/// custom one, so PostgreSQL plans that statement anew on every call: the profile of a fetch
/// run had planning taking more of the database's CPU than running it. One row read from the
/// arrays plans as one row, and PostgreSQL keeps its generic plan after five calls.
/// `loadtest/pgbench/fetch.sql` runs this statement (a test keeps them equal).
const FETCH_ONE_BUNDLE: &str = fetch_bundles!(
    "SELECT ($1::int4[])[1] AS ord, ($2::uuid[])[1] AS user_id, ($3::text[])[1] AS device_id,
            $4::bool AS pqxdh_only, $5::uuid AS requester"
);

#[derive(FromRow)]
struct Row {
    ord: i32,
    #[sqlx(flatten)]
    device: DeviceRow,
    prekey_id: Option<PreKeyId>,
    prekey_public: Option<Key>,
    #[sqlx(flatten)]
    kyber: KyberRow,
    kyber_one_time: bool,
}

pub(super) async fn fetch(
    db: &PgDb,
    requester: Uuid,
    targets: &[BundleTarget],
    pqxdh_only: bool,
) -> Result<Vec<Vec<DeviceBundle>>, StoreError> {
    let ords: Vec<i32> = (0..targets.len() as i32).collect();
    let users: Vec<Uuid> = targets.iter().map(|t| t.user_id).collect();
    let devices: Vec<Option<&str>> = targets
        .iter()
        .map(|t| t.device_id.as_ref().map(|d| d.as_str()))
        .collect();
    let statement = match targets {
        [_] => FETCH_ONE_BUNDLE,
        _ => FETCH_BUNDLES,
    };
    let rows = sqlx::query(statement)
        .bind(&ords)
        .bind(&users)
        .bind(&devices)
        .bind(pqxdh_only)
        .bind(requester)
        .fetch_all(db.pool())
        .await?;
    let mut results = vec![Vec::new(); targets.len()];
    for row in &rows {
        let row = Row::from_row(row)?;
        let one_time = row.prekey_id.zip(row.prekey_public.map(|k| k.0));
        results[row.ord as usize].push(row.device.bundle(
            one_time,
            row.kyber.key(),
            row.kyber_one_time,
        ));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    /// The pgbench script measures the statement the server runs, not a copy that drifted.
    #[test]
    fn the_pgbench_script_runs_the_fetch_statement() {
        let script = include_str!("../../../../loadtest/pgbench/fetch.sql");
        let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
        let from_devices = |text: &str| {
            let text = words(text);
            text[text.find("devices AS (").expect("a devices CTE")..]
                .trim_end_matches(';')
                .to_owned()
        };
        assert_eq!(from_devices(script), from_devices(super::FETCH_ONE_BUNDLE));
    }
}
