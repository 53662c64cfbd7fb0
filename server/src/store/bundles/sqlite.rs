//! The fetch on SQLite: a whole batch of requests ([`super::coalesce`]) in one write
//! transaction, so one fsync makes all their keys' consumed flags durable. For each request in
//! turn: the targets' devices with their last-resort Kyber prekeys, then the one-time prekeys
//! taken, then the one-time Kyber prekeys taken. SQLite has one writer at a time, so nothing can
//! take a key between the read and the take, each request sees the keys the ones before it
//! took, and in-process statements cost no round trips.

use std::collections::{BTreeSet, HashMap};

use keyserver_proto::wire::PublicKey;
use sqlx::FromRow;
use uuid::Uuid;

use super::coalesce::{FetchRequest, FetchResult};
use super::{DeviceRow, FetchKey, KyberRow, PublishedKyberPreKey, Serve};
use crate::store::StoreError;
use crate::store::database::{Database, Tx};
use crate::store::ids::{DeviceId, PreKeyId};
use crate::store::sql::{Json, Key, List, Uid, sql};

#[derive(FromRow)]
struct Row {
    ord: i32,
    #[sqlx(flatten)]
    device: DeviceRow,
    /// The device's last-resort Kyber prekey.
    #[sqlx(flatten)]
    last_resort: KyberRow,
}

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

pub(super) async fn fetch(
    db: &Database,
    requests: &[FetchRequest],
) -> Result<Vec<FetchResult>, StoreError> {
    let mut tx = db.begin_write().await?;
    let mut results = Vec::with_capacity(requests.len());
    for request in requests {
        results.push(fetch_one(&mut tx, request).await?);
    }
    tx.commit().await?;
    Ok(results)
}

/// One request's bundles, taking its keys in `tx`.
async fn fetch_one(tx: &mut Tx, request: &FetchRequest) -> Result<FetchResult, StoreError> {
    let FetchRequest {
        requester,
        targets,
        serve,
        retry,
    } = request;
    let targets_json = serde_json::Value::Array(
        targets
            .iter()
            .map(|t| {
                serde_json::json!([
                    t.user_id.hyphenated().to_string(),
                    t.device_id.as_ref().map(DeviceId::as_str)
                ])
            })
            .collect(),
    );
    let rows: Vec<Row> = tx
        .query(&sql!(
            "WITH targets AS (
                 SELECT CAST(t.key AS INTEGER) AS ord,
                        json_extract(t.value, '$[0]') AS user_id,
                        json_extract(t.value, '$[1]') AS device_id
                 FROM json_each($1) t
             )
             SELECT t.ord, ik.device_id, COALESCE(ik.registration_id, 0) AS registration_id,
                    ik.identity_key_public, sp.signed_prekey_id, sp.signed_prekey_public,
                    sp.signature, sp.rotation_date, lr.kyber_prekey_id, lr.kyber_prekey_public,
                    lr.signature AS kyber_signature
             FROM targets t
             JOIN nchat_identity_keys ik
               ON ik.user_id = t.user_id AND (t.device_id IS NULL OR ik.device_id = t.device_id)
             JOIN nchat_signed_prekeys sp ON sp.device_id = ik.device_id AND sp.is_active = TRUE
             LEFT JOIN nchat_kyber_prekeys lr
               ON lr.device_id = ik.device_id AND lr.is_last_resort = TRUE AND lr.is_active = TRUE
             WHERE NOT $2 OR lr.id IS NOT NULL
             ORDER BY t.ord, ik.device_id"
        ))
        .bind(Json(targets_json))
        .bind(*serve == Serve::PqxdhOnly)
        .fetch_all()
        .await?;

    // Each device once, however many targets name it: one key per device per call. Only a
    // device with a last-resort Kyber prekey can hold one-time ones (uploads need it), so
    // bundles of devices without Kyber keys cost no Kyber statement.
    let distinct = |with_kyber: bool| -> Vec<String> {
        let ids = rows
            .iter()
            .filter(|r| !with_kyber || r.last_resort.kyber_prekey_id.is_some())
            .map(|r| r.device.device_id.to_string());
        ids.collect::<BTreeSet<_>>().into_iter().collect()
    };
    let (mut devices, mut kyber_devices) = (distinct(false), distinct(true));
    // A retry: the devices its user took keys of with the same key get them again, and no more.
    let (again, kyber_again) = match retry {
        Some(retry) => taken_before(tx, *requester, retry, &devices).await?,
        None => Default::default(),
    };
    let replayed = |d: &String| {
        again
            .keys()
            .chain(kyber_again.keys())
            .any(|r| r.as_str() == d)
    };
    devices.retain(|d| !replayed(d));
    kyber_devices.retain(|d| !replayed(d));
    let fetch_key = retry.as_ref().map(|r| r.key.as_str());
    let mut taken: HashMap<DeviceId, (PreKeyId, PublicKey)> = tx
        .query(&sql!(
            "UPDATE nchat_one_time_prekeys SET is_consumed = TRUE, consumed_at = " NOW ",
                 consumed_by = $2, fetch_key = $3
             WHERE id IN (
                 SELECT (SELECT o.id FROM nchat_one_time_prekeys o
                         WHERE o.device_id = d.value AND o.is_consumed = FALSE
                         ORDER BY o.id LIMIT 1)
                 FROM json_each($1) d
             ) AND is_consumed = FALSE
             RETURNING device_id, prekey_id, prekey_public"
        ))
        .bind(List(devices))
        .bind(Uid(*requester))
        .bind(fetch_key)
        .fetch_all::<Taken>()
        .await?
        .into_iter()
        .map(|t| (t.device_id, (t.prekey_id, t.prekey_public.0)))
        .collect();
    let mut kyber_taken: HashMap<DeviceId, PublishedKyberPreKey> = if kyber_devices.is_empty() {
        HashMap::new()
    } else {
        tx.query(&sql!(
            "UPDATE nchat_kyber_prekeys SET is_consumed = TRUE, consumed_at = " NOW ",
                 consumed_by = $2, fetch_key = $3
             WHERE id IN (
                 SELECT (SELECT q.id FROM nchat_kyber_prekeys q
                         WHERE q.device_id = d.value AND q.is_last_resort = FALSE
                           AND q.is_consumed = FALSE
                         ORDER BY q.id LIMIT 1)
                 FROM json_each($1) d
             ) AND is_consumed = FALSE
             RETURNING device_id, kyber_prekey_id, kyber_prekey_public,
                       signature AS kyber_signature"
        ))
        .bind(List(kyber_devices))
        .bind(Uid(*requester))
        .bind(fetch_key)
        .fetch_all::<KyberTaken>()
        .await?
        .into_iter()
        .filter_map(|t| Some((t.device_id, t.key.key()?)))
        .collect()
    };
    taken.extend(again);
    kyber_taken.extend(kyber_again);

    let mut results = vec![Vec::new(); targets.len()];
    for row in rows {
        let one_time = taken.get(&row.device.device_id).copied();
        // A device named by several targets: the key taken for it goes to each of them.
        let (kyber, kyber_one_time) = match kyber_taken.get(&row.device.device_id) {
            Some(taken) => (Some(taken.clone()), true),
            None => (row.last_resort.key(), false),
        };
        results[row.ord as usize].push(row.device.bundle(one_time, kyber, kyber_one_time));
    }
    Ok(results)
}

