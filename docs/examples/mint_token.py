#!/usr/bin/env python3
"""Mint a keyserver bearer token the way a chat backend does, with the standard library only.

A token is an HS256 JWT. Its header names the signing secret by `kid`: the first 16 hex digits
of the secret's SHA-256, so the backend and the key server derive it alike. Its claims name the
user (`sub`) and, for a device's own writes, the device (`dev`); `iss` and `aud` must be the
key server's --token-issuer and --token-audience (both "keyserver" by default), and exp - iat
must not exceed --token-max-ttl (30 days by default).

    KEYSERVER_TOKEN_SECRET=... python3 mint_token.py USER_UUID [DEVICE_ID] [TTL_SECONDS]
"""
import base64
import hashlib
import hmac
import json
import os
import sys
import time


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint(secret: bytes, user: str, device: str | None = None, ttl: int = 3600,
         issuer: str = "keyserver", audience: str = "keyserver") -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": hashlib.sha256(secret).hexdigest()[:16]}
    now = int(time.time())
    claims = {"sub": user, "iss": issuer, "aud": audience, "iat": now, "exp": now + ttl}
    if device is not None:
        claims["dev"] = device
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


if __name__ == "__main__":
    secret = os.environ["KEYSERVER_TOKEN_SECRET"].encode()
    user = sys.argv[1]
    device = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    ttl = int(sys.argv[3]) if len(sys.argv) > 3 else 3600
    print(mint(secret, user, device, ttl))
