//! "Each one-time prekey is handed out at most once", tested the way it can fail: many
//! concurrent fetchers spread over two servers, each with its own connection pool, on one
//! database (one PostgreSQL database, or one SQLite file), as two processes would be. One-time
//! Kyber prekeys are held to the same, with the last-resort Kyber prekey for the fetches after.
//! Fetches of one process go to the database in batches (`store::bundles::coalesce`): the
//! tests below drive batches hard (a hot device, single and bulk fetches mixed, a batch that
//! fails on the database).

#[macro_use]
mod common;

use std::collections::HashMap;

use common::*;
use keyserver::store::{BundleTarget, DeviceId, KeyId, Serve, StoreError};
use keyserver::testing::{Backend, TestConfig, TestDb, TestServer};
use keyserver_proto::pb;
use tonic::Code;
use uuid::Uuid;

const PREKEYS: u32 = 50;
const FETCHERS: usize = 32;
const FETCHES_EACH: usize = 4;

/// Counts how often each key id was served, and how many bundles came without one.
fn tally(served: Vec<Option<u32>>) -> (HashMap<u32, usize>, usize) {
    let mut times = HashMap::new();
    let mut without = 0;
    for key in served {
        match key {
            Some(id) => *times.entry(id).or_insert(0) += 1,
            None => without += 1,
        }
    }
    (times, without)
}

async fn thirty_two_fetchers_on_two_servers_get_each_of_fifty_prekeys_exactly_once(
    backend: Backend,
) {
    let db = TestDb::migrated(backend).await;
    let servers = [TestServer::start(&db).await, TestServer::start(&db).await];
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", PREKEYS);
    bob.client(&servers[0])
        .await
        .register_device(bob.register_request())
        .await
        .unwrap();

    let start = std::sync::Arc::new(tokio::sync::Barrier::new(FETCHERS));
    let mut tasks = Vec::new();
    for i in 0..FETCHERS {
        let mut c = client(&servers[i % 2], Uuid::new_v4()).await;
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut got = Vec::new();
            for _ in 0..FETCHES_EACH {
                let bundle = fetch(&mut c, bob.user, Some("bob-phone")).await.unwrap();
                got.push(bundle.devices[0].one_time_prekey.as_ref().map(|k| k.key_id));
            }
            got
        }));
    }
    let mut served = Vec::new();
    for task in tasks {
        served.extend(task.await.unwrap());
    }
    let (times, without) = tally(served);
    assert_eq!(times.len(), PREKEYS as usize, "every prekey was handed out");
    assert!(
        times.values().all(|&n| n == 1),
        "a prekey was served twice: {times:?}"
    );
    assert_eq!(without, FETCHERS * FETCHES_EACH - PREKEYS as usize);
    let consumed = servers[0]
        .db
        .count("SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed AND consumed_at IS NOT NULL")
        .await;
    assert_eq!(consumed, i64::from(PREKEYS));
}

async fn concurrent_bulk_and_single_fetches_never_share_a_prekey(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let servers = [TestServer::start(&db).await, TestServer::start(&db).await];
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, user) in users.iter().enumerate() {
        for d in 0..2 {
            let device = TestDevice::new(*user, &format!("u{i}-d{d}"), 20);
            let mut c = device.client(&servers[0]).await;
            c.register_device(device.register_request()).await.unwrap();
        }
    }
    let mut tasks = Vec::new();
    for i in 0..24 {
        let mut c = client(&servers[i % 2], Uuid::new_v4()).await;
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for round in 0..5 {
                if (i + round) % 2 == 0 {
                    let targets = users.iter().map(|u| target(*u, None)).collect();
                    let results = fetch_bulk(&mut c, targets, "").await.unwrap();
                    for d in results.into_iter().flat_map(|r| r.devices) {
                        got.push(d.one_time_prekey.map(|k| (d.device_id.clone(), k.key_id)));
                    }
                } else {
                    let user = users[(i + round) % users.len()];
                    for d in fetch(&mut c, user, None).await.unwrap().devices {
                        got.push(d.one_time_prekey.map(|k| (d.device_id.clone(), k.key_id)));
                    }
                }
            }
            got
        }));
    }
    let mut times: HashMap<(String, u32), usize> = HashMap::new();
    let mut without = 0;
    for task in tasks {
        for key in task.await.unwrap() {
            match key {
                Some(k) => *times.entry(k).or_insert(0) += 1,
                None => without += 1,
            }
        }
    }
    assert!(times.values().all(|&n| n == 1), "a prekey was served twice");
    assert_eq!(times.len(), 6 * 20, "all 120 prekeys were handed out");
    assert!(without > 0);
}

