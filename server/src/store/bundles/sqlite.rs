//! The fetch on SQLite: a whole batch of requests ([`super::coalesce`]) in one write
//! transaction, so one fsync makes all their keys' consumed flags durable, and in a handful of
//! statements for the whole batch rather than a few per request: sqlx runs a SQLite connection
//! on a thread of its own, so every statement costs two thread wake-ups, which profiled as most
//! of the server's time when each request ran its own.
//!
//! The statements, as on PostgreSQL ([`super::postgres`]) but read and written apart, which
//! SQLite's single writer makes atomic: every target's devices with their last-resort Kyber
//! prekeys; for requests with an idempotency key, the keys their user took with it before; and
//! per kind of key, one update taking the oldest unconsumed key of every device wanted (one
//! more for each further request of the batch naming a device already served: the k-th key of
//! a device goes to the k-th request naming it).
//!
//! Flags are compared with 0 and 1, not FALSE and TRUE: SQLite uses a partial index only for a
//! query term written as the index's own condition is (`is_consumed = 0`), and with `= FALSE`
//! it read every key row of a device, consumed ones included, to find the next unconsumed one.

use std::collections::{HashMap, HashSet, VecDeque};

use keyserver_proto::wire::PublicKey;
use serde_json::{Value, json};
use sqlx::FromRow;

use super::coalesce::{FetchRequest, FetchResult, retry_window};
use super::{DeviceRow, KyberRow, PublishedKyberPreKey, Serve};
use crate::store::StoreError;
use crate::store::database::{Database, Tx};
use crate::store::ids::{DeviceId, PreKeyId};
use crate::store::sql::{Decoded, Json, Key, Sql, sql};

#[derive(FromRow)]
struct Row {
    req: i64,
    ord: i64,
    #[sqlx(flatten)]
    device: DeviceRow,
    /// The device's last-resort Kyber prekey.
    #[sqlx(flatten)]
    last_resort: KyberRow,
}

/// A one-time prekey taken.
#[derive(FromRow)]
struct Taken {
    device_id: DeviceId,
    prekey_id: PreKeyId,
    prekey_public: Key,
}

#[derive(FromRow)]
struct KyberTaken {
    device_id: DeviceId,
    #[sqlx(flatten)]
    key: KyberRow,
}

/// A key a request of the batch took before, with the same idempotency key.
#[derive(FromRow)]
struct Again {
    req: i64,
    #[sqlx(flatten)]
    key: Taken,
}

#[derive(FromRow)]
struct KyberAgain {
    req: i64,
    #[sqlx(flatten)]
    key: KyberTaken,
}

/// A (request, device) pair's keys.
type Served<T> = HashMap<(usize, DeviceId), T>;

/// Takes each device's oldest unconsumed one-time prekey, `$1` a JSON array of [device id,
/// requester, idempotency key or null], recording the requester and key on it.
const TAKE: Sql = sql!(
    "UPDATE nchat_one_time_prekeys SET is_consumed = TRUE, consumed_at = " NOW ",
         consumed_by = json_extract(g.value, '$[1]'), fetch_key = json_extract(g.value, '$[2]')
     FROM json_each($1) g
     WHERE nchat_one_time_prekeys.id = (
         SELECT o.id FROM nchat_one_time_prekeys o
         WHERE o.device_id = json_extract(g.value, '$[0]') AND o.is_consumed = 0
         ORDER BY o.id LIMIT 1)
     RETURNING device_id, prekey_id, prekey_public"
);

const KYBER_TAKE: Sql = sql!(
    "UPDATE nchat_kyber_prekeys SET is_consumed = TRUE, consumed_at = " NOW ",
         consumed_by = json_extract(g.value, '$[1]'), fetch_key = json_extract(g.value, '$[2]')
     FROM json_each($1) g
     WHERE nchat_kyber_prekeys.id = (
         SELECT q.id FROM nchat_kyber_prekeys q
         WHERE q.device_id = json_extract(g.value, '$[0]') AND q.is_last_resort = 0
           AND q.is_consumed = 0
         ORDER BY q.id LIMIT 1)
     RETURNING device_id, kyber_prekey_id, kyber_prekey_public, signature AS kyber_signature"
);

/// The keys each (request, device) of `$1` (a JSON array of [request, device id, idempotency
/// key, requester]) took with the same key by the same user since `$2` (SQLite's time modifier,
/// so the cutoff is computed as NOW writes times), oldest first.
const AGAIN: Sql = sql!(
    "SELECT CAST(json_extract(a.value, '$[0]') AS INTEGER) AS req, o.device_id, o.prekey_id,
            o.prekey_public
     FROM json_each($1) a
     JOIN nchat_one_time_prekeys o
       ON o.device_id = json_extract(a.value, '$[1]') AND o.fetch_key IS NOT NULL
      AND o.fetch_key = json_extract(a.value, '$[2]')
      AND o.consumed_by = json_extract(a.value, '$[3]') AND o.is_consumed = 1
      AND o.consumed_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $2)
     ORDER BY o.id"
);

