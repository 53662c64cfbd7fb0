//! The key service over a real PostgreSQL and a real gRPC server on a loopback port: every
//! call, every rejection, and what each leaves in the database.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::api::verify_bundle;
use keyserver_client::keys::KeyPair;
use keyserver_proto::pb;
use tonic::Code;
use uuid::Uuid;

async fn count(server: &TestServer, sql: &str) -> i64 {
    server.db.count(sql).await
}

async fn audit_events(server: &TestServer, event: &str) -> Vec<serde_json::Value> {
    server.db.audit_metadata(event).await
}

/// (one-time prekey rows, signed prekey rows) in the database.
async fn key_rows(server: &TestServer) -> (i64, i64) {
    (
        count(server, "SELECT count(*) FROM nchat_one_time_prekeys").await,
        count(server, "SELECT count(*) FROM nchat_signed_prekeys").await,
    )
}

/// Rows in every table the key path writes, to show a refused call wrote nothing.
async fn row_counts(server: &TestServer) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "nchat_identity_keys",
        "nchat_signed_prekeys",
        "nchat_one_time_prekeys",
        "nchat_e2ee_audit_log",
    ] {
        counts.push(count(server, &format!("SELECT count(*) FROM {table}")).await);
    }
    counts.push(
        count(
            server,
            "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed",
        )
        .await,
    );
    counts
}

async fn register_then_fetch_serves_verified_bundles_taking_prekeys_in_upload_order(
    backend: Backend,
) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", 3);
    let mut bob_client = bob.client(&server).await;
    let registered = bob_client
        .register_device(bob.register_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.outcome(), pb::RegistrationOutcome::Created);
    assert_eq!(registered.one_time_prekeys_available, 3);

    let mut alice = client(&server, Uuid::new_v4()).await;
    let mut served = Vec::new();
    for _ in 0..4 {
        let response = fetch(&mut alice, bob.user, Some("bob-phone"))
            .await
            .unwrap();
        assert_eq!(response.devices.len(), 1);
        let bundle = verify_bundle(&response.devices[0]).expect("signature verifies");
        assert_eq!(bundle.device_id, "bob-phone");
        assert_eq!(bundle.registration_id, bob.registration_id);
        assert_eq!(bundle.keys.identity_key, bob.identity.public());
        assert_eq!(bundle.keys.signed_prekey, bob.signed.public());
        assert_eq!(bundle.keys.signed_prekey_id, 1);
        served.push(bundle.keys.one_time_prekey);
    }
    let expected: Vec<_> = bob
        .one_time
        .iter()
        .map(|(id, k)| Some((*id, k.public())))
        .collect();
    assert_eq!(
        served[..3],
        expected[..],
        "served once each, in upload order"
    );
    assert_eq!(
        served[3], None,
        "a device with none left still gets a bundle without one"
    );

    assert_eq!(
        count(&server, "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed AND consumed_at IS NOT NULL").await,
        3,
        "served keys stay, flagged consumed"
    );
    let status = bob_client
        .get_key_status(pb::GetKeyStatusRequest {
            device_id: "bob-phone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.one_time_prekeys_available, 0);
    assert!(status.replenish_recommended);
    assert_eq!(status.active_signed_prekey_id, Some(1));
    assert!(!status.rotation_due);

    let events = audit_events(&server, "device_keys_generated").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["outcome"], "created");
    assert_eq!(events[0]["one_time_prekeys_uploaded"], 3);
}

