//! "Each one-time prekey is handed out at most once", tested the way it can fail: many
//! concurrent fetchers spread over two servers, each with its own connection pool, on one
//! database (one PostgreSQL database, or one SQLite file), as two processes would be. One-time
//! Kyber prekeys are held to the same, with the last-resort Kyber prekey for the fetches after.

#[macro_use]
mod common;

use std::collections::HashMap;

use common::*;
use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_proto::pb;
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
                    let results = c
                        .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest { targets })
                        .await
                        .unwrap()
                        .into_inner()
                        .results;
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
