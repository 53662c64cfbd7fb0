//! `db copy` between the backends: a populated SQLite store moved to PostgreSQL serves exactly
//! the prekeys it had left, in the same order, never a consumed one; a damaged copy is caught.

#[macro_use]
mod common;

use std::collections::HashMap;

use common::*;
use keyserver::store::database::Database;
use keyserver::store::transfer::{self, TransferError};
use keyserver::testing::{Backend, TestDb, TestServer};
use tonic_health::pb::health_check_response::ServingStatus;
use uuid::Uuid;

/// What a device has left to hand out, in serving order: one-time prekey ids, one-time Kyber
/// prekey ids, and the last-resort Kyber prekey served after them.
type Remaining = HashMap<(Uuid, String), (Vec<u32>, Vec<u32>, u32)>;

/// Three users with five PQXDH devices, some prekeys of both kinds handed out, rotations and
/// uploads: every kind of row the key path writes. Returns what each device has left.
async fn populate(server: &TestServer) -> Remaining {
    let mut remaining = HashMap::new();
    let mut peer = client(server, Uuid::new_v4()).await;
    for (u, devices) in [(0, 1u32), (1, 2), (2, 2)] {
        let user = Uuid::new_v4();
        for d in 0..devices {
            let name = format!("user{u}-device{d}");
            let device = TestDevice::pqxdh(user, &name, 10, 4);
            let mut c = device.client(server).await;
            c.register_device(device.register_request()).await.unwrap();
            c.upload_one_time_pre_keys(keyserver_proto::pb::UploadOneTimePreKeysRequest {
                device_id: name.clone(),
                one_time_prekeys: fresh_otks(11..=12),
            })
            .await
            .unwrap();
            let mut last_resort = LAST_RESORT_ID;
            if d == 0 {
                c.rotate_signed_pre_key(keyserver_proto::pb::RotateSignedPreKeyRequest {
                    device_id: name.clone(),
                    signed_prekey: Some(
                        device.signed_upload(2, &keyserver_client::keys::KeyPair::generate()),
                    ),
                })
                .await
                .unwrap();
                last_resort = 900;
                c.rotate_kyber_last_resort_pre_key(
                    keyserver_proto::pb::RotateKyberLastResortPreKeyRequest {
                        device_id: name.clone(),
                        kyber_last_resort_prekey: Some(device.kyber_upload(
                            last_resort,
                            &keyserver_client::keys::KyberKeyPair::generate(),
                        )),
                    },
                )
                .await
                .unwrap();
            }
            // Hand out u + d + 1 keys of this device before the copy.
            let taken = u + d as usize + 1;
            for _ in 0..taken {
                fetch(&mut peer, user, Some(&name)).await.unwrap();
            }
            let kyber_left = (taken as u32 + 1..=4).collect();
            remaining.insert(
                (user, name),
                ((taken as u32 + 1..=12).collect(), kyber_left, last_resort),
            );
        }
    }
    remaining
}

/// A database of `backend` populated through a server (stopped again), and what each device
/// has left.
async fn populated(backend: Backend) -> (TestDb, Remaining) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let remaining = populate(&server).await;
    server.stop().await.unwrap();
    (db, remaining)
}

/// A device registered after a copy of 60 one-time prekeys gets ids after the copied ones:
/// the copy carried the sequences over.
async fn assert_new_ids_follow_the_copied_ones(server: &TestServer, keys: u32) {
    let newcomer = TestDevice::new(Uuid::new_v4(), "newcomer", keys);
    newcomer
        .client(server)
        .await
        .register_device(newcomer.register_request())
        .await
        .unwrap();
    let above = server
        .db
        .count(
            "SELECT count(*) FROM nchat_one_time_prekeys WHERE device_id = 'newcomer' AND id > 60",
        )
        .await;
    assert_eq!(above, i64::from(keys));
}

