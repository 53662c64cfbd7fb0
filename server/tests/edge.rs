//! The request edge of a real `keyserver serve` process: per-RPC metrics scraped over HTTP,
//! JSON request logs with no secret in them, readiness while its PostgreSQL is stopped, TLS and
//! mTLS over real handshakes with a certificate reloaded in place, a refused oversized message,
//! a server whose log reader went away still stopping cleanly on SIGTERM, and a server killed
//! mid-load whose lost fetches, retried with their idempotency keys elsewhere, burn no key.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDevice;
use keyserver::testing::{PrivatePostgres, TEST_SECRET, secret_looking};
use keyserver_client::api::{self, Address};
use keyserver_proto::pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

/// A `keyserver serve` process, killed when the test ends however it ends.
struct Server {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyserver-edge-{what}-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `keyserver` in `dir`, with the tests' token secret and nothing from the environment.
fn keyserver(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyserver"));
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("KEYSERVER_DATA_DIR")
        .env_remove("KEYSERVER_LOG")
        .env(
            "KEYSERVER_TOKEN_SECRET",
            std::str::from_utf8(TEST_SECRET).unwrap(),
        );
    cmd
}

/// Starts `keyserver serve` in a new directory with `args`, stderr going to `stderr`.
fn serve(what: &str, args: &[&str], stderr: Stdio, env: &[(&str, &str)]) -> Server {
    let dir = temp_dir(what);
    let listen = format!("127.0.0.1:{}", free_port());
    let tls = args.contains(&"--tls-cert");
    let child = keyserver(&dir)
        .args(["serve", "--listen", &listen])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starting keyserver serve");
    let scheme = if tls { "https" } else { "http" };
    Server {
        child,
        url: format!("{scheme}://{listen}"),
        dir,
    }
}

/// Waits until `server` answers a health check over `address`, and returns the status.
async fn health(address: &Address, service: &str) -> Result<ServingStatus, String> {
    let channel = address.connect().await.map_err(|e| e.to_string())?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status())
        .map_err(|e| e.to_string())
}

