//! Bundles: what a peer fetches to start a session with a device, taking the device's oldest
//! unused one-time prekey and oldest unused one-time Kyber prekey, each never handed out again
//! (docs/BUNDLES.md). A device out of one-time Kyber prekeys is served its last-resort one.
//!
//! This is the hot path. Concurrent fetches of a process are coalesced into batches
//! ([`coalesce`]), and the backends take different routes for a batch: PostgreSQL serves every
//! target of every request in one statement, one round trip and one commit, with `FOR UPDATE
//! SKIP LOCKED` so fetchers in any number of processes never take the same key ([`postgres`]);
//! SQLite reads and takes in one write transaction, which its single writer makes atomic, with
//! one fsync for the batch ([`sqlite`]). Both decode the same rows.

pub mod coalesce;
mod postgres;
mod sqlite;

use keyserver_proto::wire::{KyberPublicKey, PublicKey};
use time::OffsetDateTime;
use uuid::Uuid;

use super::ids::{DeviceId, KyberPreKeyId, PreKeyId, SignedPreKeyId};
use super::sql::{At, Key, KyberKey, Sig};
use super::{Store, StoreError};
use coalesce::FetchRequest;

/// One fetch target: a user, and one device or all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BundleTarget {
    pub user_id: Uuid,
    pub device_id: Option<DeviceId>,
}

/// The key a client chose for one fetch: a retry with it, by the same user within `window`,
/// gets the one-time keys the first attempt took instead of taking more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchKey {
    /// 1 to 64 of `A-Z a-z 0-9 - _ . :` (checked at the edge).
    pub key: String,
    pub window: std::time::Duration,
}

/// A signed prekey as peers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedSignedPreKey {
    pub key_id: SignedPreKeyId,
    pub public: PublicKey,
    pub signature: [u8; 64],
    /// When the device installed it.
    pub rotated_at: OffsetDateTime,
}

/// A Kyber prekey as peers receive it: one-time or last resort, which only the device can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKyberPreKey {
    pub key_id: KyberPreKeyId,
    pub public: KyberPublicKey,
    pub signature: [u8; 64],
}

/// Which devices a fetch serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Serve {
    /// Every device with an active signed prekey: devices without Kyber keys get X3DH bundles.
    #[default]
    Mixed,
    /// Only devices with a last-resort Kyber prekey, as a PQXDH-only deployment (Signal) runs.
    PqxdhOnly,
}

/// What a peer needs to start a session with one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundle {
    pub device_id: DeviceId,
    pub registration_id: u32,
    pub identity_key: PublicKey,
    pub signed_prekey: PublishedSignedPreKey,
    /// The one-time prekey handed to this caller, if the device had one left.
    pub one_time_prekey: Option<(PreKeyId, PublicKey)>,
    /// The Kyber prekey for PQXDH; None for a device that never published Kyber keys.
    pub kyber_prekey: Option<PublishedKyberPreKey>,
    /// Whether `kyber_prekey` is a one-time key handed to this caller (else the last-resort
    /// key, which every caller gets once the one-time ones ran out).
    pub kyber_one_time: bool,
}

/// A device's part of a bundle, as both backends' statements return it.
#[derive(sqlx::FromRow)]
struct DeviceRow {
    device_id: DeviceId,
    registration_id: i32,
    identity_key_public: Key,
    signed_prekey_id: SignedPreKeyId,
    signed_prekey_public: Key,
    signature: Sig,
    rotation_date: At,
}

/// A Kyber prekey's columns, as both backends' statements return them (all null when none).
#[derive(sqlx::FromRow)]
struct KyberRow {
    kyber_prekey_id: Option<KyberPreKeyId>,
    kyber_prekey_public: Option<KyberKey>,
    kyber_signature: Option<Sig>,
}

impl KyberRow {
    fn key(self) -> Option<PublishedKyberPreKey> {
        Some(PublishedKyberPreKey {
            key_id: self.kyber_prekey_id?,
            public: self.kyber_prekey_public?.0,
            signature: self.kyber_signature?.0,
        })
    }
}

impl DeviceRow {
    fn bundle(
        self,
        one_time_prekey: Option<(PreKeyId, PublicKey)>,
        kyber_prekey: Option<PublishedKyberPreKey>,
        kyber_one_time: bool,
    ) -> DeviceBundle {
        DeviceBundle {
            device_id: self.device_id,
            registration_id: self.registration_id as u32,
            identity_key: self.identity_key_public.0,
            signed_prekey: PublishedSignedPreKey {
                key_id: self.signed_prekey_id,
                public: self.signed_prekey_public.0,
                signature: self.signature.0,
                rotated_at: self.rotation_date.0,
            },
            one_time_prekey,
            kyber_prekey,
            kyber_one_time,
        }
    }
}

impl Store {
    /// One result per target, in order, each with the bundles of the target's devices that
    /// `serve` covers and that have an active signed prekey, ordered by device id. Takes one
    /// one-time prekey and one one-time Kyber prekey per device, and a device named by several
    /// targets gets one of each, shared by their results. The keys taken record `requester`
    /// (the fetching user) for drain detection, and `retry`'s key: a fetch by the same user with
    /// the same key within its window gets, for each device the first took keys of, the same
    /// keys again (its one-time Kyber key, or the last-resort key if it took none), taking
    /// nothing more. Goes to the database in a batch with the process's concurrent fetches
    /// ([`coalesce`]).
    pub async fn fetch_bundles(
        &self,
        requester: Uuid,
        targets: &[BundleTarget],
        serve: Serve,
        retry: Option<FetchKey>,
    ) -> Result<Vec<Vec<DeviceBundle>>, StoreError> {
        let request = FetchRequest {
            requester,
            targets: targets.to_vec(),
            serve,
            retry,
        };
        self.fetches.fetch(&self.db, request).await
    }

    /// Fetch batches this store has sent to the database, and the requests they carried.
    pub fn fetch_batches_sent(&self) -> (u64, u64) {
        self.fetches.sent()
    }
}