async fn fetch_all_devices_leaves_out_devices_without_an_active_signed_prekey(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let user = Uuid::new_v4();
    for name in ["tablet", "phone"] {
        TestDevice::new(user, name, 1).register(&server).await;
    }
    // A device row with no signed prekey, as a chat database could hold.
    let insert = |blob: &str| {
        format!(
            "INSERT INTO nchat_identity_keys
                 (device_id, user_id, identity_key_public, identity_key_private_encrypted)
             VALUES ('laptop', '{user}', {blob}, {blob})"
        )
    };
    let key = "09".repeat(32);
    server
        .db
        .execute_either(
            &insert(&format!("'\\x{key}'::bytea")),
            &insert(&format!("X'{key}'")),
        )
        .await;

    let mut peer = client(&server, Uuid::new_v4()).await;
    let all = fetch(&mut peer, user, None).await.unwrap();
    let names: Vec<_> = all.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(names, ["phone", "tablet"]);
    assert!(all.devices.iter().all(|d| d.one_time_prekey.is_some()));

    assert_status(
        fetch(&mut peer, user, Some("laptop")).await,
        Code::NotFound,
        "target: device laptop",
    );
    assert_status(
        fetch(&mut peer, Uuid::new_v4(), None).await,
        Code::NotFound,
        "target: no device of user",
    );
    let again = fetch(&mut peer, user, None).await.unwrap();
    assert!(again.devices.iter().all(|d| d.one_time_prekey.is_none()));
}

async fn every_bad_registration_is_refused_precisely_and_writes_nothing(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dev = TestDevice::new(Uuid::new_v4(), "dev-1", 3);
    let mut c = dev.client(&server).await;
    let before = row_counts(&server).await;
    let good = dev.register_request();

    type Mutation = Box<dyn Fn(&mut pb::RegisterDeviceRequest)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "short identity",
            Box::new(|r| {
                r.identity_key.pop();
            }),
            "identity_key: must be 33 bytes, got 32",
        ),
        (
            "identity type byte",
            Box::new(|r| r.identity_key[0] = 0x08),
            "identity_key: must start with type byte 0x05, got 0x08",
        ),
        (
            "device id",
            Box::new(|r| r.device_id = "bad id".into()),
            "device_id: may hold only",
        ),
        (
            "too long a device id",
            Box::new(|r| r.device_id = "d".repeat(65)),
            "device_id: must be 1 to 64 characters",
        ),
        (
            "registration id 0",
            Box::new(|r| r.registration_id = 0),
            "registration_id: must be 1 to 16383",
        ),
        (
            "registration id too big",
            Box::new(|r| r.registration_id = 16384),
            "registration_id: must be 1 to 16383",
        ),
        (
            "empty identity blob",
            Box::new(|r| r.encrypted_identity_private_key.clear()),
            "encrypted_identity_private_key: must be 1 to 512 bytes",
        ),
        (
            "no signed prekey",
            Box::new(|r| r.signed_prekey = None),
            "signed_prekey: is required",
        ),
        (
            "signed prekey length",
            Box::new(|r| r.signed_prekey.as_mut().unwrap().public_key.push(0)),
            "signed_prekey.public_key: must be 33 bytes, got 34",
        ),
        (
            "signature length",
            Box::new(|r| {
                r.signed_prekey.as_mut().unwrap().signature.pop();
            }),
            "signed_prekey.signature: must be 64 bytes, got 63",
        ),
        (
            "signature bit flip",
            Box::new(|r| r.signed_prekey.as_mut().unwrap().signature[10] ^= 1),
            "signed_prekey.signature: does not verify",
        ),
        (
            "signed by another key",
            Box::new(|r| {
                let other = KeyPair::generate();
                let s = r.signed_prekey.as_mut().unwrap();
                s.signature = other.sign(&s.public_key).to_vec();
            }),
            "signed_prekey.signature: does not verify",
        ),
        (
            "signed prekey id range",
            Box::new(|r| r.signed_prekey.as_mut().unwrap().key_id = 0x100_0000),
            "signed_prekey.key_id: must be at most 16777215",
        ),
        (
            "101 one-time prekeys",
            Box::new(|r| r.one_time_prekeys = fresh_otks(1..=101)),
            "one_time_prekeys: must hold 0 to 100 keys, got 101",
        ),
        (
            "duplicate ids",
            Box::new(|r| r.one_time_prekeys[2].key_id = 1),
            "one_time_prekeys[2].key_id: duplicates one_time_prekeys[0].key_id (1)",
        ),
        (
            "one-time prekey type",
            Box::new(|r| r.one_time_prekeys[1].public_key[0] = 0x06),
            "one_time_prekeys[1].public_key: must start with type byte 0x05",
        ),
        (
            "one-time prekey blob",
            Box::new(|r| r.one_time_prekeys[0].encrypted_private_key = vec![0; 513]),
            "one_time_prekeys[0].encrypted_private_key: must be 1 to 512 bytes",
        ),
    ];
    for (name, mutate, message) in cases {
        let mut request = good.clone();
        mutate(&mut request);
        let status = c.register_device(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().starts_with(message),
            "{name}: {:?}",
            status.message()
        );
        assert_eq!(row_counts(&server).await, before, "{name} wrote something");
    }
    c.register_device(good)
        .await
        .expect("the unmodified request is fine");
}

