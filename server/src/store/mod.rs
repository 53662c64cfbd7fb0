//! The storage of the key server, by concept, in domain terms.
//!
//! Handlers validate requests into the types here and call the [`Store`]; SQL lives only in
//! this module's concepts: [`devices`], [`prekeys`] (by kind), [`bundles`], [`sessions`],
//! [`safety`] numbers, [`recovery`], [`audit`], [`drain`] detection and the maintenance [`jobs`]. Each concept
//! writes its rules once, with each statement's PostgreSQL and SQLite text side by side
//! ([`sql`]); [`database`] opens either backend and hands out transactions. Every write method
//! is one transaction that includes its audit event, so a failed call writes nothing. Errors
//! leave as a [`StoreError`], classified here: no driver type goes above the store.

pub mod audit;
pub mod backup;
pub mod bundles;
pub mod database;
pub mod devices;
pub mod drain;
mod error;
pub mod fence;
pub mod ids;
pub mod jobs;
pub mod migrations;
pub mod prekeys;
pub mod recovery;
mod replica;
pub mod safety;
pub mod sessions;
pub(crate) mod sql;
pub mod transfer;

pub use audit::{AuditEvent, AuditQuery, AuditRecord};
pub use bundles::{
    BundleTarget, DeviceBundle, FetchKey, PublishedKyberPreKey, PublishedSignedPreKey, Serve,
};
pub use devices::{NewDevice, RegisterOutcome, Registered};
pub use error::StoreError;
pub use ids::{DeviceId, KeyId, KyberPreKeyId, PreKeyId, SignedPreKeyId};
pub use prekeys::repeated_use::Rotated;
pub use prekeys::single_use::UploadReport;
pub use prekeys::{KeyStatus, NewKyberPreKey, NewOneTimePreKey, NewSignedPreKey, PublishedKeys};
pub use recovery::{MasterKeyRecord, RecoverableDevice, Recovery};
pub use safety::{SafetyRecord, VerificationMethod, safety_number};
pub use sessions::{SessionKey, SessionQuery, StoredSession};
pub use sql::{Backend, timestamp_text};

use std::sync::Arc;

use bundles::coalesce::{Coalescer, DEFAULT_BATCHES_IN_FLIGHT};
use database::{Database, ReadConn};
use replica::Replica;

/// The key server's storage on one database. It hands out each one-time prekey at most once,
/// even to concurrent callers in several processes. Cloning it is cheap (the pool is shared).
#[derive(Clone)]
pub struct Store {
    db: Database,
    /// This store's fetches, gathered into batches.
    fetches: Arc<Coalescer>,
    /// Standbys for the reads that take no key, if the server has them.
    replica: Option<Arc<Replica>>,
}

impl Store {
    pub(crate) fn new(db: Database) -> Self {
        let in_flight = match db.backend() {
            Backend::Postgres => DEFAULT_BATCHES_IN_FLIGHT,
            Backend::Sqlite => 1,
        };
        Self {
            db,
            fetches: Arc::new(Coalescer::new(in_flight)),
            replica: None,
        }
    }

    /// The same store with its key-less reads (identity keys, key status, audit and session
    /// reads) on `replica`, a pool on PostgreSQL standbys; the primary answers them while it
    /// gives no connection.
    pub fn with_read_replica(mut self, replica: Database) -> Self {
        self.replica = Some(Arc::new(Replica::new(replica)));
        self
    }

    /// A connection for a read that takes no key and writes nothing: a standby's when there is
    /// one to be had, else the primary's.
    pub(crate) async fn replica_read(&self) -> Result<ReadConn, StoreError> {
        if let Some(replica) = &self.replica
            && let Some(conn) = replica.read().await
        {
            return Ok(conn);
        }
        self.db.read().await
    }

    /// The same store with at most `batches` fetch batches on the database at once (PostgreSQL;
    /// SQLite runs one, having one writer). More batches use more of the database's cores,
    /// fewer gather more fetches into each.
    pub fn with_fetch_batches(mut self, batches: usize) -> Self {
        if self.db.backend() == Backend::Postgres {
            self.fetches = Arc::new(Coalescer::new(batches));
        }
        self
    }

    /// The database underneath, for migrations and operator tools.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Whether the database answers a round trip, and where its keys went if a cutover fenced
    /// it (the readiness check).
    pub async fn ping(&self) -> Result<Option<String>, StoreError> {
        self.db.ping().await
    }

    /// Open and idle connections of the request pool.
    pub fn pool_figures(&self) -> (u32, usize) {
        self.db.pool_figures()
    }
}