/// The Kyber twin of the test above: a device with 50 one-time Kyber prekeys (and 50 one-time
/// EC prekeys) under 32 fetchers on two servers. Each one-time key of either kind is served
/// once; every other bundle carries the last-resort Kyber key; none comes without a Kyber key.
async fn thirty_two_fetchers_get_each_of_fifty_kyber_prekeys_once_then_the_last_resort_key(
    backend: Backend,
) {
    let db = TestDb::migrated(backend).await;
    let servers = [TestServer::start(&db).await, TestServer::start(&db).await];
    let bob = TestDevice::pqxdh(Uuid::new_v4(), "bob-phone", PREKEYS, PREKEYS);
    bob.client(&servers[0])
        .await
        .register_device(bob.register_request())
        .await
        .unwrap();

    let start = std::sync::Arc::new(tokio::sync::Barrier::new(FETCHERS));
    let mut tasks = Vec::new();
    for i in 0..FETCHERS {
        let mut c = client(&servers[i % 2], Uuid::new_v4()).await;
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut got = Vec::new();
            for _ in 0..FETCHES_EACH {
                let mut bundle = fetch(&mut c, bob.user, Some("bob-phone")).await.unwrap();
                let bundle = bundle.devices.remove(0);
                let kyber = bundle
                    .kyber_prekey
                    .expect("every bundle has a Kyber prekey");
                got.push((bundle.one_time_prekey.map(|k| k.key_id), kyber.key_id));
            }
            got
        }));
    }
    let mut one_time = Vec::new();
    let mut kyber = Vec::new();
    for task in tasks {
        for (ec, k) in task.await.unwrap() {
            one_time.push(ec);
            kyber.push((k != LAST_RESORT_ID).then_some(k));
        }
    }
    let (times, _) = tally(one_time);
    assert!(
        times.values().all(|&n| n == 1),
        "an EC prekey was served twice"
    );
    let (times, last_resort) = tally(kyber);
    assert_eq!(
        times.len(),
        PREKEYS as usize,
        "every Kyber prekey was handed out"
    );
    assert!(
        times.values().all(|&n| n == 1),
        "a one-time Kyber prekey was served twice: {times:?}"
    );
    assert_eq!(last_resort, FETCHERS * FETCHES_EACH - PREKEYS as usize);
    let consumed = servers[0]
        .db
        .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE is_consumed AND consumed_at IS NOT NULL")
        .await;
    assert_eq!(consumed, i64::from(PREKEYS));
}

conformance!(multi_thread; thirty_two_fetchers_on_two_servers_get_each_of_fifty_prekeys_exactly_once);
conformance!(multi_thread; thirty_two_fetchers_get_each_of_fifty_kyber_prekeys_once_then_the_last_resort_key);
conformance!(multi_thread; concurrent_bulk_and_single_fetches_never_share_a_prekey);

/// A server that runs one fetch batch at a time, so concurrent fetches queue and go to the
/// database together.
async fn batching_server(db: &TestDb) -> TestServer {
    let config = TestConfig {
        fetch_batches: 1,
        ..TestConfig::default()
    };
    TestServer::start_with(db, config).await
}

/// A registered device "bob-phone" with 20 one-time prekeys on a batching server, and the
/// target naming it.
async fn bob_on_a_batching_server(db: &TestDb) -> (TestServer, [BundleTarget; 1]) {
    let server = batching_server(db).await;
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", 20);
    bob.register(&server).await;
    let target = [BundleTarget {
        user_id: bob.user,
        device_id: Some(DeviceId::parse("bob-phone").unwrap()),
    }];
    (server, target)
}

