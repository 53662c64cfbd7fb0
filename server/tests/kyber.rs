//! PQXDH on the key service, over real gRPC on both backends: what a bundle of a Kyber device
//! carries and in what order, X3DH devices beside PQXDH ones and a PQXDH-only server, every
//! refused Kyber upload (writing nothing), retry-safety of uploads and rotations, and the key
//! consistency and identity checks.

#[macro_use]
mod common;

use common::*;
use keyserver::config::CleanupSettings;
use keyserver::jobs::{Job, Trigger};
use keyserver::shutdown::CancellationToken;
use keyserver::store::Serve;
use keyserver::testing::{Backend, TestConfig, TestDb, TestServer};
use keyserver_client::api::verify_bundle;
use keyserver_client::keys::{KeyPair, KyberKeyPair};
use keyserver_proto::checks;
use keyserver_proto::pb;
use time::OffsetDateTime;
use tonic::Code;
use uuid::Uuid;

/// Rows in every table a registration or a Kyber upload writes, to show a refused call wrote
/// nothing.
async fn row_counts(server: &TestServer) -> Vec<i64> {
    let mut counts = Vec::new();
    for sql in [
        "SELECT count(*) FROM nchat_identity_keys",
        "SELECT count(*) FROM nchat_signed_prekeys",
        "SELECT count(*) FROM nchat_one_time_prekeys",
        "SELECT count(*) FROM nchat_kyber_prekeys",
        "SELECT count(*) FROM nchat_kyber_prekeys WHERE is_active",
        "SELECT count(*) FROM nchat_e2ee_audit_log",
    ] {
        counts.push(server.db.count(sql).await);
    }
    counts
}