async fn a_device_id_of_another_user_is_never_taken_over_or_written(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let bob = TestDevice::new(Uuid::new_v4(), "shared-id", 2);
    bob.client(&server)
        .await
        .register_device(bob.register_request())
        .await
        .unwrap();
    let before = row_counts(&server).await;

    // Mallory's token names the device id too (her backend would not mint it, but the
    // ownership check must not rely on that).
    let mallory = TestDevice::new(Uuid::new_v4(), "shared-id", 2);
    let mut m = mallory.client(&server).await;
    assert_status(
        m.register_device(mallory.register_request()).await,
        Code::AlreadyExists,
        "device_id: registered to another user",
    );
    assert_status(
        m.upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
            device_id: "shared-id".into(),
            one_time_prekeys: fresh_otks(50..=51),
        })
        .await,
        Code::PermissionDenied,
        "device_id: the device belongs to another user",
    );
    assert_status(
        m.rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
            device_id: "shared-id".into(),
            signed_prekey: Some(mallory.signed_upload(9, &KeyPair::generate())),
        })
        .await,
        Code::PermissionDenied,
        "device_id",
    );
    assert_status(
        m.get_key_status(pb::GetKeyStatusRequest {
            device_id: "shared-id".into(),
        })
        .await,
        Code::PermissionDenied,
        "device_id",
    );
    assert_status(
        m.get_key_status(pb::GetKeyStatusRequest {
            device_id: "nobody".into(),
        })
        .await,
        Code::NotFound,
        "device_id: no such device",
    );
    assert_eq!(row_counts(&server).await, before);
    let bundle = fetch(&mut m, bob.user, Some("shared-id")).await.unwrap();
    assert_eq!(
        bundle.devices[0].identity_key,
        bob.identity.public().serialize().to_vec()
    );
}

