//! Schema migrations on real databases of both backends: up, down and up again, empty and with
//! data; refusing a database migrated by an unknown version; the same schema objects on both;
//! adopting a PostgreSQL chat database that already has the nchat schema.

#[macro_use]
mod common;

use common::*;
use keyserver::store::migrations::{self, MigrationError};
use keyserver::testing::{Backend, TestDb, TestServer};
use tonic::Code;
use uuid::Uuid;

const TABLES: [&str; 10] = [
    "nchat_users",
    "nchat_user_master_keys",
    "nchat_identity_keys",
    "nchat_signed_prekeys",
    "nchat_one_time_prekeys",
    "nchat_signal_sessions",
    "nchat_safety_numbers",
    "nchat_e2ee_audit_log",
    "nchat_prekey_bundles",
    "nchat_kyber_prekeys",
];

async fn migrations_go_up_down_and_up_again_on_an_empty_database(backend: Backend) {
    let test_db = TestDb::empty(backend).await;
    let db = test_db.open().await;
    assert!(db.schema_objects().await.is_empty());

    migrations::up(&db).await.unwrap();
    let schema = db.schema_objects().await;
    for name in TABLES.iter().chain(&[
        "idx_one_time_prekeys_next",
        "idx_signed_prekeys_one_active",
        "idx_kyber_prekeys_next",
        "idx_kyber_prekeys_one_last_resort",
    ]) {
        assert!(
            schema.contains(&name.to_string()),
            "{name} missing from {schema:?}"
        );
    }
    assert!(
        migrations::status(&db)
            .await
            .unwrap()
            .iter()
            .all(|m| m.applied)
    );

    migrations::down_to(&db, 1).await.unwrap();
    let at_one = db.schema_objects().await;
    assert!(!at_one.contains(&"idx_one_time_prekeys_next".to_string()));
    assert!(at_one.contains(&"nchat_one_time_prekeys".to_string()));
    migrations::down_to(&db, 0).await.unwrap();
    assert!(
        db.schema_objects().await.is_empty(),
        "down removes everything up created"
    );
    assert!(
        migrations::status(&db)
            .await
            .unwrap()
            .iter()
            .all(|m| !m.applied)
    );

    migrations::up(&db).await.unwrap();
    assert_eq!(db.schema_objects().await, schema);
    assert_eq!(migrations::current_version(&db).await.unwrap(), Some(9));
}
conformance!(migrations_go_up_down_and_up_again_on_an_empty_database);

async fn both_backends_have_the_same_schema_objects(backend: Backend) {
    // Table for table, index for index: what differs between the backends is types, and the
    // two indexes of the materialized view, which SQLite's plain view cannot have.
    let view_only =
        |name: &String| backend == Backend::Sqlite && name.starts_with("idx_prekey_bundles_");
    let mut postgres = TestDb::migrated(Backend::Postgres)
        .await
        .open()
        .await
        .schema_objects()
        .await;
    postgres.retain(|name| !view_only(name));
    let other = TestDb::migrated(backend)
        .await
        .open()
        .await
        .schema_objects()
        .await;
    assert_eq!(postgres, other);
}
conformance!(both_backends_have_the_same_schema_objects);

async fn migrating_down_and_up_keeps_the_data(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let server = TestServer::start(&test_db).await;
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", 5);
    bob.client(&server)
        .await
        .register_device(bob.register_request())
        .await
        .unwrap();
    let mut alice = client(&server, Uuid::new_v4()).await;
    fetch(&mut alice, bob.user, None).await.unwrap();
    server.stop().await.unwrap();

    let db = test_db.open().await;
    let snapshot = |db: keyserver::store::database::Database| async move {
        let mut counts = Vec::new();
        for sql in [
            "SELECT count(*) FROM nchat_users",
            "SELECT count(*) FROM nchat_identity_keys",
            "SELECT count(*) FROM nchat_signed_prekeys WHERE is_active",
            "SELECT count(*) FROM nchat_one_time_prekeys",
            "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed AND consumed_at IS NOT NULL",
            "SELECT count(*) FROM nchat_e2ee_audit_log",
        ] {
            counts.push(db.count(sql).await);
        }
        counts
    };
    let before = snapshot(db.clone()).await;
    assert_eq!(before, [1, 1, 1, 5, 1, 1]);
    migrations::down_to(&db, 1).await.unwrap();
    assert_eq!(
        snapshot(db.clone()).await,
        before,
        "reverting 0002 keeps every row"
    );
    migrations::up(&db).await.unwrap();
    assert_eq!(snapshot(db.clone()).await, before);

    // The server carries on where it stopped: the next fetch gets the second key, not the first.
    let server = TestServer::start(&test_db).await;
    let mut alice = client(&server, Uuid::new_v4()).await;
    let next = fetch(&mut alice, bob.user, None).await.unwrap();
    assert_eq!(next.devices[0].one_time_prekey.as_ref().unwrap().key_id, 2);
}
conformance!(migrating_down_and_up_keeps_the_data);

