//! The maintenance jobs on both backends: exact retention and rotation boundaries under a test
//! clock, retired ids that stay refused, cleanup of a backlog under concurrent fetches, one run
//! at a time (a released lock free at once for the next taker, a lost one stopping the run), a
//! killed cleanup, and the server's own schedule.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{TestDevice, fetch, finished, otk};
use keyserver::clock::Clock;
use keyserver::config::{CleanupSettings, Schedule};
use keyserver::jobs::{Job, Outcome, Run, Trigger};
use keyserver::shutdown::CancellationToken;
use keyserver::store::StoreError;
use keyserver::store::database::Database;
use keyserver::testing::{Backend, TestConfig, TestDb, TestServer};
use keyserver_client::keys::KeyPair;
use keyserver_proto::pb;
use time::OffsetDateTime;
use uuid::Uuid;

const DAY: time::Duration = time::Duration::DAY;
const SECOND: time::Duration = time::Duration::SECOND;

/// Now, at the millisecond precision both backends store.
fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap()
}

/// Inserts `ids` as one-time prekeys of `device` handed out at `consumed_at`: a backlog
/// without going through thousands of fetches.
async fn consumed_backlog(
    db: &Database,
    device: &str,
    ids: std::ops::RangeInclusive<u32>,
    consumed_at: OffsetDateTime,
) {
    let at = keyserver::testing::time_literal(consumed_at);
    let (first, last) = (ids.start(), ids.end());
    db.execute_either(
        &format!(
            "INSERT INTO nchat_one_time_prekeys (device_id, prekey_id, prekey_public,
                 prekey_private_encrypted, is_consumed, consumed_at)
             SELECT '{device}', g, decode(repeat('09', 32), 'hex'), decode('cc', 'hex'), TRUE,
                    '{at}'
             FROM generate_series({first}, {last}) g"
        ),
        &format!(
            "WITH RECURSIVE g(n) AS (SELECT {first} UNION ALL SELECT n + 1 FROM g WHERE n < {last})
             INSERT INTO nchat_one_time_prekeys (device_id, prekey_id, prekey_public,
                 prekey_private_encrypted, is_consumed, consumed_at)
             SELECT '{device}', n, zeroblob(32), x'cc', 1, '{at}' FROM g"
        ),
    )
    .await;
}

/// Ids of `device`'s one-time prekeys still stored, ascending.
async fn stored_one_time_ids(db: &Database, device: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    let n = db
        .count(&format!(
            "SELECT count(*) FROM nchat_one_time_prekeys WHERE device_id = '{device}'"
        ))
        .await;
    for offset in 0..n {
        ids.push(
            db.integer(&format!(
                "SELECT CAST(prekey_id AS BIGINT) FROM nchat_one_time_prekeys WHERE device_id = '{device}'
                 ORDER BY prekey_id LIMIT 1 OFFSET {offset}"
            ))
            .await
            .unwrap(),
        );
    }
    ids
}

async fn upload(
    server: &TestServer,
    device: &TestDevice,
    keys: Vec<pb::OneTimePreKeyUpload>,
) -> pb::UploadOneTimePreKeysResponse {
    device
        .client(server)
        .await
        .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
            device_id: device.device_id.clone(),
            one_time_prekeys: keys,
        })
        .await
        .expect("uploading")
        .into_inner()
}