async fn re_registration_is_idempotent_and_a_new_identity_replaces_every_key(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let first = TestDevice::new(Uuid::new_v4(), "phone", 3);
    let mut c = first.client(&server).await;
    c.register_device(first.register_request()).await.unwrap();
    let again = c
        .register_device(first.register_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), pb::RegistrationOutcome::Updated);
    assert_eq!(again.one_time_prekeys_available, 3);
    assert_eq!(key_rows(&server).await, (3, 1));

    let mut peer = client(&server, Uuid::new_v4()).await;
    fetch(&mut peer, first.user, Some("phone")).await.unwrap();

    let mut reinstalled = TestDevice::new(first.user, "phone", 2);
    reinstalled.registration_id = 777;
    let replaced = c
        .register_device(reinstalled.register_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replaced.outcome(), pb::RegistrationOutcome::Replaced);
    assert_eq!(replaced.one_time_prekeys_available, 2);
    assert_eq!(key_rows(&server).await, (2, 1));

    let bundle = fetch(&mut peer, first.user, Some("phone"))
        .await
        .unwrap()
        .devices
        .remove(0);
    let bundle = verify_bundle(&bundle).unwrap();
    assert_eq!(bundle.keys.identity_key, reinstalled.identity.public());
    assert_eq!(bundle.registration_id, 777);
    assert_eq!(
        bundle.keys.one_time_prekey,
        Some((1, reinstalled.one_time[0].1.public()))
    );

    let outcomes: Vec<_> = audit_events(&server, "device_keys_generated")
        .await
        .into_iter()
        .map(|m| m["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(outcomes, ["created", "updated", "replaced"]);
}

async fn uploads_are_retry_safe_and_never_restore_a_consumed_key(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dev = TestDevice::new(Uuid::new_v4(), "phone", 0);
    let mut c = dev.client(&server).await;
    c.register_device(dev.register_request()).await.unwrap();
    let batch = fresh_otks(10..=11);
    let upload = |keys: Vec<pb::OneTimePreKeyUpload>| pb::UploadOneTimePreKeysRequest {
        device_id: "phone".into(),
        one_time_prekeys: keys,
    };

    let first = c
        .upload_one_time_pre_keys(upload(batch.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.stored_key_ids, [10, 11]);
    assert_eq!(first.one_time_prekeys_available, 2);

    // The answer was lost; meanwhile a peer took key 10; the device retries the same batch.
    let mut peer = client(&server, Uuid::new_v4()).await;
    let taken = fetch(&mut peer, dev.user, Some("phone")).await.unwrap();
    assert_eq!(
        taken.devices[0].one_time_prekey.as_ref().unwrap().key_id,
        10
    );
    let retry = c
        .upload_one_time_pre_keys(upload(batch.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.stored_key_ids.is_empty());
    assert_eq!(retry.unchanged_key_ids, [11]);
    assert_eq!(retry.refused_consumed_key_ids, [10]);
    assert_eq!(retry.one_time_prekeys_available, 1);

    let next = fetch(&mut peer, dev.user, Some("phone")).await.unwrap();
    assert_eq!(next.devices[0].one_time_prekey.as_ref().unwrap().key_id, 11);
    let empty = fetch(&mut peer, dev.user, Some("phone")).await.unwrap();
    assert!(
        empty.devices[0].one_time_prekey.is_none(),
        "key 10 is never served again"
    );

    let before = row_counts(&server).await;
    let mut changed = batch.clone();
    changed[1].public_key = KeyPair::generate().public().serialize().to_vec();
    assert_status(
        c.upload_one_time_pre_keys(upload(vec![
            fresh_otks(12..=12).remove(0),
            changed[1].clone(),
        ]))
        .await,
        Code::AlreadyExists,
        "one_time_prekeys: key id 11 is already stored with a different public key",
    );
    assert_status(
        c.upload_one_time_pre_keys(upload(vec![])).await,
        Code::InvalidArgument,
        "one_time_prekeys: must hold 1 to 100 keys, got 0",
    );
    assert_status(
        c.upload_one_time_pre_keys(upload(fresh_otks(100..=200)))
            .await,
        Code::InvalidArgument,
        "one_time_prekeys: must hold 1 to 100 keys, got 101",
    );
    assert_status(
        c.upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
            device_id: "unknown".into(),
            one_time_prekeys: fresh_otks(1..=1),
        })
        .await,
        Code::PermissionDenied,
        "device_id: the token is bound to another device",
    );
    assert_status(
        device_client(&server, dev.user, "unknown")
            .await
            .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
                device_id: "unknown".into(),
                one_time_prekeys: fresh_otks(1..=1),
            })
            .await,
        Code::NotFound,
        "device_id: no such device",
    );
    assert_eq!(
        row_counts(&server).await,
        before,
        "refused uploads wrote nothing"
    );

    let events = audit_events(&server, "prekeys_replenished").await;
    assert_eq!(
        events.len(),
        1,
        "only the upload that stored keys is audited"
    );
    assert_eq!(events[0]["stored"], 2);
}

