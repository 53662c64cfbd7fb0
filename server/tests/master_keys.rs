//! Master-key records and recovery on both backends: only the code's hash is stored, the
//! minimum iteration count holds, recovery returns the sealed identity keys and is audited, and
//! failed attempts lock recovery.

#[macro_use]
mod common;

use common::*;
use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::api::{MasterKeyClient, connect_master_keys};
use keyserver_proto::pb;
use tonic::Code;
use uuid::Uuid;

const CODE: &str = "ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ23-4567";

fn record(code: &str, iterations: u32) -> pb::PutMasterKeyRequest {
    pb::PutMasterKeyRequest {
        salt: vec![7; 32],
        pbkdf2_iterations: iterations,
        recovery_code: code.into(),
    }
}

async fn master(server: &TestServer, user: Uuid) -> MasterKeyClient {
    connect_master_keys(&server.url, &server.token(user))
        .await
        .unwrap()
}

async fn recover(
    m: &mut MasterKeyClient,
    code: &str,
) -> Result<pb::RecoverDeviceResponse, tonic::Status> {
    m.recover_device(pb::RecoverDeviceRequest {
        recovery_code: code.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn a_recovery_code_restores_the_sealed_identity_keys(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let user = Uuid::new_v4();
    let device = TestDevice::new(user, "phone", 1);
    device.register(&server).await;
    let mut m = master(&server, user).await;

    assert_status(
        recover(&mut m, CODE).await,
        Code::NotFound,
        "the user has no master-key record",
    );
    assert_status(
        m.put_master_key(record(CODE, 99_999)).await,
        Code::InvalidArgument,
        "pbkdf2_iterations: must be at least 100000",
    );
    assert_status(
        m.put_master_key(record("too-short", 100_000)).await,
        Code::InvalidArgument,
        "recovery_code: must be 32 base32",
    );
    let mut short_salt = record(CODE, 100_000);
    short_salt.salt.pop();
    assert_status(
        m.put_master_key(short_salt).await,
        Code::InvalidArgument,
        "salt: must be 32 bytes, got 31",
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_user_master_keys")
            .await,
        0
    );

    assert!(
        m.put_master_key(record(CODE, 100_000))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    assert!(
        !m.put_master_key(record(CODE, 200_000))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    let stored = m
        .get_master_key(pb::GetMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stored.salt, stored.pbkdf2_iterations),
        (vec![7; 32], 200_000)
    );
    assert_eq!(
        server.db.audit_metadata("master_key_created").await.len(),
        1
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_user_master_keys WHERE recovery_code_hash LIKE '%ABCD%' OR length(recovery_code_hash) <> 64")
            .await,
        0,
        "only the code's SHA-256 is stored"
    );

    // Dashes and case do not matter.
    let recovered = recover(&mut m, &CODE.to_lowercase().replace('-', ""))
        .await
        .unwrap();
    assert_eq!(recovered.pbkdf2_iterations, 200_000);
    assert_eq!(recovered.devices.len(), 1);
    assert_eq!(recovered.devices[0].device_id, "phone");
    assert_eq!(
        recovered.devices[0].identity_key,
        device.identity.public().serialize().to_vec()
    );
    assert_eq!(
        recovered.devices[0].encrypted_identity_private_key,
        vec![0xBB; 61]
    );
    assert_eq!(
        server.db.audit_metadata("recovery_code_used").await.len(),
        1
    );

    // Another user cannot use this user's code.
    let mut other = master(&server, Uuid::new_v4()).await;
    assert_status(
        recover(&mut other, CODE).await,
        Code::NotFound,
        "the user has no master-key record",
    );
}
conformance!(a_recovery_code_restores_the_sealed_identity_keys);

async fn five_wrong_codes_lock_recovery(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let user = Uuid::new_v4();
    let mut m = master(&server, user).await;
    m.put_master_key(record(CODE, 100_000)).await.unwrap();
    let wrong = "BBBB-EFGH-IJKL-MNOP-QRST-UVWX-YZ23-4567";
    for left in (0..5).rev() {
        assert_status(
            recover(&mut m, wrong).await,
            Code::PermissionDenied,
            &format!("recovery_code: does not match; {left} attempts left"),
        );
    }
    assert_status(
        recover(&mut m, CODE).await,
        Code::ResourceExhausted,
        "recovery is locked",
    );
    assert!(
        server
            .db
            .audit_metadata("recovery_code_used")
            .await
            .is_empty()
    );

    // A success before the limit resets the count.
    let user = Uuid::new_v4();
    let mut m = master(&server, user).await;
    m.put_master_key(record(CODE, 100_000)).await.unwrap();
    for _ in 0..4 {
        recover(&mut m, wrong).await.unwrap_err();
    }
    recover(&mut m, CODE).await.unwrap();
    assert_status(
        recover(&mut m, wrong).await,
        Code::PermissionDenied,
        "recovery_code: does not match; 4 attempts left",
    );
}
conformance!(five_wrong_codes_lock_recovery);