async fn open_both(from: &TestDb, to: &TestDb) -> (Database, Database) {
    (from.open().await, to.open().await)
}

#[tokio::test]
async fn a_sqlite_store_copied_to_postgres_serves_the_same_remaining_prekeys() {
    let (sqlite, remaining) = populated(Backend::Sqlite).await;

    let postgres = TestDb::empty(Backend::Postgres).await;
    let (from, to) = open_both(&sqlite, &postgres).await;
    // Text that COPY's format reserves (tab, newline, backslash) arrives as it was.
    from.execute(
        "INSERT INTO nchat_e2ee_audit_log (event_type, device_id, metadata)
         VALUES ('session_established', 'a\tb\\c\nd', '{\"note\": \"tab\\there\\\\\"}')",
    )
    .await;
    let before = transfer::verify(&from, &from).await.unwrap();
    let mut progress = Vec::new();
    let report = transfer::copy(&from, &to, false, None, &mut |table, done, total| {
        progress.push((table.to_owned(), done, total));
    })
    .await
    .unwrap();
    assert!(report.matches(), "{report}");
    let one_time = report
        .tables
        .iter()
        .find(|t| t.table == "nchat_one_time_prekeys")
        .unwrap();
    assert_eq!(one_time.target_rows, 5 * 12);
    assert!(progress.contains(&("nchat_one_time_prekeys".to_owned(), 60, 60)));
    let kyber = report
        .tables
        .iter()
        .find(|t| t.table == "nchat_kyber_prekeys")
        .unwrap();
    assert_eq!(
        kyber.target_rows,
        5 * 5 + 3,
        "4 one-time and 1 last-resort key each, 3 rotated"
    );
    assert_eq!(
        transfer::verify(&from, &from).await.unwrap(),
        before,
        "the source is never changed"
    );

    let server = TestServer::start(&postgres).await;
    let mut peer = client(&server, Uuid::new_v4()).await;
    for ((user, device), (expected, expected_kyber, last_resort)) in &remaining {
        let mut served = Vec::new();
        let mut kyber = Vec::new();
        loop {
            let bundle = fetch(&mut peer, *user, Some(device)).await.unwrap();
            let kyber_id = bundle.devices[0].kyber_prekey.as_ref().unwrap().key_id;
            if kyber_id != *last_resort {
                kyber.push(kyber_id);
            }
            match &bundle.devices[0].one_time_prekey {
                Some(key) => served.push(key.key_id),
                None => break,
            }
        }
        assert_eq!(
            &served, expected,
            "{device}: same keys, same order, none consumed before"
        );
        assert_eq!(
            &kyber, expected_kyber,
            "{device}: same Kyber keys, then the active last-resort key"
        );
    }
    // New rows get fresh ids: the sequences continue after the copied ones.
    assert_new_ids_follow_the_copied_ones(&server, 3).await;
}