/// The keys of `devices` that `requester` took with `retry`'s key within its window, the first
/// of each device (one fetch takes one of each kind).
async fn taken_before(
    tx: &mut Tx,
    requester: Uuid,
    retry: &FetchKey,
    devices: &[String],
) -> Result<
    (
        HashMap<DeviceId, (PreKeyId, PublicKey)>,
        HashMap<DeviceId, PublishedKyberPreKey>,
    ),
    StoreError,
> {
    // SQLite's time modifier, so the cutoff is computed as NOW writes times.
    let since = format!("-{:.3} seconds", retry.window.as_secs_f64());
    let mut again = HashMap::new();
    let rows: Vec<Taken> = tx
        .query(&sql!(
            "SELECT device_id, prekey_id, prekey_public FROM nchat_one_time_prekeys
             WHERE fetch_key = $1 AND consumed_by = $2 AND is_consumed = TRUE
               AND consumed_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $3)
               AND device_id" IN_LIST("$4") "
             ORDER BY id"
        ))
        .bind(retry.key.as_str())
        .bind(Uid(requester))
        .bind(since.as_str())
        .bind(List(devices.to_vec()))
        .fetch_all()
        .await?;
    for t in rows {
        again
            .entry(t.device_id)
            .or_insert((t.prekey_id, t.prekey_public.0));
    }
    let mut kyber_again = HashMap::new();
    let rows: Vec<KyberTaken> = tx
        .query(&sql!(
            "SELECT device_id, kyber_prekey_id, kyber_prekey_public, signature AS kyber_signature
             FROM nchat_kyber_prekeys
             WHERE fetch_key = $1 AND consumed_by = $2 AND is_consumed = TRUE
               AND consumed_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', $3)
               AND device_id" IN_LIST("$4") "
             ORDER BY id"
        ))
        .bind(retry.key.as_str())
        .bind(Uid(requester))
        .bind(since.as_str())
        .bind(List(devices.to_vec()))
        .fetch_all()
        .await?;
    for t in rows {
        if let Some(key) = t.key.key() {
            kyber_again.entry(t.device_id).or_insert(key);
        }
    }
    Ok((again, kyber_again))
}
