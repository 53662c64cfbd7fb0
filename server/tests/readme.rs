//! The README's first command works with nothing but the binary: `keyserver serve` with no
//! DATABASE_URL, started in an empty directory, creates its embedded database and token secret,
//! answers a health check, registers a device for a token minted by `keyserver token`, and runs
//! its maintenance jobs on schedule, visible in `keyserver jobs status` and in its metrics.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyserver_client::api;
use keyserver_client::device::Device;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keyserver(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyserver"));
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("KEYSERVER_DATA_DIR")
        .env_remove("KEYSERVER_TOKEN_SECRET");
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Prometheus text the server exports.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connecting to the metrics listener");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text
}

#[tokio::test]
async fn serve_with_no_setup_runs_on_the_embedded_database() {
    let dir = std::env::temp_dir().join(format!("keyserver-readme-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let _server = Running(
        keyserver(&dir)
            .args(["serve", "--listen", &listen, "--metrics-listen", &metrics])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting keyserver serve"),
    );

    let url = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => break channel,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("keyserver serve did not come up: {e}"),
        }
    };
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    assert!(dir.join("keyserver-data/keyserver.db").exists());
    assert!(dir.join("keyserver-data/token-secret").exists());

    let user = uuid::Uuid::new_v4().to_string();
    let token = keyserver(&dir)
        .args(["token", "--user", &user, "--device", "phone"])
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap();

    let mut device =
        Device::create(&dir.join("phone.json"), "phone", b"passphrase", 100_000).unwrap();
    let mut client = api::connect(&url, &token).await.unwrap();
    let registered = device.register(&mut client).await.unwrap();
    assert_eq!(registered.one_time_prekeys_available, 100);

    // Its schedule ran the rotation check, cleanup and the drain check at start: on record and
    // in the metrics.
    let deadline = Instant::now() + Duration::from_secs(30);
    let runs = loop {
        let out = keyserver(&dir).args(["jobs", "status"]).output().unwrap();
        let runs = String::from_utf8(out.stdout).unwrap();
        if runs.matches("schedule succeeded").count() == 3 || Instant::now() > deadline {
            break runs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        runs.contains(" cleanup ") && runs.contains(" rotate ") && runs.contains(" drain-check "),
        "{runs}"
    );
    assert_eq!(runs.matches("schedule succeeded").count(), 3, "{runs}");
    let exported = scrape(&metrics);
    assert!(
        exported
            .lines()
            .any(|l| l.starts_with("keyserver_job_runs_total{")
                && l.contains("job=\"cleanup\"")
                && l.contains("outcome=\"succeeded\"")
                && l.ends_with(" 1")),
        "{exported}"
    );
    assert!(
        exported.contains("keyserver_job_rows_total{job=\"cleanup\",kind=\"audit_events\"} 0"),
        "{exported}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
