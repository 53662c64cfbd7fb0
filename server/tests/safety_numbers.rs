//! Safety numbers on both backends: the server's number is libsignal's fingerprint over every
//! device identity key of both users; verification only of the current number; any identity
//! key change recomputes stored numbers, clears their verification and is audited.

#[macro_use]
mod common;

use common::*;
use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::api::{SafetyNumberClient, connect_safety_numbers};
use keyserver_proto::fingerprint;
use keyserver_proto::pb;
use tonic::Code;
use uuid::Uuid;

async fn safety(server: &TestServer, user: Uuid) -> SafetyNumberClient {
    connect_safety_numbers(&server.url, &server.token(user))
        .await
        .unwrap()
}

async fn get(c: &mut SafetyNumberClient, peer: Uuid) -> pb::GetSafetyNumberResponse {
    c.get_safety_number(pb::GetSafetyNumberRequest {
        peer_user_id: peer.to_string(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn verify(
    peer: Uuid,
    number: &str,
    method: pb::VerificationMethod,
) -> pb::VerifySafetyNumberRequest {
    pb::VerifySafetyNumberRequest {
        peer_user_id: peer.to_string(),
        safety_number: number.to_owned(),
        method: method.into(),
    }
}

async fn verified_numbers_are_cleared_when_an_identity_key_changes(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let alice = TestDevice::new(Uuid::new_v4(), "alice-phone", 0);
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", 0);
    alice.register(&server).await;
    bob.register(&server).await;
    let (mut a, mut b) = (
        safety(&server, alice.user).await,
        safety(&server, bob.user).await,
    );

    let expected = fingerprint::safety_number(
        &fingerprint::user_digits(alice.user.as_bytes(), [alice.identity.public()]),
        &fingerprint::user_digits(bob.user.as_bytes(), [bob.identity.public()]),
    );
    let seen_by_alice = get(&mut a, bob.user).await;
    assert_eq!(seen_by_alice.safety_number, expected);
    assert_eq!(
        get(&mut b, alice.user).await.safety_number,
        expected,
        "both sides see one number"
    );
    assert!(!seen_by_alice.verified && !seen_by_alice.changed_since_verification);

    use pb::VerificationMethod::{Manual, QrCode, Unspecified};
    // Every digit moved by one: 60 digits, never the current number.
    let wrong: String = expected
        .bytes()
        .map(|d| char::from(b'0' + (d - b'0' + 1) % 10))
        .collect();
    assert_status(
        a.verify_safety_number(verify(bob.user, &wrong, Manual))
            .await,
        Code::FailedPrecondition,
        "safety_number: is not the current safety number",
    );
    assert_status(
        a.verify_safety_number(verify(bob.user, "12345", Manual))
            .await,
        Code::InvalidArgument,
        "safety_number: must be 60 digits",
    );
    assert_status(
        a.verify_safety_number(verify(bob.user, &expected, Unspecified))
            .await,
        Code::InvalidArgument,
        "method:",
    );
    assert_status(
        a.verify_safety_number(verify(alice.user, &expected, Manual))
            .await,
        Code::InvalidArgument,
        "peer_user_id: a safety number is between two different users",
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_safety_numbers")
            .await,
        0
    );

    a.verify_safety_number(verify(bob.user, &expected, QrCode))
        .await
        .unwrap();
    let verified = get(&mut a, bob.user).await;
    assert!(verified.verified);
    assert_eq!(verified.method(), QrCode);
    assert!(verified.verified_at.is_some());
    assert!(
        !get(&mut b, alice.user).await.verified,
        "Bob has not verified"
    );

    // Re-registering with the same identity key changes nothing.
    bob.register(&server).await;
    assert!(get(&mut a, bob.user).await.verified);

    // Bob reinstalls with a new identity key.
    let mut reinstalled = TestDevice::new(bob.user, "bob-phone", 0);
    reinstalled.signed_id = 9;
    reinstalled.register(&server).await;
    let changed = get(&mut a, bob.user).await;
    assert_ne!(changed.safety_number, expected);
    assert!(!changed.verified && changed.changed_since_verification);
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_safety_numbers WHERE verified_at IS NULL AND verification_method IS NULL")
            .await,
        1,
        "the stored number was recomputed and its verification cleared"
    );
    let events = server.db.audit_metadata("safety_number_changed").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["peer_user_id"], bob.user.to_string());
    assert_eq!(
        server
            .db
            .audit_metadata("safety_number_verified")
            .await
            .len(),
        1
    );

    // Verified again, then Bob adds a second device: the number changes again.
    a.verify_safety_number(verify(bob.user, &changed.safety_number, Manual))
        .await
        .unwrap();
    TestDevice::new(bob.user, "bob-tablet", 0)
        .register(&server)
        .await;
    let with_tablet = get(&mut a, bob.user).await;
    assert_ne!(with_tablet.safety_number, changed.safety_number);
    assert!(with_tablet.changed_since_verification);
    assert_eq!(
        server
            .db
            .audit_metadata("safety_number_changed")
            .await
            .len(),
        2
    );
}
conformance!(verified_numbers_are_cleared_when_an_identity_key_changes);

async fn users_without_devices_have_no_safety_number(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let alice = TestDevice::new(Uuid::new_v4(), "alice-phone", 0);
    alice.register(&server).await;
    let mut a = safety(&server, alice.user).await;
    assert_status(
        a.get_safety_number(pb::GetSafetyNumberRequest {
            peer_user_id: Uuid::new_v4().to_string(),
        })
        .await,
        Code::NotFound,
        "peer_user_id: the user has no registered device",
    );
    let mut nobody = safety(&server, Uuid::new_v4()).await;
    assert_status(
        nobody
            .get_safety_number(pb::GetSafetyNumberRequest {
                peer_user_id: alice.user.to_string(),
            })
            .await,
        Code::FailedPrecondition,
        "the caller has no registered device",
    );

    // The identity-key listing used to compute numbers takes no prekey.
    let mut keys = client(&server, Uuid::new_v4()).await;
    let listed = keys
        .get_identity_keys(pb::GetIdentityKeysRequest {
            user_id: alice.user.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.identity_keys,
        [alice.identity.public().serialize().to_vec()]
    );
    let own = alice
        .client(&server)
        .await
        .get_identity_keys(pb::GetIdentityKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.user_id, alice.user.to_string());
}
conformance!(users_without_devices_have_no_safety_number);
