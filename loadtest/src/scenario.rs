//! The scenarios: what each worker does in a loop until the run's time or call budget is spent.
//!
//! - `register`: registers devices 0..N (each with 100 one-time prekeys, and unless `--x3dh` a
//!   last-resort Kyber prekey and 100 one-time Kyber prekeys); also the seed for the others.
//! - `fetch`: single-device bundles of random seeded devices.
//! - `bulk`: bundles of 10 random devices per call, as a group chat fetches.
//! - `replenish`: random devices upload 10 fresh one-time prekeys (and 10 Kyber ones).
//! - `mixed`: 90 % fetches, 5 % key status, 4 % replenish, 1 % rotation of the signed prekey
//!   (and of the last-resort Kyber prekey).
//!
//! With several server addresses, worker `i` starts on address `i mod n` and moves to the next
//! whenever a call cannot reach its server, as a client holding a list of addresses does (a
//! server answering UNAVAILABLE itself, its database being away, keeps its workers); the
//! stretch from a worker's first UNAVAILABLE to its next success is recorded as an outage.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyserver::auth::TokenAuthority;
use keyserver::store::DeviceId;
use keyserver_client::api::Address;
use keyserver_client::api::{
    MAX_RETRY_WAIT, answer_may_be_lost, idempotency_key, retry_after, server_unreachable,
    unavailable_if_disconnected, verify_bundle,
};
use keyserver_client::keys::random_bytes;
use keyserver_proto::pb;
use keyserver_proto::pb::key_service_client::KeyServiceClient;
use tonic::transport::Channel;

use crate::population::{self, LAST_RESORT_ID, ONE_TIME_PREKEYS};
use crate::stats::{KeyKind, KyberKey, Recorder};

/// Targets of one bulk fetch.
const BULK_TARGETS: usize = 10;
/// One-time prekeys one replenish uploads.
const REPLENISH_KEYS: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Register,
    Fetch,
    Bulk,
    Replenish,
    Mixed,
}

/// What one run does.
pub struct Plan {
    pub scenario: Scenario,
    pub devices: u32,
    pub concurrency: usize,
    pub duration: Duration,
    pub max_calls: Option<u64>,
    /// Devices without Kyber keys (the nchat design's X3DH clients).
    pub x3dh: bool,
    /// One-time Kyber prekeys a PQXDH device is seeded with.
    pub kyber_prekeys: u32,
}

/// State every worker shares.
struct Shared {
    tokens: TokenAuthority,
    recorder: Arc<Recorder>,
    devices: u32,
    deadline: Instant,
    /// Calls started; the budget is checked against it.
    calls: AtomicU64,
    max_calls: Option<u64>,
    /// The next device to register.
    next_device: AtomicU32,
    /// The next key id for uploads and signed prekey rotations: above the seeded ids, random
    /// per run so repeated runs do not collide, below the last-resort Kyber prekeys' ids.
    next_key_id: AtomicU32,
    /// The next last-resort Kyber prekey id: from [`LAST_RESORT_ID`] up, below 2^24, so a
    /// bundle's Kyber prekey tells by its id which kind it is.
    next_last_resort_id: AtomicU32,
    x3dh: bool,
    kyber_prekeys: u32,
}

impl Shared {
    /// Whether another call may start.
    fn go(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        self.max_calls.is_none_or(|max| n < max)
    }

    fn request<T>(&self, message: T, device: u32) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let bound = DeviceId::parse(&population::device_id(device)).expect("a valid device id");
        let token = self
            .tokens
            .mint(
                population::user(device),
                Some(&bound),
                Duration::from_secs(3600),
            )
            .expect("an hour is within any token lifetime");
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .expect("a token is header-safe"),
        );
        request
    }

    fn random_device(&self) -> u32 {
        u32::from_le_bytes(random_bytes::<4>()) % self.devices
    }

    fn key_ids(&self, n: u32) -> u32 {
        self.next_key_id.fetch_add(n, Ordering::Relaxed)
    }
}