async fn kyber_status(
    c: &mut keyserver_client::api::KeyClient,
    device: &str,
) -> pb::GetKeyStatusResponse {
    c.get_key_status(pb::GetKeyStatusRequest {
        device_id: device.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn bundles_carry_one_kyber_prekey_oldest_first_then_the_last_resort_key(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let bob = TestDevice::pqxdh(Uuid::new_v4(), "bob-phone", 2, 3);
    let mut bob_client = bob.client(&server).await;
    let registered = bob_client
        .register_device(bob.register_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.kyber_one_time_prekeys_available, 3);

    let mut alice = client(&server, Uuid::new_v4()).await;
    let mut served = Vec::new();
    for _ in 0..5 {
        let response = fetch(&mut alice, bob.user, Some("bob-phone"))
            .await
            .unwrap();
        let verified = verify_bundle(&response.devices[0]).expect("both signatures verify");
        let (id, key) = verified.keys.kyber_prekey.expect("a Kyber prekey");
        served.push((id, key));
    }
    let expected: Vec<_> = bob
        .kyber_one_time
        .iter()
        .map(|(id, k)| (*id, k.public().clone()))
        .chain((0..2).map(|_| {
            let (id, k) = bob.kyber_last_resort.as_ref().unwrap();
            (*id, k.public().clone())
        }))
        .collect();
    assert_eq!(
        served, expected,
        "one-time Kyber prekeys in upload order, then the last-resort key for everyone"
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE is_consumed AND consumed_at IS NOT NULL")
            .await,
        3
    );

    let status = kyber_status(&mut bob_client, "bob-phone").await;
    assert_eq!(status.kyber_one_time_prekeys_available, 0);
    assert_eq!(status.kyber_last_resort_prekey_id, Some(LAST_RESORT_ID));
    assert!(status.kyber_last_resort_prekey_created_at.is_some());
    assert!(status.kyber_replenish_recommended && status.replenish_recommended);
    assert!(!status.kyber_rotation_due && !status.rotation_due);

    let events = server.db.audit_metadata("device_keys_generated").await;
    assert_eq!(events[0]["kyber_last_resort_prekey_id"], LAST_RESORT_ID);
    assert_eq!(events[0]["kyber_one_time_prekeys_uploaded"], 3);
    assert_eq!(events[0]["kyber_one_time_prekeys_available"], 3);
}
conformance!(bundles_carry_one_kyber_prekey_oldest_first_then_the_last_resort_key);

async fn x3dh_devices_are_served_beside_pqxdh_ones_unless_the_server_requires_pqxdh(
    backend: Backend,
) {
    let db = TestDb::migrated(backend).await;
    let user = Uuid::new_v4();
    let mixed = TestServer::start(&db).await;
    let mut owner = client(&mixed, user).await;
    let legacy = TestDevice::new(user, "old-phone", 10);
    let current = TestDevice::pqxdh(user, "new-phone", 2, 2);
    for device in [&legacy, &current] {
        device.register(&mixed).await;
    }
    let legacy_status = kyber_status(&mut owner, "old-phone").await;
    assert_eq!(legacy_status.kyber_last_resort_prekey_id, None);
    assert!(
        legacy_status.kyber_rotation_due,
        "it has none: it should make one"
    );
    assert!(!legacy_status.rotation_due, "its signed prekey is fresh");
    assert!(
        !legacy_status.replenish_recommended,
        "10 one-time prekeys, and no Kyber keys it could be asked to top up"
    );

    let mut peer = client(&mixed, Uuid::new_v4()).await;
    let all = fetch(&mut peer, user, None).await.unwrap();
    let kinds: Vec<_> = all
        .devices
        .iter()
        .map(|d| (d.device_id.as_str(), d.kyber_prekey.is_some()))
        .collect();
    assert_eq!(kinds, [("new-phone", true), ("old-phone", false)]);

    let strict = TestServer::start_with(
        &db,
        TestConfig {
            serve: Serve::PqxdhOnly,
            ..TestConfig::default()
        },
    )
    .await;
    let mut peer = client(&strict, Uuid::new_v4()).await;
    let all = fetch(&mut peer, user, None).await.unwrap();
    let names: Vec<_> = all.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(names, ["new-phone"], "the X3DH device is left out");
    assert_status(
        fetch(&mut peer, user, Some("old-phone")).await,
        Code::NotFound,
        "target: device old-phone",
    );
    let bulk = peer
        .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest {
            targets: vec![
                target(user, Some("old-phone")),
                target(user, Some("new-phone")),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bulk.results[0].status(), pb::TargetStatus::NotFound);
    assert_eq!(bulk.results[1].status(), pb::TargetStatus::Found);

    let before = row_counts(&strict).await;
    let newcomer = TestDevice::new(Uuid::new_v4(), "x3dh-only", 1);
    assert_status(
        newcomer
            .client(&strict)
            .await
            .register_device(newcomer.register_request())
            .await,
        Code::InvalidArgument,
        "kyber_last_resort_prekey: is required: this server serves PQXDH only",
    );
    assert_eq!(row_counts(&strict).await, before);

    // The X3DH device catches up: a last-resort key makes it servable there too.
    let mut owner = legacy.client(&strict).await;
    owner
        .rotate_kyber_last_resort_pre_key(pb::RotateKyberLastResortPreKeyRequest {
            device_id: "old-phone".into(),
            kyber_last_resort_prekey: Some(legacy.kyber_upload(77, &KyberKeyPair::generate())),
        })
        .await
        .unwrap();
    let bundle = fetch(&mut peer, user, Some("old-phone")).await.unwrap();
    assert_eq!(bundle.devices[0].kyber_prekey.as_ref().unwrap().key_id, 77);
}
conformance!(x3dh_devices_are_served_beside_pqxdh_ones_unless_the_server_requires_pqxdh);

async fn every_bad_kyber_upload_is_refused_precisely_and_writes_nothing(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dev = TestDevice::pqxdh(Uuid::new_v4(), "dev-1", 1, 3);
    let mut c = dev.client(&server).await;
    let before = row_counts(&server).await;
    let good = dev.register_request();

    type Mutation = Box<dyn Fn(&mut pb::RegisterDeviceRequest)>;
    fn last_resort(r: &mut pb::RegisterDeviceRequest) -> &mut pb::KyberPreKeyUpload {
        r.kyber_last_resort_prekey.as_mut().unwrap()
    }
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "short Kyber key",
            Box::new(|r| {
                last_resort(r).public_key.pop();
            }),
            "kyber_last_resort_prekey.public_key: must be 1569 bytes, got 1568",
        ),
        (
            "long Kyber key",
            Box::new(|r| r.kyber_one_time_prekeys[1].public_key.push(0)),
            "kyber_one_time_prekeys[1].public_key: must be 1569 bytes, got 1570",
        ),
        (
            "Curve25519 type byte",
            Box::new(|r| r.kyber_one_time_prekeys[0].public_key[0] = 0x05),
            "kyber_one_time_prekeys[0].public_key: must start with type byte 0x08, got 0x05",
        ),
        (
            "signature length",
            Box::new(|r| {
                last_resort(r).signature.pop();
            }),
            "kyber_last_resort_prekey.signature: must be 64 bytes, got 63",
        ),
        (
            "signature bit flip",
            Box::new(|r| r.kyber_one_time_prekeys[2].signature[33] ^= 0x10),
            "kyber_one_time_prekeys[2].signature: does not verify",
        ),
        (
            "signed by another identity",
            Box::new(|r| {
                let key = last_resort(r);
                key.signature = KeyPair::generate().sign(&key.public_key).to_vec();
            }),
            "kyber_last_resort_prekey.signature: does not verify",
        ),
        (
            "signature over the raw key, without its type byte",
            Box::new({
                let identity = dev.identity.clone();
                move |r| {
                    let key = &mut r.kyber_one_time_prekeys[0];
                    key.signature = identity.sign(&key.public_key[1..]).to_vec();
                }
            }),
            "kyber_one_time_prekeys[0].signature: does not verify",
        ),
        (
            "empty private blob",
            Box::new(|r| last_resort(r).encrypted_private_key.clear()),
            "kyber_last_resort_prekey.encrypted_private_key: must be 1 to 3232 bytes, got 0",
        ),
        (
            "oversized private blob",
            Box::new(|r| r.kyber_one_time_prekeys[0].encrypted_private_key = vec![1; 3233]),
            "kyber_one_time_prekeys[0].encrypted_private_key: must be 1 to 3232 bytes, got 3233",
        ),
        (
            "key id out of range",
            Box::new(|r| r.kyber_one_time_prekeys[0].key_id = 0x100_0000),
            "kyber_one_time_prekeys[0].key_id: must be at most 16777215",
        ),
        (
            "duplicate one-time ids",
            Box::new(|r| r.kyber_one_time_prekeys[2].key_id = 1),
            "kyber_one_time_prekeys[2].key_id: duplicates kyber_one_time_prekeys[0].key_id (1)",
        ),
        (
            "a one-time id that is the last-resort key's",
            Box::new(|r| r.kyber_one_time_prekeys[1].key_id = LAST_RESORT_ID),
            "kyber_one_time_prekeys[1].key_id: is the last-resort Kyber prekey's id",
        ),
        (
            "one-time Kyber keys without a last-resort one",
            Box::new(|r| r.kyber_last_resort_prekey = None),
            "kyber_last_resort_prekey: is required with kyber_one_time_prekeys",
        ),
        (
            "101 one-time Kyber keys",
            Box::new({
                let keys = dev.fresh_kyber(1..=101);
                move |r| r.kyber_one_time_prekeys = keys.clone()
            }),
            "kyber_one_time_prekeys: must hold 0 to 100 keys, got 101",
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

    // The Kyber RPCs refuse as precisely, and write nothing either.
    let before = row_counts(&server).await;
    let upload = |keys: Vec<pb::KyberPreKeyUpload>| pb::UploadKyberPreKeysRequest {
        device_id: "dev-1".into(),
        kyber_one_time_prekeys: keys,
    };
    assert_status(
        c.upload_kyber_pre_keys(upload(Vec::new())).await,
        Code::InvalidArgument,
        "kyber_one_time_prekeys: must hold 1 to 100 keys, got 0",
    );
    let mut tampered = dev.fresh_kyber(10..=11);
    tampered[1].signature[0] ^= 1;
    assert_status(
        c.upload_kyber_pre_keys(upload(tampered)).await,
        Code::InvalidArgument,
        "kyber_one_time_prekeys[1].signature: does not verify",
    );
    assert_status(
        c.rotate_kyber_last_resort_pre_key(pb::RotateKyberLastResortPreKeyRequest {
            device_id: "dev-1".into(),
            kyber_last_resort_prekey: None,
        })
        .await,
        Code::InvalidArgument,
        "kyber_last_resort_prekey: is required",
    );
    let mut rotation = dev.kyber_upload(90, &KyberKeyPair::generate());
    rotation.signature[63] ^= 0x80;
    assert_status(
        c.rotate_kyber_last_resort_pre_key(pb::RotateKyberLastResortPreKeyRequest {
            device_id: "dev-1".into(),
            kyber_last_resort_prekey: Some(rotation),
        })
        .await,
        Code::InvalidArgument,
        "kyber_last_resort_prekey.signature: does not verify",
    );
    // Mallory's token names dev-1 too (her backend would not mint it, but the ownership check
    // must not rely on that).
    let mallory = TestDevice::pqxdh(Uuid::new_v4(), "dev-1", 0, 0);
    let mut m = mallory.client(&server).await;
    assert_status(
        m.upload_kyber_pre_keys(upload(mallory.fresh_kyber(20..=20)))
            .await,
        Code::PermissionDenied,
        "device_id: the device belongs to another user",
    );
    let mut m = device_client(&server, mallory.user, "nobody").await;
    assert_status(
        m.upload_kyber_pre_keys(pb::UploadKyberPreKeysRequest {
            device_id: "nobody".into(),
            kyber_one_time_prekeys: mallory.fresh_kyber(20..=20),
        })
        .await,
        Code::NotFound,
        "device_id: no such device",
    );
    assert_eq!(row_counts(&server).await, before);

    // An X3DH device cannot take one-time Kyber keys before it has a last-resort key: its
    // bundles would fall back to X3DH when they ran out.
    let legacy = TestDevice::new(dev.user, "dev-2", 1);
    let mut c = legacy.client(&server).await;
    c.register_device(legacy.register_request()).await.unwrap();
    let before = row_counts(&server).await;
    assert_status(
        c.upload_kyber_pre_keys(pb::UploadKyberPreKeysRequest {
            device_id: "dev-2".into(),
            kyber_one_time_prekeys: legacy.fresh_kyber(1..=2),
        })
        .await,
        Code::FailedPrecondition,
        "the device has no kyber_last_resort_prekey",
    );
    assert_eq!(row_counts(&server).await, before);
}
conformance!(every_bad_kyber_upload_is_refused_precisely_and_writes_nothing);

async fn kyber_uploads_are_retry_safe_and_a_consumed_id_is_never_stored_again(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig::default();
    let server = TestServer::start_with(&db, config.clone()).await;
    let bob = TestDevice::pqxdh(Uuid::new_v4(), "bob-phone", 0, 0);
    let mut c = bob.client(&server).await;
    c.register_device(bob.register_request()).await.unwrap();
    let keys = bob.fresh_kyber(10..=11);
    let upload = |keys: Vec<pb::KyberPreKeyUpload>| pb::UploadKyberPreKeysRequest {
        device_id: "bob-phone".into(),
        kyber_one_time_prekeys: keys,
    };

    let first = c
        .upload_kyber_pre_keys(upload(keys.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.stored_key_ids, [10, 11]);
    assert_eq!(first.kyber_one_time_prekeys_available, 2);
    // The answer was lost; the device sends the same request again.
    let retried = c
        .upload_kyber_pre_keys(upload(keys.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(retried.stored_key_ids.is_empty());
    assert_eq!(retried.unchanged_key_ids, [10, 11]);

    // A peer takes key 10; a late retry must not put it back.
    let mut peer = client(&server, Uuid::new_v4()).await;
    let taken = fetch(&mut peer, bob.user, Some("bob-phone")).await.unwrap();
    assert_eq!(taken.devices[0].kyber_prekey.as_ref().unwrap().key_id, 10);
    let late = c
        .upload_kyber_pre_keys(upload(keys.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.refused_consumed_key_ids, [10]);
    assert_eq!(late.unchanged_key_ids, [11]);
    assert_eq!(late.kyber_one_time_prekeys_available, 1);

    // Other bytes under a stored id, or the last-resort key's id, fail the whole call.
    let before = server
        .db
        .count("SELECT count(*) FROM nchat_kyber_prekeys")
        .await;
    let mut conflicting = bob.fresh_kyber(11..=12);
    conflicting.reverse();
    assert_status(
        c.upload_kyber_pre_keys(upload(conflicting)).await,
        Code::AlreadyExists,
        "kyber_one_time_prekeys: key id 11 is already stored with a different public key",
    );
    assert_status(
        c.upload_kyber_pre_keys(upload(bob.fresh_kyber(LAST_RESORT_ID..=LAST_RESORT_ID)))
            .await,
        Code::AlreadyExists,
        &format!("kyber_one_time_prekeys: key id {LAST_RESORT_ID} is already stored"),
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys")
            .await,
        before
    );

    // Cleanup deletes the consumed key after the retention period and keeps its id refused.
    server
        .db
        .set_time(
            "nchat_kyber_prekeys",
            "consumed_at",
            "is_consumed",
            OffsetDateTime::now_utc() - time::Duration::days(31),
        )
        .await;
    let jobs = config.jobs(&server.db);
    let report = finished(
        jobs.run(Job::Cleanup, Trigger::Cli, &CancellationToken::new())
            .await
            .unwrap(),
    );
    assert_eq!(report.count("consumed_kyber_prekeys"), 1, "{report}");
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE kyber_prekey_id = 10")
            .await,
        0
    );
    let after_cleanup = c
        .upload_kyber_pre_keys(upload(keys))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after_cleanup.refused_consumed_key_ids, [10]);

    let events = server.db.audit_metadata("prekeys_replenished").await;
    assert_eq!(
        events.len(),
        1,
        "only the upload that stored keys is audited"
    );
    assert_eq!(events[0]["kind"], "kyber_one_time");
    assert_eq!(events[0]["stored"], 2);
    assert_eq!(events[0]["kyber_one_time_prekeys_available"], 2);
}
conformance!(kyber_uploads_are_retry_safe_and_a_consumed_id_is_never_stored_again);

async fn a_last_resort_rotation_is_retry_safe_and_the_previous_key_stays_until_cleanup(
    backend: Backend,
) {
    let db = TestDb::migrated(backend).await;
    let config = TestConfig {
        cleanup: CleanupSettings::default(),
        ..TestConfig::default()
    };
    let server = TestServer::start_with(&db, config.clone()).await;
    let bob = TestDevice::pqxdh(Uuid::new_v4(), "bob-phone", 0, 1);
    let mut c = bob.client(&server).await;
    c.register_device(bob.register_request()).await.unwrap();
    let next = KyberKeyPair::generate();
    let rotate = |key: pb::KyberPreKeyUpload| pb::RotateKyberLastResortPreKeyRequest {
        device_id: "bob-phone".into(),
        kyber_last_resort_prekey: Some(key),
    };

    let rotated = c
        .rotate_kyber_last_resort_pre_key(rotate(bob.kyber_upload(500, &next)))
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.rotated);
    assert_eq!(rotated.previous_key_id, Some(LAST_RESORT_ID));
    let again = c
        .rotate_kyber_last_resort_pre_key(rotate(bob.kyber_upload(500, &next)))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.rotated, "a retried rotation changes nothing");
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE is_last_resort AND NOT is_active AND superseded_at IS NOT NULL")
            .await,
        1,
        "the previous key stays, inactive, for late messages"
    );
    assert_status(
        c.rotate_kyber_last_resort_pre_key(rotate(
            bob.kyber_upload(LAST_RESORT_ID, &bob.kyber_last_resort.as_ref().unwrap().1),
        ))
        .await,
        Code::FailedPrecondition,
        &format!("kyber_last_resort_prekey.key_id: {LAST_RESORT_ID} was already replaced"),
    );
    assert_status(
        c.rotate_kyber_last_resort_pre_key(rotate(bob.kyber_upload(1, &KyberKeyPair::generate())))
            .await,
        Code::AlreadyExists,
        "kyber_last_resort_prekey.key_id: 1 is already stored",
    );

    // The one-time key goes first, then the new last-resort key, never the old one.
    let mut peer = client(&server, Uuid::new_v4()).await;
    let ids: Vec<u32> = {
        let mut ids = Vec::new();
        for _ in 0..3 {
            let b = fetch(&mut peer, bob.user, Some("bob-phone")).await.unwrap();
            ids.push(b.devices[0].kyber_prekey.as_ref().unwrap().key_id);
        }
        ids
    };
    assert_eq!(ids, [1, 500, 500]);

    let events = server.db.audit_metadata("signed_prekey_rotated").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["kind"], "kyber_last_resort");
    assert_eq!(events[0]["kyber_prekey_id"], 500);
    assert_eq!(events[0]["previous_kyber_prekey_id"], LAST_RESORT_ID);

    // After the retention period cleanup removes the old key, and its id stays refused.
    server
        .db
        .set_time(
            "nchat_kyber_prekeys",
            "superseded_at",
            "NOT is_active",
            OffsetDateTime::now_utc() - time::Duration::days(31),
        )
        .await;
    let jobs = config.jobs(&server.db);
    let report = finished(
        jobs.run(Job::Cleanup, Trigger::Cli, &CancellationToken::new())
            .await
            .unwrap(),
    );
    assert_eq!(report.count("superseded_kyber_last_resort_prekeys"), 1);
    assert_status(
        c.rotate_kyber_last_resort_pre_key(rotate(
            bob.kyber_upload(LAST_RESORT_ID, &bob.kyber_last_resort.as_ref().unwrap().1),
        ))
        .await,
        Code::FailedPrecondition,
        &format!("kyber_last_resort_prekey.key_id: {LAST_RESORT_ID} was already replaced"),
    );
    let status = kyber_status(&mut c, "bob-phone").await;
    assert_eq!(status.kyber_last_resort_prekey_id, Some(500));

    // The rotation check reports last-resort keys past the rotation age too.
    server
        .db
        .set_time(
            "nchat_kyber_prekeys",
            "created_at",
            "is_active",
            OffsetDateTime::now_utc() - time::Duration::days(8),
        )
        .await;
    let report = finished(
        jobs.run(Job::Rotate, Trigger::Cli, &CancellationToken::new())
            .await
            .unwrap(),
    );
    assert_eq!(report.count("kyber_rotation_due"), 1, "{report}");
    assert_eq!(report.count("kyber_stale"), 0, "{report}");
    assert_eq!(report.count("rotation_due"), 0, "{report}");
    let status = kyber_status(&mut c, "bob-phone").await;
    assert!(status.kyber_rotation_due && status.rotation_due);
}
conformance!(a_last_resort_rotation_is_retry_safe_and_the_previous_key_stays_until_cleanup);

async fn a_new_identity_replaces_kyber_keys_and_the_same_one_merges_them(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let user = Uuid::new_v4();
    let mut c = device_client(&server, user, "phone").await;

    // Registered before PQXDH; the same identity registers again with Kyber keys.
    let mut phone = TestDevice::new(user, "phone", 1);
    c.register_device(phone.register_request()).await.unwrap();
    phone.kyber_last_resort = Some((LAST_RESORT_ID, KyberKeyPair::generate()));
    phone.kyber_one_time = (1..=2).map(|id| (id, KyberKeyPair::generate())).collect();
    let updated = c
        .register_device(phone.register_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.outcome(), pb::RegistrationOutcome::Updated);
    assert_eq!(updated.kyber_one_time_prekeys_available, 2);
    let again = c
        .register_device(phone.register_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.kyber_one_time_prekeys_available, 2,
        "merged, not doubled"
    );

    // A reinstall (a new identity key) makes every Kyber key of the old one meaningless.
    let reinstalled = TestDevice::pqxdh(user, "phone", 1, 1);
    let replaced = c
        .register_device(reinstalled.register_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replaced.outcome(), pb::RegistrationOutcome::Replaced);
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys")
            .await,
        2
    );
    let mut peer = client(&server, Uuid::new_v4()).await;
    let bundle = fetch(&mut peer, user, Some("phone")).await.unwrap();
    let verified = verify_bundle(&bundle.devices[0]).unwrap();
    assert_eq!(
        verified.keys.kyber_prekey.unwrap().1,
        reinstalled.kyber_one_time[0].1.public().clone()
    );
}
conformance!(a_new_identity_replaces_kyber_keys_and_the_same_one_merges_them);

async fn check_keys_tells_a_device_whether_the_server_holds_its_keys(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let bob = TestDevice::pqxdh(Uuid::new_v4(), "bob-phone", 0, 0);
    let mut c = bob.client(&server).await;
    c.register_device(bob.register_request()).await.unwrap();
    let (lr_id, lr) = bob.kyber_last_resort.as_ref().unwrap();
    let digest = |signed: &KeyPair, signed_id: u32| {
        checks::published_keys_digest(
            &bob.identity.public(),
            (signed_id, &signed.public()),
            (*lr_id, lr.public()),
        )
        .to_vec()
    };
    let check = |digest: Vec<u8>| pb::CheckKeysRequest {
        device_id: "bob-phone".into(),
        digest,
    };
    async fn matches(
        c: &mut keyserver_client::api::KeyClient,
        request: pb::CheckKeysRequest,
    ) -> bool {
        c.check_keys(request).await.unwrap().into_inner().matches
    }
    assert!(matches(&mut c, check(digest(&bob.signed, bob.signed_id))).await);

    // The server's signed prekey changed (another copy of the device rotated it): no match.
    let rotated = KeyPair::generate();
    c.rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
        device_id: "bob-phone".into(),
        signed_prekey: Some(bob.signed_upload(2, &rotated)),
    })
    .await
    .unwrap();
    assert!(!matches(&mut c, check(digest(&bob.signed, bob.signed_id))).await);
    assert!(matches(&mut c, check(digest(&rotated, 2))).await);

    // A device without a last-resort key never matches: it should upload one.
    let legacy = TestDevice::new(bob.user, "old-phone", 0);
    legacy.register(&server).await;
    let request = pb::CheckKeysRequest {
        device_id: "old-phone".into(),
        digest: digest(&legacy.signed, legacy.signed_id),
    };
    assert!(!c.check_keys(request).await.unwrap().into_inner().matches);

    assert_status(
        c.check_keys(check(vec![0; 31])).await,
        Code::InvalidArgument,
        "digest: must be 32 bytes, got 31",
    );
    let mut other = client(&server, Uuid::new_v4()).await;
    assert_status(
        other.check_keys(check(vec![0; 32])).await,
        Code::PermissionDenied,
        "device_id: the device belongs to another user",
    );
}
conformance!(check_keys_tells_a_device_whether_the_server_holds_its_keys);