async fn rotation_keeps_exactly_one_active_key_and_refuses_reused_ids(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dev = TestDevice::new(Uuid::new_v4(), "phone", 1);
    let mut c = dev.client(&server).await;
    c.register_device(dev.register_request()).await.unwrap();
    let rotate = |key: pb::SignedPreKeyUpload| pb::RotateSignedPreKeyRequest {
        device_id: "phone".into(),
        signed_prekey: Some(key),
    };

    let second = KeyPair::generate();
    let upload = dev.signed_upload(2, &second);
    let rotated = c
        .rotate_signed_pre_key(rotate(upload.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.rotated);
    assert_eq!(rotated.previous_key_id, Some(1));
    let retried = c
        .rotate_signed_pre_key(rotate(upload))
        .await
        .unwrap()
        .into_inner();
    assert!(!retried.rotated, "re-sending the same rotation is a no-op");

    let before = row_counts(&server).await;
    assert_status(
        c.rotate_signed_pre_key(rotate(dev.signed_upload(1, &KeyPair::generate())))
            .await,
        Code::AlreadyExists,
        "signed_prekey.key_id: 1 is already stored",
    );
    assert_status(
        c.rotate_signed_pre_key(rotate(dev.signed_upload(1, &dev.signed)))
            .await,
        Code::FailedPrecondition,
        "signed_prekey.key_id: 1 was already replaced",
    );
    let mut forged = dev.signed_upload(3, &KeyPair::generate());
    forged.signature = KeyPair::generate().sign(&forged.public_key).to_vec();
    assert_status(
        c.rotate_signed_pre_key(rotate(forged)).await,
        Code::InvalidArgument,
        "signed_prekey.signature: does not verify with the device's identity key",
    );
    assert_eq!(row_counts(&server).await, before);

    assert_eq!(
        count(
            &server,
            "SELECT count(*) FROM nchat_signed_prekeys WHERE is_active"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &server,
            "SELECT count(*) FROM nchat_signed_prekeys WHERE NOT is_active"
        )
        .await,
        1
    );
    let mut peer = client(&server, Uuid::new_v4()).await;
    let bundle = fetch(&mut peer, dev.user, None)
        .await
        .unwrap()
        .devices
        .remove(0);
    assert_eq!(bundle.signed_prekey.unwrap().key_id, 2);
    let events = audit_events(&server, "signed_prekey_rotated").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["previous_signed_prekey_id"], 1);
}

async fn concurrent_rotations_of_one_device_leave_exactly_one_active_key(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dev = TestDevice::new(Uuid::new_v4(), "phone", 0);
    dev.client(&server)
        .await
        .register_device(dev.register_request())
        .await
        .unwrap();
    let uploads: Vec<_> = (2..=17)
        .map(|id| dev.signed_upload(id, &KeyPair::generate()))
        .collect();
    let mut tasks = Vec::new();
    for upload in uploads {
        let mut c = dev.client(&server).await;
        tasks.push(tokio::spawn(async move {
            c.rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
                device_id: "phone".into(),
                signed_prekey: Some(upload),
            })
            .await
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().unwrap().into_inner().rotated);
    }
    assert_eq!(
        count(
            &server,
            "SELECT count(*) FROM nchat_signed_prekeys WHERE is_active"
        )
        .await,
        1
    );
    assert_eq!(
        count(&server, "SELECT count(*) FROM nchat_signed_prekeys").await,
        17
    );
    assert_eq!(
        audit_events(&server, "signed_prekey_rotated").await.len(),
        16
    );
}