const KYBER_AGAIN: Sql = sql!(
    "SELECT CAST(json_extract(a.value, '$[0]') AS INTEGER) AS req, q.device_id,
            q.kyber_prekey_id, q.kyber_prekey_public, q.signature AS kyber_signature
     FROM json_each($1) a
     JOIN nchat_kyber_prekeys q
       ON q.device_id = json_extract(a.value, '$[1]') AND q.fetch_key IS NOT NULL
      AND q.fetch_key = json_extract(a.value, '$[2]')
      AND q.consumed_by = json_extract(a.value, '$[3]') AND q.is_consumed = 1
      AND q.consumed_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $2)
     ORDER BY q.id"
);

pub(super) async fn fetch(
    db: &Database,
    requests: &[FetchRequest],
) -> Result<Vec<FetchResult>, StoreError> {
    let targets = requests
        .iter()
        .enumerate()
        .flat_map(|(req, r)| {
            r.targets.iter().enumerate().map(move |(ord, t)| {
                json!([
                    req,
                    ord,
                    t.user_id.hyphenated().to_string(),
                    t.device_id.as_ref().map(DeviceId::as_str),
                    r.serve == Serve::PqxdhOnly
                ])
            })
        })
        .collect();
    let mut tx = db.begin_write().await?;
    let rows: Vec<Row> = tx
        .query(&sql!(
            "WITH targets AS (
                 SELECT json_extract(t.value, '$[0]') AS req, json_extract(t.value, '$[1]') AS ord,
                        json_extract(t.value, '$[2]') AS user_id,
                        json_extract(t.value, '$[3]') AS device_id,
                        json_extract(t.value, '$[4]') AS pqxdh_only
                 FROM json_each($1) t
             )
             SELECT t.req, t.ord, ik.device_id,
                    COALESCE(ik.registration_id, 0) AS registration_id, ik.identity_key_public,
                    sp.signed_prekey_id, sp.signed_prekey_public, sp.signature, sp.rotation_date,
                    lr.kyber_prekey_id, lr.kyber_prekey_public, lr.signature AS kyber_signature
             FROM targets t
             JOIN nchat_identity_keys ik
               ON ik.user_id = t.user_id AND (t.device_id IS NULL OR ik.device_id = t.device_id)
             JOIN nchat_signed_prekeys sp ON sp.device_id = ik.device_id AND sp.is_active = 1
             LEFT JOIN nchat_kyber_prekeys lr
               ON lr.device_id = ik.device_id AND lr.is_last_resort = 1 AND lr.is_active = 1
             WHERE NOT t.pqxdh_only OR lr.id IS NOT NULL
             ORDER BY t.req, t.ord, ik.device_id"
        ))
        .bind(Json(Value::Array(targets)))
        .fetch_all()
        .await?;

    // Each (request, device) once, however many of the request's targets name the device: one
    // key of a kind per device per request. Only a device with a last-resort Kyber prekey can
    // hold one-time ones (uploads need it), so the others want no Kyber key.
    let mut seen = HashSet::new();
    let asks: Vec<(usize, &DeviceId, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.req as usize,
                &r.device.device_id,
                r.last_resort.kyber_prekey_id.is_some(),
            )
        })
        .filter(|&(req, device, _)| seen.insert((req, device)))
        .collect();
    let (again, kyber_again) = taken_before(&mut tx, requests, &asks).await?;
    // A retry takes nothing: the pair got its keys again. The rest, in request order.
    let wants: Vec<_> = asks
        .into_iter()
        .filter(|&(req, device, _)| {
            let pair = (req, device.clone());
            !again.contains_key(&pair) && !kyber_again.contains_key(&pair)
        })
        .collect();
    let ec_wants: Vec<_> = wants
        .iter()
        .map(|&(req, device, _)| (req, device))
        .collect();
    let kyber_wants: Vec<_> = wants
        .iter()
        .filter(|&&(_, _, kyber)| kyber)
        .map(|&(req, device, _)| (req, device))
        .collect();

    let mut taken: Served<(PreKeyId, PublicKey)> = again;
    let device: fn(&Taken) -> &DeviceId = |t| &t.device_id;
    for (req, t) in take(&mut tx, &TAKE, requests, &ec_wants, device).await? {
        taken.insert((req, t.device_id), (t.prekey_id, t.prekey_public.0));
    }
    let mut kyber_taken: Served<PublishedKyberPreKey> = kyber_again;
    let device: fn(&KyberTaken) -> &DeviceId = |t| &t.device_id;
    for (req, t) in take(&mut tx, &KYBER_TAKE, requests, &kyber_wants, device).await? {
        if let Some(key) = t.key.key() {
            kyber_taken.insert((req, t.device_id), key);
        }
    }
    tx.commit().await?;

    let mut results: Vec<FetchResult> = requests
        .iter()
        .map(|r| vec![Vec::new(); r.targets.len()])
        .collect();
    for row in rows {
        let (req, ord) = (row.req as usize, row.ord as usize);
        let pair = (req, row.device.device_id.clone());
        let one_time = taken.get(&pair).copied();
        // A device named by several targets of a request: its keys go to each of them.
        let (kyber, kyber_one_time) = match kyber_taken.get(&pair) {
            Some(taken) => (Some(taken.clone()), true),
            None => (row.last_resort.key(), false),
        };
        results
            .get_mut(req)
            .and_then(|r| r.get_mut(ord))
            .ok_or_else(|| StoreError::corrupt("a fetch row for a target not asked for"))?
            .push(row.device.bundle(one_time, kyber, kyber_one_time));
    }
    Ok(results)
}

