//! Rate limits, quotas and squatting, tested the way they can fail: a drain from one
//! requester, bulk and all-device fetches, two servers sharing one Redis (and, to show the
//! test can fail, two that do not), Redis killed under both failure modes, refills on a clock
//! the test moves, and writes past their limits. Every refused call is checked to have taken
//! no key and stored nothing.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use keyserver::clock::{Clock, ManualClock};
use keyserver::config::LimitArgs;
use keyserver::testing::{Backend, PrivateRedis, TestConfig, TestDb, TestServer, shared_redis_url};
use keyserver_proto::pb;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

const TEN_MINUTES: Duration = Duration::from_secs(600);

/// Signal's fetch limit (6, one more every 10 minutes) and nothing else.
fn fetch_limits() -> LimitArgs {
    LimitArgs {
        fetch_burst: 6,
        fetch_refill_every: TEN_MINUTES,
        ..LimitArgs::off()
    }
}

fn config(limits: LimitArgs, clock: &ManualClock) -> TestConfig {
    TestConfig {
        limits,
        clock: Clock::Manual(clock.clone()),
        ..TestConfig::default()
    }
}

fn clock() -> ManualClock {
    ManualClock::starting_at(time::OffsetDateTime::now_utc())
}

/// The wait a refusal carries in its `google.rpc.RetryInfo`.
fn retry_after(status: &tonic::Status) -> Duration {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_else(|| panic!("no google.rpc.RetryInfo in {status:?}"))
}

fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, prefix: &str) -> Duration {
    let status = result.expect_err("the call should have been refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().starts_with(prefix), "{status:?}");
    retry_after(&status)
}

async fn available(server: &TestServer, device: &TestDevice) -> u32 {
    key_status(server, device).await.one_time_prekeys_available
}

async fn a_drain_stops_at_the_seventh_fetch_which_takes_nothing_until_the_bucket_refills(
    backend: Backend,
) {
    let db = TestDb::migrated(backend).await;
    let clock = clock();
    let server = TestServer::start_with(&db, config(fetch_limits(), &clock)).await;
    let victim = TestDevice::new(Uuid::new_v4(), "victim-phone", 20);
    victim.register(&server).await;
    let mallory = Uuid::new_v4();
    let mut m = device_client(&server, mallory, "mallory-phone").await;
    for _ in 0..6 {
        let bundle = fetch(&mut m, victim.user, Some("victim-phone"))
            .await
            .unwrap();
        assert!(bundle.devices[0].one_time_prekey.is_some());
    }
    let wait = refused(
        fetch(&mut m, victim.user, Some("victim-phone")).await,
        "fetch rate limit reached; retry in 600 s",
    );
    assert_eq!(wait, TEN_MINUTES);
    assert_eq!(
        available(&server, &victim).await,
        14,
        "the refused fetch took no key"
    );

    // Another device of the same requester has a bucket of its own, as in Signal.
    let mut m2 = device_client(&server, mallory, "mallory-laptop").await;
    fetch(&mut m2, victim.user, Some("victim-phone"))
        .await
        .unwrap();

    clock.advance(TEN_MINUTES - Duration::from_secs(1));
    let wait = refused(
        fetch(&mut m, victim.user, Some("victim-phone")).await,
        "fetch",
    );
    assert_eq!(wait, Duration::from_secs(1));
    clock.advance(Duration::from_secs(1));
    fetch(&mut m, victim.user, Some("victim-phone"))
        .await
        .unwrap();
    refused(
        fetch(&mut m, victim.user, Some("victim-phone")).await,
        "fetch",
    );
    assert_eq!(available(&server, &victim).await, 12);
}
conformance!(a_drain_stops_at_the_seventh_fetch_which_takes_nothing_until_the_bucket_refills);

#[tokio::test]
async fn bulk_and_all_device_fetches_cost_one_token_per_target() {
    let db = TestDb::migrated(Backend::Postgres).await;
    let clock = clock();
    let limits = LimitArgs {
        fetch_burst: 2,
        fetch_refill_every: TEN_MINUTES,
        fetch_budget: 5,
        fetch_budget_period: Duration::from_secs(3600),
        ..LimitArgs::off()
    };
    let server = TestServer::start_with(&db, config(limits, &clock)).await;
    let v = Uuid::new_v4();
    let (a, b) = (TestDevice::new(v, "v-a", 10), TestDevice::new(v, "v-b", 10));
    let w = TestDevice::new(Uuid::new_v4(), "w-a", 10);
    for d in [&a, &b, &w] {
        d.register(&server).await;
    }
    let mut c = device_client(&server, Uuid::new_v4(), "requester").await;

    // An all-devices fetch is one target: two of them empty its bucket, though each device
    // served two bundles, and the single devices keep their own buckets.
    for _ in 0..2 {
        assert_eq!(fetch(&mut c, v, None).await.unwrap().devices.len(), 2);
    }
    refused(fetch(&mut c, v, None).await, "fetch rate limit");
    assert_eq!(available(&server, &a).await, 8);
    fetch(&mut c, v, Some("v-a")).await.unwrap();

    // Budget spent: 2 + 1. A bulk of two targets costs two: 5.
    let bulk = |targets: Vec<pb::Target>| pb::FetchPreKeyBundlesRequest {
        targets,
        ..Default::default()
    };
    c.fetch_pre_key_bundles(bulk(vec![
        target(v, Some("v-b")),
        target(w.user, Some("w-a")),
    ]))
    .await
    .unwrap();
    let wait = refused(
        c.fetch_pre_key_bundles(bulk(vec![target(w.user, Some("w-a"))]))
            .await,
        "fetch budget rate limit reached",
    );
    assert_eq!(
        wait,
        Duration::from_secs(720),
        "one target's share of an hour"
    );
    assert_eq!(
        available(&server, &w).await,
        9,
        "the refused bulk took no key"
    );
    assert_eq!(available(&server, &b).await, 7);

    // A bulk refused by one target's bucket charges none of the others.
    clock.advance(Duration::from_secs(3600));
    for _ in 0..2 {
        fetch(&mut c, w.user, Some("w-a")).await.unwrap();
    }
    refused(
        c.fetch_pre_key_bundles(bulk(vec![
            target(v, Some("v-b")),
            target(w.user, Some("w-a")),
        ]))
        .await,
        "fetch rate limit",
    );
    assert_eq!(available(&server, &b).await, 7);
    fetch(&mut c, v, Some("v-b")).await.unwrap();
    fetch(&mut c, v, Some("v-b")).await.unwrap();
    refused(fetch(&mut c, v, Some("v-b")).await, "fetch rate limit");
    assert_eq!(
        available(&server, &b).await,
        5,
        "v-b's bucket was not charged by the refusal"
    );
}

/// Fetches of one target by one requester, spread over `servers` and run at once.
async fn concurrent_fetches(servers: &[TestServer], requester: Uuid, victim: &TestDevice) -> usize {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = device_client(&servers[i % servers.len()], requester, "mallory-phone").await;
        let user = victim.user;
        let device = victim.device_id.clone();
        tasks.push(tokio::spawn(async move {
            match fetch(&mut c, user, Some(&device)).await {
                Ok(_) => true,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    false
                }
            }
        }));
    }
    let mut served = 0;
    for task in tasks {
        served += usize::from(task.await.unwrap());
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_redis_share_one_budget_exactly_and_refill_on_the_servers_clock() {
    let db = TestDb::migrated(Backend::Postgres).await;
    let clock = clock();
    let limits = LimitArgs {
        redis_url: Some(shared_redis_url()),
        ..fetch_limits()
    };
    let servers = [
        TestServer::start_with(&db, config(limits.clone(), &clock)).await,
        TestServer::start_with(&db, config(limits, &clock)).await,
    ];
    let victim = TestDevice::new(Uuid::new_v4(), "victim-phone", 50);
    victim.register(&servers[0]).await;
    let mallory = Uuid::new_v4();
    assert_eq!(concurrent_fetches(&servers, mallory, &victim).await, 6);
    assert_eq!(available(&servers[0], &victim).await, 44);
    for server in &servers {
        let mut m = device_client(server, mallory, "mallory-phone").await;
        refused(
            fetch(&mut m, victim.user, Some("victim-phone")).await,
            "fetch",
        );
    }
    clock.advance(TEN_MINUTES);
    let mut m = device_client(&servers[1], mallory, "mallory-phone").await;
    fetch(&mut m, victim.user, Some("victim-phone"))
        .await
        .unwrap();
    let mut m = device_client(&servers[0], mallory, "mallory-phone").await;
    refused(
        fetch(&mut m, victim.user, Some("victim-phone")).await,
        "fetch",
    );
    assert_eq!(available(&servers[0], &victim).await, 43);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_without_redis_each_count_alone() {
    // The reason for Redis: in-process buckets are per process, so two servers let twice the
    // burst through (the test above would fail without Redis).
    let db = TestDb::migrated(Backend::Postgres).await;
    let clock = clock();
    let servers = [
        TestServer::start_with(&db, config(fetch_limits(), &clock)).await,
        TestServer::start_with(&db, config(fetch_limits(), &clock)).await,
    ];
    let victim = TestDevice::new(Uuid::new_v4(), "victim-phone", 50);
    victim.register(&servers[0]).await;
    assert_eq!(
        concurrent_fetches(&servers, Uuid::new_v4(), &victim).await,
        12
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_killed_fetches_fail_closed_by_default_and_pass_with_fail_open() {
    let db = TestDb::migrated(Backend::Postgres).await;
    let clock = clock();
    let mut redis = PrivateRedis::start();
    let closed = LimitArgs {
        redis_url: Some(redis.url()),
        redis_timeout: Duration::from_millis(300),
        ..fetch_limits()
    };
    let open = LimitArgs {
        rate_limit_fail_open: true,
        ..closed.clone()
    };
    let closed = TestServer::start_with(&db, config(closed, &clock)).await;
    let open = TestServer::start_with(&db, config(open, &clock)).await;
    let victim = TestDevice::new(Uuid::new_v4(), "victim-phone", 50);
    victim.register(&closed).await;
    let requester = Uuid::new_v4();
    let mut c = device_client(&closed, requester, "r").await;
    let mut o = device_client(&open, requester, "r").await;
    fetch(&mut c, victim.user, Some("victim-phone"))
        .await
        .unwrap();
    fetch(&mut o, victim.user, Some("victim-phone"))
        .await
        .unwrap();

    redis.kill();
    for _ in 0..3 {
        let status = fetch(&mut c, victim.user, Some("victim-phone"))
            .await
            .expect_err("fail closed");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            "the rate limiter is unavailable; retry later"
        );
    }
    assert_eq!(
        available(&closed, &victim).await,
        48,
        "a refused fetch took no key"
    );
    // Fail open lets calls through uncounted: more than the burst.
    for _ in 0..8 {
        let bundle = fetch(&mut o, victim.user, Some("victim-phone"))
            .await
            .unwrap();
        assert!(bundle.devices[0].one_time_prekey.is_some());
    }
    assert_eq!(available(&closed, &victim).await, 40);

    // Redis back (empty: it kept nothing): limits again, without a restart.
    redis.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match fetch(&mut c, victim.user, Some("victim-phone")).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("after Redis came back: {s:?}"),
        }
    }
    for _ in 0..5 {
        fetch(&mut c, victim.user, Some("victim-phone"))
            .await
            .unwrap();
    }
    refused(
        fetch(&mut o, victim.user, Some("victim-phone")).await,
        "fetch",
    );
}

#[tokio::test]
async fn uploads_registrations_and_devices_have_limits_and_a_refusal_stores_nothing() {
    let db = TestDb::migrated(Backend::Postgres).await;
    let clock = clock();
    let limits = LimitArgs {
        uploads_per_hour: 2,
        registrations_per_hour: 3,
        max_devices_per_user: 2,
        ..LimitArgs::off()
    };
    let server = TestServer::start_with(&db, config(limits, &clock)).await;
    let user = Uuid::new_v4();
    let phone = TestDevice::new(user, "phone", 5);
    phone.register(&server).await;
    let mut c = phone.client(&server).await;
    let upload = |ids| pb::UploadOneTimePreKeysRequest {
        device_id: "phone".into(),
        one_time_prekeys: fresh_otks(ids),
    };
    c.upload_one_time_pre_keys(upload(100..=101)).await.unwrap();
    c.upload_one_time_pre_keys(upload(102..=103)).await.unwrap();
    let wait = refused(
        c.upload_one_time_pre_keys(upload(104..=105)).await,
        "upload rate limit reached; retry in 1800 s",
    );
    assert_eq!(wait, Duration::from_secs(1800));
    assert_eq!(
        available(&server, &phone).await,
        9,
        "the refused upload stored nothing"
    );

    // Devices: the second fits, the third is past the quota and is not stored.
    let laptop = TestDevice::new(user, "laptop", 5);
    laptop.register(&server).await;
    let tablet = TestDevice::new(user, "tablet", 5);
    let status = tablet
        .client(&server)
        .await
        .register_device(tablet.register_request())
        .await
        .expect_err("past the device quota");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "device_id: the user already has the most devices allowed (2); remove one first"
    );
    let devices = server
        .db
        .count(&format!(
            "SELECT count(*) FROM nchat_identity_keys WHERE user_id = '{user}'"
        ))
        .await;
    assert_eq!(devices, 2);
    // That was the third registration in the hour: the fourth is refused before the store.
    refused(
        phone
            .client(&server)
            .await
            .register_device(phone.register_request())
            .await,
        "registration rate limit reached",
    );
}