#[tokio::test]
async fn a_damaged_copy_is_reported_and_the_command_fails() {
    let (sqlite, _) = populated(Backend::Sqlite).await;
    let postgres = TestDb::empty(Backend::Postgres).await;
    let (from, to) = open_both(&sqlite, &postgres).await;
    assert!(
        transfer::copy(&from, &to, false, None, &mut |_, _, _| {})
            .await
            .unwrap()
            .matches()
    );

    // One byte of one copied public key changes.
    to.execute(
        "UPDATE nchat_one_time_prekeys SET prekey_public = set_byte(prekey_public, 0, get_byte(prekey_public, 0) # 1)
         WHERE id = (SELECT min(id) FROM nchat_one_time_prekeys)",
    )
    .await;
    let report = transfer::verify(&from, &to).await.unwrap();
    assert!(!report.matches());
    let bad: Vec<_> = report
        .tables
        .iter()
        .filter(|t| !t.matches())
        .map(|t| t.table)
        .collect();
    assert_eq!(bad, ["nchat_one_time_prekeys"]);

    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args([
            "db",
            "verify",
            "--from",
            sqlite.url(),
            "--to",
            postgres.url(),
        ])
        .output()
        .unwrap();
    assert!(!cli.status.success(), "a mismatch exits non-zero");
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert!(
        stdout.contains("nchat_one_time_prekeys") && stdout.contains("MISMATCH"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_non_empty_target_is_refused_unless_replaced() {
    let (sqlite, _) = populated(Backend::Sqlite).await;
    let postgres = TestDb::migrated(Backend::Postgres).await;
    let target = TestServer::start(&postgres).await;
    let stranger = TestDevice::new(Uuid::new_v4(), "already-here", 1);
    stranger
        .client(&target)
        .await
        .register_device(stranger.register_request())
        .await
        .unwrap();
    target.stop().await.unwrap();

    let (from, to) = open_both(&sqlite, &postgres).await;
    let refused = transfer::copy(&from, &to, false, None, &mut |_, _, _| {}).await;
    assert!(matches!(
        refused,
        Err(TransferError::TargetNotEmpty {
            table: "nchat_users",
            rows: 1
        })
    ));
    assert_eq!(
        to.count("SELECT count(*) FROM nchat_identity_keys").await,
        1,
        "nothing was written"
    );

    let report = transfer::copy(&from, &to, true, None, &mut |_, _, _| {})
        .await
        .unwrap();
    assert!(report.matches(), "{report}");
    assert_eq!(
        to.count("SELECT count(*) FROM nchat_identity_keys WHERE device_id = 'already-here'")
            .await,
        0
    );
}

#[tokio::test]
async fn postgres_copies_back_to_sqlite_row_for_row() {
    let (postgres, _) = populated(Backend::Postgres).await;
    let sqlite = TestDb::empty(Backend::Sqlite).await;
    let (from, to) = open_both(&postgres, &sqlite).await;
    let report = transfer::copy(&from, &to, false, None, &mut |_, _, _| {})
        .await
        .unwrap();
    assert!(report.matches(), "{report}");

    // The local replay serves the next key, and a new device gets ids after the copied ones.
    let server = TestServer::start(&sqlite).await;
    assert_new_ids_follow_the_copied_ones(&server, 2).await;
}

/// Every one-time key a server handed out: (device, EC key id) and (device, Kyber key id).
#[derive(Default)]
struct Served {
    ec: Vec<(String, u32)>,
    kyber: Vec<(String, u32)>,
}

impl Served {
    fn record(&mut self, bundle: &keyserver_proto::pb::FetchPreKeyBundleResponse) {
        for d in &bundle.devices {
            if let Some(k) = &d.one_time_prekey {
                self.ec.push((d.device_id.clone(), k.key_id));
            }
            if let Some(k) = d
                .kyber_prekey
                .as_ref()
                .filter(|k| k.key_id != LAST_RESORT_ID)
            {
                self.kyber.push((d.device_id.clone(), k.key_id));
            }
        }
    }
}

/// Four fetchers take keys of random devices from `server` until it answers
/// FAILED_PRECONDITION naming `moved_to` (it was fenced), while `cutover` runs the `keyserver
/// db cutover` command after a moment. Returns what the server handed out, and checks a write
/// is refused too and the server's health turns NOT_SERVING.
async fn serve_until_fenced(
    server: &TestServer,
    devices: &[TestDevice],
    cutover: &[&str],
    moved_to: &str,
) -> Served {
    let served = std::sync::Arc::new(std::sync::Mutex::new(Served::default()));
    let mut fetchers = tokio::task::JoinSet::new();
    for f in 0..4u32 {
        let mut peer = client(server, Uuid::new_v4()).await;
        let targets: Vec<(Uuid, String)> = devices
            .iter()
            .map(|d| (d.user, d.device_id.clone()))
            .collect();
        let (served, moved_to) = (served.clone(), moved_to.to_owned());
        fetchers.spawn(async move {
            for n in 0u32.. {
                let (user, device) = &targets[((n * 7 + f * 3) as usize) % targets.len()];
                match fetch(&mut peer, *user, Some(device)).await {
                    Ok(bundle) => served.lock().unwrap().record(&bundle),
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                        assert!(status.message().contains(&moved_to), "{status:?}");
                        return;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args(cutover)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("copy verified") && stdout.contains("cutover done"),
        "{stdout}"
    );
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(done) = fetchers.join_next().await {
            done.unwrap();
        }
    })
    .await
    .expect("the server kept handing out keys after the cutover");
    let device = &devices[0];
    let refused = device
        .client(server)
        .await
        .upload_one_time_pre_keys(keyserver_proto::pb::UploadOneTimePreKeysRequest {
            device_id: device.device_id.clone(),
            one_time_prekeys: fresh_otks(1000..=1000),
        })
        .await;
    assert_status(
        refused,
        tonic::Code::FailedPrecondition,
        "this key server's database was moved to",
    );
    // Its health turns NOT_SERVING, so load balancers send calls to the new database's servers.
    wait_health(server, ServingStatus::NotServing).await;
    std::sync::Arc::into_inner(served)
        .unwrap()
        .into_inner()
        .unwrap()
}

/// The cutover and the way back, each under load: SQLite's servers hand out keys until the
/// cutover fences them, PostgreSQL's take over, a rollback fences PostgreSQL and brings
/// SQLite's servers (still running) back, and they hand out the rest. Every key uploaded is
/// handed out exactly once over the three phases: none by two databases, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_and_its_rollback_under_load_hand_out_every_key_once() {
    let sqlite = TestDb::migrated(Backend::Sqlite).await;
    let postgres = TestDb::empty(Backend::Postgres).await;
    let old = TestServer::start(&sqlite).await;
    let devices: Vec<TestDevice> = (0..8)
        .map(|i| TestDevice::pqxdh(Uuid::new_v4(), &format!("phone-{i}"), 60, 20))
        .collect();
    for d in &devices {
        d.register(&old).await;
    }

    let forward = serve_until_fenced(
        &old,
        &devices,
        &[
            "db",
            "cutover",
            "--from",
            sqlite.url(),
            "--to",
            postgres.url(),
        ],
        &keyserver::store::database::display_url(postgres.url()),
    )
    .await;
    let new = TestServer::start(&postgres).await;
    let back = serve_until_fenced(
        &new,
        &devices,
        &[
            "db",
            "cutover",
            "--from",
            postgres.url(),
            "--to",
            sqlite.url(),
            "--replace",
        ],
        sqlite.url(),
    )
    .await;
    // The old servers serve again, without a restart: the rollback lifted their fence.
    wait_health(&old, ServingStatus::Serving).await;
    let mut rest = Served::default();
    let mut peer = client(&old, Uuid::new_v4()).await;
    for d in &devices {
        loop {
            let bundle = fetch(&mut peer, d.user, Some(&d.device_id)).await.unwrap();
            rest.record(&bundle);
            if bundle.devices[0].one_time_prekey.is_none() {
                break;
            }
        }
    }

    assert!(!forward.ec.is_empty() && !back.ec.is_empty() && !rest.ec.is_empty());
    for (kind, per_device, phases) in [
        ("EC", 60, [&forward.ec, &back.ec, &rest.ec]),
        ("Kyber", 20, [&forward.kyber, &back.kyber, &rest.kyber]),
    ] {
        let all: Vec<&(String, u32)> = phases.iter().flat_map(|p| p.iter()).collect();
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(
            all.len(),
            distinct.len(),
            "a {kind} key was handed out twice"
        );
        assert_eq!(
            distinct.len(),
            8 * per_device,
            "every {kind} key handed out once"
        );
    }
    new.stop().await.unwrap();
    old.stop().await.unwrap();
}
