//! Every RPC's request validation from arbitrary protobuf bytes: the first byte picks the
//! message, the rest is decoded as it and run through the validators its handler runs (with
//! the identity key a stored device would have, `keyserver_fuzz::identity`). No input may panic, and what is accepted
//! holds what the validators promise.
#![no_main]

use keyserver::service::validate;
use keyserver_fuzz::identity;
use keyserver_proto::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((which, bytes)) = data.split_first() else {
        return;
    };
    let identity = identity();
    match which % 12 {
        0 => {
            let Ok(r) = pb::RegisterDeviceRequest::decode(bytes) else {
                return;
            };
            if !r.device_id.is_empty() {
                let _ = validate::device_id("device_id", &r.device_id);
            }
            let Ok(identity) = validate::public_key("identity_key", &r.identity_key) else {
                return;
            };
            let last_resort = r
                .kyber_last_resort_prekey
                .map(|k| validate::kyber_prekey("kyber_last_resort_prekey", k, &identity));
            let reserved = match last_resort {
                Some(Ok(k)) => Some(k.key_id),
                Some(Err(_)) => return,
                None => None,
            };
            let _ = validate::registration_id("registration_id", r.registration_id);
            let _ = validate::encrypted_blob(
                "encrypted_identity_private_key",
                r.encrypted_identity_private_key,
            );
            let _ = validate::signed_prekey("signed_prekey", r.signed_prekey, &identity);
            if let Ok(keys) = validate::one_time_prekeys("one_time_prekeys", r.one_time_prekeys, 0)
            {
                assert!(keys.len() <= 100);
            }
            if let Ok(keys) = validate::kyber_prekeys(
                "kyber_one_time_prekeys",
                r.kyber_one_time_prekeys,
                0,
                &identity,
                reserved,
            ) {
                assert!(keys.len() <= 100);
                assert!(keys.iter().all(|k| Some(k.key_id) != reserved));
            }
        }
        1 => {
            let Ok(r) = pb::UploadOneTimePreKeysRequest::decode(bytes) else {
                return;
            };
            let _ = validate::device_id("device_id", &r.device_id);
            if let Ok(keys) = validate::one_time_prekeys("one_time_prekeys", r.one_time_prekeys, 1)
            {
                assert!(!keys.is_empty() && keys.len() <= 100);
            }
        }
        2 => {
            let Ok(r) = pb::RotateSignedPreKeyRequest::decode(bytes) else {
                return;
            };
            let _ = validate::device_id("device_id", &r.device_id);
            let _ = validate::signed_prekey("signed_prekey", r.signed_prekey, &identity);
        }
        3 => {
            let Ok(r) = pb::UploadKyberPreKeysRequest::decode(bytes) else {
                return;
            };
            let _ = validate::device_id("device_id", &r.device_id);
            let _ = validate::kyber_prekeys(
                "kyber_one_time_prekeys",
                r.kyber_one_time_prekeys,
                1,
                &identity,
                None,
            );
        }
        4 => {
            let Ok(r) = pb::RotateKyberLastResortPreKeyRequest::decode(bytes) else {
                return;
            };
            if let Some(k) = r.kyber_last_resort_prekey {
                let _ = validate::kyber_prekey("kyber_last_resort_prekey", k, &identity);
            }
        }
        5 => {
            let Ok(r) = pb::FetchPreKeyBundleRequest::decode(bytes) else {
                return;
            };
            let _ = validate::target("target", r.target);
        }
        6 => {
            let Ok(r) = pb::FetchPreKeyBundlesRequest::decode(bytes) else {
                return;
            };
            let n = r.targets.len();
            if let Ok(targets) = validate::targets("targets", r.targets) {
                assert_eq!(targets.len(), n);
            }
        }
        7 => {
            let Ok(r) = pb::CheckKeysRequest::decode(bytes) else {
                return;
            };
            let _ = validate::device_id("device_id", &r.device_id);
            let _ = validate::digest("digest", &r.digest);
        }
        8 => {
            let Ok(r) = pb::CheckIdentityKeysRequest::decode(bytes) else {
                return;
            };
            let _ = validate::identity_checks("checks", r.checks);
        }
        9 => {
            let Ok(r) = pb::GetIdentityKeysRequest::decode(bytes) else {
                return;
            };
            let _ = validate::user_id("user_id", &r.user_id);
        }
        10 => {
            let Ok(r) = pb::PutSessionRequest::decode(bytes) else {
                return;
            };
            let _ = validate::session_key("key", r.key);
            let _ = validate::session_state("state", r.state);
        }
        _ => {
            let Ok(r) = pb::ListSessionsRequest::decode(bytes) else {
                return;
            };
            let _ = validate::device_id("device_id", &r.device_id);
            let _ = validate::page_size("page_size", r.page_size);
            let _ = validate::page_token("page_token", &r.page_token);
        }
    }
});
