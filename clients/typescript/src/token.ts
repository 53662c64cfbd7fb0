/**
 * Bearer tokens as a chat backend mints them for its devices: HS256 JWTs signed with the secret
 * the key server has (docs/OPERATIONS.md, "Tokens"), built with `jose` rather than by hand.
 */
import { createHash } from 'node:crypto';

import { SignJWT } from 'jose';

/** Whom a token speaks for, and for how long. */
export interface TokenClaims {
  /** The user id (a UUID). */
  user: string;
  /** The device the token may change (re-register, upload, rotate, remove, its sessions). */
  device?: string;
  /** Lifetime in seconds (default 3600); the server refuses more than its `--token-max-ttl`. */
  ttlSeconds?: number;
  /** The server's `--token-issuer` (default "keyserver"). */
  issuer?: string;
  /** The server's `--token-audience` (default "keyserver"). */
  audience?: string;
}

/** A token for `claims`, signed with the key server's token secret. */
export async function mintToken(secret: string | Uint8Array, claims: TokenClaims): Promise<string> {
  const key = typeof secret === 'string' ? new TextEncoder().encode(secret) : secret;
  // The server finds the secret by `kid`: the first 16 hex digits of its SHA-256.
  const kid = createHash('sha256').update(key).digest('hex').slice(0, 16);
  const now = Math.floor(Date.now() / 1000);
  const jwt = new SignJWT(claims.device === undefined ? {} : { dev: claims.device })
    .setProtectedHeader({ alg: 'HS256', typ: 'JWT', kid })
    .setSubject(claims.user)
    .setIssuer(claims.issuer ?? 'keyserver')
    .setAudience(claims.audience ?? 'keyserver')
    .setIssuedAt(now)
    .setExpirationTime(now + (claims.ttlSeconds ?? 3600));
  return jwt.sign(key);
}
