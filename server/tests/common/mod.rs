//! Helpers shared by the integration tests: devices with real keys and real signatures, and
//! authenticated clients.

#![allow(dead_code, unused_macros)] // each test binary uses a different subset

pub mod npm;

/// Runs the async test function `$name(backend)` once per backend: the conformance suite is
/// one set of tests, not one per backend. `conformance!(multi_thread; name)` for a test that
/// needs several runtime threads.
macro_rules! conformance {
    (multi_thread; $name:ident) => {
        conformance!(@tests tokio::test(flavor = "multi_thread", worker_threads = 4); $name);
    };
    ($name:ident) => {
        conformance!(@tests tokio::test; $name);
    };
    (@tests $test:meta; $name:ident) => {
        mod $name {
            #[$test]
            async fn postgres() {
                super::$name(keyserver::testing::Backend::Postgres).await
            }
            #[$test]
            async fn sqlite() {
                super::$name(keyserver::testing::Backend::Sqlite).await
            }
        }
    };
}

use keyserver::testing::TestServer;
use keyserver_client::api::{self, KeyClient};
use keyserver_client::keys::{KeyPair, KyberKeyPair};
use keyserver_proto::pb;
use uuid::Uuid;

/// A device's key material, generated for a test.
pub struct TestDevice {
    pub user: Uuid,
    pub device_id: String,
    pub registration_id: u32,
    pub identity: KeyPair,
    pub signed: KeyPair,
    pub signed_id: u32,
    pub one_time: Vec<(u32, KeyPair)>,
    /// The last-resort Kyber prekey: None for an X3DH-only device (the nchat design's).
    pub kyber_last_resort: Option<(u32, KyberKeyPair)>,
    pub kyber_one_time: Vec<(u32, KyberKeyPair)>,
}

/// The id test devices give their last-resort Kyber prekey (one-time ones count from 1).
pub const LAST_RESORT_ID: u32 = 0x7000;

impl TestDevice {
    pub fn new(user: Uuid, device_id: &str, one_time_prekeys: u32) -> Self {
        Self {
            user,
            device_id: device_id.to_owned(),
            registration_id: 4242,
            identity: KeyPair::generate(),
            signed: KeyPair::generate(),
            signed_id: 1,
            one_time: (1..=one_time_prekeys)
                .map(|id| (id, KeyPair::generate()))
                .collect(),
            kyber_last_resort: None,
            kyber_one_time: Vec::new(),
        }
    }

    /// A PQXDH device: a last-resort Kyber prekey and `kyber_one_time` one-time ones besides.
    pub fn pqxdh(user: Uuid, device_id: &str, one_time_prekeys: u32, kyber_one_time: u32) -> Self {
        Self {
            kyber_last_resort: Some((LAST_RESORT_ID, KyberKeyPair::generate())),
            kyber_one_time: (1..=kyber_one_time)
                .map(|id| (id, KyberKeyPair::generate()))
                .collect(),
            ..Self::new(user, device_id, one_time_prekeys)
        }
    }

    /// A Kyber prekey upload signed by this device's identity key.
    pub fn kyber_upload(&self, id: u32, pair: &KyberKeyPair) -> pb::KyberPreKeyUpload {
        let public = pair.public().serialize();
        pb::KyberPreKeyUpload {
            key_id: id,
            signature: self.identity.sign(&public).to_vec(),
            public_key: public,
            encrypted_private_key: vec![0xDD; 3197],
        }
    }

    /// Fresh one-time Kyber prekeys with these ids, signed by this device.
    pub fn fresh_kyber(&self, ids: std::ops::RangeInclusive<u32>) -> Vec<pb::KyberPreKeyUpload> {
        ids.map(|id| self.kyber_upload(id, &KyberKeyPair::generate()))
            .collect()
    }

    pub fn signed_upload(&self, id: u32, pair: &KeyPair) -> pb::SignedPreKeyUpload {
        let public = pair.public().serialize();
        pb::SignedPreKeyUpload {
            key_id: id,
            public_key: public.to_vec(),
            signature: self.identity.sign(&public).to_vec(),
            encrypted_private_key: vec![0xAA; 61],
        }
    }

    pub fn register_request(&self) -> pb::RegisterDeviceRequest {
        pb::RegisterDeviceRequest {
            device_id: self.device_id.clone(),
            registration_id: self.registration_id,
            identity_key: self.identity.public().serialize().to_vec(),
            encrypted_identity_private_key: vec![0xBB; 61],
            signed_prekey: Some(self.signed_upload(self.signed_id, &self.signed)),
            one_time_prekeys: self.one_time.iter().map(|(id, k)| otk(*id, k)).collect(),
            kyber_last_resort_prekey: self
                .kyber_last_resort
                .as_ref()
                .map(|(id, k)| self.kyber_upload(*id, k)),
            kyber_one_time_prekeys: self
                .kyber_one_time
                .iter()
                .map(|(id, k)| self.kyber_upload(*id, k))
                .collect(),
            replace_one_time_prekeys: false,
        }
    }
}

