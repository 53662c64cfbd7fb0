//! Removing a device on both backends: its keys and sessions go with it, fetchers never see it
//! again, the owner's safety numbers change, and only the owner can do it.

#[macro_use]
mod common;

use common::*;
use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::api::{connect_safety_numbers, connect_sessions};
use keyserver_proto::pb;
use tonic::Code;
use uuid::Uuid;

async fn removing_a_device_takes_everything_that_hangs_off_it(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let bob = Uuid::new_v4();
    let mut b = client(&server, bob).await;
    for name in ["bob-phone", "bob-tablet"] {
        TestDevice::new(bob, name, 5).register(&server).await;
    }
    let alice = TestDevice::new(Uuid::new_v4(), "alice-phone", 1);
    alice
        .client(&server)
        .await
        .register_device(alice.register_request())
        .await
        .unwrap();

    // The tablet has a session with Alice, and Alice verified Bob's safety number.
    let mut sessions = connect_sessions(&server.url, &server.device_token(bob, "bob-tablet"))
        .await
        .unwrap();
    sessions
        .put_session(pb::PutSessionRequest {
            key: Some(pb::SessionKey {
                device_id: "bob-tablet".into(),
                peer_user_id: alice.user.to_string(),
                peer_device_id: "alice-phone".into(),
            }),
            state: b"ratchet".to_vec(),
            is_initiator: true,
            expected_version: 0,
        })
        .await
        .unwrap();
    let mut safety = connect_safety_numbers(&server.url, &server.token(alice.user))
        .await
        .unwrap();
    let request = pb::GetSafetyNumberRequest {
        peer_user_id: bob.to_string(),
    };
    let before = safety
        .get_safety_number(request.clone())
        .await
        .unwrap()
        .into_inner();
    safety
        .verify_safety_number(pb::VerifySafetyNumberRequest {
            peer_user_id: bob.to_string(),
            safety_number: before.safety_number.clone(),
            method: pb::VerificationMethod::Manual.into(),
        })
        .await
        .unwrap();

    // Mallory's token names Bob's device id, yet the device is not hers; and Bob's own token
    // of no device, or of another device, may not remove it either.
    let mut mallory = keyserver_client::api::connect(
        &server.url,
        &server.device_token(Uuid::new_v4(), "bob-tablet"),
    )
    .await
    .unwrap();
    assert_status(
        mallory
            .remove_device(pb::RemoveDeviceRequest {
                device_id: "bob-tablet".into(),
            })
            .await,
        Code::PermissionDenied,
        "device_id: the device belongs to another user",
    );
    let mut phone =
        keyserver_client::api::connect(&server.url, &server.device_token(bob, "bob-phone"))
            .await
            .unwrap();
    for other in [&mut b, &mut phone] {
        assert_status(
            other
                .remove_device(pb::RemoveDeviceRequest {
                    device_id: "bob-tablet".into(),
                })
                .await,
            Code::PermissionDenied,
            "device_id: ",
        );
    }
    let mut b =
        keyserver_client::api::connect(&server.url, &server.device_token(bob, "bob-tablet"))
            .await
            .unwrap();
    let removed = b
        .remove_device(pb::RemoveDeviceRequest {
            device_id: "bob-tablet".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.sessions_removed, 1);
    assert_status(
        b.remove_device(pb::RemoveDeviceRequest {
            device_id: "bob-tablet".into(),
        })
        .await,
        Code::NotFound,
        "device_id: no such device",
    );

    for (table, left) in [
        ("nchat_identity_keys WHERE device_id = 'bob-tablet'", 0),
        ("nchat_signed_prekeys WHERE device_id = 'bob-tablet'", 0),
        ("nchat_one_time_prekeys WHERE device_id = 'bob-tablet'", 0),
        ("nchat_signal_sessions WHERE device_id = 'bob-tablet'", 0),
        ("nchat_one_time_prekeys WHERE device_id = 'bob-phone'", 5),
    ] {
        assert_eq!(
            server
                .db
                .count(&format!("SELECT count(*) FROM {table}"))
                .await,
            left,
            "{table}"
        );
    }
    let bundles = fetch(&mut mallory, bob, None).await.unwrap();
    let names: Vec<_> = bundles
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(names, ["bob-phone"]);
    assert_status(
        fetch(&mut mallory, bob, Some("bob-tablet")).await,
        Code::NotFound,
        "target",
    );

    let after = safety
        .get_safety_number(request)
        .await
        .unwrap()
        .into_inner();
    assert_ne!(after.safety_number, before.safety_number);
    assert!(!after.verified && after.changed_since_verification);
    let events = server.db.audit_metadata("device_keys_generated").await;
    assert_eq!(events.last().unwrap()["outcome"], "removed");
    assert_eq!(
        server
            .db
            .audit_metadata("safety_number_changed")
            .await
            .len(),
        1
    );
}
conformance!(removing_a_device_takes_everything_that_hangs_off_it);
