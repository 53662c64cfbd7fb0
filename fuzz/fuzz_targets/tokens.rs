//! Bearer tokens: the verifier never panics, and accepts nothing but the token it minted
//! (libFuzzer cannot forge an HMAC; anything else accepted is a bug in the checks around it).
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use keyserver::auth::{TokenAuthority, TokenPolicy};
use libfuzzer_sys::fuzz_target;

static AUTHORITY: LazyLock<(TokenAuthority, String)> = LazyLock::new(|| {
    let authority = TokenAuthority::new(&[vec![7u8; 32]], TokenPolicy::default()).expect("secret");
    let user = uuid::Uuid::from_u128(1);
    let token = authority
        .mint(user, None, Duration::from_secs(3600))
        .expect("minting");
    (authority, token)
});

fuzz_target!(|bytes: &[u8]| {
    let Ok(token) = std::str::from_utf8(bytes) else {
        return;
    };
    let (authority, minted) = &*AUTHORITY;
    if let Ok(caller) = authority.verify(token) {
        assert_eq!(
            token, minted,
            "accepted a token it did not mint: {caller:?}"
        );
    }
});
