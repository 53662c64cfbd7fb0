//! The session service on both backends: compare-and-swap writes, paging, ownership, the size
//! limit, and the audit events of establishing and destroying a session.

#[macro_use]
mod common;

use common::*;
use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::api::SessionClient as Sessions;
use keyserver_proto::pb;
use tonic::Code;
use uuid::Uuid;

/// A registered device of a new user, a session client for that user, and a peer user.
async fn setup(server: &TestServer) -> (Sessions, Uuid) {
    let owner = Uuid::new_v4();
    TestDevice::new(owner, "phone", 0).register(server).await;
    let peer = Uuid::new_v4();
    TestDevice::new(peer, "peer-phone", 0)
        .register(server)
        .await;
    (session_client(server, owner).await, peer)
}

/// A session client of `user`'s device "phone", the device the tests' sessions belong to.
async fn session_client(server: &TestServer, user: Uuid) -> Sessions {
    keyserver_client::api::connect_sessions(&server.url, &server.device_token(user, "phone"))
        .await
        .unwrap()
}

fn key(peer: Uuid, peer_device: &str) -> pb::SessionKey {
    pb::SessionKey {
        device_id: "phone".into(),
        peer_user_id: peer.to_string(),
        peer_device_id: peer_device.into(),
    }
}

fn put(peer: Uuid, state: &[u8], expected_version: u64) -> pb::PutSessionRequest {
    pb::PutSessionRequest {
        key: Some(key(peer, "peer-phone")),
        state: state.to_vec(),
        is_initiator: true,
        expected_version,
    }
}

async fn get(c: &mut Sessions, peer: Uuid) -> pb::Session {
    c.get_session(pb::GetSessionRequest {
        key: Some(key(peer, "peer-phone")),
    })
    .await
    .unwrap()
    .into_inner()
    .session
    .unwrap()
}

