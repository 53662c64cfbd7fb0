//! Schema migrations on real PostgreSQL databases: up, down and up again; refusing a database
//! migrated by an unknown version; adopting a chat database that already has the nchat schema.

mod common;

use common::*;
use keyserver::store::migrations::{self, MigrationError};
use keyserver::testing::{TestDb, TestServer};
use sqlx::PgPool;
use tonic::Code;
use uuid::Uuid;

const E2EE_TABLES: [&str; 7] = [
    "nchat_user_master_keys",
    "nchat_identity_keys",
    "nchat_signed_prekeys",
    "nchat_one_time_prekeys",
    "nchat_signal_sessions",
    "nchat_safety_numbers",
    "nchat_e2ee_audit_log",
];

async fn relations(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm') AND c.relname LIKE 'nchat_%'
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn indexes(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' AND indexname LIKE 'idx_%' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_go_up_down_and_up_again_on_an_empty_database() {
    let db = TestDb::empty().await;
    let store = db.store(2).await;
    let pool = store.pool();
    assert!(relations(pool).await.is_empty());

    migrations::up(pool).await.unwrap();
    let schema = relations(pool).await;
    for table in E2EE_TABLES
        .iter()
        .chain(&["nchat_users", "nchat_prekey_bundles"])
    {
        assert!(
            schema.contains(&table.to_string()),
            "{table} missing from {schema:?}"
        );
    }
    let all_indexes = indexes(pool).await;
    assert!(all_indexes.contains(&"idx_one_time_prekeys_next".to_string()));
    assert!(all_indexes.contains(&"idx_signed_prekeys_one_active".to_string()));
    assert!(
        migrations::status(pool)
            .await
            .unwrap()
            .iter()
            .all(|m| m.applied)
    );

    migrations::down_to(pool, 1).await.unwrap();
    assert!(
        !indexes(pool)
            .await
            .contains(&"idx_one_time_prekeys_next".to_string())
    );
    migrations::down_to(pool, 0).await.unwrap();
    assert!(
        relations(pool).await.is_empty(),
        "down removes everything up created"
    );
    assert!(
        migrations::status(pool)
            .await
            .unwrap()
            .iter()
            .all(|m| !m.applied)
    );

    migrations::up(pool).await.unwrap();
    assert_eq!(relations(pool).await, schema);
    assert_eq!(indexes(pool).await, all_indexes);
    assert_eq!(migrations::current_version(pool).await.unwrap(), Some(2));
}

#[tokio::test]
async fn a_database_with_unknown_migrations_is_refused() {
    let db = TestDb::migrated().await;
    let store = db.store(2).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', TRUE, '\\x00', 0)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let err = migrations::up(store.pool()).await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Unknown { version: 9999 }),
        "{err}"
    );
    assert!(err.to_string().contains("newer keyserver"));

    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 9999")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x01' WHERE version = 1")
        .execute(store.pool())
        .await
        .unwrap();
    let err = migrations::check_known(store.pool()).await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Modified { version: 1, .. }),
        "{err}"
    );
}

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

#[tokio::test]
async fn adopts_a_chat_database_that_already_has_the_schema() {
    let db = TestDb::empty().await;
    let store = db.store(2).await;
    sqlx::raw_sql(CHAT_DATABASE)
        .execute(store.pool())
        .await
        .unwrap();
    let known = Uuid::new_v4();
    sqlx::query("INSERT INTO nchat_users (id, username) VALUES ($1, 'bob')")
        .bind(known)
        .execute(store.pool())
        .await
        .unwrap();

    migrations::up(store.pool()).await.unwrap();
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'refresh_prekey_bundles%'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        triggers, 0,
        "the design's refresh-on-every-write triggers are removed"
    );

    let server = TestServer::start(&db).await;
    client(&server, known)
        .await
        .register_device(TestDevice::new(known, "bob-phone", 1).register_request())
        .await
        .expect("a user the chat app knows registers");
    let stranger = Uuid::new_v4();
    assert_status(
        client(&server, stranger)
            .await
            .register_device(TestDevice::new(stranger, "x-phone", 1).register_request())
            .await,
        Code::FailedPrecondition,
        "the caller's user is not known to the chat database",
    );
    let mut peer = client(&server, stranger).await;
    let bundle = fetch(&mut peer, known, None).await.unwrap();
    assert_eq!(bundle.devices.len(), 1);

    // Reverting all of the key server's migrations leaves the chat app's own users table.
    server.stop().await.unwrap();
    migrations::down_to(store.pool(), 0).await.unwrap();
    assert_eq!(relations(store.pool()).await, ["nchat_users"]);
}