/// 96 callers fetch one PQXDH device with 100 one-time keys of each kind, three times each,
/// through two servers that batch, half of the calls single fetches and half bulk fetches
/// naming the device twice (by its user and by its id) beside another user's device. Each key
/// is served once and all of them are; a bulk call's two results for the device carry one key;
/// the batches really held several calls.
async fn a_hot_device_in_batches_of_single_and_bulk_fetches_serves_each_key_once(backend: Backend) {
    const KEYS: u32 = 100;
    const CALLERS: usize = 96;
    const CALLS_EACH: usize = 3;
    let db = TestDb::migrated(backend).await;
    let servers = [batching_server(&db).await, batching_server(&db).await];
    let hot = TestDevice::pqxdh(Uuid::new_v4(), "hot-phone", KEYS, KEYS);
    hot.register(&servers[0]).await;
    let other = TestDevice::new(Uuid::new_v4(), "other-phone", KEYS);
    other.register(&servers[1]).await;

    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for i in 0..CALLERS {
        let mut c = client(&servers[i % 2], Uuid::new_v4()).await;
        let (start, hot_user, other_user) = (start.clone(), hot.user, other.user);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            // (EC key, Kyber key) of each bundle of the hot device; the other device's EC keys.
            let (mut got, mut other) = (Vec::new(), Vec::new());
            let key = |d: &pb::DevicePreKeyBundle| {
                (
                    d.one_time_prekey.as_ref().map(|k| k.key_id),
                    d.kyber_prekey.as_ref().expect("a Kyber prekey").key_id,
                )
            };
            for call in 0..CALLS_EACH {
                if (i + call) % 2 == 0 {
                    let bundle = fetch(&mut c, hot_user, Some("hot-phone")).await.unwrap();
                    got.push(key(&bundle.devices[0]));
                    continue;
                }
                let targets = vec![
                    target(hot_user, None),
                    target(other_user, None),
                    target(hot_user, Some("hot-phone")),
                ];
                let results = fetch_bulk(&mut c, targets, "").await.unwrap();
                let (by_user, by_id) = (key(&results[0].devices[0]), key(&results[2].devices[0]));
                assert_eq!(by_user, by_id, "one call got two keys of one device");
                other.push(
                    results[1].devices[0]
                        .one_time_prekey
                        .as_ref()
                        .map(|k| k.key_id),
                );
                got.push(by_user);
            }
            (got, other)
        }));
    }
    let (mut ec, mut kyber, mut other_ec) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let (got, other) = task.await.unwrap();
        for (e, k) in got {
            ec.push(e);
            kyber.push((k != LAST_RESORT_ID).then_some(k));
        }
        other_ec.extend(other);
    }
    let calls = CALLERS * CALLS_EACH;
    let bulk_calls = other_ec.len();
    for (kind, served, calls) in [
        ("EC", ec, calls),
        ("Kyber", kyber, calls),
        ("other device's EC", other_ec, bulk_calls),
    ] {
        let (times, without) = tally(served);
        assert!(
            times.values().all(|&n| n == 1),
            "a one-time {kind} prekey was served twice: {times:?}"
        );
        assert_eq!(times.len(), KEYS as usize, "every {kind} prekey was served");
        assert_eq!(without, calls - KEYS as usize);
    }
    let (batches, requests): (u64, u64) = servers
        .iter()
        .map(|s| s.store.fetch_batches_sent())
        .fold((0, 0), |(b, r), (sb, sr)| (b + sb, r + sr));
    assert_eq!(requests, calls as u64);
    assert!(
        batches < requests,
        "no fetches were batched: {batches} batches for {requests} calls"
    );
}

/// Makes the database refuse to hand a one-time prekey to `user`: any statement that tries
/// fails, and with it the whole batch it is in.
async fn poison_fetches_by(server: &TestServer, user: Uuid) {
    server
        .db
        .execute_either(
            &format!(
                "CREATE FUNCTION refuse_fetch() RETURNS trigger AS $$
                 BEGIN RAISE EXCEPTION 'a poisoned fetch'; END $$ LANGUAGE plpgsql;
                 CREATE TRIGGER refuse_fetch BEFORE UPDATE ON nchat_one_time_prekeys
                 FOR EACH ROW WHEN (NEW.consumed_by = '{user}') EXECUTE FUNCTION refuse_fetch()"
            ),
            &format!(
                "CREATE TRIGGER refuse_fetch BEFORE UPDATE ON nchat_one_time_prekeys
                 WHEN NEW.consumed_by = '{user}'
                 BEGIN SELECT RAISE(ABORT, 'a poisoned fetch'); END"
            ),
        )
        .await;
}

/// Waits until a failed fetch's row locks are gone. PostgreSQL sends a statement's error before
/// its rollback releases them, so a fetch right after it could skip the failed one's keys as
/// locked (taking them later), and the exact key order these tests assert would not hold.
async fn rolled_back(server: &TestServer, backend: Backend) {
    if backend == Backend::Postgres {
        let locking = "SELECT count(*) FROM (SELECT id FROM nchat_one_time_prekeys FOR UPDATE) k";
        assert!(server.db.count(locking).await > 0);
    }
}

