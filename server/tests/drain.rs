//! Drain detection on both backends, through real fetches: one requester taking most of a
//! device's keys, many requesters taking too many, each kind of one-time prekey judged on its
//! own, keys outside the window not counting, one report per window on the owner's trail (and
//! nothing of the requester but their user id), and the counts a device sees staying exact.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use keyserver::config::DrainArgs;
use keyserver::jobs::{Job, Report, Trigger};
use keyserver::shutdown::CancellationToken;
use keyserver::testing::{Backend, TestConfig, TestDb, TestServer};
use keyserver_proto::pb;
use uuid::Uuid;

/// `times` fetches of `device` by `requester`, each served.
async fn fetch_times(server: &TestServer, requester: Uuid, device: &TestDevice, times: usize) {
    let mut c = client(server, requester).await;
    for _ in 0..times {
        fetch(&mut c, device.user, Some(&device.device_id))
            .await
            .expect("fetching");
    }
}

async fn drain_check(server: &TestServer, config: &TestConfig) -> Report {
    finished(
        config
            .jobs(&server.db)
            .run(Job::DrainCheck, Trigger::Cli, &CancellationToken::new())
            .await
            .expect("running the drain check"),
    )
}

/// The drain events on `user`'s trail, as the user reads them, newest first.
async fn drain_events(server: &TestServer, user: Uuid) -> Vec<(String, serde_json::Value)> {
    keyserver_client::api::connect_audit(&server.url, &server.token(user))
        .await
        .unwrap()
        .list_audit_events(pb::ListAuditEventsRequest {
            event_types: vec!["prekeys_drain_suspected".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| {
            (
                e.device_id.unwrap_or_default(),
                serde_json::from_str(&e.metadata_json).unwrap(),
            )
        })
        .collect()
}

async fn one_requester_taking_most_keys_is_reported_once_per_window(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig::default();
    let server = TestServer::start_with(&db, config.clone()).await;
    let victim = TestDevice::new(Uuid::new_v4(), "victim-phone", 30);
    victim.register(&server).await;
    let bystander = TestDevice::new(Uuid::new_v4(), "bystander-phone", 30);
    bystander.register(&server).await;
    let (mallory, alice) = (Uuid::new_v4(), Uuid::new_v4());

    // Nine by one requester is below the rule's ten.
    fetch_times(&server, mallory, &victim, 9).await;
    fetch_times(&server, alice, &victim, 2).await;
    assert!(!key_status(&server, &victim).await.drain_suspected);
    assert_eq!(
        drain_check(&server, &config)
            .await
            .count("devices_reported"),
        0
    );

    // The tenth makes 10 of 12: suspected, and the count the device sees stays exact.
    fetch_times(&server, mallory, &victim, 1).await;
    // Twelve fetches of the bystander by twelve users: no one requester, and under 100.
    for _ in 0..12 {
        fetch_times(&server, Uuid::new_v4(), &bystander, 1).await;
    }
    let seen = key_status(&server, &victim).await;
    assert!(seen.drain_suspected);
    assert_eq!(seen.one_time_prekeys_available, 30 - 12);
    assert!(!key_status(&server, &bystander).await.drain_suspected);

    let report = drain_check(&server, &config).await;
    assert_eq!(report.count("devices_reported"), 1, "{report}");
    let events = drain_events(&server, victim.user).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let (device, metadata) = &events[0];
    assert_eq!(device, "victim-phone");
    // Counts, the kind and the requester's user id: nothing else about the requester.
    assert_eq!(
        *metadata,
        serde_json::json!({
            "kind": "one_time",
            "keys_taken": 12,
            "window_seconds": 86_400,
            "requester_user_id": mallory,
            "requester_keys": 10,
        })
    );
    assert!(drain_events(&server, bystander.user).await.is_empty());
    assert!(
        drain_events(&server, mallory).await.is_empty(),
        "the event is on the owner's trail only"
    );

    // Within the same window the device is not reported again, however the drain goes on;
    // the device still sees it in its status.
    fetch_times(&server, mallory, &victim, 5).await;
    assert_eq!(
        drain_check(&server, &config)
            .await
            .count("devices_reported"),
        0
    );
    assert_eq!(drain_events(&server, victim.user).await.len(), 1);
    assert!(key_status(&server, &victim).await.drain_suspected);
}
conformance!(one_requester_taking_most_keys_is_reported_once_per_window);

async fn many_requesters_trip_the_threshold_and_old_keys_do_not_count(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig {
        drain: DrainArgs {
            drain_threshold: 8,
            ..DrainArgs::default()
        },
        ..TestConfig::default()
    };
    let server = TestServer::start_with(&db, config.clone()).await;
    let popular = TestDevice::new(Uuid::new_v4(), "popular-phone", 20);
    popular.register(&server).await;
    // One-requester test off: only the count over all requesters.
    let counts_only = TestConfig {
        drain: DrainArgs {
            drain_requester_keys: 0,
            ..config.drain
        },
        ..config.clone()
    };
    for _ in 0..7 {
        fetch_times(&server, Uuid::new_v4(), &popular, 1).await;
    }
    assert!(!key_status(&server, &popular).await.drain_suspected);
    fetch_times(&server, Uuid::new_v4(), &popular, 1).await;
    assert!(key_status(&server, &popular).await.drain_suspected);

    // Keys taken before the window leave the count: two days ago is outside 24 hours.
    let long_ago = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    server
        .db
        .set_time(
            "nchat_one_time_prekeys",
            "consumed_at",
            "is_consumed = TRUE",
            long_ago,
        )
        .await;
    assert!(!key_status(&server, &popular).await.drain_suspected);
    assert_eq!(
        drain_check(&server, &counts_only)
            .await
            .count("devices_reported"),
        0
    );

    for _ in 0..8 {
        fetch_times(&server, Uuid::new_v4(), &popular, 1).await;
    }
    let report = drain_check(&server, &counts_only).await;
    assert_eq!(report.count("devices_reported"), 1, "{report}");
    let events = drain_events(&server, popular.user).await;
    assert_eq!(events[0].1["keys_taken"], 8);
    assert!(
        events[0].1.get("requester_user_id").is_none(),
        "many requesters: none is named"
    );
    assert_eq!(
        key_status(&server, &popular)
            .await
            .one_time_prekeys_available,
        4
    );

    // A zero window turns detection off.
    let off = TestConfig {
        drain: DrainArgs {
            drain_window: Duration::ZERO,
            ..config.drain
        },
        ..config.clone()
    };
    let report = drain_check(&server, &off).await;
    assert_eq!(report.count("devices_reported"), 0);
    assert!(report.notes.iter().any(|n| n.contains("off")), "{report}");
}
conformance!(many_requesters_trip_the_threshold_and_old_keys_do_not_count);

async fn each_kind_of_one_time_prekey_is_judged_on_its_own(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig::default();
    let server = TestServer::start_with(&db, config.clone()).await;
    // Two EC one-time prekeys and fifteen Kyber ones: twelve fetches take both EC keys and
    // twelve Kyber keys, all by one requester.
    let victim = TestDevice::pqxdh(Uuid::new_v4(), "victim-phone", 2, 15);
    victim.register(&server).await;
    let mallory = Uuid::new_v4();
    // A bulk fetch naming the device twice takes one key of each kind, recorded as mallory's.
    client(&server, mallory)
        .await
        .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest {
            targets: vec![
                target(victim.user, Some("victim-phone")),
                target(victim.user, None),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    fetch_times(&server, mallory, &victim, 11).await;

    let seen = key_status(&server, &victim).await;
    assert!(seen.drain_suspected);
    assert_eq!(
        (
            seen.one_time_prekeys_available,
            seen.kyber_one_time_prekeys_available
        ),
        (0, 3)
    );
    drain_check(&server, &config).await;
    let events = drain_events(&server, victim.user).await;
    assert_eq!(events.len(), 1, "one event per device: its worst kind");
    assert_eq!(events[0].1["kind"], "kyber");
    assert_eq!(events[0].1["keys_taken"], 12);
    assert_eq!(events[0].1["requester_keys"], 12);
}
conformance!(each_kind_of_one_time_prekey_is_judged_on_its_own);