async fn identity_checks_answer_only_the_keys_that_changed(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let (alice, bob, nobody) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let a1 = TestDevice::new(alice, "a-1", 0);
    let a2 = TestDevice::new(alice, "a-2", 0);
    let b1 = TestDevice::new(bob, "b-1", 0);
    for d in [&a1, &a2, &b1] {
        d.client(&server)
            .await
            .register_device(d.register_request())
            .await
            .unwrap();
    }
    let fp = |d: &TestDevice| checks::identity_fingerprint(&d.identity.public()).to_vec();
    let stale = checks::identity_fingerprint(&KeyPair::generate().public()).to_vec();
    let check = |user: Uuid, device: Option<&str>, fingerprint: Vec<u8>| pb::IdentityKeyCheck {
        user_id: user.to_string(),
        device_id: device.map(str::to_owned),
        fingerprint,
    };
    let mut c = client(&server, Uuid::new_v4()).await;
    let answer = c
        .check_identity_keys(pb::CheckIdentityKeysRequest {
            checks: vec![
                check(alice, Some("a-1"), fp(&a1)),
                check(alice, Some("a-2"), stale.clone()),
                check(bob, None, fp(&b1)),
                check(alice, None, stale.clone()),
                check(alice, Some("a-3"), stale.clone()),
                check(nobody, None, stale.clone()),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(String, String, Vec<u8>)> = answer
        .mismatches
        .into_iter()
        .map(|m| (m.user_id, m.device_id, m.identity_key))
        .collect();
    let key = |d: &TestDevice| d.identity.public().serialize().to_vec();
    let mut alices = vec![
        (alice.to_string(), "a-1".to_owned(), key(&a1)),
        (alice.to_string(), "a-2".to_owned(), key(&a2)),
    ];
    alices.sort();
    let mut expected = vec![(alice.to_string(), "a-2".to_owned(), key(&a2))];
    expected.extend(alices);
    expected.push((alice.to_string(), "a-3".to_owned(), Vec::new()));
    expected.push((nobody.to_string(), String::new(), Vec::new()));
    let (head, tail) = got.split_at(1);
    let mut middle = tail[..2].to_vec();
    middle.sort();
    assert_eq!(
        [head, &middle[..], &tail[2..]].concat(),
        expected,
        "mismatches only, in the order of the checks"
    );

    assert_status(
        c.check_identity_keys(pb::CheckIdentityKeysRequest { checks: Vec::new() })
            .await,
        Code::InvalidArgument,
        "checks: must hold 1 to 1000 checks, got 0",
    );
    assert_status(
        c.check_identity_keys(pb::CheckIdentityKeysRequest {
            checks: vec![check(alice, None, fp(&a1)); 1001],
        })
        .await,
        Code::InvalidArgument,
        "checks: must hold 1 to 1000 checks, got 1001",
    );
    assert_status(
        c.check_identity_keys(pb::CheckIdentityKeysRequest {
            checks: vec![check(alice, None, fp(&a1)), check(bob, None, vec![1, 2, 3])],
        })
        .await,
        Code::InvalidArgument,
        "checks[1].fingerprint: must be 4 bytes, got 3",
    );
}
conformance!(identity_checks_answer_only_the_keys_that_changed);

/// A device restored from a backup registers with `replace_one_time_prekeys`: every unused
/// one-time prekey of both kinds from its earlier uploads is withdrawn in the same transaction
/// as its new ones are stored, ids already handed out stay refused, and the audit event counts
/// what was withdrawn. Fetchers then only ever get the new keys.
async fn a_restored_device_withdraws_the_one_time_prekeys_it_cannot_answer(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let bob = TestDevice::pqxdh(uuid::Uuid::new_v4(), "bob-phone", 10, 10);
    bob.register(&server).await;
    let mut alice = client(&server, uuid::Uuid::new_v4()).await;
    let taken = fetch(&mut alice, bob.user, Some("bob-phone"))
        .await
        .unwrap();
    let device = &taken.devices[0];
    assert_eq!(device.one_time_prekey.as_ref().map(|k| k.key_id), Some(1));
    assert_eq!(device.kyber_prekey.as_ref().map(|k| k.key_id), Some(1));

    // The restored device: the same identity, new keys with ids 1..=5 (1 was handed out) and
    // 50..=54.
    let mut restored = TestDevice::pqxdh(bob.user, "bob-phone", 0, 0);
    restored.identity = bob.identity.clone();
    restored.signed_id = 2;
    restored.kyber_last_resort = Some((LAST_RESORT_ID + 1, KyberKeyPair::generate()));
    let mut request = restored.register_request();
    request.one_time_prekeys = [fresh_otks(1..=5), fresh_otks(50..=54)].concat();
    request.kyber_one_time_prekeys =
        [restored.fresh_kyber(1..=5), restored.fresh_kyber(50..=54)].concat();
    request.replace_one_time_prekeys = true;
    let mut b = bob.client(&server).await;
    let answer = b
        .register_device(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outcome(), pb::RegistrationOutcome::Updated);
    assert_eq!(
        (
            answer.one_time_prekeys_withdrawn,
            answer.kyber_one_time_prekeys_withdrawn
        ),
        (9, 9)
    );
    assert_eq!(
        (
            answer.one_time_prekeys_available,
            answer.kyber_one_time_prekeys_available
        ),
        (9, 9),
        "ids 2..=5 and 50..=54 stored, id 1 refused: it was handed out"
    );
    let audit = server.db.audit_metadata("device_keys_generated").await;
    let last = audit.last().unwrap();
    assert_eq!(last["one_time_prekeys_withdrawn"], 9, "{last}");
    assert_eq!(last["kyber_one_time_prekeys_withdrawn"], 9, "{last}");

    // Every key handed out from now on is one of the restored device's.
    let ours = |ids: &[pb::OneTimePreKeyUpload]| {
        ids.iter().map(|k| k.public_key.clone()).collect::<Vec<_>>()
    };
    let new_ec = ours(&request.one_time_prekeys);
    let new_kyber: Vec<Vec<u8>> = request
        .kyber_one_time_prekeys
        .iter()
        .map(|k| k.public_key.clone())
        .collect();
    for _ in 0..9 {
        let bundle = fetch(&mut alice, bob.user, Some("bob-phone"))
            .await
            .unwrap();
        let d = &bundle.devices[0];
        assert!(new_ec.contains(&d.one_time_prekey.as_ref().unwrap().public_key));
        assert!(new_kyber.contains(&d.kyber_prekey.as_ref().unwrap().public_key));
    }
    let bundle = fetch(&mut alice, bob.user, Some("bob-phone"))
        .await
        .unwrap();
    assert!(bundle.devices[0].one_time_prekey.is_none());
    assert_eq!(
        bundle.devices[0].kyber_prekey.as_ref().map(|k| k.key_id),
        Some(LAST_RESORT_ID + 1)
    );

    // A registration without the flag appends: nothing is withdrawn.
    request.replace_one_time_prekeys = false;
    request.one_time_prekeys = fresh_otks(60..=61);
    request.kyber_one_time_prekeys = restored.fresh_kyber(60..=61);
    let answer = b.register_device(request).await.unwrap().into_inner();
    assert_eq!(
        (
            answer.one_time_prekeys_withdrawn,
            answer.kyber_one_time_prekeys_available
        ),
        (0, 2)
    );
}
conformance!(a_restored_device_withdraws_the_one_time_prekeys_it_cannot_answer);