async fn a_database_with_unknown_migrations_is_refused(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.open().await;
    let insert = |checksum: &str| {
        format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from the future', TRUE, {checksum}, 0)"
        )
    };
    db.execute_either(&insert("'\\x00'::bytea"), &insert("X'00'"))
        .await;
    let err = migrations::up(&db).await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Unknown { version: 9999 }),
        "{err}"
    );
    assert!(err.to_string().contains("newer keyserver"));

    db.execute("DELETE FROM _sqlx_migrations WHERE version = 9999")
        .await;
    db.execute_either(
        "UPDATE _sqlx_migrations SET checksum = '\\x01'::bytea WHERE version = 1",
        "UPDATE _sqlx_migrations SET checksum = X'01' WHERE version = 1",
    )
    .await;
    let err = migrations::check_known(&db).await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Modified { version: 1, .. }),
        "{err}"
    );
}
conformance!(a_database_with_unknown_migrations_is_refused);

/// The design's own migration as a chat app would have run it: a richer users table, the
/// E2EE tables, and the per-statement triggers that refresh the whole view.
const CHAT_DATABASE: &str = r#"
CREATE TABLE nchat_users (id UUID PRIMARY KEY, username TEXT NOT NULL UNIQUE);
CREATE TABLE nchat_identity_keys (
    device_id TEXT PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES nchat_users(id) ON DELETE CASCADE,
    identity_key_public BYTEA NOT NULL,
    identity_key_private_encrypted BYTEA NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    UNIQUE(user_id, device_id));
CREATE TABLE nchat_signed_prekeys (
    id SERIAL PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    signed_prekey_id INTEGER NOT NULL,
    signed_prekey_public BYTEA NOT NULL,
    signed_prekey_private_encrypted BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    rotation_date TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    is_active BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    UNIQUE(device_id, signed_prekey_id));
CREATE TABLE nchat_one_time_prekeys (
    id SERIAL PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES nchat_identity_keys(device_id) ON DELETE CASCADE,
    prekey_id INTEGER NOT NULL,
    prekey_public BYTEA NOT NULL,
    prekey_private_encrypted BYTEA NOT NULL,
    is_consumed BOOLEAN NOT NULL DEFAULT FALSE,
    consumed_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    UNIQUE(device_id, prekey_id));
CREATE MATERIALIZED VIEW nchat_prekey_bundles AS
SELECT ik.user_id, ik.device_id, ik.identity_key_public, sp.signed_prekey_id,
       sp.signed_prekey_public, sp.signature, otp.prekey_id AS one_time_prekey_id,
       otp.prekey_public AS one_time_prekey_public
FROM nchat_identity_keys ik
JOIN nchat_signed_prekeys sp ON ik.device_id = sp.device_id AND sp.is_active = TRUE
LEFT JOIN LATERAL (SELECT prekey_id, prekey_public FROM nchat_one_time_prekeys
    WHERE device_id = ik.device_id AND is_consumed = FALSE ORDER BY created_at ASC LIMIT 1) otp ON TRUE;
CREATE UNIQUE INDEX idx_prekey_bundles_device ON nchat_prekey_bundles(device_id);
CREATE OR REPLACE FUNCTION refresh_prekey_bundles() RETURNS TRIGGER AS $$
BEGIN REFRESH MATERIALIZED VIEW CONCURRENTLY nchat_prekey_bundles; RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER refresh_prekey_bundles_on_identity_key AFTER INSERT OR UPDATE OR DELETE
    ON nchat_identity_keys FOR EACH STATEMENT EXECUTE FUNCTION refresh_prekey_bundles();
CREATE TRIGGER refresh_prekey_bundles_on_signed_prekey AFTER INSERT OR UPDATE OR DELETE
    ON nchat_signed_prekeys FOR EACH STATEMENT EXECUTE FUNCTION refresh_prekey_bundles();
CREATE TRIGGER refresh_prekey_bundles_on_one_time_prekey AFTER INSERT OR UPDATE
    ON nchat_one_time_prekeys FOR EACH STATEMENT EXECUTE FUNCTION refresh_prekey_bundles();
"#;

