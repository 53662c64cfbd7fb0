//! The read pool: calls that take no key and write nothing (identity keys, key status, audit
//! and session reads) can run on PostgreSQL standbys (`--read-database-url`, HAProxy's replica
//! port), so that the primary keeps its cores for fetches and writes. A fetch never reads
//! here: a standby may be behind, and a key taken on the primary could still look free on it.
//!
//! A standby can go away (a failover promotes it, or none is left): the read then goes to the
//! primary, and the replica is left alone for a few seconds so that every read does not wait
//! for a connection that will not come.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::StoreError;
use super::database::{Database, ReadConn};
use crate::edge::metrics::DB_REPLICA_UNAVAILABLE;

/// How long a replica that did not give a connection is left alone.
const REST: Duration = Duration::from_secs(5);

/// A pool on the standbys, and until when it is resting after a failure.
pub(crate) struct Replica {
    db: Database,
    resting_until: Mutex<Option<Instant>>,
}

impl Replica {
    pub(crate) fn new(db: Database) -> Self {
        Self {
            db,
            resting_until: Mutex::new(None),
        }
    }

    /// A connection to a standby, or None when there is none to be had now.
    pub(crate) async fn read(&self) -> Option<ReadConn> {
        {
            let mut resting = self.resting_until.lock().expect("replica state");
            match *resting {
                Some(until) if Instant::now() < until => return None,
                Some(_) => *resting = None,
                None => {}
            }
        }
        match self.db.read().await {
            Ok(conn) => Some(conn),
            Err(e) => {
                self.rest(&e);
                None
            }
        }
    }

    fn rest(&self, why: &StoreError) {
        let mut resting = self.resting_until.lock().expect("replica state");
        if resting.is_none() {
            tracing::warn!(error = %why, rest = ?REST, "no connection to a read replica; reading from the primary");
        }
        *resting = Some(Instant::now() + REST);
        metrics::counter!(DB_REPLICA_UNAVAILABLE).increment(1);
    }
}