async fn status_reports_rotation_due_after_seven_days(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dev = TestDevice::new(Uuid::new_v4(), "phone", 12);
    let mut c = dev.client(&server).await;
    c.register_device(dev.register_request()).await.unwrap();
    let status = |c: &mut keyserver_client::api::KeyClient| {
        let mut c = c.clone();
        async move {
            c.get_key_status(pb::GetKeyStatusRequest {
                device_id: "phone".into(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let fresh = status(&mut c).await;
    assert_eq!(fresh.one_time_prekeys_available, 12);
    assert!(!fresh.replenish_recommended && !fresh.rotation_due);
    assert!(fresh.active_signed_prekey_created_at.is_some());

    let age = |pg: &'static str, sqlite: &'static str| {
        let db = server.db.clone();
        async move {
            db.execute_either(
                &format!("UPDATE nchat_signed_prekeys SET rotation_date = NOW() - INTERVAL '{pg}'"),
                &format!(
                    "UPDATE nchat_signed_prekeys SET rotation_date = \
                     strftime('%Y-%m-%dT%H:%M:%fZ', 'now', {sqlite})"
                ),
            )
            .await
        }
    };
    age("6 days 23 hours", "'-6 days', '-23 hours'").await;
    assert!(!status(&mut c).await.rotation_due);
    age("7 days 1 hour", "'-7 days', '-1 hours'").await;
    let old = status(&mut c).await;
    assert!(old.rotation_due);
    assert!(old.active_signed_prekey_age_seconds > 7 * 24 * 3600);

    let mut peer = client(&server, Uuid::new_v4()).await;
    for _ in 0..3 {
        fetch(&mut peer, dev.user, None).await.unwrap();
    }
    let low = status(&mut c).await;
    assert_eq!(low.one_time_prekeys_available, 9);
    assert!(low.replenish_recommended);
}

async fn bulk_fetch_answers_each_target_in_order_and_never_shares_a_key_twice(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let bob = Uuid::new_v4();
    let carol = Uuid::new_v4();
    TestDevice::new(bob, "bob-1", 5).register(&server).await;
    TestDevice::new(bob, "bob-2", 5).register(&server).await;
    TestDevice::new(carol, "carol-1", 5).register(&server).await;

    let mut alice = client(&server, Uuid::new_v4()).await;
    let nobody = Uuid::new_v4();
    let targets = vec![
        target(carol, Some("carol-1")),
        target(bob, None),
        target(nobody, None),
        target(bob, Some("bob-1")),
    ];
    let results = alice
        .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest {
            targets: targets.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 4);
    for (result, requested) in results.iter().zip(&targets) {
        assert_eq!(result.target.as_ref(), Some(requested));
    }
    let statuses: Vec<_> = results.iter().map(|r| r.status()).collect();
    use pb::TargetStatus::{Found, NotFound};
    assert_eq!(statuses, [Found, Found, NotFound, Found]);
    let devices = |i: usize| -> Vec<(String, u32)> {
        results[i]
            .devices
            .iter()
            .map(|d| {
                (
                    d.device_id.clone(),
                    d.one_time_prekey.as_ref().unwrap().key_id,
                )
            })
            .collect()
    };
    assert_eq!(devices(0), [("carol-1".to_owned(), 1)]);
    assert_eq!(
        devices(1),
        [("bob-1".to_owned(), 1), ("bob-2".to_owned(), 1)]
    );
    assert!(results[2].devices.is_empty());
    // bob-1 was named twice: one key was taken and both results show it.
    assert_eq!(devices(3), [("bob-1".to_owned(), 1)]);
    assert_eq!(
        count(
            &server,
            "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed"
        )
        .await,
        3
    );

    assert_status(
        alice
            .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest {
                targets: vec![target(bob, None), target(carol, None), target(bob, None)],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "targets[2]: duplicates targets[0]",
    );
    assert_status(
        alice
            .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest {
                targets: (0..257).map(|_| target(Uuid::new_v4(), None)).collect(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "targets: must hold 1 to 256 targets, got 257",
    );
    assert_status(
        alice
            .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest {
                targets: vec![pb::Target {
                    user_id: "not-a-uuid".into(),
                    device_id: None,
                }],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "targets[0].user_id: must be a UUID",
    );
    assert_eq!(
        count(
            &server,
            "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed"
        )
        .await,
        3
    );
}

async fn calls_without_a_valid_token_are_unauthenticated(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let user = Uuid::new_v4();
    let request = || pb::GetKeyStatusRequest {
        device_id: "phone".into(),
    };

    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anonymous = pb::key_service_client::KeyServiceClient::new(channel);
    assert_status(
        anonymous.get_key_status(request()).await,
        Code::Unauthenticated,
        "missing authorization",
    );

    use keyserver::auth::{TokenAuthority, TokenPolicy};
    let unknown = TokenAuthority::new(&[vec![7u8; 32]], TokenPolicy::default()).unwrap();
    let forged = unknown.mint(user, None, Duration::from_secs(60)).unwrap();
    let mut c = keyserver_client::api::connect(&server.url, &forged)
        .await
        .unwrap();
    assert_status(
        c.get_key_status(request()).await,
        Code::Unauthenticated,
        "the token names no key (kid)",
    );

    let authority = TokenAuthority::new(
        &[keyserver::testing::TEST_SECRET.to_vec()],
        TokenPolicy::default(),
    )
    .unwrap();
    let expired = authority.mint(user, None, Duration::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await; // past the 5 s leeway
    let mut c = keyserver_client::api::connect(&server.url, &expired)
        .await
        .unwrap();
    assert_status(
        c.get_key_status(request()).await,
        Code::Unauthenticated,
        "the token has expired",
    );

    let mut c = client(&server, user).await;
    assert_status(
        c.get_key_status(request()).await,
        Code::NotFound,
        "device_id: no such device",
    );
}

async fn health_and_reflection_are_served(backend: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus;

    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    assert_eq!(
        health(&server, "keyserver.v1.KeyService").await,
        ServingStatus::Serving
    );
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"keyserver.v1.KeyService"), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    }
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "keyserver.v1.KeyService".into(),
            )),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = stream.message().await.unwrap().unwrap().message_response;
        assert!(
            matches!(response, Some(MessageResponse::FileDescriptorResponse(f)) if !f.file_descriptor_proto.is_empty())
        );
    }
    server.stop().await.expect("graceful stop");
}

async fn the_bundle_view_is_refreshed_off_the_request_path(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dev = TestDevice::new(Uuid::new_v4(), "phone", 2);
    let mut owner = dev.client(&server).await;
    owner.register_device(dev.register_request()).await.unwrap();
    let view = || async {
        server
            .db
            .integer(
                "SELECT CAST(one_time_prekey_id AS BIGINT) FROM nchat_prekey_bundles
                 WHERE device_id = 'phone'",
            )
            .await
    };
    let shows = |want: i64| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let row = view().await;
            if row == Some(want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "view shows {row:?}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // The registration is refreshed into the view: the next key is the first one.
    shows(1).await;
    let mut peer = client(&server, Uuid::new_v4()).await;
    fetch(&mut peer, dev.user, None).await.unwrap();
    if backend == Backend::Postgres {
        // Fetches alone never re-arm the refresh: five refresh periods later (200 ms in tests)
        // the materialized view still shows the key just handed out.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(view().await, Some(1), "a fetch re-armed the view refresh");
    }
    // The next write refreshes it, fetches included.
    owner
        .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
            device_id: "phone".into(),
            one_time_prekeys: fresh_otks(3..=3),
        })
        .await
        .unwrap();
    shows(2).await;
}

/// A fetch retried with its idempotency key gets the keys the first attempt took and takes
/// no more; the key is the requesting user's alone, and only good for the retry window.
async fn a_retried_fetch_gets_the_same_keys_and_takes_no_more(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start_with(
        &db,
        keyserver::testing::TestConfig {
            fetch_retry_window: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    let bob = TestDevice::pqxdh(Uuid::new_v4(), "bob-phone", 10, 2);
    bob.register(&server).await;
    let x3dh = TestDevice::new(bob.user, "bob-laptop", 10);
    x3dh.register(&server).await;
    let (mut alice, mut mallory) = (
        client(&server, Uuid::new_v4()).await,
        client(&server, Uuid::new_v4()).await,
    );
    let phone = || vec![target(bob.user, Some("bob-phone"))];
    let taken = |kind: &'static str| {
        let (server, table) = (&server, kind);
        async move {
            server
                .db
                .count(&format!(
                    "SELECT count(*) FROM {table} WHERE is_consumed AND fetch_key IS NOT NULL"
                ))
                .await
        }
    };

    let first = fetch_with_key(&mut alice, phone(), "k-1").await.unwrap();
    assert_eq!(first, [(Some(1), Some(1))]);
    assert_eq!(
        fetch_with_key(&mut alice, phone(), "k-1").await.unwrap(),
        first
    );
    // The same key from another user is that user's own fetch.
    assert_eq!(
        fetch_with_key(&mut mallory, phone(), "k-1").await.unwrap(),
        [(Some(2), Some(2))]
    );
    // Every device of a bulk call, the X3DH one too; a retry repeats each.
    let all = vec![target(bob.user, None)];
    let bulk = fetch_with_key(&mut alice, all.clone(), "k-2")
        .await
        .unwrap();
    assert_eq!(
        bulk,
        [(Some(1), None), (Some(3), Some(LAST_RESORT_ID))],
        "bob-laptop, then bob-phone, out of one-time Kyber keys"
    );
    assert_eq!(fetch_with_key(&mut alice, all, "k-2").await.unwrap(), bulk);
    assert_eq!(
        (
            taken("nchat_one_time_prekeys").await,
            taken("nchat_kyber_prekeys").await
        ),
        (4, 2),
        "retries took nothing"
    );
    // A call without a key takes a new key every time.
    for want in [4, 5] {
        let bundle = fetch(&mut alice, bob.user, Some("bob-phone"))
            .await
            .unwrap();
        assert_eq!(
            bundle.devices[0].one_time_prekey.as_ref().unwrap().key_id,
            want
        );
    }
    // After the window a retry is a new fetch.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        fetch_with_key(&mut alice, phone(), "k-1").await.unwrap(),
        [(Some(6), Some(LAST_RESORT_ID))]
    );
    for bad in ["has space", "é", &"k".repeat(65)] {
        assert_status(
            fetch_with_key(&mut alice, phone(), bad).await,
            Code::InvalidArgument,
            "idempotency_key: must be 1 to 64",
        );
    }
    assert_eq!(taken("nchat_one_time_prekeys").await, 5);
}

conformance!(register_then_fetch_serves_verified_bundles_taking_prekeys_in_upload_order);
conformance!(fetch_all_devices_leaves_out_devices_without_an_active_signed_prekey);
conformance!(every_bad_registration_is_refused_precisely_and_writes_nothing);
conformance!(a_device_id_of_another_user_is_never_taken_over_or_written);
conformance!(re_registration_is_idempotent_and_a_new_identity_replaces_every_key);
conformance!(uploads_are_retry_safe_and_never_restore_a_consumed_key);
conformance!(rotation_keeps_exactly_one_active_key_and_refuses_reused_ids);
conformance!(concurrent_rotations_of_one_device_leave_exactly_one_active_key);
conformance!(status_reports_rotation_due_after_seven_days);
conformance!(bulk_fetch_answers_each_target_in_order_and_never_shares_a_key_twice);
conformance!(calls_without_a_valid_token_are_unauthenticated);
conformance!(health_and_reflection_are_served);
conformance!(the_bundle_view_is_refreshed_off_the_request_path);
conformance!(a_retried_fetch_gets_the_same_keys_and_takes_no_more);

/// A client given several servers of one deployment (comma separated, as `keyctl --server`
/// takes them) connects to one it can reach: never to one that is down, and to another once
/// one has stopped; with none reachable it says which it tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_several_servers_connects_to_one_that_answers() {
    let db = TestDb::migrated(Backend::Sqlite).await;
    let (a, b) = (TestServer::start(&db).await, TestServer::start(&db).await);
    let device = TestDevice::new(Uuid::new_v4(), "phone", 3);
    device.register(&a).await;
    let down = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let token = a.device_token(device.user, &device.device_id);
    // Ten connections to `servers`, each starting from a random one of them, all answered.
    let answered_ten_times = |servers: String| {
        let (token, device_id) = (token.clone(), device.device_id.clone());
        async move {
            for _ in 0..10 {
                let mut client = keyserver_client::api::connect(servers.as_str(), &token)
                    .await
                    .unwrap();
                let answer = client
                    .get_key_status(pb::GetKeyStatusRequest {
                        device_id: device_id.clone(),
                    })
                    .await
                    .unwrap();
                assert_eq!(answer.into_inner().one_time_prekeys_available, 3);
            }
        }
    };
    let a_url = a.url.clone();
    answered_ten_times(format!("{down},{a_url}")).await;
    answered_ten_times(format!("{a_url},{down}")).await;
    a.stop().await.unwrap();
    answered_ten_times(format!("{down},{a_url},{}", b.url)).await;
    let none = format!("{down},{a_url}");
    let refused = keyserver_client::api::connect(none.as_str(), &token)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        refused.starts_with("no server could be reached")
            && refused.contains(&down)
            && refused.contains(&a_url),
        "{refused}"
    );
}