async fn rows_placed_on_each_side_of_every_boundary_are_kept_or_removed_exactly(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let now = now_ms();
    let config = TestConfig {
        clock: Clock::Fixed(now),
        ..TestConfig::default()
    };
    let server = TestServer::start_with(&db, config.clone()).await;
    let store = &server.db;
    let user = Uuid::new_v4();
    // One-time prekeys 1..=4 handed out, 5 and 6 left.
    let alice = TestDevice::new(user, "alice", 6);
    let mut c = alice.client(&server).await;
    alice.register(&server).await;
    for _ in 0..4 {
        fetch(&mut c, user, Some("alice")).await.unwrap();
    }
    let consumed = |id: u32| format!("device_id = 'alice' AND prekey_id = {id}");
    store
        .set_time(
            "nchat_one_time_prekeys",
            "consumed_at",
            &consumed(1),
            now - 30 * DAY - SECOND,
        )
        .await;
    store
        .set_time(
            "nchat_one_time_prekeys",
            "consumed_at",
            &consumed(2),
            now - 30 * DAY + SECOND,
        )
        .await;
    store
        .set_time(
            "nchat_one_time_prekeys",
            "consumed_at",
            &consumed(3),
            now - 31 * DAY,
        )
        .await;
    // Unconsumed keys are never cleaned up, however old.
    store
        .set_time(
            "nchat_one_time_prekeys",
            "created_at",
            &consumed(5),
            now - 400 * DAY,
        )
        .await;

    // Signed prekeys 1 and 2 superseded by 3.
    for id in [2, 3] {
        c.rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
            device_id: "alice".into(),
            signed_prekey: Some(alice.signed_upload(id, &KeyPair::generate())),
        })
        .await
        .unwrap();
    }
    let signed = |id: u32| format!("device_id = 'alice' AND signed_prekey_id = {id}");
    store
        .set_time(
            "nchat_signed_prekeys",
            "superseded_at",
            &signed(1),
            now - 30 * DAY - SECOND,
        )
        .await;
    store
        .set_time(
            "nchat_signed_prekeys",
            "superseded_at",
            &signed(2),
            now - 30 * DAY + SECOND,
        )
        .await;

    // Rotation ages of four more devices, around 7 and 14 days.
    let ages = [
        ("bob", now - 7 * DAY + SECOND),
        ("carol", now - 7 * DAY - SECOND),
        ("dave", now - 14 * DAY + SECOND),
        ("erin", now - 14 * DAY - SECOND),
    ];
    for (name, rotated_at) in ages {
        TestDevice::new(user, name, 1).register(&server).await;
        store
            .set_time(
                "nchat_signed_prekeys",
                "rotation_date",
                &format!("device_id = '{name}'"),
                rotated_at,
            )
            .await;
    }

    // Two audit events around 90 days.
    let first_audit = store
        .integer("SELECT CAST(min(id) AS BIGINT) FROM nchat_e2ee_audit_log")
        .await
        .unwrap();
    store
        .set_time(
            "nchat_e2ee_audit_log",
            "created_at",
            &format!("id = {first_audit}"),
            now - 90 * DAY - SECOND,
        )
        .await;
    store
        .set_time(
            "nchat_e2ee_audit_log",
            "created_at",
            &format!("id = {}", first_audit + 1),
            now - 90 * DAY + SECOND,
        )
        .await;
    let audit_before = store
        .count("SELECT count(*) FROM nchat_e2ee_audit_log")
        .await;

    // The rotation check: carol, dave and erin are due, only erin is stale.
    let jobs = config.jobs(store);
    let stop = CancellationToken::new();
    let report = finished(jobs.run(Job::Rotate, Trigger::Cli, &stop).await.unwrap());
    assert_eq!(report.count("rotation_due"), 3, "{report}");
    assert_eq!(report.count("stale"), 1, "{report}");
    assert!(report.notes[0].contains("device erin") && report.notes[0].ends_with(", stale"));
    for (name, _) in ages {
        let bundle = fetch(&mut c, user, Some(name))
            .await
            .unwrap()
            .devices
            .remove(0);
        let signed = bundle.signed_prekey.unwrap();
        assert_eq!(signed.stale, name == "erin", "{name}");
        let status = c
            .get_key_status(pb::GetKeyStatusRequest {
                device_id: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.rotation_due, name != "bob", "{name}");
    }

    // A dry run counts exactly what goes, and deletes nothing.
    let dry = jobs.cleanup_dry_run().await.unwrap();
    assert_eq!(dry.count("consumed_one_time_prekeys"), 2, "{dry}");
    assert_eq!(dry.count("superseded_signed_prekeys"), 1, "{dry}");
    assert_eq!(dry.count("audit_events"), 1, "{dry}");
    assert_eq!(
        stored_one_time_ids(store, "alice").await,
        [1, 2, 3, 4, 5, 6]
    );

    let report = finished(jobs.run(Job::Cleanup, Trigger::Cli, &stop).await.unwrap());
    assert_eq!(report.count("consumed_one_time_prekeys"), 2, "{report}");
    assert_eq!(report.count("superseded_signed_prekeys"), 1, "{report}");
    assert_eq!(report.count("audit_events"), 1, "{report}");
    assert_eq!(report.count("job_runs"), 0, "{report}");
    assert_eq!(stored_one_time_ids(store, "alice").await, [2, 4, 5, 6]);
    assert_eq!(
        store
            .count(
                "SELECT count(*) FROM nchat_signed_prekeys
                 WHERE device_id = 'alice' AND signed_prekey_id IN (2, 3)"
            )
            .await,
        2
    );
    assert_eq!(
        store
            .count("SELECT count(*) FROM nchat_signed_prekeys WHERE device_id = 'alice'")
            .await,
        2
    );
    assert_eq!(
        store
            .count(&format!(
                "SELECT count(*) FROM nchat_e2ee_audit_log WHERE id = {first_audit}"
            ))
            .await,
        0
    );
    // The event just inside 90 days stays; cleanup itself writes no audit event.
    assert_eq!(
        store
            .count("SELECT count(*) FROM nchat_e2ee_audit_log")
            .await,
        audit_before - 1
    );

    // Deleted ids stay refused: re-uploads of consumed keys 1 and 3 (whatever their bytes)
    // are refused like the still-stored consumed key 2; a fresh id is stored.
    let answer = upload(
        &server,
        &alice,
        vec![
            otk(1, &KeyPair::generate()),
            otk(2, &alice.one_time[1].1),
            otk(3, &KeyPair::generate()),
        ],
    )
    .await;
    assert_eq!(answer.refused_consumed_key_ids, [1, 2, 3]);
    let answer = upload(
        &server,
        &alice,
        vec![otk(1, &alice.one_time[0].1), otk(7, &KeyPair::generate())],
    )
    .await;
    assert_eq!(answer.refused_consumed_key_ids, [1]);
    assert_eq!(answer.stored_key_ids, [7]);
    let next = fetch(&mut c, user, Some("alice")).await.unwrap().devices[0]
        .one_time_prekey
        .clone()
        .unwrap();
    assert_eq!(next.key_id, 5);
    // A retried rotation to the deleted signed prekey 1 is refused as superseded.
    common::assert_status(
        c.rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
            device_id: "alice".into(),
            signed_prekey: Some(alice.signed_upload(1, &alice.signed)),
        })
        .await,
        tonic::Code::FailedPrecondition,
        "signed_prekey.key_id",
    );

    // Both runs are on record.
    let runs = store_runs(store).await;
    assert_eq!(
        runs,
        [
            (Job::Cleanup, Outcome::Succeeded),
            (Job::Rotate, Outcome::Succeeded)
        ]
    );
    server.stop().await.unwrap();
}
conformance!(rows_placed_on_each_side_of_every_boundary_are_kept_or_removed_exactly);

