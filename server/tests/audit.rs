//! The audit service on both backends: a user reads only their own events, newest first,
//! filtered by type and time, a page at a time.

#[macro_use]
mod common;

use common::*;
use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_proto::pb;
use tonic::Code;
use uuid::Uuid;

async fn list(
    server: &TestServer,
    user: Uuid,
    request: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, tonic::Status> {
    keyserver_client::api::connect_audit(&server.url, &server.token(user))
        .await
        .unwrap()
        .list_audit_events(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn a_user_reads_their_own_trail_filtered_and_paged(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let alice = TestDevice::new(Uuid::new_v4(), "alice-phone", 2);
    let mut c = alice.client(&server).await;
    c.register_device(alice.register_request()).await.unwrap();
    c.upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
        device_id: "alice-phone".into(),
        one_time_prekeys: fresh_otks(10..=12),
    })
    .await
    .unwrap();
    for id in 2..=4 {
        c.rotate_signed_pre_key(pb::RotateSignedPreKeyRequest {
            device_id: "alice-phone".into(),
            signed_prekey: Some(
                alice.signed_upload(id, &keyserver_client::keys::KeyPair::generate()),
            ),
        })
        .await
        .unwrap();
    }
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", 1);
    bob.client(&server)
        .await
        .register_device(bob.register_request())
        .await
        .unwrap();

    let all = list(&server, alice.user, pb::ListAuditEventsRequest::default())
        .await
        .unwrap();
    let types: Vec<_> = all.events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "signed_prekey_rotated",
            "signed_prekey_rotated",
            "signed_prekey_rotated",
            "prekeys_replenished",
            "device_keys_generated",
        ],
        "only Alice's events, newest first"
    );
    assert!(
        all.events
            .iter()
            .all(|e| e.device_id.as_deref() == Some("alice-phone"))
    );
    let newest: serde_json::Value = serde_json::from_str(&all.events[0].metadata_json).unwrap();
    assert_eq!(newest["signed_prekey_id"], 4);
    assert!(all.next_page_token.is_empty());

    let rotations = list(
        &server,
        alice.user,
        pb::ListAuditEventsRequest {
            event_types: vec!["signed_prekey_rotated".into()],
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rotations.events.len(), 2);
    let rest = list(
        &server,
        alice.user,
        pb::ListAuditEventsRequest {
            event_types: vec!["signed_prekey_rotated".into()],
            page_size: 2,
            page_token: rotations.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rest.events.len(), 1);
    assert!(rest.events[0].id < rotations.events[1].id);

    let future = prost_types::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    };
    let none = list(
        &server,
        alice.user,
        pb::ListAuditEventsRequest {
            since: Some(future),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(none.events.is_empty());
    let before_now = list(
        &server,
        alice.user,
        pb::ListAuditEventsRequest {
            until: Some(future),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(before_now.events.len(), 5);

    assert_status(
        list(
            &server,
            alice.user,
            pb::ListAuditEventsRequest {
                event_types: vec!["keys_stolen".into()],
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "event_types[0]: \"keys_stolen\" is not an audit event type",
    );
    assert_status(
        list(
            &server,
            alice.user,
            pb::ListAuditEventsRequest {
                page_token: "x".into(),
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    let stranger = list(
        &server,
        Uuid::new_v4(),
        pb::ListAuditEventsRequest::default(),
    )
    .await
    .unwrap();
    assert!(stranger.events.is_empty());
}
conformance!(a_user_reads_their_own_trail_filtered_and_paged);
