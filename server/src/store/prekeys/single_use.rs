//! The single-use base: keys a peer takes once (one-time prekeys). An upload is merged in:
//! a key already stored with the same bytes is left alone (a retried upload), a key whose id
//! was already handed out is refused and never stored again, even after cleanup deleted its
//! row (its id is kept as retired), and an id stored with other bytes fails the whole call.
//! Taking keys is the fetch's job (`store::bundles`), in the same statement as the bundle.

use std::collections::HashMap;

use super::repeated_use::RepeatedUse;
use super::retired::{self, Retired};
use super::{Expired, NewPreKey};
use crate::store::StoreError;
use crate::store::database::Tx;
use crate::store::ids::{DeviceId, KeyId};
use crate::store::sql::{List, Sql};

/// A kind of single-use key: where its rows live, as statements.
#[derive(Debug)]
pub struct SingleUse {
    /// The request field such keys arrive in, for errors.
    pub field: &'static str,
    /// The kind as audit metadata and cleanup reports name it.
    pub name: &'static str,
    /// The id space its retired ids are kept in.
    pub retired: Retired,
    /// Audit metadata's name for the count of keys left.
    pub available_field: &'static str,
    /// The repeated-use kind a device must have an active key of to upload these: what is
    /// served when they run out (none for a kind whose bundles may go without).
    pub fallback: Option<&'static RepeatedUse>,
    /// `$1` device, `$2` list of ids: `key_id`, `public`, `consumed`, and `same_kind` (false
    /// for a key of another kind sharing the id space).
    pub(super) stored: Sql,
    /// PostgreSQL: all keys at once from arrays (`$2` ids, `$3` public keys, `$4` private
    /// blobs, `$5` signatures) in array order; SQLite: one key (`$2`…`$5`). Serial row ids
    /// record upload order, which is the order keys are handed out in.
    pub(super) insert: Sql,
    /// `$1` device: how many keys are left to hand out.
    pub(super) available: Sql,
    /// `$1` device: deletes the keys left to hand out (never one handed out).
    pub(super) withdraw: Sql,
    /// Keys handed out, by when (`consumed_at`).
    pub(crate) expired: Expired,
}

/// The statements of a single-use kind, from its table and columns. `kind_test` is true of the
/// table's rows of this kind (`TRUE` when the table holds one kind); `signature` names the
/// signature column of a signed kind.
macro_rules! single_use {
    (field: $field:literal, name: $name:literal, retired: $retired:expr,
     available_field: $available:literal, fallback: $fallback:expr, table: $table:literal,
     id: $id:literal, public: $public:literal, private: $private:literal,
     kind_test: $kind:literal, signature: $($sig:literal)?) => {
        $crate::store::prekeys::single_use::SingleUse {
            field: $field,
            name: $name,
            retired: $retired,
            available_field: $available,
            fallback: $fallback,
            stored: sql!("SELECT " $id " AS key_id, " $public " AS public, is_consumed AS consumed, "
                $kind " AS same_kind FROM " $table " WHERE device_id = $1 AND " $id IN_LIST("$2")),
            insert: $crate::store::sql::Sql {
                postgres: concat!("INSERT INTO ", $table, " (device_id, ", $id, ", ", $public, ", ",
                    $private $(, ", ", $sig)?, ") SELECT $1, k.id, k.public, k.private"
                    $(, ", k.signature", single_use!(@skip $sig))?,
                    " FROM unnest($2::int4[], $3::bytea[], $4::bytea[], $5::bytea[]) \
                     WITH ORDINALITY AS k(id, public, private, signature, n) ORDER BY k.n"),
                sqlite: concat!("INSERT INTO ", $table, " (device_id, ", $id, ", ", $public, ", ",
                    $private $(, ", ", $sig)?, ") VALUES ($1, $2, $3, $4"
                    $(, ", $5", single_use!(@skip $sig))?, ")"),
            },
            available: sql!("SELECT count(*) FROM " $table
                " WHERE device_id = $1 AND is_consumed = FALSE AND " $kind),
            withdraw: sql!("DELETE FROM " $table
                " WHERE device_id = $1 AND is_consumed = FALSE AND " $kind),
            expired: $crate::store::prekeys::Expired {
                count: sql!("SELECT count(*) FROM " $table
                    " WHERE is_consumed = TRUE AND " $kind " AND consumed_at < $1"),
                pick: sql!("SELECT id, device_id FROM " $table " WHERE is_consumed = TRUE AND "
                    $kind " AND consumed_at < $1 ORDER BY consumed_at LIMIT $2"),
                delete: sql!("DELETE FROM " $table " WHERE id" IN_LIST("$1")
                    " AND is_consumed = TRUE RETURNING device_id, " $id " AS key_id"),
            },
        }
    };
    (@skip $sig:literal) => { "" };
}
pub(crate) use single_use;