/// A batch the database refuses answers every call in it with the error and takes nothing;
/// the batches before and after it are served, in queue order, and no key is lost.
async fn a_batch_that_fails_answers_each_call_with_the_error_and_takes_nothing(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let (server, target) = bob_on_a_batching_server(&db).await;
    let bob_user = target[0].user_id;
    let mallory = Uuid::new_v4();
    poison_fetches_by(&server, mallory).await;
    // Through the API: the refused fetch is INTERNAL (not worth retrying) and takes nothing.
    let mut m = client(&server, mallory).await;
    assert_eq!(
        fetch(&mut m, bob_user, Some("bob-phone"))
            .await
            .unwrap_err()
            .code(),
        Code::Internal
    );
    rolled_back(&server, backend).await;

    // On this test's runtime thread the batch task cannot start before every call is queued:
    // the first call goes alone, the other seven together, mallory's among them.
    let store = server.store.clone();
    let callers: Vec<Uuid> = (0..8)
        .map(|i| if i == 5 { mallory } else { Uuid::new_v4() })
        .collect();
    let outcomes = futures::future::join_all(
        callers
            .iter()
            .map(|user| store.fetch_bundles(*user, &target, Serve::Mixed, None)),
    )
    .await;
    let first = outcomes[0].as_ref().expect("the first batch is served");
    assert_eq!(first[0][0].one_time_prekey.map(|(id, _)| id.get()), Some(1));
    for outcome in &outcomes[1..] {
        assert!(
            matches!(outcome, Err(StoreError::Internal(why)) if why.contains("a poisoned fetch")),
            "{outcome:?}"
        );
    }
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed")
            .await,
        1,
        "the failed batch took no key"
    );
    rolled_back(&server, backend).await;
    // The next calls get the keys after the first, in queue order.
    let again = futures::future::join_all(
        callers[1..]
            .iter()
            .filter(|u| **u != mallory)
            .map(|user| store.fetch_bundles(*user, &target, Serve::Mixed, None)),
    )
    .await;
    let ids: Vec<u32> = again
        .into_iter()
        .map(|r| r.unwrap()[0][0].one_time_prekey.expect("a key").0.get())
        .collect();
    assert_eq!(ids, [2, 3, 4, 5, 6, 7]);
    assert_eq!(store.fetch_batches_sent(), (5, 15));
}

/// The database connection dies while a batch runs (PostgreSQL terminates its backend): every
/// call of the batch is UNAVAILABLE, no key is taken, and the next calls are served on a new
/// connection without a restart.
#[tokio::test]
async fn a_batch_whose_connection_dies_is_unavailable_and_the_next_is_served() {
    let db = TestDb::migrated(Backend::Postgres).await;
    let (server, target) = bob_on_a_batching_server(&db).await;
    // A slow first key: the statement that takes it sleeps in the database.
    let slow = Uuid::new_v4();
    server
        .db
        .execute(&format!(
            "CREATE FUNCTION slow_fetch() RETURNS trigger AS $$
             BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER slow_fetch BEFORE UPDATE ON nchat_one_time_prekeys
             FOR EACH ROW WHEN (NEW.consumed_by = '{slow}') EXECUTE FUNCTION slow_fetch()"
        ))
        .await;
    let store = server.store.clone();
    let callers: Vec<Uuid> = std::iter::once(slow)
        .chain((0..5).map(|_| Uuid::new_v4()))
        .collect();
    // The first call runs alone and sleeps; the other five queue behind it. Terminating the
    // sleeping backend fails the first batch; the second then runs on a new connection.
    let killer = {
        let db = server.db.clone();
        tokio::spawn(async move {
            loop {
                let killed = db
                    .integer(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                         WHERE wait_event = 'PgSleep' AND query LIKE '%WITH targets%'",
                    )
                    .await;
                if killed > Some(0) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    };
    let outcomes = futures::future::join_all(
        callers
            .iter()
            .map(|user| store.fetch_bundles(*user, &target, Serve::Mixed, None)),
    )
    .await;
    killer.await.unwrap();
    assert!(
        matches!(&outcomes[0], Err(StoreError::Unavailable(_))),
        "{:?}",
        outcomes[0]
    );
    let ids: Vec<u32> = outcomes[1..]
        .iter()
        .map(|r| {
            r.as_ref().unwrap()[0][0]
                .one_time_prekey
                .expect("a key")
                .0
                .get()
        })
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "the killed batch took no key");
    assert_eq!(store.fetch_batches_sent(), (2, 6));
}

conformance!(multi_thread; a_hot_device_in_batches_of_single_and_bulk_fetches_serves_each_key_once);
conformance!(a_batch_that_fails_answers_each_call_with_the_error_and_takes_nothing);
