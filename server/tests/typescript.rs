//! The TypeScript client (`clients/typescript/`, an npm package) against a real server: its
//! own tests (`node --test`), with the official libsignal client on both ends, run here on
//! both backends, over plaintext and over TLS. The package is installed from its lockfile and
//! built (types generated from `proto/` by Buf's protoc-gen-es, then compiled by tsc) once per
//! test process.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use keyserver::testing::{Backend, TEST_SECRET, TestDb, TestServer};

fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/typescript")
}

/// A count from the summary `node --test` prints in TAP (`# pass 9`).
fn summary(tap: &str, name: &str) -> Option<u32> {
    let prefix = format!("# {name} ");
    tap.lines()
        .rev()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
}

async fn the_typescript_clients_tests_pass_against_a_real_server(backend: Backend) {
    if let Err(why) = common::npm::prepare(&package_dir(), &["build:test"]) {
        panic!("{why}");
    }
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    // A second server on the same database, over TLS with a self-signed certificate.
    let dir = std::env::temp_dir().join(format!("keyserver-ts-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (tls, cert) = TestServer::start_tls(&db, &dir).await;
    let out = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=tap", "dist-test/test/"])
        .current_dir(package_dir())
        .env("KEYSERVER_URL", &server.url)
        .env("KEYSERVER_TLS_URL", &tls.url)
        .env("KEYSERVER_TLS_CA", &cert)
        .env(
            "KEYSERVER_TOKEN_SECRET",
            std::str::from_utf8(TEST_SECRET).unwrap(),
        )
        .output()
        .await
        .expect("running node");
    let tap = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the TypeScript client's tests failed:\n{tap}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tests = summary(&tap, "tests").expect("a TAP summary");
    assert_eq!(summary(&tap, "fail"), Some(0), "{tap}");
    assert_eq!(summary(&tap, "pass"), Some(tests), "{tap}");
    // The key loop, sessions, restore, refusals, the vault's vectors, TLS and the README example.
    assert!(tests >= 11, "only {tests} tests ran:\n{tap}");
    server.stop().await.unwrap();
    tls.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
conformance!(multi_thread; the_typescript_clients_tests_pass_against_a_real_server);