/// The servers one worker calls: a connection to each, the one it is on, and since when it
/// has seen only UNAVAILABLE.
struct Servers {
    clients: Vec<KeyServiceClient<Channel>>,
    current: usize,
    unavailable_since: Option<Duration>,
}

impl Servers {
    /// Makes one call on the current server, timed and recorded under `rpc`; moves to the next
    /// server when this one could not be reached.
    async fn call<T, Fut>(
        &mut self,
        shared: &Shared,
        rpc: &'static str,
        call: impl FnOnce(KeyServiceClient<Channel>) -> Fut,
    ) -> Result<T, tonic::Status>
    where
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut unreachable = false;
        let client = self.clients[self.current].clone();
        let result = timed_status(shared, rpc, async {
            let answer = call(client).await;
            unreachable = matches!(&answer, Err(status) if server_unreachable(status));
            answer
        })
        .await;
        if unreachable {
            self.current = (self.current + 1) % self.clients.len();
        }
        let now = shared.recorder.elapsed();
        match &result {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                self.unavailable_since.get_or_insert(now);
            }
            Ok(_) => {
                if let Some(since) = self.unavailable_since.take() {
                    shared.recorder.outage(since, now - since);
                }
            }
            Err(_) => {}
        }
        result
    }
}

/// Runs `plan` with `concurrency` workers, each with its own connection to every server.
pub async fn run(
    servers: &[Address],
    tokens: TokenAuthority,
    plan: &Plan,
    recorder: Arc<Recorder>,
) -> anyhow::Result<()> {
    // Below the last-resort Kyber prekey's id, so an upload never collides with it.
    let start_id = 1_000 + u32::from_le_bytes(random_bytes::<4>()) % 7_000_000;
    let shared = Arc::new(Shared {
        tokens,
        recorder,
        devices: plan.devices,
        deadline: Instant::now() + plan.duration,
        calls: AtomicU64::new(0),
        max_calls: plan.max_calls,
        next_device: AtomicU32::new(0),
        next_key_id: AtomicU32::new(start_id),
        next_last_resort_id: AtomicU32::new(
            LAST_RESORT_ID + 1 + u32::from_le_bytes(random_bytes::<4>()) % 0x40_0000,
        ),
        x3dh: plan.x3dh,
        kyber_prekeys: plan.kyber_prekeys,
    });
    let mut workers = Vec::with_capacity(plan.concurrency);
    for i in 0..plan.concurrency {
        let mut clients = Vec::with_capacity(servers.len());
        for server in servers {
            clients.push(KeyServiceClient::new(server.connect().await?));
        }
        let servers = Servers {
            clients,
            current: i % servers.len(),
            unavailable_since: None,
        };
        let shared = shared.clone();
        let scenario = plan.scenario;
        workers.push(tokio::spawn(worker(scenario, servers, shared)));
    }
    for w in workers {
        w.await?;
    }
    Ok(())
}

async fn worker(scenario: Scenario, mut servers: Servers, shared: Arc<Shared>) {
    loop {
        match scenario {
            Scenario::Register => {
                let n = shared.next_device.fetch_add(1, Ordering::Relaxed);
                if n >= shared.devices || !shared.go() {
                    return;
                }
                register(&mut servers, &shared, n).await
            }
            _ if !shared.go() => return,
            Scenario::Fetch => fetch(&mut servers, &shared).await,
            Scenario::Bulk => bulk(&mut servers, &shared).await,
            Scenario::Replenish => replenish(&mut servers, &shared).await,
            Scenario::Mixed => match random_bytes::<1>()[0] % 100 {
                0..90 => fetch(&mut servers, &shared).await,
                90..95 => status(&mut servers, &shared).await,
                95..99 => replenish(&mut servers, &shared).await,
                _ => rotate(&mut servers, &shared).await,
            },
        }
    }
}