/// Where each uploaded key went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport<I> {
    pub stored: Vec<I>,
    pub unchanged: Vec<I>,
    pub refused_consumed: Vec<I>,
    /// Keys of the kind left to hand out after the upload.
    pub available: u32,
}

#[derive(sqlx::FromRow)]
struct Stored {
    key_id: i32,
    public: Vec<u8>,
    consumed: bool,
    same_kind: bool,
}

impl SingleUse {
    /// Stores the keys that are new, leaves identical unconsumed ones alone and refuses
    /// consumed ids, including those cleanup has since deleted; any id stored with another
    /// public key, or as another kind, fails the whole call. A restored device cannot know
    /// which ids its earlier self had handed out (`restored`): a consumed id is refused then,
    /// whatever its bytes. The device is locked.
    pub(crate) async fn merge<K: NewPreKey>(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
        keys: &[K],
        restored: bool,
    ) -> Result<UploadReport<K::Id>, StoreError> {
        let ids: Vec<i32> = keys.iter().map(|k| k.key_id().get() as i32).collect();
        let existing: HashMap<u32, Stored> = tx
            .query(&self.stored)
            .bind(device)
            .bind(List(ids))
            .fetch_all::<Stored>()
            .await?
            .into_iter()
            .map(|row| (row.key_id as u32, row))
            .collect();
        // Read after the stored keys: a cleanup committing in between moved ids from those
        // rows into these ranges.
        let retired = if keys
            .iter()
            .any(|k| !existing.contains_key(&k.key_id().get()))
        {
            self.retired.ranges(tx, device).await?
        } else {
            Vec::new()
        };
        let mut report = UploadReport {
            stored: Vec::new(),
            unchanged: Vec::new(),
            refused_consumed: Vec::new(),
            available: 0,
        };
        let mut new_keys = Vec::new();
        for key in keys {
            let id = key.key_id();
            match existing.get(&id.get()) {
                None if retired::contains(&retired, id.get()) => report.refused_consumed.push(id),
                None => {
                    report.stored.push(id);
                    new_keys.push(key);
                }
                Some(stored) if restored && stored.same_kind && stored.consumed => {
                    report.refused_consumed.push(id)
                }
                Some(stored) if !stored.same_kind || stored.public != key.public_raw() => {
                    return Err(StoreError::OneTimePreKeyConflict {
                        field: self.field,
                        key_id: id.get(),
                    });
                }
                Some(stored) if stored.consumed => report.refused_consumed.push(id),
                Some(_) => report.unchanged.push(id),
            }
        }
        self.insert(tx, device, &new_keys).await?;
        report.available = self.available(tx, device).await?;
        Ok(report)
    }

    /// Inserts keys in the given order.
    pub(crate) async fn insert<K: NewPreKey>(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
        keys: &[&K],
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        match tx {
            // One statement for the whole upload: a round trip per key would dominate.
            Tx::Postgres(pg) => {
                let column = |f: fn(&K) -> Vec<u8>| keys.iter().map(|k| f(k)).collect::<Vec<_>>();
                sqlx::query(self.insert.postgres)
                    .bind(device)
                    .bind(
                        keys.iter()
                            .map(|k| k.key_id().get() as i32)
                            .collect::<Vec<_>>(),
                    )
                    .bind(column(|k| k.public_raw().to_vec()))
                    .bind(column(|k| k.encrypted_private().to_vec()))
                    .bind(column(|k| k.signature().to_vec()))
                    .execute(&mut **pg)
                    .await?;
            }
            // In-process SQLite has no round trips to save.
            Tx::Sqlite(_) => {
                for key in keys {
                    tx.query(&self.insert)
                        .bind(device)
                        .bind(key.key_id().get() as i32)
                        .bind(key.public_raw())
                        .bind(key.encrypted_private())
                        .bind(key.signature())
                        .execute()
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Deletes the keys of this kind the device has left to hand out; returns how many. Their
    /// ids were never handed out, so they are not retired: a new key may take one.
    pub(crate) async fn withdraw_unused(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
    ) -> Result<u32, StoreError> {
        Ok(tx.query(&self.withdraw).bind(device).execute().await? as u32)
    }

    /// Keys of this kind the device has left to hand out.
    pub(crate) async fn available(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
    ) -> Result<u32, StoreError> {
        let count: i64 = tx.query(&self.available).bind(device).scalar().await?;
        Ok(count as u32)
    }
}
