//! The fetch on PostgreSQL: one statement on the base tables for a whole batch of requests
//! ([`super::coalesce`]) with any number of targets each. It takes, for each device, as many of
//! its oldest unconsumed one-time prekeys and one-time Kyber prekeys as requests of the batch
//! name it, with `FOR UPDATE SKIP LOCKED`, and flags them consumed, so concurrent fetchers in
//! any number of processes never get the same key; the k-th key of a device goes to the k-th
//! request naming it. The last-resort Kyber prekey is served where no one-time Kyber prekey was
//! taken. One round trip and one commit for the batch.

use sqlx::FromRow;
use uuid::Uuid;

use super::coalesce::{FetchRequest, FetchResult, retry_window};
use super::{DeviceRow, KyberRow, Serve};
use crate::store::StoreError;
use crate::store::database::PgDb;
use crate::store::fence;
use crate::store::ids::PreKeyId;
use crate::store::sql::Key;

/// The batch fetch after its `targets` CTE (req, ord, user_id, device_id, pqxdh_only,
/// requester, fetch_key: the request's place in the batch, the target's place in the request,
/// the target, whether only devices with a last-resort Kyber prekey are served, the requesting
/// user and the request's idempotency key), with `$8` the retry window in seconds.
///
/// `matched` is every target's devices; `asks` each (request, device) pair once, so one request
/// never takes two keys of a kind of a device however many of its targets name it. `again` and
/// `kyber_again` find, for a request with a key, the keys its user took with the same key within
/// the window: such a pair is a retry, served those keys, and takes nothing. The other pairs
/// are ranked per device in request order (`wants`); `picked` locks as many of each device's
/// oldest unconsumed keys as requests want it, ranked by age, and the update gives the k-th to
/// the k-th request, recording that request's user (for drain detection, `store::drain`) and
/// key. A device short of keys (or whose keys other transactions hold) serves the requests that
/// come first. The last-resort key is read only for bundles that got no one-time Kyber key (it
/// is 1.5 KB).
///
/// `fence` reads the cutover fence ([`crate::store::fence`]) `FOR SHARE`: the table lock that
/// takes is granted before the statement's snapshot, so a fence set while this statement waits
/// is seen, and a fence waits for this statement's transaction. A fenced database matches no
/// device; [`fetch`] then says where the keys went.
macro_rules! fetch_bundles {
    ($targets:literal) => {
        concat!(
            "WITH targets AS (",
            $targets,
            "),
             fence AS (
                 SELECT moved_to FROM keyserver_fence FOR SHARE
             ),
             matched AS (
                 SELECT t.req, t.ord, t.requester, t.fetch_key, ik.device_id, ik.registration_id,
                        ik.identity_key_public, sp.signed_prekey_id, sp.signed_prekey_public,
                        sp.signature, sp.rotation_date
                 FROM targets t
                 JOIN nchat_identity_keys ik
                   ON ik.user_id = t.user_id AND (t.device_id IS NULL OR ik.device_id = t.device_id)
                 JOIN nchat_signed_prekeys sp ON sp.device_id = ik.device_id AND sp.is_active = TRUE
                 WHERE NOT EXISTS (SELECT 1 FROM fence)
                   AND (NOT t.pqxdh_only OR EXISTS (
                     SELECT 1 FROM nchat_kyber_prekeys lr
                     WHERE lr.device_id = ik.device_id AND lr.is_last_resort = TRUE
                       AND lr.is_active = TRUE))
             ),
             asks AS (
                 SELECT DISTINCT req, requester, fetch_key, device_id FROM matched
             ),
             again AS (
                 SELECT a.req, g.device_id, g.prekey_id, g.prekey_public
                 FROM asks a
                 CROSS JOIN LATERAL (
                     SELECT o.device_id, o.prekey_id, o.prekey_public
                     FROM nchat_one_time_prekeys o
                     WHERE o.device_id = a.device_id AND o.fetch_key = a.fetch_key
                       AND o.consumed_by = a.requester AND o.is_consumed = TRUE
                       AND o.consumed_at > NOW() - make_interval(secs => $8)
                     ORDER BY o.id
                     LIMIT 1
                 ) g
                 WHERE a.fetch_key IS NOT NULL
             ),
             kyber_again AS (
                 SELECT a.req, g.device_id, g.kyber_prekey_id, g.kyber_prekey_public, g.signature
                 FROM asks a
                 CROSS JOIN LATERAL (
                     SELECT q.device_id, q.kyber_prekey_id, q.kyber_prekey_public, q.signature
                     FROM nchat_kyber_prekeys q
                     WHERE q.device_id = a.device_id AND q.fetch_key = a.fetch_key
                       AND q.consumed_by = a.requester AND q.is_consumed = TRUE
                       AND q.consumed_at > NOW() - make_interval(secs => $8)
                     ORDER BY q.id
                     LIMIT 1
                 ) g
                 WHERE a.fetch_key IS NOT NULL
             ),
             wants AS (
                 SELECT a.req, a.requester, a.fetch_key, a.device_id,
                        row_number() OVER (PARTITION BY a.device_id ORDER BY a.req) AS rank
                 FROM asks a
                 WHERE NOT EXISTS (
                           SELECT 1 FROM again g WHERE g.req = a.req AND g.device_id = a.device_id)
                   AND NOT EXISTS (
                           SELECT 1 FROM kyber_again g
                           WHERE g.req = a.req AND g.device_id = a.device_id)
             ),
             demand AS (
                 SELECT device_id, count(*) AS n FROM wants GROUP BY device_id
             ),
             picked AS (
                 SELECT d.device_id, next.id,
                        row_number() OVER (PARTITION BY d.device_id ORDER BY next.id) AS rank
                 FROM demand d
                 CROSS JOIN LATERAL (
                     SELECT o.id FROM nchat_one_time_prekeys o
                     WHERE o.device_id = d.device_id AND o.is_consumed = FALSE
                     ORDER BY o.id
                     LIMIT d.n
                     FOR UPDATE SKIP LOCKED
                 ) next
             ),
             taken AS (
                 UPDATE nchat_one_time_prekeys o
                 SET is_consumed = TRUE, consumed_at = NOW(), consumed_by = w.requester,
                     fetch_key = w.fetch_key
                 FROM picked p
                 JOIN wants w ON w.device_id = p.device_id AND w.rank = p.rank
                 WHERE o.id = p.id AND o.is_consumed = FALSE
                 RETURNING w.req, o.device_id, o.prekey_id, o.prekey_public
             ),
             kyber_picked AS (
                 SELECT d.device_id, next.id,
                        row_number() OVER (PARTITION BY d.device_id ORDER BY next.id) AS rank
                 FROM demand d
                 CROSS JOIN LATERAL (
                     SELECT q.id FROM nchat_kyber_prekeys q
                     WHERE q.device_id = d.device_id AND q.is_last_resort = FALSE
                       AND q.is_consumed = FALSE
                     ORDER BY q.id
                     LIMIT d.n
                     FOR UPDATE SKIP LOCKED
                 ) next
             ),
             kyber_taken AS (
                 UPDATE nchat_kyber_prekeys q
                 SET is_consumed = TRUE, consumed_at = NOW(), consumed_by = w.requester,
                     fetch_key = w.fetch_key
                 FROM kyber_picked p
                 JOIN wants w ON w.device_id = p.device_id AND w.rank = p.rank
                 WHERE q.id = p.id AND q.is_consumed = FALSE
                 RETURNING w.req, q.device_id, q.kyber_prekey_id, q.kyber_prekey_public,
                           q.signature
             ),
             served AS (
                 SELECT * FROM taken UNION ALL SELECT * FROM again
             ),
             kyber_served AS (
                 SELECT * FROM kyber_taken UNION ALL SELECT * FROM kyber_again
             )
             SELECT m.req, m.ord, m.device_id, COALESCE(m.registration_id, 0) AS registration_id,
                    m.identity_key_public, m.signed_prekey_id, m.signed_prekey_public, m.signature,
                    m.rotation_date, k.prekey_id, k.prekey_public,
                    COALESCE(kt.kyber_prekey_id, lr.kyber_prekey_id) AS kyber_prekey_id,
                    COALESCE(kt.kyber_prekey_public, lr.kyber_prekey_public) AS kyber_prekey_public,
                    COALESCE(kt.signature, lr.signature) AS kyber_signature,
                    kt.device_id IS NOT NULL AS kyber_one_time
             FROM matched m
             LEFT JOIN served k ON k.req = m.req AND k.device_id = m.device_id
             LEFT JOIN kyber_served kt ON kt.req = m.req AND kt.device_id = m.device_id
             LEFT JOIN nchat_kyber_prekeys lr
               ON kt.device_id IS NULL AND lr.device_id = m.device_id
              AND lr.is_last_resort = TRUE AND lr.is_active = TRUE
             ORDER BY m.req, m.ord, m.device_id"
        )
    };
}

