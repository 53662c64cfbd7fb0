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
use std::process::Command;
use std::sync::OnceLock;

use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::api;
use keyserver_client::device::Device;
use uuid::Uuid;

/// The interop script's folder.
fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libsignal")
}

/// Installs the pinned packages once per test process (`npm ci`, which follows the lockfile
/// exactly), unless a previous run left exactly those installed.
fn install() -> &'static Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = script_dir();
        let lock = std::fs::read(dir.join("package-lock.json")).map_err(|e| e.to_string())?;
        // npm keeps a copy of what it installed; the same lockfile means nothing to do.
        if std::fs::read(dir.join("node_modules/.package-lock.json"))
            .is_ok_and(|installed| same_packages(&lock, &installed))
        {
            return Ok(());
        }
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .map_err(|e| {
                format!(
                    "the libsignal interop test needs Node.js and npm on PATH (Debian: apt-get \
                     install nodejs npm), to install @signalapp/libsignal-client from the npm \
                     registry: {e}"
                )
            })?;
        if !out.status.success() {
            return Err(format!(
                "npm ci in {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    })
}

/// Whether npm's record of installed packages names the same versions as the lockfile.
fn same_packages(lock: &[u8], installed: &[u8]) -> bool {
    let versions = |bytes: &[u8]| -> Option<Vec<(String, String)>> {
        let json: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let mut all: Vec<(String, String)> = json["packages"]
            .as_object()?
            .iter()
            .filter(|(path, _)| !path.is_empty())
            .map(|(path, p)| (path.clone(), p["version"].as_str().unwrap_or("").to_owned()))
            .collect();
        all.sort();
        Some(all)
    };
    versions(lock).is_some_and(|v| Some(v) == versions(installed))
}

async fn libsignal_starts_pqxdh_sessions_from_our_bundles(backend: Backend) {
    if let Err(why) = install() {
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