/// PostgreSQL only: an nchat chat database is a PostgreSQL database.
#[tokio::test]
async fn adopts_a_chat_database_that_already_has_the_schema() {
    let test_db = TestDb::empty(Backend::Postgres).await;
    let db = test_db.open().await;
    db.execute(CHAT_DATABASE).await;
    let known = Uuid::new_v4();
    db.execute(&format!(
        "INSERT INTO nchat_users (id, username) VALUES ('{known}', 'bob')"
    ))
    .await;

    migrations::up(&db).await.unwrap();
    let triggers = db
        .count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'refresh_prekey_bundles%'")
        .await;
    assert_eq!(
        triggers, 0,
        "the design's refresh-on-every-write triggers are removed"
    );

    let server = TestServer::start(&test_db).await;
    let device = TestDevice::new(known, "bob-phone", 1);
    device
        .client(&server)
        .await
        .register_device(device.register_request())
        .await
        .expect("a user the chat app knows registers");
    let stranger = Uuid::new_v4();
    let x_phone = TestDevice::new(stranger, "x-phone", 1);
    assert_status(
        x_phone
            .client(&server)
            .await
            .register_device(x_phone.register_request())
            .await,
        Code::FailedPrecondition,
        "the caller's user is not known to the chat database",
    );
    let mut peer = client(&server, stranger).await;
    let bundle = fetch(&mut peer, known, None).await.unwrap();
    assert_eq!(bundle.devices.len(), 1);

    // Reverting all of the key server's migrations leaves the chat app's own users table.
    server.stop().await.unwrap();
    migrations::down_to(&db, 0).await.unwrap();
    assert_eq!(db.schema_objects().await, ["nchat_users"]);
}

async fn reverting_0006_removes_the_kyber_keys_and_nothing_else(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let config = keyserver::testing::TestConfig::default();
    let server = TestServer::start_with(&test_db, config.clone()).await;
    let bob = TestDevice::pqxdh(Uuid::new_v4(), "bob-phone", 3, 2);
    bob.client(&server)
        .await
        .register_device(bob.register_request())
        .await
        .unwrap();
    let mut alice = client(&server, Uuid::new_v4()).await;
    fetch(&mut alice, bob.user, None).await.unwrap();
    // Cleanup retires the consumed keys' ids of both kinds.
    let long_ago = time::OffsetDateTime::now_utc() - time::Duration::days(40);
    for table in ["nchat_one_time_prekeys", "nchat_kyber_prekeys"] {
        server
            .db
            .set_time(table, "consumed_at", "is_consumed", long_ago)
            .await;
    }
    config
        .jobs(&server.db)
        .run(
            keyserver::jobs::Job::Cleanup,
            keyserver::jobs::Trigger::Cli,
            &keyserver::shutdown::CancellationToken::new(),
        )
        .await
        .unwrap();
    server.stop().await.unwrap();

    let db = test_db.open().await;
    let retired = |kind: &'static str| {
        let db = db.clone();
        async move {
            db.count(&format!(
                "SELECT count(*) FROM keyserver_retired_prekeys WHERE key_kind = '{kind}'"
            ))
            .await
        }
    };
    assert_eq!((retired("one_time").await, retired("kyber").await), (1, 1));
    let kept = "SELECT count(*) FROM nchat_one_time_prekeys";
    assert_eq!(db.count(kept).await, 2);

    migrations::down_to(&db, 5).await.unwrap();
    assert!(
        !db.schema_objects()
            .await
            .iter()
            .any(|name| name.contains("kyber")),
        "the Kyber table and its indexes are gone"
    );
    assert_eq!(retired("one_time").await, 1, "other retired ids stay");
    assert_eq!(db.count(kept).await, 2);
    assert_eq!(
        db.count("SELECT count(*) FROM keyserver_retired_prekeys")
            .await,
        1,
        "the Kyber ones went with the table"
    );

    migrations::up(&db).await.unwrap();
    assert_eq!(migrations::current_version(&db).await.unwrap(), Some(9));
    let server = TestServer::start(&test_db).await;
    let mut alice = client(&server, Uuid::new_v4()).await;
    let bundle = fetch(&mut alice, bob.user, None).await.unwrap();
    assert!(
        bundle.devices[0].kyber_prekey.is_none(),
        "an X3DH device again, until it publishes Kyber keys"
    );
    assert_eq!(
        bundle.devices[0].one_time_prekey.as_ref().unwrap().key_id,
        2
    );
}
conformance!(reverting_0006_removes_the_kyber_keys_and_nothing_else);

