//! `keyctl` end to end: two devices register through the real binary, Alice fetches Bob's
//! bundle, and both derive the same PQXDH secret through the server; a device registered before
//! PQXDH catches up with `keyctl refresh`.

use std::path::Path;

use keyserver::testing::{Backend, TestDb, TestServer};
use keyserver_client::device::Device;
use uuid::Uuid;

const PASSPHRASE: &str = "correct horse battery staple";

struct Keyctl<'a> {
    server: &'a TestServer,
    user: Uuid,
    state: std::path::PathBuf,
}

impl Keyctl<'_> {
    /// The token a chat backend would give this device: bound to the device of its state file
    /// once there is one (`init` and `restore` name it), of the user alone before.
    fn token(&self) -> String {
        let device = std::fs::read(&self.state)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|state| state["device_id"].as_str().map(str::to_owned));
        match device {
            Some(device) => self.server.device_token(self.user, &device),
            None => self.server.token(self.user),
        }
    }

    async fn run(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
            .args(args)
            .env("KEYCTL_STATE", &self.state)
            .env("KEYSERVER_URL", &self.server.url)
            .env("KEYSERVER_TOKEN", self.token())
            .env("KEYCTL_PASSPHRASE", PASSPHRASE)
            .output()
            .await
            .expect("running keyctl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "keyctl {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

fn fingerprint(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("shared secret fingerprint: "))
        .expect("a fingerprint line")
        .to_owned()
}

/// Alice fetches Bob's bundle and writes her initial message to `message`; Bob answers it.
/// Returns the fingerprints each side printed, after checking both name `handshake`.
async fn round_trip(
    alice: &Keyctl<'_>,
    bob: &Keyctl<'_>,
    message: &Path,
    handshake: &str,
) -> (String, String) {
    let path = message.to_str().unwrap();
    let (alice_user, bob_user) = (alice.user.to_string(), bob.user.to_string());
    let sent = alice
        .run(&["pqxdh", "initiate", "--user", &bob_user, "--out", path])
        .await;
    assert!(sent.contains(&format!("initiated {handshake}")), "{sent}");
    // `x3dh` is the command's old name, kept as an alias.
    let received = bob
        .run(&["x3dh", "respond", "--message", path, "--from", &alice_user])
        .await;
    assert!(
        received.contains(&format!("answered {handshake}")),
        "{received}"
    );
    (fingerprint(&sent), fingerprint(&received))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    alice_and_bob_agree_on_a_pqxdh_secret_through_the_server(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    alice_and_bob_agree_on_a_pqxdh_secret_through_the_server(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_from_before_pqxdh_catches_up_on_postgres() {
    a_device_registered_before_pqxdh_catches_up_with_refresh(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_from_before_pqxdh_catches_up_on_sqlite() {
    a_device_registered_before_pqxdh_catches_up_with_refresh(Backend::Sqlite).await;
}

/// Bob's phone was registered by a keyctl from before PQXDH: no Kyber keys on the server, and a
/// version 1 state file without them. Peers get X3DH bundles; `keyctl refresh` finds the
/// server's keys differ from what the device should have published (`CheckKeys`), registers
/// again with Kyber keys, and from then on peers get PQXDH.
async fn a_device_registered_before_pqxdh_catches_up_with_refresh(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dir = std::env::temp_dir().join(format!("keyctl-upgrade-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let bob = Keyctl {
        server: &server,
        user: Uuid::new_v4(),
        state: dir.join("bob.json"),
    };
    let alice = Keyctl {
        server: &server,
        user: Uuid::new_v4(),
        state: dir.join("alice.json"),
    };
    for (who, device) in [(&bob, "old-phone"), (&alice, "alice-laptop")] {
        who.run(&["init", "--device-id", device, "--iterations", "100000"])
            .await;
        who.run(&["register"]).await;
    }
    // What the old keyctl and server left: no Kyber keys anywhere.
    server
        .db
        .execute("DELETE FROM nchat_kyber_prekeys WHERE device_id = 'old-phone'")
        .await;
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bob.state).unwrap()).unwrap();
    let fields = state.as_object_mut().unwrap();
    for field in [
        "kyber_one_time_prekeys",
        "kyber_last_resort_prekeys",
        "next_kyber_prekey_id",
    ] {
        fields.remove(field);
    }
    fields.insert("version".into(), 1.into());
    std::fs::write(&bob.state, serde_json::to_string(&state).unwrap()).unwrap();

    let status = bob.run(&["status"]).await;
    assert!(
        status.contains("last-resort Kyber prekey: none"),
        "{status}"
    );
    let message = dir.join("hello.json");
    let (sent, received) = round_trip(&alice, &bob, &message, "X3DH").await;
    assert_eq!(sent, received, "an X3DH device still works");

    let out = bob.run(&["refresh"]).await;
    assert!(
        out.contains("the server's keys differed from this device's: registered again (updated;"),
        "{out}"
    );
    let status = bob.run(&["status"]).await;
    assert!(
        status.contains("one-time Kyber prekeys available: 100"),
        "{status}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bob.state).unwrap()).unwrap();
    assert_eq!(saved["version"], 2);
    let (sent, received) = round_trip(&alice, &bob, &message, "PQXDH").await;
    assert_eq!(sent, received);
    let out = bob.run(&["refresh"]).await;
    assert!(out.contains("the server holds this device's keys"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn alice_and_bob_agree_on_a_pqxdh_secret_through_the_server(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = TestServer::start(&db).await;
    let dir = std::env::temp_dir().join(format!("keyctl-e2e-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let bob = Keyctl {
        server: &server,
        user: Uuid::new_v4(),
        state: dir.join("bob.json"),
    };
    let alice = Keyctl {
        server: &server,
        user: Uuid::new_v4(),
        state: dir.join("alice.json"),
    };

    for (who, device) in [(&bob, "bob-phone"), (&alice, "alice-laptop")] {
        who.run(&["init", "--device-id", device, "--iterations", "100000"])
            .await;
        let out = who.run(&["register"]).await;
        assert!(
            out.contains("created; 100 one-time prekeys on the server, 100 one-time Kyber prekeys"),
            "{out}"
        );
    }

    let fetched = alice.run(&["fetch", "--user", &bob.user.to_string()]).await;
    assert!(fetched.contains("device bob-phone"), "{fetched}");
    assert!(fetched.contains("signature verified"), "{fetched}");
    assert!(
        fetched.contains(", Kyber prekey ") && fetched.ends_with("(signature verified)\n"),
        "{fetched}"
    );

    let message = dir.join("initial-message.json");
    let (sent, received) = round_trip(&alice, &bob, &message, "PQXDH").await;
    assert_eq!(sent, received, "both sides derive the same secret");

    // The one-time prekey Alice used is gone from Bob's device: a replay cannot derive it again.
    let replay = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
        .args(["x3dh", "respond", "--message", message.to_str().unwrap()])
        .args(["--from", &alice.user.to_string()])
        .env("KEYCTL_STATE", &bob.state)
        .env("KEYCTL_PASSPHRASE", PASSPHRASE)
        .output()
        .await
        .unwrap();
    assert!(!replay.status.success());
    assert!(String::from_utf8_lossy(&replay.stderr).contains("unknown or already used"));

    let status = bob.run(&["status"]).await;
    assert!(
        status.contains("one-time prekeys available: 98"),
        "{status}"
    );
    assert!(
        status.contains("one-time Kyber prekeys available: 98"),
        "{status}"
    );
    assert!(status.contains("rotation due: false"), "{status}");
    let out = bob.run(&["replenish"]).await;
    assert!(out.contains("nothing uploaded"), "{out}");
    let out = bob.run(&["replenish", "--below", "99"]).await;
    assert!(
        out.contains("uploaded 2 one-time prekeys; 100 available")
            && out.contains("uploaded 2 one-time Kyber prekeys; 100 available"),
        "{out}"
    );
    let out = bob.run(&["rotate", "--if-due"]).await;
    assert!(
        out.contains("the signed prekey is not due")
            && out.contains("the last-resort Kyber prekey is not due"),
        "{out}"
    );
    let out = bob.run(&["refresh"]).await;
    assert!(
        out.contains("the server holds this device's keys")
            && out.contains("nothing uploaded")
            && out.contains("not due"),
        "{out}"
    );
    let out = bob.run(&["rotate"]).await;
    assert!(
        out.contains("rotated the signed prekey")
            && out.contains("rotated the last-resort Kyber prekey"),
        "{out}"
    );

    // A rotation that never reached the server (simulated by undoing it there) is resent by
    // the next `rotate --if-due` with the same key, although the old key is not yet due.
    let active = || async {
        server
            .db
            .integer(
                "SELECT CAST(signed_prekey_id AS BIGINT) FROM nchat_signed_prekeys
                 WHERE device_id = 'bob-phone' AND is_active",
            )
            .await
            .unwrap()
    };
    let rotated_to = active().await;
    server
        .db
        .execute(&format!(
            "DELETE FROM nchat_signed_prekeys WHERE device_id = 'bob-phone'
                 AND signed_prekey_id = {rotated_to}"
        ))
        .await;
    server
        .db
        .execute_either(
            "UPDATE nchat_signed_prekeys SET is_active = TRUE, superseded_at = NULL
             WHERE device_id = 'bob-phone'",
            "UPDATE nchat_signed_prekeys SET is_active = 1, superseded_at = NULL
             WHERE device_id = 'bob-phone'",
        )
        .await;
    assert_ne!(active().await, rotated_to);
    let out = bob.run(&["rotate", "--if-due"]).await;
    assert!(out.contains("rotated the signed prekey"), "{out}");
    assert_eq!(active().await, rotated_to, "the pending key, not a new one");
    // Once the active key is past the rotation age, --if-due makes a new one.
    server
        .db
        .set_time(
            "nchat_signed_prekeys",
            "rotation_date",
            "device_id = 'bob-phone'",
            time::OffsetDateTime::now_utc() - time::Duration::days(8),
        )
        .await;
    let out = bob.run(&["refresh"]).await;
    assert!(out.contains("rotated the signed prekey"), "{out}");
    assert_ne!(active().await, rotated_to);

    // After rotation Alice's next session uses the new signed prekey, and still agrees.
    let (sent, received) = round_trip(&alice, &bob, &message, "PQXDH").await;
    assert_eq!(sent, received);

    // Alice checks Bob's safety number locally against the server's, then records it.
    let bob_user = bob.user.to_string();
    let checked = alice.run(&["safety-number", "--user", &bob_user]).await;
    assert!(
        checked.contains("matches the server's") && checked.contains("verified: no"),
        "{checked}"
    );
    let digits: String = checked
        .lines()
        .find_map(|l| l.strip_prefix("safety number: "))
        .unwrap()
        .replace(' ', "");
    assert_eq!(digits.len(), 60);
    assert!(
        alice
            .run(&["safety-number", "--user", &bob_user, "--verify", "qr_code"])
            .await
            .contains("verified")
    );
    assert!(
        alice
            .run(&["safety-number", "--user", &bob_user])
            .await
            .contains("verified: yes")
    );

    // Both sides stored the session on the server; the second agreement replaced the first.
    let alice_sessions = alice.run(&["session", "list"]).await;
    assert!(
        alice_sessions.contains("device bob-phone: version 2, active, initiated here"),
        "{alice_sessions}"
    );
    let bob_sessions = bob.run(&["session", "list"]).await;
    assert!(
        bob_sessions.contains("device alice-laptop: version 2, active, initiated by the peer"),
        "{bob_sessions}"
    );
    let alice_user = alice.user.to_string();
    let destroyed = bob
        .run(&[
            "session",
            "destroy",
            "--peer",
            &alice_user,
            "--peer-device",
            "alice-laptop",
        ])
        .await;
    assert!(destroyed.contains("(version 3)"), "{destroyed}");
    assert!(!bob.run(&["session", "list"]).await.contains("alice-laptop"));
    assert!(
        bob.run(&["session", "list", "--all"])
            .await
            .contains("version 3, destroyed")
    );

    // Bob backs up, then restores his phone into a new state file with the code and passphrase.
    let backup = bob.run(&["backup"]).await;
    let code = backup
        .lines()
        .find_map(|l| l.strip_prefix("recovery code: "))
        .expect("a recovery code")
        .to_owned();
    assert_eq!(code.replace('-', "").len(), 32);
    let restored = Keyctl {
        server: &server,
        user: bob.user,
        state: dir.join("bob-restored.json"),
    };
    let out = restored.run(&["restore", "--recovery-code", &code]).await;
    assert!(out.contains("restored bob-phone"), "{out}");
    let original = Device::open(&bob.state, PASSPHRASE.as_bytes()).unwrap();
    let copy = Device::open(&restored.state, PASSPHRASE.as_bytes()).unwrap();
    assert_eq!(
        *copy.identity().unwrap().private_bytes(),
        *original.identity().unwrap().private_bytes(),
        "the restored device decrypts the same identity private key"
    );
    // The old phone's unused one-time prekeys are still on the server, and the restored device
    // has none of their private keys: its first registration withdraws them with the upload.
    let left = |table: &'static str| {
        let db = &server.db;
        async move {
            db.count(&format!(
                "SELECT count(*) FROM {table} WHERE device_id = 'bob-phone' AND is_consumed = FALSE"
            ))
            .await
        }
    };
    assert!(left("nchat_one_time_prekeys").await > 0);
    let out = restored.run(&["register"]).await;
    assert!(
        out.contains("updated; withdrew ")
            && out.contains("; 100 one-time prekeys on the server, 100 one-time Kyber prekeys"),
        "{out}"
    );
    let fresh = Device::open(&restored.state, PASSPHRASE.as_bytes()).unwrap();
    assert!(
        !fresh.state().withdraw_unused_prekeys,
        "only the first registration withdraws"
    );
    let restored_ids: Vec<i64> = fresh
        .state()
        .one_time_prekeys
        .iter()
        .map(|k| i64::from(k.id))
        .collect();
    assert_eq!(left("nchat_one_time_prekeys").await, 100);
    assert_eq!(
        server
            .db
            .count(&format!(
                "SELECT count(*) FROM nchat_one_time_prekeys WHERE device_id = 'bob-phone' \
             AND is_consumed = FALSE AND prekey_id IN ({})",
                restored_ids
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .await,
        100,
        "every key left to hand out is one the restored device holds"
    );
    // A peer starting a session from a fresh bundle reaches the restored device, which answers.
    let (sent, received) = round_trip(&alice, &restored, &message, "PQXDH").await;
    assert_eq!(sent, received);
    // Registering again appends: nothing more is withdrawn.
    let out = restored.run(&["register"]).await;
    assert!(out.contains("updated; 99 one-time prekeys"), "{out}");

    assert_no_plaintext_private_keys(&bob.state);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The state file holds sealed blobs only: no private key appears in it in the clear.
fn assert_no_plaintext_private_keys(state: &Path) {
    let text = std::fs::read_to_string(state).unwrap();
    let device = Device::open(state, PASSPHRASE.as_bytes()).unwrap();
    let identity = device.identity().unwrap();
    assert!(!text.contains(&hex::encode(*identity.private_bytes())));
    assert!(Device::open(state, b"wrong passphrase").is_err());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(state).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// `keyctl` over TLS: trusted through `--ca-cert`, refused without it (the system roots do not
/// know a self-signed certificate), and never falling back to plaintext: `https://` to a
/// plaintext server fails, as does `http://` to a TLS one.
#[tokio::test]
async fn keyctl_speaks_tls_and_never_downgrades() {
    let db = TestDb::migrated(Backend::Sqlite).await;
    let dir = std::env::temp_dir().join(format!("keyctl-tls-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (tls, cert) = TestServer::start_tls(&db, &dir).await;
    assert!(tls.url.starts_with("https://127.0.0.1:"), "{}", tls.url);
    let plain = TestServer::start(&db).await;
    let user = Uuid::new_v4();
    let state = dir.join("phone.json");
    let keyctl = |url: String, ca: Option<&Path>, args: &'static [&'static str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyctl"));
        cmd.args(args)
            .env("KEYCTL_STATE", &state)
            .env("KEYSERVER_URL", url)
            .env("KEYSERVER_TOKEN", tls.device_token(user, "tls-phone"))
            .env("KEYCTL_PASSPHRASE", PASSPHRASE)
            .env_remove("KEYSERVER_CA_CERT");
        if let Some(ca) = ca {
            cmd.env("KEYSERVER_CA_CERT", ca);
        }
        cmd.output()
    };
    let init = keyctl(
        tls.url.clone(),
        None,
        &["init", "--device-id", "tls-phone", "--iterations", "100000"],
    )
    .await
    .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let registered = keyctl(tls.url.clone(), Some(&cert), &["register"])
        .await
        .unwrap();
    assert!(
        registered.status.success(),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
    let untrusted = keyctl(tls.url.clone(), None, &["status"]).await.unwrap();
    assert!(!untrusted.status.success());
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(said.contains("certificate"), "{said}");

    let downgrade = plain.url.replace("http://", "https://");
    let out = keyctl(downgrade, Some(&cert), &["status"]).await.unwrap();
    assert!(
        !out.status.success(),
        "https:// to a plaintext server succeeded"
    );
    let cleartext = tls.url.replace("https://", "http://");
    let out = keyctl(cleartext.clone(), None, &["status"]).await.unwrap();
    assert!(!out.status.success(), "http:// to a TLS server succeeded");
    let out = keyctl(cleartext, Some(&cert), &["status"]).await.unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("use https://"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyctl_waits_out_a_short_rate_limit_and_reports_a_long_one() {
    use keyserver::config::LimitArgs;
    use keyserver::testing::TestConfig;
    use std::time::Duration;

    let db = TestDb::migrated(Backend::Sqlite).await;
    let limited = |refill_every| TestConfig {
        limits: LimitArgs {
            fetch_burst: 1,
            fetch_refill_every: refill_every,
            ..LimitArgs::off()
        },
        ..TestConfig::default()
    };
    let short = TestServer::start_with(&db, limited(Duration::from_secs(2))).await;
    let long = TestServer::start_with(&db, limited(Duration::from_secs(600))).await;
    let dir = std::env::temp_dir().join(format!("keyctl-limits-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let bob = Keyctl {
        server: &short,
        user: Uuid::new_v4(),
        state: dir.join("bob.json"),
    };
    bob.run(&["init", "--device-id", "bob-phone", "--iterations", "100000"])
        .await;
    bob.run(&["register"]).await;
    let bob_user = bob.user.to_string();

    for server in [&short, &long] {
        let alice = Keyctl {
            server,
            user: Uuid::new_v4(),
            state: dir.join("alice.json"),
        };
        let fetch = || {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
                .args(["fetch", "--user", &bob_user])
                .env("KEYSERVER_URL", &server.url)
                .env(
                    "KEYSERVER_TOKEN",
                    server.device_token(alice.user, "alice-laptop"),
                )
                .output()
        };
        assert!(fetch().await.unwrap().status.success());
        let second = fetch().await.unwrap();
        let stderr = String::from_utf8_lossy(&second.stderr);
        if std::ptr::eq(server, &short) {
            // Refused with a 2 s RetryInfo: keyctl waits it out and the retry is served.
            assert!(second.status.success(), "{stderr}");
            assert!(stderr.contains("rate limited; retrying in 2 s"), "{stderr}");
            assert!(String::from_utf8_lossy(&second.stdout).contains("device bob-phone"));
        } else {
            assert!(!second.status.success());
            assert!(
                stderr.contains("rate limited: fetch rate limit reached; retry in 600 s"),
                "{stderr}"
            );
        }
    }
}

/// What a new user sees when something is missing: a short passphrase is refused with its
/// length, no passphrase and no terminal says how to give one; the audit trail shows RFC 3339
/// times; the read commands answer JSON with --json; a server that is not there and a URL
/// without a scheme are said in words.
#[tokio::test]
async fn keyctl_explains_a_missing_or_weak_passphrase_and_shows_times_as_rfc_3339() {
    let db = TestDb::migrated(Backend::Sqlite).await;
    let server = TestServer::start(&db).await;
    let dir = std::env::temp_dir().join(format!("keyctl-words-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("phone.json");
    let init = |passphrase: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keyctl"));
        command
            .args(["init", "--device-id", "phone", "--iterations", "100000"])
            .env("KEYCTL_STATE", &state)
            .env_remove("KEYCTL_PASSPHRASE")
            .stdin(std::process::Stdio::null());
        if let Some(p) = passphrase {
            command.env("KEYCTL_PASSPHRASE", p);
        }
        // No controlling terminal, as under cron or CI.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc_setsid();
                Ok(())
            });
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = init(Some("short"));
    assert!(
        !ok && err.contains("the passphrase has 5 characters; use at least 12"),
        "{err}"
    );
    let (ok, err) = init(None);
    assert!(
        !ok && err.contains("no passphrase: set KEYCTL_PASSPHRASE"),
        "{err}"
    );
    assert!(!state.exists(), "nothing was created");

    let bob = Keyctl {
        server: &server,
        user: Uuid::new_v4(),
        state: state.clone(),
    };
    bob.run(&["init", "--device-id", "phone", "--iterations", "100000"])
        .await;
    bob.run(&["register"]).await;
    let audit = bob.run(&["audit"]).await;
    let line = audit.lines().next().expect("an audit event");
    let at = line.split(' ').nth(1).unwrap();
    assert!(
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok(),
        "{line}"
    );
    // The read commands answer one JSON value each with --json.
    let json = |out: String| serde_json::from_str::<serde_json::Value>(&out).expect(&out);
    let status = json(bob.run(&["status", "--json"]).await);
    assert_eq!(status["one_time_prekeys_available"], 100, "{status}");
    assert_eq!(status["kyber_one_time_prekeys_available"], 100, "{status}");
    assert_eq!(status["rotation_due"], false, "{status}");
    let events = json(bob.run(&["audit", "--json"]).await);
    assert_eq!(events[0]["event_type"], "device_keys_generated", "{events}");
    assert_eq!(events[0]["metadata"]["outcome"], "created", "{events}");
    assert_eq!(
        json(bob.run(&["session", "list", "--json"]).await),
        serde_json::json!([])
    );
    let alice = Keyctl {
        server: &server,
        user: Uuid::new_v4(),
        state: dir.join("alice.json"),
    };
    alice
        .run(&["init", "--device-id", "laptop", "--iterations", "100000"])
        .await;
    alice.run(&["register"]).await;
    let bundles = json(
        alice
            .run(&["fetch", "--user", &bob.user.to_string(), "--json"])
            .await,
    );
    assert_eq!(bundles[0]["device_id"], "phone", "{bundles}");
    assert_eq!(bundles[0]["signed_prekey_stale"], false, "{bundles}");
    assert!(bundles[0]["one_time_prekey_id"].is_u64(), "{bundles}");
    assert!(bundles[0]["kyber_prekey_id"].is_u64(), "{bundles}");
    let safety = json(
        alice
            .run(&["safety-number", "--user", &bob.user.to_string(), "--json"])
            .await,
    );
    assert_eq!(safety["matches"], true, "{safety}");
    assert_eq!(safety["verified"], false, "{safety}");
    assert_eq!(safety["safety_number"].as_str().map(str::len), Some(60));

    // A server that is not there, and a URL without its scheme, are said in words.
    let unreachable = |url: &'static str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
            .args(["status"])
            .env("KEYCTL_STATE", &state)
            .env("KEYCTL_PASSPHRASE", PASSPHRASE)
            .env("KEYSERVER_URL", url)
            .env("KEYSERVER_TOKEN", bob.token())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let refused = unreachable("http://127.0.0.1:1");
    assert!(
        refused.contains(
            "nothing answers at http://127.0.0.1:1 (connection refused): is the key server \
             running there, and is KEYSERVER_URL (--url) right?"
        ),
        "{refused}"
    );
    let bare = unreachable("127.0.0.1:50051");
    assert!(
        bare.contains(
            "\"127.0.0.1:50051\" is not a server URL (http://host:port or https://host:port)"
        ),
        "{bare}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts a new session: the child has no controlling terminal.
fn libc_setsid() {
    unsafe extern "C" {
        fn setsid() -> i32;
    }
    // SAFETY: setsid has no preconditions; it fails only for a process group leader.
    unsafe {
        setsid();
    }
}
