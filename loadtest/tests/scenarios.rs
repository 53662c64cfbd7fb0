//! Every scenario of the `loadtest` binary against a real server on each backend: the runs
//! succeed, verify every bundle (both signatures), report no key of either kind served twice,
//! and what they report matches what the server stored.

use std::process::Command;

use keyserver::testing::{Backend, TEST_SECRET, TestDb, TestServer};

fn loadtest(server: &TestServer, args: &[&str], json: &std::path::Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "--url",
            &server.url,
            "--concurrency",
            "4",
            "--duration",
            "60s",
        ])
        .args(["--json", json.to_str().unwrap()])
        .args(args)
        .env(
            "KEYSERVER_TOKEN_SECRET",
            std::str::from_utf8(TEST_SECRET).unwrap(),
        )
        .output()
        .expect("running loadtest");
    assert!(
        out.status.success(),
        "loadtest {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

async fn every_scenario_runs_and_reports_what_the_server_did(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dir = std::env::temp_dir().join(format!("loadtest-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("run.json");
    let devices = ["--devices", "40"];

    let seed = loadtest(
        &server,
        &[&devices[..], &["--scenario", "register"]].concat(),
        &json,
    );
    assert_eq!(seed["rpcs"]["RegisterDevice"]["ok"], 40);
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_one_time_prekeys")
            .await,
        4_000
    );
    // PQXDH devices: 100 one-time Kyber prekeys and a last-resort one each.
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE is_last_resort")
            .await,
        40
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE NOT is_last_resort")
            .await,
        4_000
    );

    let fetch = loadtest(
        &server,
        &[&devices[..], &["--scenario", "fetch", "--requests", "200"]].concat(),
        &json,
    );
    let bulk = loadtest(
        &server,
        &[&devices[..], &["--scenario", "bulk", "--requests", "30"]].concat(),
        &json,
    );
    assert_eq!(fetch["rpcs"]["FetchPreKeyBundle"]["ok"], 200);
    assert_eq!(bulk["rpcs"]["FetchPreKeyBundles"]["ok"], 30);
    for run in [&fetch, &bulk] {
        let c = &run["correctness"];
        assert_eq!(c["served_twice"], 0);
        assert_eq!(c["kyber_served_twice"], 0);
        assert_eq!(c["bad_signatures"], 0);
        assert_eq!(c["without_one_time_prekey_while_keys_were_left"], 0);
        assert_eq!(c["bundles_without_kyber_prekey"], 0);
        assert_eq!(c["last_resort_while_kyber_keys_were_left"], 0);
        assert_eq!(c["kyber_one_time_prekeys_served"], c["bundles"]);
    }
    // Every key the runs report was handed out is flagged consumed, and no other.
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_one_time_prekeys WHERE is_consumed")
            .await,
        200 + 300
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE is_consumed")
            .await,
        200 + 300
    );

    let replenish = loadtest(
        &server,
        &[
            &devices[..],
            &["--scenario", "replenish", "--requests", "20"],
        ]
        .concat(),
        &json,
    );
    assert_eq!(replenish["rpcs"]["UploadOneTimePreKeys"]["ok"], 20);
    assert_eq!(replenish["rpcs"]["UploadKyberPreKeys"]["ok"], 20);
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_one_time_prekeys")
            .await,
        4_000 + 20 * 10
    );
    assert_eq!(
        server
            .db
            .count("SELECT count(*) FROM nchat_kyber_prekeys WHERE NOT is_last_resort")
            .await,
        4_000 + 20 * 10
    );
    let svg = dir.join("mixed.svg");
    let mixed = loadtest(
        &server,
        &[
            &devices[..],
            &["--scenario", "mixed", "--requests", "300"],
            &["--svg", svg.to_str().unwrap()],
        ]
        .concat(),
        &json,
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("calls/s") && chart.contains("p99"));
    let ok: u64 = mixed["rpcs"]
        .as_object()
        .unwrap()
        .values()
        .map(|r| r["ok"].as_u64().unwrap())
        .sum();
    // 300 steps; a replenish or a rotation of a PQXDH device takes one call per kind of key.
    let ok_of = |rpc: &str| mixed["rpcs"][rpc]["ok"].as_u64().unwrap_or(0);
    assert_eq!(
        ok,
        300 + ok_of("UploadKyberPreKeys") + ok_of("RotateKyberLastResortPreKey")
    );
    assert_eq!(ok_of("UploadKyberPreKeys"), ok_of("UploadOneTimePreKeys"));
    assert_eq!(
        ok_of("RotateKyberLastResortPreKey"),
        ok_of("RotateSignedPreKey")
    );
    assert!(ok_of("FetchPreKeyBundle") > 200);
    assert_eq!(mixed["correctness"]["served_twice"], 0);
    assert_eq!(mixed["correctness"]["kyber_served_twice"], 0);
    let timeline = mixed["timeline"].as_array().unwrap();
    let charted: u64 = timeline.iter().map(|s| s["calls"].as_u64().unwrap()).sum();
    assert_eq!(charted, ok, "every call is in the timeline");

    // A command alongside the load: the calls that completed while it ran are reported apart.
    let split = loadtest(
        &server,
        &[
            &devices[..],
            &["--scenario", "fetch", "--duration", "3s"],
            &["--during", "sleep 1", "--during-after", "1s"],
        ]
        .concat(),
        &json,
    );
    let fetched = |part: &serde_json::Value| part["FetchPreKeyBundle"]["ok"].as_u64().unwrap();
    let (during, outside) = (
        fetched(&split["during"]["rpcs"]),
        fetched(&split["outside"]["rpcs"]),
    );
    assert!(
        during > 0 && outside > 0,
        "{during} during, {outside} outside"
    );
    assert_eq!(during + outside, fetched(&split["rpcs"]));
    let took = split["during"]["seconds"].as_f64().unwrap();
    assert!((1.0..2.0).contains(&took), "sleep 1 took {took} s");
    let failing = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "--url",
            &server.url,
            "--devices",
            "40",
            "--scenario",
            "fetch",
        ])
        .args([
            "--duration",
            "2s",
            "--during",
            "exit 3",
            "--during-after",
            "1s",
        ])
        .env(
            "KEYSERVER_TOKEN_SECRET",
            std::str::from_utf8(TEST_SECRET).unwrap(),
        )
        .output()
        .unwrap();
    assert!(
        !failing.status.success(),
        "a failed --during command fails the run"
    );
    assert!(String::from_utf8_lossy(&failing.stderr).contains("--during command failed"));

    std::fs::remove_dir_all(&dir).unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    every_scenario_runs_and_reports_what_the_server_did(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    every_scenario_runs_and_reports_what_the_server_did(Backend::Sqlite).await
}