async fn reverting_0007_removes_the_drain_records_and_nothing_else(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let config = keyserver::testing::TestConfig {
        drain: keyserver::config::DrainArgs {
            drain_threshold: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let server = TestServer::start_with(&test_db, config.clone()).await;
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", 3);
    bob.register(&server).await;
    let mut alice = client(&server, Uuid::new_v4()).await;
    fetch(&mut alice, bob.user, None).await.unwrap();
    let report = finished(
        config
            .jobs(&server.db)
            .run(
                keyserver::jobs::Job::DrainCheck,
                keyserver::jobs::Trigger::Cli,
                &keyserver::shutdown::CancellationToken::new(),
            )
            .await
            .unwrap(),
    );
    assert_eq!(report.count("devices_reported"), 1);
    server.stop().await.unwrap();

    let db = test_db.open().await;
    let count = |sql: &'static str| {
        let db = db.clone();
        async move { db.count(sql).await }
    };
    let drains =
        "SELECT count(*) FROM nchat_e2ee_audit_log WHERE event_type = 'prekeys_drain_suspected'";
    let events = "SELECT count(*) FROM nchat_e2ee_audit_log";
    let consumed = "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed";
    let runs = "SELECT count(*) FROM keyserver_job_runs WHERE job = 'drain-check'";
    assert_eq!(
        (
            count(drains).await,
            count(events).await,
            count(consumed).await
        ),
        (1, 2, 1)
    );
    assert_eq!(count(runs).await, 1);

    migrations::down_to(&db, 6).await.unwrap();
    assert_eq!(count(events).await, 1, "the registration's event stays");
    assert_eq!(count(consumed).await, 1, "the key stays taken");
    assert_eq!(count(runs).await, 0, "the drain-check run went");
    // The one-time tables' consumed_by columns.
    let consumed_by = match backend {
        Backend::Postgres => {
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'consumed_by'
               AND table_name IN ('nchat_one_time_prekeys', 'nchat_kyber_prekeys')"
        }
        Backend::Sqlite => {
            "SELECT (SELECT count(*) FROM pragma_table_info('nchat_one_time_prekeys')
                     WHERE name = 'consumed_by')
                  + (SELECT count(*) FROM pragma_table_info('nchat_kyber_prekeys')
                     WHERE name = 'consumed_by')"
        }
    };
    assert_eq!(count(consumed_by).await, 0, "consumed_by is gone");

    migrations::up(&db).await.unwrap();
    assert_eq!(count(consumed_by).await, 2);
    assert_eq!(migrations::current_version(&db).await.unwrap(), Some(9));
    let server = TestServer::start(&test_db).await;
    let mut alice = client(&server, Uuid::new_v4()).await;
    let bundle = fetch(&mut alice, bob.user, None).await.unwrap();
    assert_eq!(
        bundle.devices[0].one_time_prekey.as_ref().unwrap().key_id,
        2
    );
}
conformance!(reverting_0007_removes_the_drain_records_and_nothing_else);
/// Reverting 0008 drops the fetches' idempotency keys and nothing else: taken keys stay taken,
/// and after it a retry is a new fetch.
async fn reverting_0008_drops_the_fetch_keys_and_nothing_else(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let server = TestServer::start(&test_db).await;
    let bob = TestDevice::new(Uuid::new_v4(), "bob-phone", 3);
    bob.register(&server).await;
    let mut alice = client(&server, Uuid::new_v4()).await;
    let phone = || vec![target(bob.user, Some("bob-phone"))];
    assert_eq!(
        fetch_with_key(&mut alice, phone(), "k").await.unwrap(),
        [(Some(1), None)]
    );
    server.stop().await.unwrap();

    let db = test_db.open().await;
    let keyed = "SELECT count(*) FROM nchat_one_time_prekeys WHERE fetch_key = 'k'";
    let consumed = "SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed";
    assert_eq!(db.count(keyed).await, 1);
    migrations::down_to(&db, 7).await.unwrap();
    assert_eq!(db.count(consumed).await, 1, "the key stays taken");
    let columns = match backend {
        Backend::Postgres => {
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'fetch_key'"
        }
        Backend::Sqlite => {
            "SELECT (SELECT count(*) FROM pragma_table_info('nchat_one_time_prekeys')
                     WHERE name = 'fetch_key')
                  + (SELECT count(*) FROM pragma_table_info('nchat_kyber_prekeys')
                     WHERE name = 'fetch_key')"
        }
    };
    assert_eq!(db.count(columns).await, 0, "fetch_key is gone");

    migrations::up(&db).await.unwrap();
    assert_eq!(db.count(columns).await, 2);
    let server = TestServer::start(&test_db).await;
    let mut alice = client(&server, Uuid::new_v4()).await;
    assert_eq!(
        fetch_with_key(&mut alice, phone(), "k").await.unwrap(),
        [(Some(2), None)],
        "the retry after the rollback is a new fetch"
    );
}
conformance!(reverting_0008_drops_the_fetch_keys_and_nothing_else);