async fn a_session_lives_through_put_touch_destroy_and_put_again(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let (mut c, peer) = setup(&server).await;

    assert_eq!(
        c.put_session(put(peer, b"ratchet-1", 0))
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    assert_eq!(
        c.put_session(put(peer, b"ratchet-2", 1))
            .await
            .unwrap()
            .into_inner()
            .version,
        2
    );
    let session = get(&mut c, peer).await;
    assert_eq!(session.state, b"ratchet-2");
    assert!(session.active && session.is_initiator);
    assert_eq!(session.version, 2);
    assert!(session.last_message_at.is_none());

    let touched = c
        .touch_session(pb::TouchSessionRequest {
            key: Some(key(peer, "peer-phone")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        get(&mut c, peer).await.last_message_at,
        touched.last_message_at
    );
    assert_eq!(
        get(&mut c, peer).await.version,
        2,
        "touching is not a state write"
    );

    let destroyed = c
        .destroy_session(pb::DestroySessionRequest {
            key: Some(key(peer, "peer-phone")),
            expected_version: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destroyed.version, 3);
    let gone = get(&mut c, peer).await;
    assert!(!gone.active);
    assert!(gone.state.is_empty(), "destroying wipes the ratchet state");
    assert_status(
        c.touch_session(pb::TouchSessionRequest {
            key: Some(key(peer, "peer-phone")),
        })
        .await,
        Code::NotFound,
        "key: no such session",
    );

    assert_eq!(
        c.put_session(put(peer, b"fresh", 3))
            .await
            .unwrap()
            .into_inner()
            .version,
        4
    );
    assert_eq!(
        server.db.audit_metadata("session_established").await.len(),
        2
    );
    let destroyed_events = server.db.audit_metadata("session_destroyed").await;
    assert_eq!(destroyed_events.len(), 1);
    assert_eq!(destroyed_events[0]["peer_device_id"], "peer-phone");
}
conformance!(a_session_lives_through_put_touch_destroy_and_put_again);

async fn a_stale_writer_gets_aborted_and_writes_nothing(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let (mut c, peer) = setup(&server).await;
    c.put_session(put(peer, b"v1", 0)).await.unwrap();
    c.put_session(put(peer, b"v2", 1)).await.unwrap();

    assert_status(
        c.put_session(put(peer, b"stale", 1)).await,
        Code::Aborted,
        "expected_version: the session is at version 2, not 1",
    );
    assert_status(
        c.put_session(put(peer, b"again", 0)).await,
        Code::Aborted,
        "expected_version: the session is at version 2, not 0",
    );
    assert_status(
        c.destroy_session(pb::DestroySessionRequest {
            key: Some(key(peer, "peer-phone")),
            expected_version: 1,
        })
        .await,
        Code::Aborted,
        "expected_version",
    );
    let session = get(&mut c, peer).await;
    assert_eq!((session.state.as_slice(), session.version), (&b"v2"[..], 2));
    assert_eq!(
        server.db.audit_metadata("session_established").await.len(),
        1
    );
}
conformance!(a_stale_writer_gets_aborted_and_writes_nothing);

async fn of_eight_concurrent_writers_of_one_version_exactly_one_wins(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let (mut c, peer) = setup(&server).await;
    c.put_session(put(peer, b"base", 0)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put_session(put(peer, &[i; 16], 1))
                .await
                .map(|r| (i, r.into_inner().version))
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(won) => winners.push(won),
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (winner, version) = winners[0];
    let session = get(&mut c, peer).await;
    assert_eq!(
        (session.state, session.version),
        (vec![winner; 16], version)
    );
}
conformance!(multi_thread; of_eight_concurrent_writers_of_one_version_exactly_one_wins);

async fn bad_session_requests_are_refused_precisely(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let (mut c, peer) = setup(&server).await;
    let limit = 64 * 1024;
    assert_status(
        c.put_session(put(peer, &vec![1; limit + 1], 0)).await,
        Code::InvalidArgument,
        "state: must be 1 to 65536 bytes, got 65537",
    );
    assert_status(
        c.put_session(put(peer, &[], 0)).await,
        Code::InvalidArgument,
        "state: must be 1",
    );
    c.put_session(put(peer, &vec![1; limit], 0))
        .await
        .expect("exactly 64 KiB is fine");

    let mut unknown_peer = put(Uuid::new_v4(), b"x", 0);
    unknown_peer.key.as_mut().unwrap().peer_device_id = "d".into();
    assert_status(
        c.put_session(unknown_peer).await,
        Code::NotFound,
        "key.peer_user_id: no such user",
    );
    let mut bad_key = put(peer, b"x", 0);
    bad_key.key.as_mut().unwrap().peer_user_id = "nope".into();
    assert_status(
        c.put_session(bad_key).await,
        Code::InvalidArgument,
        "key.peer_user_id: must be a UUID",
    );
    assert_status(
        c.get_session(pb::GetSessionRequest {
            key: Some(key(peer, "other-device")),
        })
        .await,
        Code::NotFound,
        "key: no such session",
    );

    // Another user can neither read nor write this device's sessions.
    let mut stranger = session_client(&server, Uuid::new_v4()).await;
    assert_status(
        stranger.put_session(put(peer, b"x", 1)).await,
        Code::PermissionDenied,
        "device_id",
    );
    assert_status(
        stranger
            .get_session(pb::GetSessionRequest {
                key: Some(key(peer, "peer-phone")),
            })
            .await,
        Code::PermissionDenied,
        "device_id",
    );
    assert_status(
        stranger
            .list_sessions(pb::ListSessionsRequest {
                device_id: "phone".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "device_id",
    );
    assert_eq!(get(&mut c, peer).await.version, 1);
}
conformance!(bad_session_requests_are_refused_precisely);

async fn sessions_list_in_pages_active_only_unless_asked(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let (mut c, peer) = setup(&server).await;
    for device in ["d1", "d2", "d3", "d4", "d5"] {
        let mut request = put(peer, device.as_bytes(), 0);
        request.key = Some(key(peer, device));
        c.put_session(request).await.unwrap();
    }
    c.destroy_session(pb::DestroySessionRequest {
        key: Some(key(peer, "d3")),
        expected_version: 1,
    })
    .await
    .unwrap();

    let list = |include_inactive: bool, page_token: String| pb::ListSessionsRequest {
        device_id: "phone".into(),
        peer_user_id: Some(peer.to_string()),
        include_inactive,
        page_size: 2,
        page_token,
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_sessions(list(false, token))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(
            page.sessions
                .iter()
                .map(|s| s.key.as_ref().unwrap().peer_device_id.clone()),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["d1", "d2", "d4", "d5"]);
    assert_eq!(pages, 3, "the last full page is followed by an empty one");

    let all = c
        .list_sessions(pb::ListSessionsRequest {
            page_size: 10,
            ..list(true, String::new())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.sessions.len(), 5);
    assert!(all.next_page_token.is_empty());
    let other_peer = c
        .list_sessions(pb::ListSessionsRequest {
            peer_user_id: Some(Uuid::new_v4().to_string()),
            ..list(true, String::new())
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other_peer.sessions.is_empty());
    assert_status(
        c.list_sessions(list(false, "zz".into())).await,
        Code::InvalidArgument,
        "page_token: is not a token this server returned",
    );
    assert_status(
        c.list_sessions(pb::ListSessionsRequest {
            page_size: 501,
            ..list(false, String::new())
        })
        .await,
        Code::InvalidArgument,
        "page_size: must be at most 500",
    );
}
conformance!(sessions_list_in_pages_active_only_unless_asked);
