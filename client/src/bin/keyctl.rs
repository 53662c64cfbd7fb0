//! `keyctl`: a device's command line for the key server.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyserver_client::api;
use keyserver_client::device::{self, Device, ONE_TIME_PREKEY_TARGET, REPLENISH_BELOW};
use keyserver_client::pqxdh::InitialMessage;
use keyserver_client::{safety, vault};
use keyserver_proto::pb;
use uuid::Uuid;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "keyctl", version, about = "A device's keys on the key server")]
struct Cli {
    /// The device's state file (public keys and passphrase-sealed private keys).
    #[arg(
        long,
        env = "KEYCTL_STATE",
        default_value = "keyctl-state.json",
        global = true
    )]
    state: PathBuf,
    /// The key server's address: http://host:port, or https://host:port for TLS (verified
    /// against the system's roots or --ca-cert; never a plaintext fallback). Several servers
    /// of one deployment, comma separated: keyctl uses one it can reach, from a random one on.
    #[arg(
        long,
        env = "KEYSERVER_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    server: String,
    /// PEM CA certificate(s) to trust for an https:// server instead of the system's roots.
    #[arg(long, env = "KEYSERVER_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mTLS).
    #[arg(
        long,
        env = "KEYSERVER_CLIENT_CERT",
        global = true,
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    #[arg(
        long,
        env = "KEYSERVER_CLIENT_KEY",
        global = true,
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// Bearer token for the user, bound to this device to change it (see `keyserver token
    /// --device`).
    #[arg(long, env = "KEYSERVER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Read the passphrase from this file instead of KEYCTL_PASSPHRASE or a prompt.
    #[arg(long, global = true)]
    passphrase_file: Option<PathBuf>,
    /// Print the answer of a read command (status, fetch, safety-number, audit, session list)
    /// as one JSON value.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this device's identity key and state file.
    Init {
        /// The device id to register under (unique across all users).
        #[arg(long)]
        device_id: String,
        /// PBKDF2-HMAC-SHA256 iterations for the passphrase.
        #[arg(long, default_value_t = vault::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
    /// Register the device with its signed prekey, its last-resort Kyber prekey and 100
    /// one-time prekeys of each kind (or publish what a device registered before PQXDH lacks).
    Register,
    /// Show the device's keys on the server.
    Status,
    /// Remove this device from the server with all its keys and sessions.
    Remove,
    /// Upload one-time prekeys (EC and Kyber) of each kind the server has fewer than --below of.
    Replenish {
        #[arg(long, default_value_t = REPLENISH_BELOW)]
        below: u32,
        /// Top up to this many (at most 100, one upload).
        #[arg(long, default_value_t = ONE_TIME_PREKEY_TARGET)]
        to: u32,
    },
    /// Rotate the signed prekey and the last-resort Kyber prekey now, or with --if-due only when
    /// the server says one is due (for a device's cron). Safe to retry: an unanswered rotation
    /// resends the same keys.
    Rotate {
        #[arg(long)]
        if_due: bool,
    },
    /// What a device does periodically: check that the server holds this device's keys (and
    /// register again if not), replenish one-time prekeys when fewer than 10 of a kind are left,
    /// and rotate the signed keys when they are due.
    Refresh,
    /// Fetch and verify a peer's prekey bundles (takes one one-time prekey per device).
    Fetch {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: Option<String>,
    },
    /// Agree on a session secret with PQXDH (X3DH with a peer that has no Kyber keys) through
    /// the server; both sides store the session.
    #[command(alias = "x3dh")]
    Pqxdh {
        #[command(subcommand)]
        step: HandshakeStep,
    },
    /// This device's sessions on the server.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Compute the safety number with a peer locally and compare it with the server's.
    SafetyNumber {
        /// The peer user.
        #[arg(long)]
        user: Uuid,
        /// Record that you compared it with the peer: manual, qr_code or out_of_band.
        #[arg(long)]
        verify: Option<String>,
    },
    /// Make a recovery code and store the master-key record, so a new device can be restored.
    Backup,
    /// Restore a device into a new state file with a recovery code and the passphrase.
    Restore {
        /// The recovery code `keyctl backup` printed.
        #[arg(long)]
        recovery_code: String,
        /// Which of the user's devices to restore (needed when there are several).
        #[arg(long)]
        device_id: Option<String>,
    },
    /// The user's audit trail, newest first.
    Audit {
        /// Only events of this type (repeatable), for example signed_prekey_rotated.
        #[arg(long = "type")]
        event_types: Vec<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum SessionAction {
    /// List this device's sessions.
    List {
        /// Also list destroyed sessions.
        #[arg(long)]
        all: bool,
    },
    /// Destroy the session with one peer device.
    Destroy {
        #[arg(long)]
        peer: Uuid,
        #[arg(long)]
        peer_device: String,
    },
}

#[derive(Subcommand)]
enum HandshakeStep {
    /// Fetch the peer's bundle and write the initial message for it.
    Initiate {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        device: Option<String>,
        /// Where to write the initial message (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Derive the secret from a peer's initial message.
    Respond {
        /// The initial message (JSON) the peer wrote.
        #[arg(long)]
        message: PathBuf,
        /// The user who sent it.
        #[arg(long)]
        from: Uuid,
    },
}

fn passphrase(cli: &Cli) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if let Some(file) = &cli.passphrase_file {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        return Ok(Zeroizing::new(
            text.trim_end_matches('\n').as_bytes().to_vec(),
        ));
    }
    if let Ok(value) = std::env::var("KEYCTL_PASSPHRASE") {
        return Ok(Zeroizing::new(value.into_bytes()));
    }
    let value = rpassword::prompt_password("passphrase: ").context(
        "no passphrase: set KEYCTL_PASSPHRASE or --passphrase-file, or run keyctl in a terminal \
         to type it",
    )?;
    Ok(Zeroizing::new(value.into_bytes()))
}

/// The fewest characters a new passphrase may have: it is all that guards the sealed keys of
/// a stolen state file or server backup (PBKDF2 only slows the guessing).
const MIN_PASSPHRASE_CHARS: usize = 12;

/// The passphrase of a new device, refused when it is too short.
fn new_passphrase(cli: &Cli) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let value = passphrase(cli)?;
    let chars = String::from_utf8_lossy(&value).chars().count();
    anyhow::ensure!(
        chars >= MIN_PASSPHRASE_CHARS,
        "the passphrase has {chars} characters; use at least {MIN_PASSPHRASE_CHARS} (a few \
         unrelated words make a good one)"
    );
    Ok(value)
}

fn token(cli: &Cli) -> anyhow::Result<&str> {
    cli.token
        .as_deref()
        .context("a bearer token is needed: --token or KEYSERVER_TOKEN (see `keyserver token`)")
}

/// The server, with the TLS files to reach it.
fn server(cli: &Cli) -> anyhow::Result<api::Address> {
    api::Address::new(
        &cli.server,
        cli.ca_cert.as_deref(),
        cli.client_cert.as_deref(),
        cli.client_key.as_deref(),
    )
}

async fn client(cli: &Cli) -> anyhow::Result<api::KeyClient> {
    api::connect(&server(cli)?, token(cli)?).await
}

async fn sessions(cli: &Cli) -> anyhow::Result<api::SessionClient> {
    api::connect_sessions(&server(cli)?, token(cli)?).await
}

fn print_replenish(done: &device::Replenished) {
    match &done.one_time {
        Some(r) => println!(
            "uploaded {} one-time prekeys; {} available",
            r.stored_key_ids.len(),
            r.one_time_prekeys_available
        ),
        None => println!("enough one-time prekeys on the server; nothing uploaded"),
    }
    match &done.kyber {
        Some(r) => println!(
            "uploaded {} one-time Kyber prekeys; {} available",
            r.stored_key_ids.len(),
            r.kyber_one_time_prekeys_available
        ),
        None => println!("enough one-time Kyber prekeys on the server; nothing uploaded"),
    }
}

fn print_rotated(what: &str, rotated: Option<(bool, Option<u32>)>) {
    match rotated {
        Some((true, previous)) => println!(
            "rotated the {what} (previous: {})",
            previous.map_or("none".to_owned(), |id| id.to_string())
        ),
        Some((false, _)) => println!("the {what} was already installed; nothing to do"),
        None => println!("the {what} is not due for rotation; nothing done"),
    }
}

fn print_rotation(done: &device::Rotated) {
    print_rotated(
        "signed prekey",
        done.signed.as_ref().map(|r| (r.rotated, r.previous_key_id)),
    );
    print_rotated(
        "last-resort Kyber prekey",
        done.kyber_last_resort
            .as_ref()
            .map(|r| (r.rotated, r.previous_key_id)),
    );
}

/// The handshake's name: PQXDH, or X3DH when the peer had no Kyber prekey.
fn handshake(kyber_prekey_id: Option<u32>) -> &'static str {
    match kyber_prekey_id {
        Some(_) => "PQXDH",
        None => "X3DH (the peer has no Kyber prekey)",
    }
}