/// `keyserver` with `args`: its exit status and stdout and stderr together.
fn keyserver(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `migrate down` on a database holding keys lists what it would drop and refuses without
/// --yes; it never reverts the fence of a fenced database; `db backup` keeps the rows first.
async fn migrate_down_says_what_it_drops_and_asks_first(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let server = TestServer::start(&test_db).await;
    TestDevice::new(Uuid::new_v4(), "bob-phone", 7)
        .register(&server)
        .await;
    server.stop().await.unwrap();
    let db = test_db.open().await;
    let url = test_db.url();
    let keys = "SELECT count(*) FROM nchat_one_time_prekeys";

    let (ok, out) = keyserver(&["migrate", "--database-url", url, "down", "--to", "0"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("drops table nchat_one_time_prekeys (7 rows)")
            && out.contains("revert    9  cutover fence")
            && out.contains("not reverted: ")
            && out.contains("keyserver db backup"),
        "{out}"
    );
    assert_eq!(db.count(keys).await, 7, "nothing was reverted");
    let (ok, out) = keyserver(&["migrate", "--database-url", url, "down", "--to", "8"]);
    assert!(
        ok && out.contains("drops table keyserver_fence (0 rows)"),
        "{out}"
    );
    assert!(out.contains("reverted; schema is at version 8"), "{out}");
    let (ok, out) = keyserver(&["migrate", "--database-url", url, "up"]);
    assert!(
        ok && out.contains("schema is at version 9 (cutover fence)"),
        "{out}"
    );

    // A backup first; for SQLite, the copy opens and holds the keys.
    let file = std::env::temp_dir().join(format!("keyserver-backup-{}", Uuid::new_v4()));
    let (ok, out) = keyserver(&[
        "db",
        "backup",
        "--database",
        url,
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(ok && file.metadata().unwrap().len() > 0, "{out}");
    if backend == Backend::Sqlite {
        let copy = keyserver::store::database::Database::connect(
            &format!("sqlite://{}", file.display()),
            1,
        )
        .await
        .unwrap();
        assert_eq!(copy.count(keys).await, 7);
    }
    std::fs::remove_file(&file).unwrap();

    // A fenced database never reverts its fence, --yes or not, until it is lifted.
    keyserver::store::fence::set(&db, "postgres://elsewhere/keys")
        .await
        .unwrap();
    let revert_all = [
        "migrate",
        "down",
        "--to",
        "0",
        "--yes",
        "--database-url",
        url,
    ];
    let (ok, out) = keyserver(&revert_all);
    assert!(
        !ok && out.contains("fenced (its keys moved to postgres://elsewhere/keys)"),
        "{out}"
    );
    let (ok, out) = keyserver(&["db", "unfence", "--database", url]);
    assert!(ok && out.contains("lifted the fence"), "{out}");

    let (ok, out) = keyserver(&revert_all);
    assert!(ok && out.contains("no migration is applied"), "{out}");
    assert!(db.schema_objects().await.is_empty());
}
conformance!(migrate_down_says_what_it_drops_and_asks_first);

/// A database that cannot be reached is named with its host, port, database and user, and
/// the cause in words: refused, unknown database, failed authentication.
#[tokio::test]
async fn connection_failures_name_the_place_and_the_cause() {
    let test_db = TestDb::migrated(Backend::Postgres).await;
    let url = url::Url::parse(test_db.url()).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let with = |f: &dyn Fn(&mut url::Url)| {
        let mut u = url.clone();
        f(&mut u);
        u.to_string()
    };
    for (bad, expected) in [
        (
            with(&|u| {
                u.set_host(Some("127.0.0.1")).unwrap();
                u.set_port(Some(closed)).unwrap();
            }),
            format!("127.0.0.1:{closed} (database "),
        ),
        (
            with(&|u| u.set_path("/no_such_database")),
            "database no_such_database".to_owned(),
        ),
        (
            with(&|u| u.set_username("no_such_role").unwrap()),
            "user no_such_role".to_owned(),
        ),
    ] {
        let (ok, out) = keyserver(&["migrate", "--database-url", &bad, "status"]);
        assert!(!ok, "{out}");
        assert!(
            out.contains("cannot connect to PostgreSQL at ") && out.contains(&expected),
            "{out}"
        );
        assert!(
            out.contains("connection refused")
                || out.contains("that database does not exist")
                || out.contains("authentication failed"),
            "{out}"
        );
    }
}