/// The recorded runs other than bundle-view refreshes, newest first.
async fn store_runs(db: &Database) -> Vec<(Job, Outcome)> {
    db.store()
        .job_runs(None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.job != Job::RefreshBundles)
        .map(|r| (r.job, r.outcome))
        .collect()
}

async fn a_large_backlog_is_cleaned_up_while_fetches_go_on(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig {
        cleanup: CleanupSettings {
            cleanup_batch_size: 500,
            ..CleanupSettings::default()
        },
        ..TestConfig::default()
    };
    let server = TestServer::start_with(&db, config.clone()).await;
    let user = Uuid::new_v4();
    const DEVICES: u32 = 10;
    const BACKLOG: u32 = 2_000;
    let old = now_ms() - 45 * DAY;
    for d in 0..DEVICES {
        let device = TestDevice::new(user, &format!("dev-{d}"), 100);
        device.register(&server).await;
        consumed_backlog(&server.db, &device.device_id, 1_000..=999 + BACKLOG, old).await;
    }

    let cleaning = {
        let jobs = config.jobs(&server.db);
        tokio::spawn(async move {
            jobs.run(Job::Cleanup, Trigger::Cli, &CancellationToken::new())
                .await
        })
    };
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fetchers: Vec<_> = (0..6)
        .map(|f| {
            let (url, token, served) = (server.url.clone(), server.token(user), served.clone());
            tokio::spawn(async move {
                let mut c = keyserver_client::api::connect(&url, &token).await.unwrap();
                for i in 0..40u32 {
                    let device = format!("dev-{}", (f * 7 + i) % DEVICES);
                    let bundle = fetch(&mut c, user, Some(&device)).await.expect("fetching");
                    if let Some(key) = &bundle.devices[0].one_time_prekey {
                        served.lock().unwrap().push((device, key.key_id));
                    }
                }
            })
        })
        .collect();
    for f in fetchers {
        f.await.unwrap();
    }
    let report = finished(cleaning.await.unwrap().unwrap());
    assert_eq!(
        report.count("consumed_one_time_prekeys"),
        u64::from(DEVICES * BACKLOG),
        "{report}"
    );

    // 240 fetches of 1,000 keys: every one served once, none of the backlog.
    let served = served.lock().unwrap().clone();
    assert_eq!(served.len(), 240);
    let distinct: HashSet<_> = served.iter().cloned().collect();
    assert_eq!(
        distinct.len(),
        served.len(),
        "a one-time prekey was served twice"
    );
    assert!(served.iter().all(|(_, id)| *id <= 100));

    // The backlog is gone, the fetched keys (consumed just now) stay, and each device's
    // deleted ids are one range.
    let db = &server.db;
    assert_eq!(
        db.count("SELECT count(*) FROM nchat_one_time_prekeys WHERE prekey_id >= 1000")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed")
            .await,
        240
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM keyserver_retired_prekeys
             WHERE key_kind = 'one_time' AND first_id = 1000 AND last_id = {}",
            999 + BACKLOG
        ))
        .await,
        i64::from(DEVICES)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM keyserver_retired_prekeys")
            .await,
        i64::from(DEVICES)
    );
    server.stop().await.unwrap();
}
conformance!(multi_thread; a_large_backlog_is_cleaned_up_while_fetches_go_on);

