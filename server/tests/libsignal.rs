//! The official libsignal client against a real server: `libsignal/interop.mjs` (Node.js, with
//! `@signalapp/libsignal-client`, `@grpc/grpc-js` and `@grpc/proto-loader` pinned in
//! `libsignal/package-lock.json`, installed here from the npm registry on first use) registers
//! libsignal devices through the API, fetches their bundles every way the API offers, and starts
//! PQXDH sessions with libsignal's own session code, down to the last-resort Kyber prekey. Its
//! counts are checked here against what the server stored, and written to
//! `target/libsignal-interop-<backend>.json` for CI to print.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::api;
use keyserver_client::device::Device;
use uuid::Uuid;

/// The interop script's folder.
fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libsignal")
}

async fn libsignal_starts_pqxdh_sessions_from_our_bundles(backend: Backend) {
    if let Err(why) = common::npm::prepare(&script_dir(), &[]) {
        panic!("{why}");
    }
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;

    // A device registered by keyctl's own code, whose bundle libsignal must accept.
    let keyctl_user = Uuid::new_v4();
    let state = std::env::temp_dir().join(format!("libsignal-keyctl-{}.json", Uuid::new_v4()));
    let mut keyctl =
        Device::create(&state, "keyctl-phone", b"a passphrase for keyctl", 100_000).unwrap();
    let mut client = api::connect(
        &server.url,
        &server.device_token(keyctl_user, "keyctl-phone"),
    )
    .await
    .unwrap();
    keyctl.register(&mut client).await.unwrap();
    std::fs::remove_file(&state).unwrap();

    let users: Vec<serde_json::Value> = (0..4)
        .map(|_| {
            let user = Uuid::new_v4();
            // A token per device, as a chat backend mints them: bound to the device it changes.
            let tokens: serde_json::Map<String, serde_json::Value> = (1..=2)
                .map(|n| {
                    let device = format!("{user}.{n}");
                    let token = server.device_token(user, &device);
                    (device, token.into())
                })
                .collect();
            serde_json::json!({ "user": user, "tokens": tokens })
        })
        .collect();
    let out = tokio::process::Command::new("node")
        .arg("interop.mjs")
        .current_dir(script_dir())
        .env("KEYSERVER_ADDR", server.url.trim_start_matches("http://"))
        .env("INTEROP_USERS", serde_json::to_string(&users).unwrap())
        .env(
            "INTEROP_KEYCTL",
            serde_json::json!({ "user": keyctl_user, "device_id": "keyctl-phone" }).to_string(),
        )
        .env(
            "PROTO_ROOT",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto"),
        )
        .output()
        .await
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the libsignal interop run failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .last()
            .expect("the run prints its counts last"),
    )
    .expect("counts as JSON");
    let count = |name: &str| counts[name].as_i64().unwrap_or(-1);
    assert_eq!(count("devices_registered"), 5);
    assert_eq!(count("sessions_started"), 14, "{counts}");
    assert_eq!(count("messages_exchanged"), 2 * count("sessions_started"));
    assert_eq!(
        count("sessions_with_last_resort_kyber_prekey"),
        4,
        "{counts}"
    );
    assert_eq!(count("refused_tampered_uploads"), 3);
    assert_eq!(count("refused_tampered_bundles"), 1);
    assert_eq!(count("keyctl_bundles_accepted"), 1);

    // The server's side of it: every one-time Kyber prekey a session used, and the two taken by
    // the altered bundle and the keyctl device's bundle, are consumed; none else.
    let consumed = server
        .db
        .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE is_consumed")
        .await;
    assert_eq!(
        consumed,
        count("sessions_with_one_time_kyber_prekey") + 2,
        "{counts}"
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE is_last_resort AND is_consumed")
            .await,
        0
    );

    let report = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../target/libsignal-interop-{}.json",
        format!("{backend:?}").to_lowercase()
    ));
    std::fs::write(&report, counts.to_string()).unwrap();
    server.stop().await.unwrap();
}
conformance!(multi_thread; libsignal_starts_pqxdh_sessions_from_our_bundles);
