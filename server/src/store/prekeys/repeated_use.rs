//! The repeated-use base: signed keys served to every peer until the device replaces them (the
//! signed EC prekey, the last-resort Kyber prekey). A device has one active key of each such
//! kind; installing a new one deactivates the previous, which stays stored for the retention
//! period so late messages to it still decrypt, until cleanup removes it and keeps its id
//! refused. Installing the active key again is a no-op, so a lost answer can be retried.

use super::retired::{self, Retired};
use super::{Expired, NewPreKey};
use crate::store::StoreError;
use crate::store::database::Tx;
use crate::store::ids::{DeviceId, KeyId};
use crate::store::sql::Sql;

/// A kind of repeated-use key: where its rows live, as statements.
#[derive(Debug)]
pub struct RepeatedUse {
    /// The request field such a key arrives in, for errors.
    pub field: &'static str,
    /// The kind as audit metadata and cleanup reports name it.
    pub name: &'static str,
    /// The id space its retired ids are kept in.
    pub retired: Retired,
    /// Audit metadata's names for the key's id and the id of the key it replaced.
    pub audit_fields: (&'static str, &'static str),
    /// `$1` device, `$2` id: `key_id`, `public`, `active` and `same_kind` of the key with that
    /// id (of any kind sharing the id space) and of the active key of this kind.
    pub(super) stored: Sql,
    /// `$1` device: whether the device has an active key of this kind.
    pub(super) has_active: Sql,
    /// `$1` device: deactivates the active key, recording now as when it was superseded.
    pub(super) deactivate: Sql,
    /// `$1` device, `$2` id, `$3` public key, `$4` private blob, `$5` signature: an active key.
    pub(super) insert: Sql,
    /// Keys superseded by a newer one, by when (`superseded_at`).
    pub(crate) expired: Expired,
    /// The rotation check: `$1` rotation cut-off, `$2` stale cut-off: how many active keys were
    /// installed before each.
    pub(crate) overdue_counts: Sql,
    /// The rotation check: `$1` rotation cut-off, `$2` limit: (`user_id`, `device_id`,
    /// `installed_at`) of the oldest overdue active keys.
    pub(crate) overdue_oldest: Sql,
}

/// The statements of a repeated-use kind, from its table and columns. `installed` is the
/// column holding when a key was installed; `kind_test` is true of the table's rows of this
/// kind (unqualified: no other table of the statements has its columns); `extra` columns and
/// values are what an insert sets besides the key (its kind flag).
macro_rules! repeated_use {
    (field: $field:literal, name: $name:literal, retired: $retired:expr,
     audit_fields: ($id_field:literal, $previous_field:literal), table: $table:literal,
     id: $id:literal, public: $public:literal, private: $private:literal,
     installed: $installed:literal, kind_test: $kind:literal,
     extra: ($extra_columns:literal, $extra_values:literal)) => {
        $crate::store::prekeys::repeated_use::RepeatedUse {
            field: $field,
            name: $name,
            retired: $retired,
            audit_fields: ($id_field, $previous_field),
            stored: sql!("SELECT " $id " AS key_id, " $public " AS public, is_active AS active, "
                $kind " AS same_kind FROM " $table " WHERE device_id = $1 AND ("
                $id " = $2 OR (is_active = TRUE AND " $kind "))"),
            has_active: sql!("SELECT EXISTS (SELECT 1 FROM " $table
                " WHERE device_id = $1 AND is_active = TRUE AND " $kind ")"),
            deactivate: sql!("UPDATE " $table " SET is_active = FALSE, superseded_at = " NOW
                " WHERE device_id = $1 AND is_active = TRUE AND " $kind),
            insert: sql!("INSERT INTO " $table " (device_id, " $id ", " $public ", " $private
                ", signature, is_active" $extra_columns ") VALUES ($1, $2, $3, $4, $5, TRUE"
                $extra_values ")"),
            expired: $crate::store::prekeys::Expired {
                count: sql!("SELECT count(*) FROM " $table
                    " WHERE is_active = FALSE AND " $kind " AND superseded_at < $1"),
                pick: sql!("SELECT id, device_id FROM " $table " WHERE is_active = FALSE AND "
                    $kind " AND superseded_at < $1 ORDER BY superseded_at LIMIT $2"),
                delete: sql!("DELETE FROM " $table " WHERE id" IN_LIST("$1")
                    " AND is_active = FALSE RETURNING device_id, " $id " AS key_id"),
            },
            overdue_counts: sql!("SELECT count(*), count(*) FILTER (WHERE " $installed " < $2) FROM "
                $table " WHERE is_active = TRUE AND " $kind " AND " $installed " < $1"),
            overdue_oldest: sql!("SELECT ik.user_id, k.device_id, k." $installed " AS installed_at
                FROM " $table " k JOIN nchat_identity_keys ik ON ik.device_id = k.device_id
                WHERE k.is_active = TRUE AND " $kind " AND k." $installed " < $1
                ORDER BY k." $installed " LIMIT $2"),
        }
    };
}
pub(crate) use repeated_use;

/// The result of installing a repeated-use key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated<I> {
    /// False when the key was already the active one (a retried rotation).
    pub rotated: bool,
    /// The key that was active before, if any and if it changed.
    pub previous_key_id: Option<I>,
}

#[derive(sqlx::FromRow)]
struct Stored {
    key_id: i32,
    public: Vec<u8>,
    active: bool,
    same_kind: bool,
}

impl RepeatedUse {
    /// Makes `key` the only active key of this kind of a locked device.
    pub(crate) async fn install<K: NewPreKey>(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
        key: &K,
    ) -> Result<Rotated<K::Id>, StoreError> {
        let id = key.key_id().get();
        let stored: Vec<Stored> = tx
            .query(&self.stored)
            .bind(device)
            .bind(id as i32)
            .fetch_all()
            .await?;
        let superseded = StoreError::SignedPreKeySuperseded {
            field: self.field,
            key_id: id,
        };
        match stored.iter().find(|k| k.key_id as u32 == id) {
            Some(k) if !k.same_kind || k.public != key.public_raw() => {
                return Err(StoreError::SignedPreKeyConflict {
                    field: self.field,
                    key_id: id,
                });
            }
            Some(k) if !k.active => return Err(superseded),
            Some(_) => {
                return Ok(Rotated {
                    rotated: false,
                    previous_key_id: None,
                });
            }
            None if retired::contains(&self.retired.ranges(tx, device).await?, id) => {
                return Err(superseded);
            }
            None => {}
        }
        let previous = stored
            .iter()
            .find(|k| k.active && k.same_kind)
            .map(|k| K::Id::from_stored(k.key_id as u32));
        tx.query(&self.deactivate).bind(device).execute().await?;
        self.insert(tx, device, key).await?;
        Ok(Rotated {
            rotated: true,
            previous_key_id: previous,
        })
    }

    /// Whether the device has an active key of this kind.
    pub(crate) async fn has_active(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
    ) -> Result<bool, StoreError> {
        Ok(tx.query(&self.has_active).bind(device).scalar().await?)
    }

    /// Inserts `key` as the active key (the device has none of this kind).
    pub(crate) async fn insert<K: NewPreKey>(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
        key: &K,
    ) -> Result<(), StoreError> {
        tx.query(&self.insert)
            .bind(device)
            .bind(key.key_id().get() as i32)
            .bind(key.public_raw())
            .bind(key.encrypted_private())
            .bind(key.signature())
            .execute()
            .await?;
        Ok(())
    }
}