#[tokio::test]
async fn device_ids_cannot_be_squatted_and_the_server_issues_ids_on_request() {
    let db = TestDb::migrated(Backend::Postgres).await;
    let server = TestServer::start(&db).await;
    let victim = Uuid::new_v4();
    let mallory = Uuid::new_v4();

    // A token of the user alone may not pick an id: it could be anybody's next device.
    let chosen = TestDevice::new(mallory, "victims-next-phone", 3);
    assert_status(
        client(&server, mallory)
            .await
            .register_device(chosen.register_request())
            .await,
        Code::PermissionDenied,
        "device_id: registering a chosen device id needs a token bound to it",
    );

    // Without an id, the server issues one in the caller's own space.
    let mut issued = Vec::new();
    for _ in 0..2 {
        let mut request = TestDevice::new(victim, "unused", 3).register_request();
        request.device_id = String::new();
        let answer = client(&server, victim)
            .await
            .register_device(request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.outcome(), pb::RegistrationOutcome::Created);
        let (owner, n) = answer.device_id.split_once('.').expect("<user>.<n>");
        assert_eq!(owner, victim.to_string());
        n.parse::<u64>().expect("a number");
        issued.push(answer.device_id);
    }
    assert_ne!(issued[0], issued[1]);
    fetch(
        &mut client(&server, mallory).await,
        victim,
        Some(&issued[0]),
    )
    .await
    .unwrap();
    // The issued id's own token writes to it.
    device_client(&server, victim, &issued[0])
        .await
        .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
            device_id: issued[0].clone(),
            one_time_prekeys: fresh_otks(50..=51),
        })
        .await
        .unwrap();

    // Ids in another user's space are refused even with a token bound to them.
    let next = format!("{victim}.42");
    let squat = TestDevice::new(mallory, &next, 3);
    assert_status(
        squat
            .client(&server)
            .await
            .register_device(squat.register_request())
            .await,
        Code::PermissionDenied,
        "device_id: ids that begin with another user's id are reserved",
    );
    let rows = server
        .db
        .count(&format!(
            "SELECT count(*) FROM nchat_identity_keys WHERE device_id IN ('{next}', 'victims-next-phone')"
        ))
        .await;
    assert_eq!(rows, 0);
}
