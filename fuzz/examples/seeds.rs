//! Writes the seed corpora (`fuzz/corpus/<target>/seed-*`): the well-formed inputs the tests
//! send (requests, keys, signatures, tokens) and rows as the SQLite schema stores them, so the
//! fuzzers mutate from valid inputs. Running it again writes the same files, but for the times
//! inside the tokens.
//!   cargo run --manifest-path fuzz/Cargo.toml --example seeds

use std::path::Path;
use std::time::Duration;

use keyserver::auth::{TokenAuthority, TokenPolicy};
use keyserver::store::transfer::TABLES;
use keyserver::store::transfer::tables::ColumnType;
use keyserver_fuzz::{IDENTITY_PRIVATE, identity};
use keyserver_proto::pb;
use keyserver_proto::wire::{KYBER1024_PUBLIC_KEY_LEN, KyberPublicKey, PublicKey};
use keyserver_proto::xeddsa;
use prost::Message;

fn sign(message: &[u8]) -> Vec<u8> {
    xeddsa::sign(&IDENTITY_PRIVATE, message, &[7; 64]).to_vec()
}

fn ec_key(n: u8) -> Vec<u8> {
    PublicKey::from_raw([n; 32]).serialize().to_vec()
}

fn kyber_key(n: u8) -> Vec<u8> {
    KyberPublicKey::from_raw([n; KYBER1024_PUBLIC_KEY_LEN]).serialize()
}

fn signed(id: u32) -> pb::SignedPreKeyUpload {
    let public_key = ec_key(id as u8);
    pb::SignedPreKeyUpload {
        key_id: id,
        signature: sign(&public_key),
        public_key,
        encrypted_private_key: vec![0xAA; 61],
    }
}

fn kyber(id: u32) -> pb::KyberPreKeyUpload {
    let public_key = kyber_key(id as u8);
    pb::KyberPreKeyUpload {
        key_id: id,
        signature: sign(&public_key),
        public_key,
        encrypted_private_key: vec![0xCC; 1600],
    }
}

fn one_time(ids: std::ops::RangeInclusive<u32>) -> Vec<pb::OneTimePreKeyUpload> {
    ids.map(|id| pb::OneTimePreKeyUpload {
        key_id: id,
        public_key: ec_key(id as u8),
        encrypted_private_key: vec![0xBB; 61],
    })
    .collect()
}

const USER: &str = "6f1c3c1e-9f0a-4b7e-8d55-3f4a2b1c0d9e";