/// What a registration did, in words.
fn registration(r: &pb::RegisterDeviceResponse) -> String {
    let outcome = match r.outcome() {
        pb::RegistrationOutcome::Created => "created",
        pb::RegistrationOutcome::Replaced => "a new identity key replaced every key",
        pb::RegistrationOutcome::Updated | pb::RegistrationOutcome::Unspecified => "updated",
    };
    let withdrawn = if r.one_time_prekeys_withdrawn + r.kyber_one_time_prekeys_withdrawn > 0 {
        format!(
            "; withdrew {} unused one-time prekeys and {} one-time Kyber prekeys this device \
             cannot answer",
            r.one_time_prekeys_withdrawn, r.kyber_one_time_prekeys_withdrawn
        )
    } else {
        String::new()
    };
    format!(
        "{outcome}{withdrawn}; {} one-time prekeys on the server, {} one-time Kyber prekeys",
        r.one_time_prekeys_available, r.kyber_one_time_prekeys_available
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Init {
            device_id,
            iterations,
        } => {
            let device =
                Device::create(&cli.state, device_id, &new_passphrase(&cli)?, *iterations)?;
            println!(
                "created device {} (registration id {}) in {}",
                device.state().device_id,
                device.state().registration_id,
                cli.state.display()
            );
        }
        Command::Register => {
            let mut device = Device::open(&cli.state, &passphrase(&cli)?)?;
            let response = device.register(&mut client(&cli).await?).await?;
            println!(
                "registered {}: {}",
                device.state().device_id,
                registration(&response)
            );
        }
        Command::Remove => {
            let device = Device::open(&cli.state, &passphrase(&cli)?)?;
            let removed = client(&cli)
                .await?
                .remove_device(pb::RemoveDeviceRequest {
                    device_id: device.state().device_id.clone(),
                })
                .await?
                .into_inner();
            println!(
                "removed {} and {} sessions from the server; the local state file stays",
                device.state().device_id,
                removed.sessions_removed
            );
        }
        Command::Status => {
            let device = Device::open(&cli.state, &passphrase(&cli)?)?;
            let s = device.status(&mut client(&cli).await?).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "device_id": device.state().device_id,
                        "one_time_prekeys_available": s.one_time_prekeys_available,
                        "kyber_one_time_prekeys_available": s.kyber_one_time_prekeys_available,
                        "active_signed_prekey_id": s.active_signed_prekey_id,
                        "active_signed_prekey_age_seconds": s.active_signed_prekey_id
                            .map(|_| s.active_signed_prekey_age_seconds),
                        "kyber_last_resort_prekey_id": s.kyber_last_resort_prekey_id,
                        "kyber_last_resort_prekey_age_seconds": s.kyber_last_resort_prekey_id
                            .map(|_| s.kyber_last_resort_prekey_age_seconds),
                        "rotation_due": s.rotation_due,
                        "replenish_recommended": s.replenish_recommended,
                        "drain_suspected": s.drain_suspected,
                    })
                );
                return Ok(());
            }
            println!(
                "one-time prekeys available: {}",
                s.one_time_prekeys_available
            );
            match s.active_signed_prekey_id {
                Some(id) => println!(
                    "active signed prekey: {id}, {} s old",
                    s.active_signed_prekey_age_seconds
                ),
                None => println!("active signed prekey: none"),
            }
            println!(
                "one-time Kyber prekeys available: {}",
                s.kyber_one_time_prekeys_available
            );
            match s.kyber_last_resort_prekey_id {
                Some(id) => println!(
                    "last-resort Kyber prekey: {id}, {} s old",
                    s.kyber_last_resort_prekey_age_seconds
                ),
                None => println!(
                    "last-resort Kyber prekey: none (peers get X3DH bundles; run `keyctl refresh`)"
                ),
            }
            println!("rotation due: {}", s.rotation_due);
            println!("replenish recommended: {}", s.replenish_recommended);
            if s.drain_suspected {
                println!(
                    "drain suspected: one-time prekeys went faster than usual, or mostly to one \
                     requester (`keyctl audit --type prekeys_drain_suspected`); run \
                     `keyctl replenish` to refill early"
                );
            }
        }
        Command::Replenish { below, to } => {
            let mut device = Device::open(&cli.state, &passphrase(&cli)?)?;
            print_replenish(
                &device
                    .replenish(&mut client(&cli).await?, *below, *to)
                    .await?,
            );
        }
        Command::Rotate { if_due } => {
            let mut device = Device::open(&cli.state, &passphrase(&cli)?)?;
            print_rotation(&device.rotate(&mut client(&cli).await?, *if_due).await?);
        }
        Command::Refresh => {
            let mut device = Device::open(&cli.state, &passphrase(&cli)?)?;
            let done = device.refresh(&mut client(&cli).await?).await?;
            match &done.reuploaded {
                Some(r) => println!(
                    "the server's keys differed from this device's: registered again ({})",
                    registration(r)
                ),
                None => println!("the server holds this device's keys"),
            }
            print_replenish(&done.replenished);
            print_rotation(&done.rotated);
        }
        Command::Fetch { user, device } => {
            let bundles =
                device::fetch_verified(&mut client(&cli).await?, user, device.as_deref()).await?;
            if cli.json {
                let list: Vec<serde_json::Value> = bundles
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "device_id": b.device_id,
                            "registration_id": b.registration_id,
                            "identity_key": hex::encode(b.keys.identity_key.serialize()),
                            "signed_prekey_id": b.keys.signed_prekey_id,
                            "signed_prekey_stale": b.stale,
                            "one_time_prekey_id": b.keys.one_time_prekey.as_ref().map(|(id, _)| id),
                            "kyber_prekey_id": b.keys.kyber_prekey.as_ref().map(|(id, _)| id),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
                return Ok(());
            }
            for b in bundles {
                println!(
                    "device {} (registration id {}): identity {}, signed prekey {} (signature verified{}), one-time prekey {}, Kyber prekey {}",
                    b.device_id,
                    b.registration_id,
                    hex::encode(b.keys.identity_key.serialize()),
                    b.keys.signed_prekey_id,
                    if b.stale {
                        "; STALE: the device stopped rotating it"
                    } else {
                        ""
                    },
                    b.keys
                        .one_time_prekey
                        .map_or("none left".to_owned(), |(id, _)| id.to_string()),
                    b.keys
                        .kyber_prekey
                        .as_ref()
                        .map_or("none (an X3DH-only device)".to_owned(), |(id, _)| format!(
                            "{id} (signature verified)"
                        ))
                );
            }
        }
        Command::Pqxdh { step } => match step {
            HandshakeStep::Initiate { user, device, out } => {
                let me = Device::open(&cli.state, &passphrase(&cli)?)?;
                let bundles = device::fetch_verified(
                    &mut client(&cli).await?,
                    &user.to_string(),
                    device.as_deref(),
                )
                .await?;
                let bundle = bundles.first().context("the server returned no bundle")?;
                let (secret, message) = me.initiate(bundle)?;
                std::fs::write(out, serde_json::to_string_pretty(&message)?)
                    .with_context(|| format!("writing {}", out.display()))?;
                let version = me
                    .save_session(
                        &mut sessions(&cli).await?,
                        *user,
                        &bundle.device_id,
                        &secret,
                        true,
                    )
                    .await?;
                println!(
                    "initiated {} with device {} (session version {version})",
                    handshake(message.kyber_prekey_id),
                    bundle.device_id
                );
                println!("shared secret fingerprint: {}", secret.fingerprint());
            }
            HandshakeStep::Respond { message, from } => {
                let mut me = Device::open(&cli.state, &passphrase(&cli)?)?;
                let text = std::fs::read_to_string(message)
                    .with_context(|| format!("reading {}", message.display()))?;
                let message: InitialMessage = serde_json::from_str(&text)?;
                let secret = me.respond(&message)?;
                let version = me
                    .save_session(
                        &mut sessions(&cli).await?,
                        *from,
                        &message.device_id,
                        &secret,
                        false,
                    )
                    .await?;
                println!(
                    "answered {} from device {} (session version {version})",
                    handshake(message.kyber_prekey_id),
                    message.device_id
                );
                println!("shared secret fingerprint: {}", secret.fingerprint());
            }
        },
        Command::SafetyNumber { user, verify } => {
            let me = Device::open(&cli.state, &passphrase(&cli)?)?;
            let mut safety_client =
                api::connect_safety_numbers(&server(&cli)?, token(&cli)?).await?;
            let check = safety::check(
                &mut client(&cli).await?,
                &mut safety_client,
                me.identity()?.public(),
                *user,
            )
            .await?;
            if cli.json {
                // Verifying stays an interactive act: with --json this only reports.
                anyhow::ensure!(verify.is_none(), "--verify cannot be combined with --json");
                println!(
                    "{}",
                    serde_json::json!({
                        "peer_user_id": user,
                        "safety_number": check.local,
                        "server_safety_number": check.server.safety_number,
                        "matches": check.matches(),
                        "verified": check.server.verified,
                        "changed_since_verification": check.server.changed_since_verification,
                    })
                );
                anyhow::ensure!(
                    check.matches(),
                    "SAFETY NUMBER MISMATCH: do not trust this conversation until you have \
                     compared numbers with the peer in person"
                );
                return Ok(());
            }
            println!("safety number: {}", safety::grouped(&check.local));
            anyhow::ensure!(
                check.matches(),
                "SAFETY NUMBER MISMATCH: the server reports {}; do not trust this conversation \
                 until you have compared numbers with the peer in person",
                safety::grouped(&check.server.safety_number)
            );
            println!("matches the server's");
            if check.server.changed_since_verification {
                println!("WARNING: an identity key changed since you verified this peer");
            }
            match verify {
                Some(method) => {
                    let method = match method.as_str() {
                        "manual" => pb::VerificationMethod::Manual,
                        "qr_code" => pb::VerificationMethod::QrCode,
                        "out_of_band" => pb::VerificationMethod::OutOfBand,
                        other => anyhow::bail!(
                            "--verify takes manual, qr_code or out_of_band, not {other}"
                        ),
                    };
                    safety_client
                        .verify_safety_number(pb::VerifySafetyNumberRequest {
                            peer_user_id: user.to_string(),
                            safety_number: check.local.clone(),
                            method: method.into(),
                        })
                        .await?;
                    println!("verified");
                }
                None => println!(
                    "verified: {}",
                    if check.server.verified { "yes" } else { "no" }
                ),
            }
        }
        Command::Backup => {
            let device = Device::open(&cli.state, &passphrase(&cli)?)?;
            let mut master = api::connect_master_keys(&server(&cli)?, token(&cli)?).await?;
            let code = device.backup(&mut master).await?;
            println!("recovery code: {code}");
            println!("write it down and keep it offline: it is shown only this once");
        }
        Command::Restore {
            recovery_code,
            device_id,
        } => {
            let passphrase = passphrase(&cli)?;
            let mut master = api::connect_master_keys(&server(&cli)?, token(&cli)?).await?;
            let recovery = master
                .recover_device(pb::RecoverDeviceRequest {
                    recovery_code: recovery_code.clone(),
                })
                .await?
                .into_inner();
            let device = match device_id {
                Some(id) => recovery.devices.iter().find(|d| &d.device_id == id),
                None if recovery.devices.len() == 1 => recovery.devices.first(),
                None => anyhow::bail!(
                    "the user has {} devices; name one with --device-id",
                    recovery.devices.len()
                ),
            }
            .context("no such device to restore")?;
            let restored = Device::restore(&cli.state, &passphrase, &recovery, device)?;
            println!(
                "restored {} into {}; run `keyctl register` (with a token bound to the device) to \
                 publish fresh prekeys and withdraw the earlier ones",
                restored.state().device_id,
                cli.state.display()
            );
        }
        Command::Audit { event_types, limit } => {
            let mut audit = api::connect_audit(&server(&cli)?, token(&cli)?).await?;
            let page = audit
                .list_audit_events(pb::ListAuditEventsRequest {
                    event_types: event_types.clone(),
                    page_size: *limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let at = |e: &pb::AuditEvent| {
                e.created_at
                    .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
            };
            if cli.json {
                let events: Vec<serde_json::Value> = page
                    .events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "id": e.id,
                            "created_at": at(e),
                            "event_type": e.event_type,
                            "device_id": e.device_id,
                            "metadata": serde_json::from_str::<serde_json::Value>(&e.metadata_json)
                                .unwrap_or(serde_json::Value::Null),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(events));
                return Ok(());
            }
            for e in page.events {
                let at = at(&e).unwrap_or_else(|| "-".into());
                println!(
                    "{} {at} {} {} {}",
                    e.id,
                    e.event_type,
                    e.device_id.unwrap_or_else(|| "-".into()),
                    e.metadata_json
                );
            }
        }
        Command::Session { action } => {
            let me = Device::open(&cli.state, &passphrase(&cli)?)?;
            let mut sessions = sessions(&cli).await?;
            match action {
                SessionAction::List { all } => {
                    let list = me.sessions(&mut sessions, *all).await?;
                    if cli.json {
                        let list: Vec<serde_json::Value> = list
                            .iter()
                            .map(|s| {
                                let key = s.key.clone().unwrap_or_default();
                                serde_json::json!({
                                    "peer_user_id": key.peer_user_id,
                                    "peer_device_id": key.peer_device_id,
                                    "version": s.version,
                                    "active": s.active,
                                    "initiator": s.is_initiator,
                                })
                            })
                            .collect();
                        println!("{}", serde_json::Value::Array(list));
                        return Ok(());
                    }
                    for s in list {
                        let key = s.key.unwrap_or_default();
                        println!(
                            "peer {} device {}: version {}, {}, {}",
                            key.peer_user_id,
                            key.peer_device_id,
                            s.version,
                            if s.active { "active" } else { "destroyed" },
                            if s.is_initiator {
                                "initiated here"
                            } else {
                                "initiated by the peer"
                            },
                        );
                    }
                }
                SessionAction::Destroy { peer, peer_device } => {
                    let version = me
                        .destroy_session(&mut sessions, *peer, peer_device)
                        .await?;
                    println!("destroyed the session with {peer_device} (version {version})");
                }
            }
        }
    }
    Ok(())
}