async fn one_cleanup_runs_at_a_time_and_the_other_says_why(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig {
        cleanup: CleanupSettings {
            cleanup_batch_size: 100,
            cleanup_batch_pause: Duration::from_millis(5),
            ..CleanupSettings::default()
        },
        ..TestConfig::default()
    };
    let server = TestServer::start_with(&db, config.clone()).await;
    let user = Uuid::new_v4();
    TestDevice::new(user, "phone", 1).register(&server).await;
    consumed_backlog(&server.db, "phone", 1_000..=5_999, now_ms() - 45 * DAY).await;

    // Two runs started at once from two "processes" (separate connection pools): one runs,
    // the other is skipped and names the run holding the lock.
    let (a, b) = (db.open().await, db.open().await);
    let (ja, jb) = (config.jobs(&a), config.jobs(&b));
    let stop = CancellationToken::new();
    let (ra, rb) = tokio::join!(
        ja.run(Job::Cleanup, Trigger::Cli, &stop),
        jb.run(Job::Cleanup, Trigger::Schedule, &stop)
    );
    let (report, why) = match (ra.unwrap(), rb.unwrap()) {
        (Run::Finished(r), Run::Skipped(why)) | (Run::Skipped(why), Run::Finished(r)) => (r, why),
        (a, b) => panic!("expected one run and one skip, got {a:?} and {b:?}"),
    };
    assert_eq!(report.count("consumed_one_time_prekeys"), 5_000);
    assert!(
        why.starts_with("another cleanup run holds the lock"),
        "{why}"
    );
    let mut outcomes: Vec<_> = store_runs(&a).await.into_iter().map(|r| r.1).collect();
    outcomes.sort_by_key(|o| o.as_str());
    assert_eq!(outcomes, [Outcome::Skipped, Outcome::Succeeded]);

    // The CLI a cron job runs says the same and exits 0 while the lock is held.
    let held = a.store().try_lock(Job::Cleanup).await.unwrap().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args(["jobs", "cleanup"])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("cleanup not run: another cleanup run holds the lock"),
        "{stdout}"
    );
    held.release().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args(["jobs", "cleanup"])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cleanup finished in"));
    a.close().await;
    b.close().await;
    server.stop().await.unwrap();
}
conformance!(one_cleanup_runs_at_a_time_and_the_other_says_why);