fn target(device: Option<&str>) -> pb::Target {
    pb::Target {
        user_id: USER.into(),
        device_id: device.map(str::to_owned),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("creating the corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("writing a seed");
}

/// A request seed: the target's selector byte, then the encoded message.
fn request(dir: &Path, name: &str, which: u8, message: impl Message) {
    let mut bytes = vec![which];
    message.encode(&mut bytes).expect("encoding");
    write(dir, name, &bytes);
}

/// A `rows` seed: the table's index, then each column as the SQLite schema stores it (see
/// `fuzz_targets/rows.rs` for the encoding).
fn row(table: u8, columns: &[(&str, ColumnType)]) -> Vec<u8> {
    let text = |bytes: &mut Vec<u8>, value: &[u8]| {
        bytes.extend([3, value.len() as u8]);
        bytes.extend(value);
    };
    let mut bytes = vec![table];
    for (n, (_, ty)) in columns.iter().enumerate() {
        match ty {
            ColumnType::Int | ColumnType::Bool => {
                bytes.push(1);
                bytes.extend((n as i64 + 1).to_le_bytes());
            }
            ColumnType::Text => text(&mut bytes, b"phone"),
            ColumnType::Bytes => {
                bytes.extend([4, 33]);
                bytes.extend(ec_key(n as u8));
            }
            ColumnType::Uuid => text(&mut bytes, USER.as_bytes()),
            ColumnType::Time => text(&mut bytes, b"2026-12-01T10:00:00.123Z"),
            ColumnType::Json => text(&mut bytes, br#"{"count":1,"kind":"one_time"}"#),
        }
    }
    bytes
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let identity = identity().serialize().to_vec();

    let requests = corpus.join("requests");
    request(
        &requests,
        "register",
        0,
        pb::RegisterDeviceRequest {
            device_id: "phone".into(),
            registration_id: 1234,
            identity_key: identity.clone(),
            encrypted_identity_private_key: vec![0xDD; 61],
            signed_prekey: Some(signed(1)),
            one_time_prekeys: one_time(1..=3),
            kyber_last_resort_prekey: Some(kyber(1000)),
            kyber_one_time_prekeys: vec![kyber(1), kyber(2)],
            replace_one_time_prekeys: false,
        },
    );
    request(
        &requests,
        "upload",
        1,
        pb::UploadOneTimePreKeysRequest {
            device_id: "phone".into(),
            one_time_prekeys: one_time(10..=12),
        },
    );
    request(
        &requests,
        "rotate",
        2,
        pb::RotateSignedPreKeyRequest {
            device_id: "phone".into(),
            signed_prekey: Some(signed(2)),
        },
    );
    request(
        &requests,
        "upload-kyber",
        3,
        pb::UploadKyberPreKeysRequest {
            device_id: "phone".into(),
            kyber_one_time_prekeys: vec![kyber(3)],
        },
    );
    request(
        &requests,
        "rotate-kyber",
        4,
        pb::RotateKyberLastResortPreKeyRequest {
            device_id: "phone".into(),
            kyber_last_resort_prekey: Some(kyber(1001)),
        },
    );
    request(
        &requests,
        "fetch",
        5,
        pb::FetchPreKeyBundleRequest {
            target: Some(target(Some("phone"))),
            ..Default::default()
        },
    );
    request(
        &requests,
        "fetch-bulk",
        6,
        pb::FetchPreKeyBundlesRequest {
            targets: vec![target(Some("phone")), target(None)],
            ..Default::default()
        },
    );
    request(
        &requests,
        "check-keys",
        7,
        pb::CheckKeysRequest {
            device_id: "phone".into(),
            digest: vec![1; 32],
        },
    );
    request(
        &requests,
        "check-identities",
        8,
        pb::CheckIdentityKeysRequest {
            checks: vec![pb::IdentityKeyCheck {
                user_id: USER.into(),
                device_id: Some("phone".into()),
                fingerprint: vec![1, 2, 3, 4],
            }],
        },
    );
    request(
        &requests,
        "identity-keys",
        9,
        pb::GetIdentityKeysRequest {
            user_id: USER.into(),
        },
    );
    request(
        &requests,
        "put-session",
        10,
        pb::PutSessionRequest {
            key: Some(pb::SessionKey {
                device_id: "phone".into(),
                peer_user_id: USER.into(),
                peer_device_id: "laptop".into(),
            }),
            state: vec![0xEE; 500],
            is_initiator: true,
            expected_version: 0,
        },
    );
    request(
        &requests,
        "list-sessions",
        11,
        pb::ListSessionsRequest {
            device_id: "phone".into(),
            page_size: 10,
            ..Default::default()
        },
    );

    let keys = corpus.join("keys");
    write(&keys, "ec", &ec_key(5));
    write(&keys, "kyber", &kyber_key(6));
    write(&keys, "signature", &sign(b"message"));

    let mut xeddsa_seed = IDENTITY_PRIVATE.to_vec();
    xeddsa_seed.extend([7; 64]);
    xeddsa_seed.push(3);
    xeddsa_seed.extend(ec_key(8));
    write(&corpus.join("xeddsa"), "signed-prekey", &xeddsa_seed);

    // Well-formed tokens the target must refuse: of another secret, and of its own secret
    // with another issuer.
    let tokens = corpus.join("tokens");
    let other_issuer = TokenPolicy {
        issuer: "another-issuer".into(),
        ..TokenPolicy::default()
    };
    for (name, secret, policy) in [
        ("other-secret", [9u8; 32], TokenPolicy::default()),
        ("other-issuer", [7u8; 32], other_issuer),
    ] {
        let authority = TokenAuthority::new(&[secret.to_vec()], policy).expect("a secret");
        let token = authority
            .mint(uuid::Uuid::from_u128(1), None, Duration::from_secs(60))
            .expect("minting");
        write(&tokens, name, token.as_bytes());
    }

    let rows = corpus.join("rows");
    for (n, table) in TABLES.iter().enumerate() {
        write(&rows, table.name, &row(n as u8, table.columns));
    }
}