async fn wait_serving(address: &Address) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match health(address, "").await {
            Ok(ServingStatus::Serving) => return,
            other if Instant::now() > deadline => panic!("the server did not come up: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn token(user: Uuid, device: Option<&str>) -> String {
    let dir = temp_dir("token");
    let mut cmd = keyserver(&dir);
    cmd.args(["token", "--user", &user.to_string()]);
    if let Some(device) = device {
        cmd.args(["--device", device]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Registers `device` with a token bound to it, and returns a client of another user to fetch
/// its bundles with.
async fn registered(address: &Address, device: &TestDevice) -> api::KeyClient {
    api::connect(address, &token(device.user, Some(&device.device_id)))
        .await
        .unwrap()
        .register_device(device.register_request())
        .await
        .unwrap();
    api::connect(address, &token(Uuid::new_v4(), None))
        .await
        .unwrap()
}

/// One plain HTTP/1.1 GET, answered as (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut conn = std::net::TcpStream::connect(addr).expect("connecting to the metrics listener");
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The value of the series `name` whose labels include every one of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn metrics_count_every_call_by_method_and_code_and_describe_every_series() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = serve(
        "metrics",
        &["--metrics-listen", &metrics],
        Stdio::null(),
        &[],
    );
    let address = Address::from(&server.url);
    wait_serving(&address).await;

    let phone = TestDevice::pqxdh(Uuid::new_v4(), "metrics-phone", 3, 2);
    let mut peer = registered(&address, &phone).await;
    for _ in 0..4 {
        common::fetch(&mut peer, phone.user, Some("metrics-phone"))
            .await
            .unwrap();
    }
    let mut forged = api::connect(&address, "not.a.token").await.unwrap();
    let refused = common::fetch(&mut forged, phone.user, None).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);

    let (status, text) = http_get(&metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    let key_service = "service=\"keyserver.v1.KeyService\"";
    assert_eq!(
        series(
            &text,
            "keyserver_rpc_requests_total",
            &[key_service, "method=\"RegisterDevice\"", "code=\"OK\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "keyserver_rpc_requests_total",
            &[key_service, "method=\"FetchPreKeyBundle\"", "code=\"OK\""]
        ),
        4.0
    );
    assert_eq!(
        series(
            &text,
            "keyserver_rpc_requests_total",
            &["method=\"FetchPreKeyBundle\"", "code=\"UNAUTHENTICATED\""]
        ),
        1.0
    );
    assert_eq!(
        series(
            &text,
            "keyserver_rpc_duration_seconds_count",
            &["method=\"FetchPreKeyBundle\""]
        ),
        5.0
    );
    assert_eq!(
        series(
            &text,
            "keyserver_security_events_total",
            &["event=\"token_refused\"", "reason=\"malformed\""]
        ),
        1.0
    );
    // Three EC one-time prekeys for four fetches: the last bundle went without.
    assert_eq!(
        series(
            &text,
            "keyserver_one_time_prekeys_served_total",
            &["kind=\"ec\""]
        ),
        3.0
    );
    assert_eq!(
        series(
            &text,
            "keyserver_one_time_prekeys_served_total",
            &["kind=\"kyber\""]
        ),
        2.0
    );
    assert_eq!(
        series(
            &text,
            "keyserver_bundles_without_one_time_prekey_total",
            &["kind=\"ec\""]
        ),
        1.0
    );
    assert_eq!(series(&text, "keyserver_bundles_served_total", &[]), 4.0);
    assert_eq!(
        series(
            &text,
            "keyserver_keys_uploaded_total",
            &["kind=\"one_time_ec\""]
        ),
        3.0
    );
    assert_eq!(
        series(
            &text,
            "keyserver_keys_uploaded_total",
            &["kind=\"one_time_kyber\""]
        ),
        2.0
    );
    assert_eq!(series(&text, "keyserver_db_up", &[]), 1.0);
    assert_eq!(series(&text, "keyserver_db_fenced", &[]), 0.0);
    assert!(series(&text, "keyserver_db_pool_connections", &[]) >= 1.0);
    assert!(series(&text, "keyserver_db_pool_wait_seconds_count", &[]) >= 5.0);
    assert_eq!(series(&text, "keyserver_rpc_in_flight", &[]), 0.0);

    // Every series says what it is.
    let names: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .collect();
    assert!(names.len() >= 12, "{names:?}");
    for name in names {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}"
        );
    }
    for path in ["/", "/metrics/x", "/favicon.ico"] {
        let (status, _) = http_get(&metrics, path);
        assert!(status.contains("404"), "{path}: {status}");
    }
}

/// Sends SIGTERM and waits for the process to exit, returning its exit code.
fn terminate(child: &mut Child) -> Option<i32> {
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            panic!("the server did not exit within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn json_logs_give_each_call_a_span_and_id_and_never_a_secret() {
    let mut server = serve(
        "logs",
        &["--log-format", "json"],
        Stdio::piped(),
        &[(
            "KEYSERVER_LOG",
            "debug,sqlx=warn,h2=info,hyper=info,tower=info,rustls=info",
        )],
    );
    // Read stderr as a log shipper would, all along.
    let mut stderr = server.child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logged = String::new();
        stderr.read_to_string(&mut logged).unwrap();
        logged
    });
    let address = Address::from(&server.url);
    wait_serving(&address).await;

    let phone = TestDevice::new(Uuid::new_v4(), "logs-phone", 2);
    let phone_token = token(phone.user, Some("logs-phone"));
    let mut owner = api::connect(&address, &phone_token).await.unwrap();
    let registered = owner
        .register_device(phone.register_request())
        .await
        .unwrap();
    let request_id = registered
        .metadata()
        .get("x-request-id")
        .expect("a request id in the response")
        .to_str()
        .unwrap()
        .to_owned();
    // A user token may not change the device: a security event.
    let mut user_only = api::connect(&address, &token(phone.user, None))
        .await
        .unwrap();
    let denied = user_only
        .remove_device(pb::RemoveDeviceRequest {
            device_id: "logs-phone".into(),
        })
        .await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let mut expired_kid = api::connect(&address, &format!("{phone_token}x"))
        .await
        .unwrap();
    assert_eq!(
        common::fetch(&mut expired_kid, phone.user, None)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // Off the runtime: the clients' connections must answer the server's GOAWAY meanwhile.
    let (code, server) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        (terminate(&mut server.child), server)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0));
    drop(server);
    let logged = reader.join().unwrap();
    let lines: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let register = lines
        .iter()
        .find(|l| {
            l["span"]["request_id"] == request_id.as_str()
                && l["fields"]["message"] == "request finished"
        })
        .unwrap_or_else(|| panic!("no finished event for {request_id}: {logged}"));
    assert_eq!(
        register["span"]["method"],
        "/keyserver.v1.KeyService/RegisterDevice"
    );
    assert_eq!(register["span"]["user"], phone.user.to_string());
    assert_eq!(register["span"]["device"], "logs-phone");
    assert_eq!(register["fields"]["status"], "OK");
    assert!(register["fields"]["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["security_event"] == "permission_denied"
                && l["fields"]["reason"] == "no_device"),
        "{logged}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["security_event"] == "token_refused"
                && l["fields"]["reason"] == "bad_signature"),
        "{logged}"
    );
    assert!(lines.iter().any(|l| l["fields"]["message"] == "stopped"));
    // Nothing logged holds a token, a key or a blob.
    assert!(!logged.contains(&phone_token[20..]), "a token was logged");
    for (i, line) in lines.iter().enumerate() {
        if let Some(path) = secret_looking(line, "$") {
            panic!("log line {i} holds secret-looking material at {path}: {line}");
        }
    }
}