/// The session holding a cleanup's lock ends mid-run, as it does when the PostgreSQL primary
/// fails over (here the test terminates that backend): the run stops before its next batch and
/// fails saying it lost its lock, deletes nothing more, and the next run takes the lock and
/// finishes the backlog.
#[tokio::test]
async fn a_cleanup_that_loses_its_lock_stops_before_its_next_batch() {
    let db = TestDb::migrated(Backend::Postgres).await;
    let config = TestConfig {
        cleanup: CleanupSettings {
            cleanup_batch_size: 100,
            cleanup_batch_pause: Duration::from_millis(100),
            ..CleanupSettings::default()
        },
        ..TestConfig::default()
    };
    let server = TestServer::start_with(&db, config.clone()).await;
    TestDevice::new(Uuid::new_v4(), "phone", 1)
        .register(&server)
        .await;
    consumed_backlog(&server.db, "phone", 1_000..=5_999, now_ms() - 45 * DAY).await;
    let expired = "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed";

    let a = db.open().await;
    let jobs = config.jobs(&a);
    let run = tokio::spawn(async move {
        jobs.run(Job::Cleanup, Trigger::Cli, &CancellationToken::new())
            .await
    });
    while server.db.count(expired).await > 4_700 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The cleanup lock's key is 0x6b65_7973_7276_0002: PostgreSQL shows its low half as objid.
    let ended = server
        .db
        .count(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
             WHERE locktype = 'advisory' AND objid = 1920335874 AND objsubid = 1
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
    assert_eq!(ended, 1, "one session held the cleanup lock");
    let outcome = run.await.unwrap();
    assert!(
        matches!(&outcome, Err(StoreError::Unavailable(why)) if why.contains("lost its lock")),
        "{outcome:?}"
    );
    let left = server.db.count(expired).await;
    assert!((1..=4_700).contains(&left), "{left} expired keys left");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.db.count(expired).await,
        left,
        "no batch after the lock was lost"
    );
    assert_eq!(
        store_runs(&a).await,
        [(Job::Cleanup, Outcome::Failed)],
        "the run is recorded as failed"
    );

    let next = config.jobs(&a);
    match next
        .run(Job::Cleanup, Trigger::Cli, &CancellationToken::new())
        .await
        .unwrap()
    {
        Run::Finished(report) => {
            assert_eq!(report.count("consumed_one_time_prekeys"), left as u64)
        }
        other => panic!("expected the next run to finish, got {other:?}"),
    }
    assert_eq!(server.db.count(expired).await, 0);
    a.close().await;
    server.stop().await.unwrap();
}

async fn a_released_lock_is_free_at_once_for_another_process(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let (a, b) = (db.open().await, db.open().await);
    // A run that starts right after another ended must not be skipped: the release has to be
    // visible to the next taker before it returns, every time.
    for round in 0..200 {
        let (first, second) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let held = first.store().try_lock(Job::Cleanup).await.unwrap();
        let held = held.unwrap_or_else(|| panic!("round {round}: the lock was still held"));
        assert!(
            second
                .store()
                .try_lock(Job::Cleanup)
                .await
                .unwrap()
                .is_none(),
            "round {round}: two holders"
        );
        held.release().await;
        let next = second.store().try_lock(Job::Cleanup).await.unwrap();
        next.unwrap_or_else(|| panic!("round {round}: released, yet still held"))
            .release()
            .await;
    }
    a.close().await;
    b.close().await;
}
conformance!(a_released_lock_is_free_at_once_for_another_process);

