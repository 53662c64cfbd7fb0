//! Safety numbers on the device: computed locally from the identity keys the server lists and
//! compared with the number the server reports. A difference means the two do not agree on
//! whose keys these are, which is what safety numbers exist to reveal.

use anyhow::Context;
use keyserver_proto::fingerprint;
use keyserver_proto::pb;
use keyserver_proto::wire::PublicKey;
use uuid::Uuid;

use crate::api::{KeyClient, SafetyNumberClient};

/// The locally computed number beside the server's answer.
pub struct SafetyCheck {
    pub local: String,
    pub server: pb::GetSafetyNumberResponse,
}

impl SafetyCheck {
    pub fn matches(&self) -> bool {
        self.local == self.server.safety_number
    }
}

/// A safety number in twelve groups of five digits, as Signal shows it.
pub fn grouped(number: &str) -> String {
    number
        .as_bytes()
        .chunks(5)
        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

async fn identity_keys(
    keys: &mut KeyClient,
    user: Option<Uuid>,
) -> anyhow::Result<(Uuid, Vec<PublicKey>)> {
    let listed = keys
        .get_identity_keys(pb::GetIdentityKeysRequest {
            user_id: user.map(|u| u.to_string()).unwrap_or_default(),
        })
        .await?
        .into_inner();
    let user_id = Uuid::parse_str(&listed.user_id).context("the server sent a bad user id")?;
    let parsed = listed
        .identity_keys
        .iter()
        .map(|k| PublicKey::from_serialized(k).context("the server sent a malformed identity key"))
        .collect::<anyhow::Result<_>>()?;
    Ok((user_id, parsed))
}

/// Computes the safety number with `peer` from the listed keys, checks that this device's
/// own identity key is among the caller's, and asks the server for its number.
pub async fn check(
    keys: &mut KeyClient,
    safety: &mut SafetyNumberClient,
    own_identity: PublicKey,
    peer: Uuid,
) -> anyhow::Result<SafetyCheck> {
    let (me, mine) = identity_keys(keys, None).await?;
    anyhow::ensure!(
        mine.contains(&own_identity),
        "the server does not list this device's identity key among the user's"
    );
    let (_, theirs) = identity_keys(keys, Some(peer)).await?;
    anyhow::ensure!(!theirs.is_empty(), "the peer has no registered device");
    let local = fingerprint::safety_number(
        &fingerprint::user_digits(me.as_bytes(), mine),
        &fingerprint::user_digits(peer.as_bytes(), theirs),
    );
    let server = safety
        .get_safety_number(pb::GetSafetyNumberRequest {
            peer_user_id: peer.to_string(),
        })
        .await?
        .into_inner();
    Ok(SafetyCheck { local, server })
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_sixty_digits_in_twelve_fives() {
        let number = "300354477692869396892869876765458257569162576843440918079131";
        assert_eq!(
            super::grouped(number),
            "30035 44776 92869 39689 28698 76765 45825 75691 62576 84344 09180 79131"
        );
    }
}