/// One call, recorded with its duration and outcome.
async fn timed_status<T>(
    shared: &Shared,
    rpc: &'static str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let started = Instant::now();
    let result = call.await.map_err(unavailable_if_disconnected);
    let took = started.elapsed();
    match result {
        Ok(response) => {
            shared.recorder.call(rpc, took, None);
            Ok(response.into_inner())
        }
        Err(status) => {
            shared
                .recorder
                .call(rpc, took, Some(format!("{:?}", status.code())));
            // A rate limit says when to come back: this worker waits that long (at most the
            // client's longest retry wait) instead of hammering a refusing server.
            if let Some(wait) = retry_after(&status) {
                tokio::time::sleep(wait.min(MAX_RETRY_WAIT)).await;
            }
            Err(status)
        }
    }
}

/// A fetch carrying an idempotency key, sent again with it (each attempt recorded) while its
/// answer may have been lost, as a client would: the retry gets the keys the lost answer held
/// instead of taking more, so the ledger shows a key burned only if the server burned it.
async fn fetch_retried<M: Clone, T, Fut>(
    servers: &mut Servers,
    shared: &Shared,
    rpc: &'static str,
    message: M,
    requester: u32,
    call: impl Fn(KeyServiceClient<Channel>, tonic::Request<M>) -> Fut,
) -> Option<T>
where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    const WAITS: [Duration; 2] = [Duration::from_millis(250), Duration::from_secs(1)];
    for wait in WAITS {
        let request = shared.request(message.clone(), requester);
        match servers.call(shared, rpc, |c| call(c, request)).await {
            Err(status) if answer_may_be_lost(&status) => tokio::time::sleep(wait).await,
            done => return done.ok(),
        }
    }
    let request = shared.request(message, requester);
    servers.call(shared, rpc, |c| call(c, request)).await.ok()
}

async fn register(servers: &mut Servers, shared: &Shared, n: u32) {
    let registration = population::registration(n, shared.x3dh, shared.kyber_prekeys);
    let request = shared.request(registration, n);
    let _ = servers
        .call(shared, "RegisterDevice", |mut c| async move {
            c.register_device(request).await
        })
        .await;
}