async fn a_killed_cleanup_leaves_consistent_data_and_the_next_run_finishes(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let user = Uuid::new_v4();
    let device = TestDevice::new(user, "phone", 5);
    device.register(&server).await;
    const FIRST: u32 = 10_000;
    const LAST: u32 = 29_999;
    consumed_backlog(&server.db, "phone", FIRST..=LAST, now_ms() - 45 * DAY).await;
    let backlog = i64::from(LAST - FIRST + 1);
    let left = || async {
        server
            .db
            .count(&format!(
                "SELECT count(*) FROM nchat_one_time_prekeys WHERE prekey_id >= {FIRST}"
            ))
            .await
    };

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args([
            "jobs",
            "cleanup",
            "--cleanup-batch-size",
            "100",
            "--cleanup-batch-pause",
            "20ms",
        ])
        .env("DATABASE_URL", db.url())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while left().await > backlog - 1_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "cleanup made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let remaining = left().await;
    assert!(remaining > 0, "the cleanup finished before it was killed");
    assert_eq!(remaining % 100, 0, "only whole batches were deleted");

    // Consistent: every backlog id is either still stored or inside a retired range, never
    // both, and the killed run is on record as running.
    let retired = server
        .db
        .count(&format!(
            "SELECT COALESCE(sum(last_id - first_id + 1), 0) FROM keyserver_retired_prekeys
             WHERE device_id = 'phone' AND key_kind = 'one_time' AND first_id >= {FIRST}"
        ))
        .await;
    assert_eq!(remaining + retired, backlog);
    assert_eq!(
        store_runs(&server.db).await,
        [(Job::Cleanup, Outcome::Running)]
    );
    // A re-upload of a deleted id is refused.
    let range = |end: &str| {
        format!(
            "SELECT CAST({end} AS BIGINT) FROM keyserver_retired_prekeys
             WHERE device_id = 'phone' ORDER BY id LIMIT 1"
        )
    };
    let first = server.db.integer(&range("first_id")).await.unwrap() as u32;
    let last = server.db.integer(&range("last_id")).await.unwrap() as u32;
    let sample = vec![
        otk(first, &KeyPair::generate()),
        otk(last, &KeyPair::generate()),
    ];
    let answer = upload(&server, &device, sample).await;
    assert_eq!(
        answer
            .refused_consumed_key_ids
            .iter()
            .collect::<HashSet<_>>(),
        HashSet::from([&first, &last])
    );

    // The next run finishes the work and marks the killed one abandoned.
    let jobs = TestConfig::default().jobs(&server.db);
    let report = finished(
        jobs.run(Job::Cleanup, Trigger::Cli, &CancellationToken::new())
            .await
            .unwrap(),
    );
    assert_eq!(
        report.count("consumed_one_time_prekeys"),
        remaining as u64,
        "{report}"
    );
    assert_eq!(left().await, 0);
    assert_eq!(
        server
            .db
            .count(
                "SELECT count(*) FROM keyserver_retired_prekeys
                 WHERE device_id = 'phone' AND key_kind = 'one_time'"
            )
            .await,
        1,
        "the two runs' ranges joined into one"
    );
    assert_eq!(
        store_runs(&server.db).await,
        [
            (Job::Cleanup, Outcome::Succeeded),
            (Job::Cleanup, Outcome::Abandoned)
        ]
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args(["jobs", "status", "--job", "cleanup"])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("abandoned") && stdout.contains("succeeded"),
        "{stdout}"
    );
    // The same for scripts: newest first, times in RFC 3339.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args(["jobs", "status", "--job", "cleanup", "--json"])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON array");
    let outcomes: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["succeeded", "abandoned"], "{runs}");
    let started = runs[0]["started_at"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(started, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{started}"
    );
    assert!(runs[0]["counts"].is_object(), "{runs}");
    server.stop().await.unwrap();
}
conformance!(a_killed_cleanup_leaves_consistent_data_and_the_next_run_finishes);

async fn servers_run_scheduled_jobs_once_per_period_between_them(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig {
        schedule: Schedule {
            rotation_check_every: Duration::from_secs(3600),
            cleanup_every: Duration::from_secs(3600),
            ..Schedule::NONE
        },
        ..TestConfig::default()
    };
    let first = TestServer::start_with(&db, config.clone()).await;
    let scheduled = |db: Database| async move {
        db.store()
            .job_runs(None, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.trigger == Trigger::Schedule && r.outcome == Outcome::Succeeded)
            .map(|r| r.job)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while scheduled(first.db.clone()).await.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no scheduled runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second server (or a restart) finds both jobs done this period and does not repeat them.
    let second = TestServer::start_with(&db, config.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut jobs = scheduled(second.db.clone()).await;
    jobs.sort();
    assert_eq!(jobs, [Job::Rotate, Job::Cleanup]);
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}
conformance!(servers_run_scheduled_jobs_once_per_period_between_them);