pub fn otk(id: u32, pair: &KeyPair) -> pb::OneTimePreKeyUpload {
    pb::OneTimePreKeyUpload {
        key_id: id,
        public_key: pair.public().serialize().to_vec(),
        encrypted_private_key: vec![0xCC; 61],
    }
}

pub fn fresh_otks(ids: std::ops::RangeInclusive<u32>) -> Vec<pb::OneTimePreKeyUpload> {
    ids.map(|id| otk(id, &KeyPair::generate())).collect()
}

impl TestDevice {
    /// Registers this device on `server` with its own token.
    pub async fn register(&self, server: &TestServer) -> pb::RegisterDeviceResponse {
        self.client(server)
            .await
            .register_device(self.register_request())
            .await
            .expect("registering")
            .into_inner()
    }

    /// A client of `server` with this device's token: it may change this device.
    pub async fn client(&self, server: &TestServer) -> KeyClient {
        api::connect(
            &server.url,
            &server.device_token(self.user, &self.device_id),
        )
        .await
        .expect("connecting to the test server")
    }
}

/// The device's key status, as the device reads it.
pub async fn key_status(server: &TestServer, device: &TestDevice) -> pb::GetKeyStatusResponse {
    device
        .client(server)
        .await
        .get_key_status(pb::GetKeyStatusRequest {
            device_id: device.device_id.clone(),
        })
        .await
        .expect("key status")
        .into_inner()
}

/// A client of `server` with a token of `user` bound to `device`.
pub async fn device_client(server: &TestServer, user: Uuid, device: &str) -> KeyClient {
    api::connect(&server.url, &server.device_token(user, device))
        .await
        .expect("connecting to the test server")
}

/// A client of `server` authenticated as `user`, bound to no device.
pub async fn client(server: &TestServer, user: Uuid) -> KeyClient {
    api::connect(&server.url, &server.token(user))
        .await
        .expect("connecting to the test server")
}

/// What `server`'s gRPC health service says of `service` ("" for the whole server).
pub async fn health(
    server: &TestServer,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .expect("connecting to the test server");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status()
}

/// Waits up to 30 s for `server`'s health (the whole server's) to say `status`.
pub async fn wait_health(
    server: &TestServer,
    status: tonic_health::pb::health_check_response::ServingStatus,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = health(server, "").await;
        if now == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health says {now:?}, not {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub fn target(user: Uuid, device: Option<&str>) -> pb::Target {
    pb::Target {
        user_id: user.to_string(),
        device_id: device.map(str::to_owned),
    }
}

pub async fn fetch(
    client: &mut KeyClient,
    user: Uuid,
    device: Option<&str>,
) -> Result<pb::FetchPreKeyBundleResponse, tonic::Status> {
    client
        .fetch_pre_key_bundle(pb::FetchPreKeyBundleRequest {
            target: Some(target(user, device)),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A bulk fetch of `targets` with the idempotency key `key` ("" for none): one result per target.
pub async fn fetch_bulk(
    client: &mut KeyClient,
    targets: Vec<pb::Target>,
    key: &str,
) -> Result<Vec<pb::TargetResult>, tonic::Status> {
    Ok(client
        .fetch_pre_key_bundles(pb::FetchPreKeyBundlesRequest {
            targets,
            idempotency_key: key.to_owned(),
        })
        .await?
        .into_inner()
        .results)
}

/// A fetch carrying `key` as its idempotency key: the (EC, Kyber) one-time key ids of each
/// bundle, Kyber as served (the last-resort id when no one-time key was left).
pub async fn fetch_with_key(
    client: &mut KeyClient,
    targets: Vec<pb::Target>,
    key: &str,
) -> Result<Vec<(Option<u32>, Option<u32>)>, tonic::Status> {
    let results = fetch_bulk(client, targets, key).await?;
    Ok(results
        .iter()
        .flat_map(|r| &r.devices)
        .map(|d| {
            (
                d.one_time_prekey.as_ref().map(|k| k.key_id),
                d.kyber_prekey.as_ref().map(|k| k.key_id),
            )
        })
        .collect())
}

/// Asserts a call failed with `code` and a message that starts with `prefix`.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    prefix: &str,
) {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().starts_with(prefix),
        "message {:?} should start with {prefix:?}",
        status.message()
    );
    // An invalid field is also named in the details, for clients that read them and not text.
    if code == tonic::Code::InvalidArgument {
        use tonic_types::StatusExt;
        let field = status.message().split(':').next().unwrap_or_default();
        let violations = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("no google.rpc.BadRequest in {status:?}"))
            .field_violations;
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].field, field, "{violations:?}");
        assert!(
            status.message().ends_with(&violations[0].description),
            "{violations:?}"
        );
    }
}

/// The report of a job run that was expected to run, not to find the job's lock held.
pub fn finished(run: keyserver::jobs::Run) -> keyserver::jobs::Report {
    match run {
        keyserver::jobs::Run::Finished(report) => report,
        keyserver::jobs::Run::Skipped(why) => panic!("the run was skipped: {why}"),
    }
}