/// Takes keys for `wants` in rounds, each round one key of every device still wanted, by one
/// statement: the k-th round serves each device's k-th request in `wants`, so a device's k-th
/// oldest key goes to the k-th request naming it, and a device short of keys serves the
/// requests that come first. One round in all unless a device is wanted by several requests of
/// the batch.
async fn take<T: Decoded>(
    tx: &mut Tx,
    take: &Sql,
    requests: &[FetchRequest],
    wants: &[(usize, &DeviceId)],
    device_of: fn(&T) -> &DeviceId,
) -> Result<Vec<(usize, T)>, StoreError> {
    let mut queues: HashMap<&DeviceId, VecDeque<usize>> = HashMap::new();
    for &(req, device) in wants {
        queues.entry(device).or_default().push_back(req);
    }
    let mut taken = Vec::new();
    while !queues.is_empty() {
        let round: HashMap<&DeviceId, usize> = queues
            .iter_mut()
            .filter_map(|(&device, reqs)| Some((device, reqs.pop_front()?)))
            .collect();
        let grants = round
            .iter()
            .map(|(device, &req)| {
                let r = &requests[req];
                json!([
                    device.as_str(),
                    r.requester.hyphenated().to_string(),
                    r.retry.as_ref().map(|k| k.key.as_str())
                ])
            })
            .collect();
        let rows: Vec<T> = tx
            .query(take)
            .bind(Json(Value::Array(grants)))
            .fetch_all()
            .await?;
        // A device with no key left this round has none for its later requests either.
        let mut served = HashSet::new();
        for row in rows {
            let device = device_of(&row);
            let req = *round
                .get(device)
                .ok_or_else(|| StoreError::corrupt("a key taken for a device not asked for"))?;
            served.insert(device.clone());
            taken.push((req, row));
        }
        queues.retain(|device, reqs| !reqs.is_empty() && served.contains(*device));
    }
    Ok(taken)
}

/// For the pairs of `asks` whose request carries an idempotency key: the keys the request's
/// user took with the same key within its window, the first of each device (one fetch takes
/// one of each kind).
async fn taken_before(
    tx: &mut Tx,
    requests: &[FetchRequest],
    asks: &[(usize, &DeviceId, bool)],
) -> Result<(Served<(PreKeyId, PublicKey)>, Served<PublishedKyberPreKey>), StoreError> {
    let keyed: Vec<Value> = asks
        .iter()
        .filter_map(|&(req, device, _)| {
            let r = &requests[req];
            let key = r.retry.as_ref()?;
            Some(json!([
                req,
                device.as_str(),
                key.key,
                r.requester.hyphenated().to_string()
            ]))
        })
        .collect();
    if keyed.is_empty() {
        return Ok(Default::default());
    }
    let window = retry_window(requests);
    let since = format!("-{window:.3} seconds");
    let keyed = Json(Value::Array(keyed));
    let mut again = HashMap::new();
    let rows: Vec<Again> = tx
        .query(&AGAIN)
        .bind(keyed.clone())
        .bind(since.as_str())
        .fetch_all()
        .await?;
    for Again { req, key: t } in rows {
        again
            .entry((req as usize, t.device_id))
            .or_insert((t.prekey_id, t.prekey_public.0));
    }
    let mut kyber_again = HashMap::new();
    let rows: Vec<KyberAgain> = tx
        .query(&KYBER_AGAIN)
        .bind(keyed)
        .bind(since.as_str())
        .fetch_all()
        .await?;
    for KyberAgain { req, key: t } in rows {
        if let Some(key) = t.key.key() {
            kyber_again
                .entry((req as usize, t.device_id))
                .or_insert(key);
        }
    }
    Ok((again, kyber_again))
}
