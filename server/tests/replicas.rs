//! The read pool (`--read-database-url`, PostgreSQL only): the calls that take no key and write
//! nothing read from the replica, fetches and writes go to the primary, and the primary answers
//! those reads while no replica gives a connection.
//!
//! The "replica" here is a second database holding the same device with other keys, so each
//! answer shows which database it was read from.

mod common;

use common::*;
use keyserver::testing::{Backend, TestConfig, TestDb, TestServer};
use keyserver_proto::pb;
use uuid::Uuid;

async fn identity_keys(server: &TestServer, user: Uuid) -> Vec<Vec<u8>> {
    client(server, user)
        .await
        .get_identity_keys(pb::GetIdentityKeysRequest {
            user_id: user.to_string(),
        })
        .await
        .expect("identity keys")
        .into_inner()
        .identity_keys
}

async fn audit_events(server: &TestServer, user: Uuid) -> Vec<u64> {
    let mut ids: Vec<u64> = keyserver_client::api::connect_audit(&server.url, &server.token(user))
        .await
        .unwrap()
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .expect("audit events")
        .into_inner()
        .events
        .iter()
        .map(|e| e.id)
        .collect();
    ids.sort_unstable();
    ids
}

fn with_replica(url: String) -> TestConfig {
    TestConfig {
        read_replica: Some(url),
        ..TestConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_less_reads_go_to_the_replica_and_fetches_to_the_primary() {
    let primary = TestDb::migrated(Backend::Postgres).await;
    let replica = TestDb::migrated(Backend::Postgres).await;
    let server = TestServer::start_with(&primary, with_replica(replica.url().to_owned())).await;
    let on_replica = TestServer::start(&replica).await;
    let user = Uuid::new_v4();
    let (here, there) = (
        TestDevice::new(user, "phone", 5),
        TestDevice::new(user, "phone", 2),
    );
    here.register(&server).await;
    there.register(&on_replica).await;
    // A second write on the primary only, so the audit trails differ too.
    here.client(&server)
        .await
        .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
            device_id: here.device_id.clone(),
            one_time_prekeys: fresh_otks(100..=101),
        })
        .await
        .expect("uploading on the primary");

    let replica_key = there.identity.public().serialize().to_vec();
    assert_eq!(
        identity_keys(&server, user).await,
        vec![replica_key.clone()]
    );
    assert_eq!(
        key_status(&server, &here).await.one_time_prekeys_available,
        2
    );
    assert_eq!(
        audit_events(&server, user).await,
        audit_events(&on_replica, user).await
    );

    // A fetch takes its key on the primary, never on the replica.
    let mut fetcher = client(&server, Uuid::new_v4()).await;
    let bundle = fetch(&mut fetcher, user, Some("phone")).await.unwrap();
    assert_eq!(
        bundle.devices[0].identity_key,
        here.identity.public().serialize().to_vec()
    );
    let consumed = "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed";
    assert_eq!(server.db.count(consumed).await, 1);
    assert_eq!(on_replica.db.count(consumed).await, 0);

    server.stop().await.unwrap();
    on_replica.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_answers_reads_while_no_replica_gives_a_connection() {
    let primary = TestDb::migrated(Backend::Postgres).await;
    // A port nothing listens on: the replica is down from the start.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("postgres://postgres@127.0.0.1:{port}/keyserver");
    let server = TestServer::start_with(&primary, with_replica(down)).await;
    let user = Uuid::new_v4();
    let device = TestDevice::new(user, "phone", 3);
    device.register(&server).await;
    let key = device.identity.public().serialize().to_vec();
    for _ in 0..3 {
        assert_eq!(identity_keys(&server, user).await, vec![key.clone()]);
        assert_eq!(
            key_status(&server, &device)
                .await
                .one_time_prekeys_available,
            3
        );
        assert!(!audit_events(&server, user).await.is_empty());
    }
    server.stop().await.unwrap();
}