/// Any number of requests and targets.
const FETCH_BUNDLES: &str = fetch_bundles!(
    "SELECT * FROM unnest($1::int4[], $2::int4[], $3::uuid[], $4::text[], $5::bool[], $6::uuid[],
                          $7::text[])
         AS u(req, ord, user_id, device_id, pqxdh_only, requester, fetch_key)"
);

/// One request of one target, the common case on a server that is not busy. An array of
/// unknown length is planned as ten rows, which makes the generic plan of [`FETCH_BUNDLES`]
/// look four times dearer than a custom one, so PostgreSQL plans that statement anew on every
/// call: the profile of a fetch run had planning taking more of the database's CPU than running
/// it. One row read from the arrays plans as one row, and PostgreSQL keeps its generic plan
/// after five calls. `loadtest/pgbench/fetch.sql` runs this statement (a test keeps them equal).
const FETCH_ONE_BUNDLE: &str = fetch_bundles!(
    "SELECT ($1::int4[])[1] AS req, ($2::int4[])[1] AS ord, ($3::uuid[])[1] AS user_id,
            ($4::text[])[1] AS device_id, ($5::bool[])[1] AS pqxdh_only,
            ($6::uuid[])[1] AS requester, ($7::text[])[1] AS fetch_key"
);

#[derive(FromRow)]
struct Row {
    req: i32,
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
    requests: &[FetchRequest],
) -> Result<Vec<FetchResult>, StoreError> {
    let n = requests.iter().map(|r| r.targets.len()).sum();
    let mut reqs: Vec<i32> = Vec::with_capacity(n);
    let mut ords: Vec<i32> = Vec::with_capacity(n);
    let mut users: Vec<Uuid> = Vec::with_capacity(n);
    let mut devices: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut pqxdh_only: Vec<bool> = Vec::with_capacity(n);
    let mut requesters: Vec<Uuid> = Vec::with_capacity(n);
    let mut fetch_keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let window = retry_window(requests);
    for (req, request) in requests.iter().enumerate() {
        for (ord, target) in request.targets.iter().enumerate() {
            reqs.push(req as i32);
            ords.push(ord as i32);
            users.push(target.user_id);
            devices.push(target.device_id.as_ref().map(|d| d.as_str()));
            pqxdh_only.push(request.serve == Serve::PqxdhOnly);
            requesters.push(request.requester);
            fetch_keys.push(request.retry.as_ref().map(|k| k.key.as_str()));
        }
    }
    let statement = if n == 1 {
        FETCH_ONE_BUNDLE
    } else {
        FETCH_BUNDLES
    };
    let rows = sqlx::query(statement)
        .bind(&reqs)
        .bind(&ords)
        .bind(&users)
        .bind(&devices)
        .bind(&pqxdh_only)
        .bind(&requesters)
        .bind(&fetch_keys)
        .bind(window)
        .fetch_all(db.pool())
        .await?;
    let mut results: Vec<FetchResult> = requests
        .iter()
        .map(|r| vec![Vec::new(); r.targets.len()])
        .collect();
    for row in &rows {
        let row = Row::from_row(row)?;
        let one_time = row.prekey_id.zip(row.prekey_public.map(|k| k.0));
        let bundle = row
            .device
            .bundle(one_time, row.kyber.key(), row.kyber_one_time);
        results
            .get_mut(row.req as usize)
            .and_then(|r| r.get_mut(row.ord as usize))
            .ok_or_else(|| StoreError::corrupt("a fetch row for a target not asked for"))?
            .push(bundle);
    }
    // A target unanswered: not found, or fenced (a fenced database matches nothing).
    if results.iter().flatten().any(Vec::is_empty)
        && let Some(moved_to) = fence::moved_to(db.pool()).await?
    {
        return Err(StoreError::Fenced { moved_to });
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
            text[text.find("matched AS (").expect("a matched CTE")..]
                .trim_end_matches(';')
                .to_owned()
        };
        // The script has no retry window parameter: it writes the default, 600 s.
        let statement = super::FETCH_ONE_BUNDLE.replace("secs => $8", "secs => 600");
        assert_eq!(from_devices(script), from_devices(&statement));
    }
}