/// Verifies each bundle (both signatures) and records the one-time prekey and the Kyber
/// prekey it carried.
fn check_bundles(shared: &Shared, bundles: &[pb::DevicePreKeyBundle]) {
    for bundle in bundles {
        let device = bundle
            .device_id
            .strip_prefix("load-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(u32::MAX);
        let verified = verify_bundle(bundle).is_ok();
        let key = bundle.one_time_prekey.as_ref().map(|k| k.key_id);
        let kyber = match &bundle.kyber_prekey {
            None => KyberKey::Missing,
            Some(k) if k.key_id >= LAST_RESORT_ID => KyberKey::LastResort,
            Some(k) => KyberKey::OneTime(k.key_id),
        };
        let seeded = (ONE_TIME_PREKEYS, shared.kyber_prekeys);
        shared.recorder.bundle(device, key, kyber, verified, seeded);
    }
}

fn target(n: u32) -> pb::Target {
    pb::Target {
        user_id: population::user(n).to_string(),
        device_id: Some(population::device_id(n)),
    }
}

async fn fetch(servers: &mut Servers, shared: &Shared) {
    let n = shared.random_device();
    let message = pb::FetchPreKeyBundleRequest {
        target: Some(target(n)),
        idempotency_key: idempotency_key(),
    };
    let answer = fetch_retried(
        servers,
        shared,
        "FetchPreKeyBundle",
        message,
        shared.random_device(),
        |mut c, request| async move { c.fetch_pre_key_bundle(request).await },
    );
    if let Some(answer) = answer.await {
        check_bundles(shared, &answer.devices);
    }
}

async fn bulk(servers: &mut Servers, shared: &Shared) {
    let mut devices: Vec<u32> = Vec::with_capacity(BULK_TARGETS);
    while devices.len() < BULK_TARGETS.min(shared.devices as usize) {
        let n = shared.random_device();
        if !devices.contains(&n) {
            devices.push(n);
        }
    }
    let message = pb::FetchPreKeyBundlesRequest {
        targets: devices.iter().map(|&n| target(n)).collect(),
        idempotency_key: idempotency_key(),
    };
    let answer = fetch_retried(
        servers,
        shared,
        "FetchPreKeyBundles",
        message,
        shared.random_device(),
        |mut c, request| async move { c.fetch_pre_key_bundles(request).await },
    );
    if let Some(answer) = answer.await {
        for result in &answer.results {
            check_bundles(shared, &result.devices);
        }
    }
}

/// Uploads 10 one-time prekeys (and 10 Kyber ones) for a random device.
async fn replenish(servers: &mut Servers, shared: &Shared) {
    let n = shared.random_device();
    let ids = shared.key_ids(REPLENISH_KEYS);
    let ids = ids..ids + REPLENISH_KEYS;
    let request = shared.request(
        pb::UploadOneTimePreKeysRequest {
            device_id: population::device_id(n),
            one_time_prekeys: ids.clone().map(population::one_time_prekey).collect(),
        },
        n,
    );
    let rpc = "UploadOneTimePreKeys";
    upload(
        servers,
        shared,
        rpc,
        (KeyKind::Ec, n, ids),
        |mut c| async move { c.upload_one_time_pre_keys(request).await },
    )
    .await;
    if shared.x3dh {
        return;
    }
    let ids = shared.key_ids(REPLENISH_KEYS);
    let ids = ids..ids + REPLENISH_KEYS;
    let request = shared.request(
        pb::UploadKyberPreKeysRequest {
            device_id: population::device_id(n),
            kyber_one_time_prekeys: ids
                .clone()
                .map(|id| population::kyber_prekey(n, id))
                .collect(),
        },
        n,
    );
    let rpc = "UploadKyberPreKeys";
    upload(
        servers,
        shared,
        rpc,
        (KeyKind::Kyber, n, ids),
        |mut c| async move { c.upload_kyber_pre_keys(request).await },
    )
    .await;
}

/// One upload of the one-time keys `(kind, device, ids)`, recorded as sent before it goes and
/// as acknowledged when the server says so.
async fn upload<T, Fut>(
    servers: &mut Servers,
    shared: &Shared,
    rpc: &'static str,
    (kind, device, ids): (KeyKind, u32, std::ops::Range<u32>),
    call: impl FnOnce(KeyServiceClient<Channel>) -> Fut,
) where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    shared.recorder.uploading(kind, device, ids.clone());
    if servers.call(shared, rpc, call).await.is_ok() {
        shared.recorder.uploaded(kind, device, ids);
    }
}

async fn status(servers: &mut Servers, shared: &Shared) {
    let n = shared.random_device();
    let request = shared.request(
        pb::GetKeyStatusRequest {
            device_id: population::device_id(n),
        },
        n,
    );
    let _ = servers
        .call(shared, "GetKeyStatus", |mut c| async move {
            c.get_key_status(request).await
        })
        .await;
}

async fn rotate(servers: &mut Servers, shared: &Shared) {
    let n = shared.random_device();
    let request = shared.request(
        pb::RotateSignedPreKeyRequest {
            device_id: population::device_id(n),
            signed_prekey: Some(population::signed_prekey(n, shared.key_ids(1))),
        },
        n,
    );
    let _ = servers
        .call(shared, "RotateSignedPreKey", |mut c| async move {
            c.rotate_signed_pre_key(request).await
        })
        .await;
    if shared.x3dh {
        return;
    }
    let id = shared.next_last_resort_id.fetch_add(1, Ordering::Relaxed);
    let request = shared.request(
        pb::RotateKyberLastResortPreKeyRequest {
            device_id: population::device_id(n),
            kyber_last_resort_prekey: Some(population::kyber_prekey(n, id)),
        },
        n,
    );
    let _ = servers
        .call(shared, "RotateKyberLastResortPreKey", |mut c| async move {
            c.rotate_kyber_last_resort_pre_key(request).await
        })
        .await;
}
