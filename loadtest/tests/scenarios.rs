//! Every scenario of the `loadtest` binary against a real server on each backend: the runs
//! succeed, verify every bundle (both signatures), report no key of either kind served twice,
//! and what they report matches what the server stored; a run over two servers moves off the
//! one that stops, and its ledger matches the database.

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

/// The rows of `ledger` (the `--ledger` CSV) with this event and kind, as `device:key id`.
fn ledger_keys(ledger: &str, event: &str, kind: &str) -> Vec<String> {
    ledger
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields[0] == event && fields[1] == kind)
                .then(|| format!("'{}:{}'", fields[2], fields[3]))
        })
        .collect()
}

async fn a_run_over_two_servers_moves_off_the_one_that_stops(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let (first, second) = (TestServer::start(&db).await, TestServer::start(&db).await);
    let dir = std::env::temp_dir().join(format!("loadtest-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, ledger) = (dir.join("run.json"), dir.join("ledger.csv"));
    let devices = ["--devices", "20"];
    loadtest(
        &first,
        &[&devices[..], &["--scenario", "register"]].concat(),
        &json,
    );

    let urls = format!("{},{}", first.url, second.url);
    let run = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--url", &urls, "--concurrency", "4", "--duration", "4s"])
        .args(devices)
        .args(["--scenario", "mixed", "--tolerate", "UNAVAILABLE"])
        .args(["--ledger", ledger.to_str().unwrap()])
        .args(["--json", json.to_str().unwrap()])
        .env(
            "KEYSERVER_TOKEN_SECRET",
            std::str::from_utf8(TEST_SECRET).unwrap(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    second.stop().await.unwrap();
    let out = tokio::task::spawn_blocking(|| run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The workers on the stopped server saw UNAVAILABLE, then went on on the other one.
    let outages = report["outages"]["count"].as_u64().unwrap();
    assert!(outages >= 1, "{report}");
    for failure in report["failures"].as_array().unwrap() {
        assert_eq!(failure["code"], "Unavailable", "{report}");
    }
    let late: u64 = report["timeline"].as_array().unwrap()[2..]
        .iter()
        .map(|s| s["calls"].as_u64().unwrap() - s["failures"].as_u64().unwrap())
        .sum();
    assert!(late > 100, "calls served after the stop: {late}");
    let c = &report["correctness"];
    assert_eq!(c["served_never_uploaded"], 0);
    assert_eq!(c["served_twice"], 0);
    assert_eq!(c["kyber_served_twice"], 0);

    // The ledger against the database: every key handed out is taken, every acknowledged
    // upload stored.
    let ledger = std::fs::read_to_string(&ledger).unwrap();
    let tables = [
        ("ec", "nchat_one_time_prekeys", "prekey_id", "TRUE"),
        (
            "kyber",
            "nchat_kyber_prekeys",
            "kyber_prekey_id",
            "NOT is_last_resort",
        ),
    ];
    let mut checked = 0;
    for (kind, table, id, one_time) in tables {
        for (event, taken) in [("served", "is_consumed"), ("uploaded", "TRUE")] {
            let keys = ledger_keys(&ledger, event, kind);
            if keys.is_empty() {
                continue;
            }
            let sql = format!(
                "SELECT count(*) FROM {table} WHERE {one_time} AND {taken} \
                 AND device_id || ':' || {id} IN ({})",
                keys.join(",")
            );
            assert_eq!(
                first.db.count(&sql).await,
                keys.len() as i64,
                "{event} {kind}"
            );
            checked += keys.len();
        }
    }
    let acknowledged = c["uploads_acknowledged"].as_u64().unwrap() as usize;
    assert!(acknowledged > 0, "the run uploaded keys: {report}");
    assert!(checked > acknowledged, "{checked} ledger rows checked");

    std::fs::remove_dir_all(&dir).unwrap();
    first.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_postgres() {
    a_run_over_two_servers_moves_off_the_one_that_stops(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_sqlite() {
    a_run_over_two_servers_moves_off_the_one_that_stops(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    every_scenario_runs_and_reports_what_the_server_did(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    every_scenario_runs_and_reports_what_the_server_did(Backend::Sqlite).await
}
