//! Safety numbers (`nchat_safety_numbers`): a user's record of having compared the number with
//! a peer. The number is computed from both users' device identity keys, never taken from a
//! client; a stored one is recomputed, and its verification cleared, in the same transaction
//! as any identity-key change of either user.

use std::collections::HashMap;

use keyserver_proto::fingerprint;
use keyserver_proto::wire::PublicKey;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::audit::{self, AuditEvent};
use super::database::Tx;
use super::devices::{identity_keys, lock_user};
use super::sql::{At, Uid, sql};
use super::{Store, StoreError};

/// How a safety number was compared (the schema's `verification_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationMethod {
    Manual,
    QrCode,
    OutOfBand,
}

impl VerificationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::QrCode => "qr_code",
            Self::OutOfBand => "out_of_band",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Manual, Self::QrCode, Self::OutOfBand]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// A user's stored safety number with a peer: the number as last computed, and the
/// verification (cleared when an identity key of either user changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyRecord {
    pub number: String,
    pub verified: Option<(OffsetDateTime, VerificationMethod)>,
}

/// The 60-digit safety number of two users from their device identity keys; None when either
/// has no device.
pub fn safety_number(a: (Uuid, &[PublicKey]), b: (Uuid, &[PublicKey])) -> Option<String> {
    if a.1.is_empty() || b.1.is_empty() {
        return None;
    }
    let a_digits = fingerprint::user_digits(a.0.as_bytes(), a.1.iter().copied());
    let b_digits = fingerprint::user_digits(b.0.as_bytes(), b.1.iter().copied());
    Some(fingerprint::safety_number(&a_digits, &b_digits))
}

#[derive(sqlx::FromRow)]
struct StoredNumber {
    id: i32,
    user_id: Uid,
    peer_user_id: Uid,
    safety_number: String,
}

#[derive(sqlx::FromRow)]
struct RecordRow {
    safety_number: String,
    verified_at: Option<At>,
    verification_method: Option<String>,
}

/// After `user_id`'s identity keys changed: recomputes every stored safety number that
/// involves the user, clears the verification of each that changed, and audits
/// `safety_number_changed` for the user who had verified it.
pub(crate) async fn refresh(tx: &mut Tx, user_id: Uuid) -> Result<(), StoreError> {
    let rows: Vec<StoredNumber> = tx
        .query(&sql!(
            "SELECT id, user_id, peer_user_id, safety_number FROM nchat_safety_numbers
             WHERE user_id = $1 OR peer_user_id = $1"
        ))
        .bind(Uid(user_id))
        .fetch_all()
        .await?;
    let mut keys: HashMap<Uuid, Vec<PublicKey>> = HashMap::new();
    for row in rows {
        let (owner, peer) = (row.user_id.0, row.peer_user_id.0);
        for user in [owner, peer] {
            if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry(user) {
                slot.insert(identity_keys(tx, user).await?);
            }
        }
        let Some(current) = safety_number((owner, &keys[&owner]), (peer, &keys[&peer])) else {
            continue; // a party has no device left: nothing to compare until one registers
        };
        if current != row.safety_number {
            tx.query(&sql!(
                "UPDATE nchat_safety_numbers
                 SET safety_number = $2, verified_at = NULL, verification_method = NULL,
                     updated_at = " NOW "
                 WHERE id = $1"
            ))
            .bind(row.id)
            .bind(current.as_str())
            .execute()
            .await?;
            audit::record(
                tx,
                AuditEvent::SafetyNumberChanged,
                owner,
                None,
                json!({ "peer_user_id": peer, "because_of_user_id": user_id }),
            )
            .await?;
        }
    }
    Ok(())
}

impl Store {
    /// Records that `user_id` verified `number` with `peer_user_id`, if it is the current
    /// one, audited `safety_number_verified`; returns the time recorded.
    pub async fn verify_safety_number(
        &self,
        user_id: Uuid,
        peer_user_id: Uuid,
        number: &str,
        method: VerificationMethod,
    ) -> Result<OffsetDateTime, StoreError> {
        let mut tx = self.db.begin_write().await?;
        // Both users' keys are read under their locks, in a fixed order against deadlocks.
        let (first, second) = if user_id < peer_user_id {
            (user_id, peer_user_id)
        } else {
            (peer_user_id, user_id)
        };
        lock_user(&mut tx, first).await?;
        lock_user(&mut tx, second).await?;
        let mine = identity_keys(&mut tx, user_id).await?;
        if mine.is_empty() {
            return Err(StoreError::CallerHasNoDevices);
        }
        let theirs = identity_keys(&mut tx, peer_user_id).await?;
        if theirs.is_empty() {
            return Err(StoreError::PeerHasNoDevices);
        }
        if safety_number((user_id, &mine), (peer_user_id, &theirs)).as_deref() != Some(number) {
            return Err(StoreError::SafetyNumberMismatch);
        }
        let at: At = tx
            .query(&sql!(
                "INSERT INTO nchat_safety_numbers
                     (user_id, peer_user_id, safety_number, verified_at, verification_method)
                 VALUES ($1, $2, $3, " NOW ", $4)
                 ON CONFLICT (user_id, peer_user_id) DO UPDATE
                 SET safety_number = excluded.safety_number, verified_at = excluded.verified_at,
                     verification_method = excluded.verification_method,
                     updated_at = " NOW "
                 RETURNING verified_at"
            ))
            .bind(Uid(user_id))
            .bind(Uid(peer_user_id))
            .bind(number)
            .bind(method.as_str())
            .scalar()
            .await?;
        audit::record(
            &mut tx,
            AuditEvent::SafetyNumberVerified,
            user_id,
            None,
            json!({ "peer_user_id": peer_user_id, "method": method.as_str() }),
        )
        .await?;
        tx.commit().await?;
        Ok(at.0)
    }

    /// `user_id`'s stored safety number with `peer_user_id`, if they ever verified one.
    pub async fn safety_record(
        &self,
        user_id: Uuid,
        peer_user_id: Uuid,
    ) -> Result<Option<SafetyRecord>, StoreError> {
        let row: Option<RecordRow> = self
            .db
            .read()
            .await?
            .query(&sql!(
                "SELECT safety_number, verified_at, verification_method FROM nchat_safety_numbers
                 WHERE user_id = $1 AND peer_user_id = $2"
            ))
            .bind(Uid(user_id))
            .bind(Uid(peer_user_id))
            .fetch_optional()
            .await?;
        Ok(row.map(|r| SafetyRecord {
            number: r.safety_number,
            verified: r.verified_at.map(|at| at.0).zip(
                r.verification_method
                    .as_deref()
                    .and_then(VerificationMethod::from_name),
            ),
        }))
    }
}