#[tokio::test]
async fn a_server_whose_log_reader_went_away_serves_on_and_stops_cleanly() {
    // The peer fetches one device far more often than a sender would: no fetch limit.
    let mut server = serve(
        "pipe",
        &["--fetch-burst", "0"],
        Stdio::piped(),
        &[("KEYSERVER_LOG", "debug,sqlx=warn")],
    );
    let address = Address::from(&server.url);
    // Read the first lines, then go away, as a crashed log shipper does.
    let stderr = server.child.stderr.take().unwrap();
    let mut first = String::new();
    BufReader::new(stderr).read_line(&mut first).unwrap();
    assert!(!first.is_empty());
    wait_serving(&address).await;

    // Each call logs (debug), and every write to stderr now fails with EPIPE.
    let phone = TestDevice::new(Uuid::new_v4(), "pipe-phone", 20);
    let mut peer = registered(&address, &phone).await;
    for _ in 0..20 {
        common::fetch(&mut peer, phone.user, Some("pipe-phone"))
            .await
            .unwrap();
    }
    // Calls in flight while SIGTERM arrives are finished, then the process exits 0.
    let load: Vec<_> = (0..8)
        .map(|_| {
            let mut peer = peer.clone();
            tokio::spawn(async move {
                let mut ok = 0;
                while common::fetch(&mut peer, phone.user, None).await.is_ok() {
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Off the runtime: the clients' connections must answer the server's GOAWAY meanwhile.
    let (code, _server) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        (terminate(&mut server.child), server)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "SIGTERM must drain and exit 0");
    for task in load {
        assert!(task.await.unwrap() > 0);
    }
}

#[tokio::test]
async fn readiness_follows_a_stopped_database_and_calls_fail_fast_meanwhile() {
    let mut postgres = PrivatePostgres::start();
    let url = postgres.url();
    let server = serve(
        "ready",
        &["--readiness-interval", "200ms", "--readiness-timeout", "1s"],
        Stdio::null(),
        &[("DATABASE_URL", &url)],
    );
    let address = Address::from(&server.url);
    wait_serving(&address).await;
    let services = [
        "keyserver.v1.KeyService",
        "keyserver.v1.SessionService",
        "keyserver.v1.SafetyNumberService",
        "keyserver.v1.MasterKeyService",
        "keyserver.v1.AuditService",
    ];
    for service in services {
        assert_eq!(health(&address, service).await, Ok(ServingStatus::Serving));
    }
    let user = Uuid::new_v4();
    let mut client = api::connect(&address, &token(user, None)).await.unwrap();
    let status = || pb::GetKeyStatusRequest {
        device_id: "nobody".into(),
    };
    assert_eq!(
        client.get_key_status(status()).await.unwrap_err().code(),
        Code::NotFound
    );

    postgres.stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    while health(&address, "").await != Ok(ServingStatus::NotServing) {
        assert!(Instant::now() < deadline, "health still says SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for service in services {
        assert_eq!(
            health(&address, service).await,
            Ok(ServingStatus::NotServing),
            "{service}"
        );
    }
    // Answered at once, not after the pool's 10 s acquire timeout.
    let asked = Instant::now();
    let refused = client.get_key_status(status()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "UNAVAILABLE took {:?}",
        asked.elapsed()
    );

    postgres.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&address, "").await != Ok(ServingStatus::Serving) {
        assert!(
            Instant::now() < deadline,
            "health did not return to SERVING"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.get_key_status(status()).await {
            Err(e) if e.code() == Code::NotFound => break,
            // Connections broken by the restart are replaced as they are found.
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("after the database returned: {other:?}"),
        }
    }
}

/// A CA and a certificate it issued for `name`, as PEM (cert, key), plus the CA's PEM.
fn issued_by_ca(name: &str) -> (String, (String, String)) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), (cert.pem(), key.serialize_pem()))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn tls_is_a_real_handshake_never_a_downgrade_and_reloads_in_place() {
    let dir = temp_dir("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = keyserver(&dir)
        .args(["tls", "self-signed", "--name", "localhost"])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let mut server = serve(
        "tls",
        &["--tls-cert", &cert_arg, "--tls-key", &key_arg],
        Stdio::null(),
        &[],
    );
    let port = server.url.rsplit(':').next().unwrap().to_owned();
    let https = format!("https://localhost:{port}");
    let trusted = Address::new(&https, Some(&cert), None, None).unwrap();
    wait_serving(&trusted).await;
    let user = Uuid::new_v4();
    let mut before_reload = api::connect(&trusted, &token(user, None)).await.unwrap();
    assert_eq!(
        common::fetch(&mut before_reload, user, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // The system roots do not know a self-signed certificate; plaintext gets no answer.
    assert!(
        health(&Address::from(https.as_str()), "").await.is_err(),
        "an untrusted certificate was accepted"
    );
    assert!(
        health(
            &Address::from(format!("http://localhost:{port}").as_str()),
            ""
        )
        .await
        .is_err(),
        "a plaintext call to the TLS port was answered"
    );

    // A new certificate in place, and SIGHUP: new handshakes use it, open connections go on.
    let old_cert = std::fs::read(&cert).unwrap();
    let renewed = keyserver(&dir)
        .args(["tls", "self-signed", "--name", "localhost"])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(renewed.status.success());
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let renewed_trust = Address::new(&https, Some(&cert), None, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while health(&renewed_trust, "").await != Ok(ServingStatus::Serving) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old_trust = Address {
        ca_cert: Some(old_cert),
        ..Address::from(https.as_str())
    };
    assert!(
        health(&old_trust, "").await.is_err(),
        "still the old certificate"
    );
    assert_eq!(
        common::fetch(&mut before_reload, user, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "a connection opened before the reload was dropped"
    );
    assert!(server.child.try_wait().unwrap().is_none());

    // A TLS client to a plaintext server fails rather than falling back to plaintext.
    let plain = serve("plain", &[], Stdio::null(), &[]);
    wait_serving(&Address::from(&plain.url)).await;
    let plain_port = plain.url.rsplit(':').next().unwrap();
    let downgrade = Address::new(
        &format!("https://localhost:{plain_port}"),
        Some(&cert),
        None,
        None,
    )
    .unwrap();
    assert!(health(&downgrade, "").await.is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn mtls_admits_only_clients_with_a_certificate_from_the_ca() {
    let dir = temp_dir("mtls");
    let (server_ca, (server_cert, server_key)) = issued_by_ca("localhost");
    let (client_ca, (client_cert, client_key)) = issued_by_ca("chat-backend");
    let (_, (stranger_cert, stranger_key)) = issued_by_ca("stranger");
    let args: Vec<String> = [
        ("--tls-cert", write(&dir, "server.pem", &server_cert)),
        ("--tls-key", write(&dir, "server-key.pem", &server_key)),
        ("--tls-client-ca", write(&dir, "client-ca.pem", &client_ca)),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = serve("mtls", &args, Stdio::null(), &[]);
    let port = server.url.rsplit(':').next().unwrap();
    let https = format!("https://localhost:{port}");
    let with = |cert: &str, key: &str| {
        Address::new(
            &https,
            Some(&write(&dir, "server-ca.pem", &server_ca)),
            Some(&write(&dir, "c.pem", cert)),
            Some(&write(&dir, "k.pem", key)),
        )
        .unwrap()
    };
    let backend = with(&client_cert, &client_key);
    wait_serving(&backend).await;
    let user = Uuid::new_v4();
    let mut client = api::connect(&backend, &token(user, None)).await.unwrap();
    assert_eq!(
        common::fetch(&mut client, user, None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(
        health(&with(&stranger_cert, &stranger_key), "")
            .await
            .is_err(),
        "a certificate from another CA was admitted"
    );
    let anonymous = Address::new(
        &https,
        Some(&write(&dir, "server-ca.pem", &server_ca)),
        None,
        None,
    )
    .unwrap();
    assert!(
        health(&anonymous, "").await.is_err(),
        "a client without a certificate was admitted"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_oversized_message_is_refused_from_its_length_prefix() {
    let server = serve("oversized", &[], Stdio::null(), &[]);
    let address = Address::from(&server.url);
    wait_serving(&address).await;
    let user = Uuid::new_v4();
    let token = token(user, None);

    // A real registration just over the limit is refused, and nothing is stored.
    let mut device = TestDevice::new(user, "big-phone", 0).register_request();
    device.encrypted_identity_private_key = vec![0x42; 700 * 1024];
    let mut client = api::connect(&address, &token).await.unwrap();
    let refused = client.register_device(device).await.unwrap_err();
    assert!(
        matches!(refused.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{refused:?}"
    );

    // A message that claims 2 GiB and sends five bytes is answered at once: the server does
    // not wait for (or allocate) what the length prefix announces.
    let stream = tokio::net::TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (body_tx, body) = http_body_channel();
    let request = http::Request::post(format!(
        "{}/keyserver.v1.KeyService/RegisterDevice",
        server.url
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {token}"))
    .body(body)
    .unwrap();
    let responding = tokio::spawn(sender.send_request(request));
    body_tx
        .send(Ok(http_body::Frame::data(bytes::Bytes::from_static(&[
            0, 0x7f, 0xff, 0xff, 0xff,
        ]))))
        .await
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), responding)
        .await
        .expect("the server waited for the announced 2 GiB")
        .unwrap()
        .unwrap();
    let status = grpc_status(response).await;
    assert!(
        status == Some(Code::OutOfRange as i32) || status == Some(Code::ResourceExhausted as i32),
        "{status:?}"
    );
    drop(body_tx);
}

type Frames =
    tokio::sync::mpsc::Sender<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>;
type ChannelBody = http_body_util::StreamBody<
    tokio_stream::wrappers::ReceiverStream<
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >,
>;

/// A request body fed from a channel, left open so the server cannot see its end.
fn http_body_channel() -> (Frames, ChannelBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (
        tx,
        http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
}

/// The grpc-status of a response, from its headers (trailers-only) or its trailers.
async fn grpc_status(response: http::Response<hyper::body::Incoming>) -> Option<i32> {
    use http_body_util::BodyExt;
    if let Some(v) = response.headers().get("grpc-status") {
        return v.to_str().ok()?.parse().ok();
    }
    let collected = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .ok()?
        .ok()?;
    collected
        .trailers()?
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test]
async fn tokens_minted_by_a_chat_backend_work_and_keyserver_token_never_invents_a_secret() {
    let server = serve("tokens", &[], Stdio::null(), &[]);
    let address = Address::from(&server.url);
    wait_serving(&address).await;

    // docs/examples/mint_token.py, as a chat backend in Python would run it.
    let python = |user: Uuid, device: &str, ttl: u64| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/mint_token.py");
        let out = Command::new("python3")
            .arg(script)
            .args([&user.to_string(), device, &ttl.to_string()])
            .env(
                "KEYSERVER_TOKEN_SECRET",
                std::str::from_utf8(TEST_SECRET).unwrap(),
            )
            .output()
            .expect("this test runs the documented Python example: python3 must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let phone = TestDevice::new(Uuid::new_v4(), "py-phone", 2);
    let mut device = api::connect(&address, &python(phone.user, "py-phone", 600))
        .await
        .unwrap();
    device
        .register_device(phone.register_request())
        .await
        .unwrap();
    device
        .upload_one_time_pre_keys(pb::UploadOneTimePreKeysRequest {
            device_id: "py-phone".into(),
            one_time_prekeys: common::fresh_otks(10..=11),
        })
        .await
        .unwrap();
    let mut too_long = api::connect(&address, &python(phone.user, "", 31 * 86_400))
        .await
        .unwrap();
    let refused = common::fetch(&mut too_long, phone.user, None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("maximum lifetime"),
        "{refused:?}"
    );

    // Outside the server's data directory and without KEYSERVER_TOKEN_SECRET it refuses, says
    // where it looked, and creates nothing.
    let elsewhere = temp_dir("no-secret");
    let out = keyserver(&elsewhere)
        .env_remove("KEYSERVER_TOKEN_SECRET")
        .args(["token", "--user", &Uuid::new_v4().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("keyserver-data/token-secret"), "{said}");
    assert!(out.stdout.is_empty());
    assert!(!elsewhere.join("keyserver-data").exists());
    for ttl in ["0s", "100years", "31days"] {
        let out = keyserver(&elsewhere)
            .args(["token", "--user", &Uuid::new_v4().to_string(), "--ttl", ttl])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--ttl {ttl} was accepted");
    }
    std::fs::remove_dir_all(&elsewhere).unwrap();
}

/// A server killed mid-load burns no key: every fetch whose answer was lost with it is retried
/// with its idempotency key against the other server (as `keyctl` and `loadtest` retry), which
/// answers with the keys the lost answer held. Two processes on one PostgreSQL database, 16
/// fetchers of 8 PQXDH devices; the ledger of keys received must match the keys the database
/// marked taken, one for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetches_retried_with_their_key_after_a_server_is_killed_burn_no_key() {
    const FETCHERS: usize = 16;
    const FETCHES_EACH: usize = 40;
    let db = keyserver::testing::TestDb::migrated(keyserver::testing::Backend::Postgres).await;
    let args = [
        "--database-url",
        db.url(),
        "--fetch-burst",
        "0",
        "--fetch-budget",
        "0",
    ];
    let mut doomed = serve("kill-a", &args, Stdio::null(), &[]);
    let survivor = serve("kill-b", &args, Stdio::null(), &[]);
    let (a, b) = (
        Address::from(doomed.url.as_str()),
        Address::from(survivor.url.as_str()),
    );
    wait_serving(&a).await;
    wait_serving(&b).await;
    let devices: Vec<TestDevice> = (0..8)
        .map(|i| TestDevice::pqxdh(Uuid::new_v4(), &format!("dev-{i}"), 100, 100))
        .collect();
    for device in &devices {
        registered(&a, device).await;
    }
    let targets: Vec<pb::Target> = devices
        .iter()
        .map(|d| common::target(d.user, Some(&d.device_id)))
        .collect();

    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for f in 0..FETCHERS {
        let token = token(Uuid::new_v4(), None);
        let mut on_a = api::connect(&a, &token).await.unwrap();
        let mut on_b = api::connect(&b, &token).await.unwrap();
        let (targets, done) = (targets.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            // (device, EC key, Kyber key) received, and the fetches retried after a loss.
            let (mut ledger, mut retried) = (Vec::new(), 0);
            let mut a_alive = true;
            for i in 0..FETCHES_EACH {
                let request = pb::FetchPreKeyBundleRequest {
                    target: Some(targets[(f + i) % targets.len()].clone()),
                    idempotency_key: api::idempotency_key(),
                };
                let mut answer = if a_alive {
                    on_a.fetch_pre_key_bundle(request.clone()).await
                } else {
                    on_b.fetch_pre_key_bundle(request.clone()).await
                };
                let mut attempts = 0;
                while let Err(status) = &answer {
                    assert!(api::answer_may_be_lost(status), "{status:?}");
                    attempts += 1;
                    assert!(attempts < 20, "the survivor never answered: {status:?}");
                    a_alive = false;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    answer = on_b.fetch_pre_key_bundle(request.clone()).await;
                }
                retried += usize::from(attempts > 0);
                let bundle = answer.unwrap().into_inner().devices.remove(0);
                ledger.push((
                    bundle.device_id,
                    bundle.one_time_prekey.map(|k| k.key_id),
                    bundle.kyber_prekey.map(|k| k.key_id),
                ));
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (ledger, retried)
        }));
    }
    // Mid-load, with calls in flight: SIGKILL, no goodbye to clients or the database.
    while done.load(std::sync::atomic::Ordering::Relaxed) < FETCHERS * FETCHES_EACH / 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();

    let (mut ec, mut kyber, mut retried) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (ledger, r) = task.await.unwrap();
        retried += r;
        for (device, e, k) in ledger {
            ec.push((device.clone(), e.expect("every fetch finds an EC key left")));
            kyber.push((device, k.expect("a PQXDH bundle")));
        }
    }
    assert!(retried > 0, "no fetch was in flight at the kill");
    let check = db.open().await;
    for (kind, received, table) in [
        ("EC", ec, "nchat_one_time_prekeys"),
        ("Kyber", kyber, "nchat_kyber_prekeys"),
    ] {
        let n = received.len();
        let distinct: std::collections::HashSet<_> = received.into_iter().collect();
        assert_eq!(
            distinct.len(),
            n,
            "a one-time {kind} key was received twice"
        );
        let taken = check
            .count(&format!("SELECT count(*) FROM {table} WHERE is_consumed"))
            .await;
        assert_eq!(
            taken, n as i64,
            "{kind} keys taken but never received (burned) after {retried} retried fetches"
        );
    }
    eprintln!(
        "{retried} fetches lost with the killed server were retried on the other; 0 keys burned"
    );
}
