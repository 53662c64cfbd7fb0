/**
 * Private keys and session state at rest: AES-256-GCM under a key derived with
 * PBKDF2-HMAC-SHA256, in the same blob format and with the same labels as the Rust client
 * (`client/src/vault.rs`), so the server holds one kind of sealed blob whoever made it.
 *
 * A blob is `0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16)`; the label (say `one-time-prekey:7`)
 * is the associated data, so a blob cannot be swapped for another. The server cannot open them.
 */
import { createCipheriv, createDecipheriv, pbkdf2, randomBytes } from 'node:crypto';
import { promisify } from 'node:util';

const VERSION = 1;
const NONCE_LEN = 12;
const TAG_LEN = 16;

/** PBKDF2 iterations for new vaults (OWASP's figure for PBKDF2-HMAC-SHA256). */
export const DEFAULT_ITERATIONS = 600_000;
/** Fewest iterations a vault may be derived with. */
export const MIN_ITERATIONS = 100_000;

/** Thrown when a blob is malformed, or sealed under another key or label. */
export class VaultError extends Error {}

/** The key that seals one device's private keys and sessions. */
export class Vault {
  private constructor(private readonly key: Buffer) {}

  /** A vault over a 32-byte key the application keeps (say in the platform's keychain). */
  static fromKey(key: Uint8Array): Vault {
    if (key.length !== 32) throw new VaultError(`a vault key is 32 bytes, got ${key.length}`);
    return new Vault(Buffer.from(key));
  }

  /** A vault whose key is derived from a passphrase and a per-user salt (32 random bytes). */
  static async derive(passphrase: string | Uint8Array, salt: Uint8Array, iterations = DEFAULT_ITERATIONS): Promise<Vault> {
    if (iterations < MIN_ITERATIONS) {
      throw new VaultError(`PBKDF2 needs at least ${MIN_ITERATIONS} iterations, got ${iterations}`);
    }
    return new Vault(await deriveKey(passphrase, salt, iterations));
  }

  /** Seals `plaintext` under a fresh random nonce. */
  seal(plaintext: Uint8Array, label: string): Uint8Array<ArrayBuffer> {
    const nonce = randomBytes(NONCE_LEN);
    const cipher = createCipheriv('aes-256-gcm', this.key, nonce);
    cipher.setAAD(Buffer.from(label, 'utf8'));
    const sealed = Buffer.concat([
      Buffer.from([VERSION]),
      nonce,
      cipher.update(plaintext),
      cipher.final(),
      cipher.getAuthTag(),
    ]);
    return new Uint8Array(sealed);
  }

  /** Opens a blob sealed with the same key and label. */
  open(blob: Uint8Array, label: string): Uint8Array<ArrayBuffer> {
    if (blob.length < 1 + NONCE_LEN + TAG_LEN || blob[0] !== VERSION) {
      throw new VaultError('the sealed blob is malformed');
    }
    const decipher = createDecipheriv('aes-256-gcm', this.key, blob.subarray(1, 1 + NONCE_LEN));
    decipher.setAAD(Buffer.from(label, 'utf8'));
    decipher.setAuthTag(blob.subarray(blob.length - TAG_LEN));
    try {
      const opened = Buffer.concat([decipher.update(blob.subarray(1 + NONCE_LEN, blob.length - TAG_LEN)), decipher.final()]);
      return new Uint8Array(opened);
    } catch {
      throw new VaultError('wrong key, or the sealed blob was altered');
    }
  }
}

/** PBKDF2-HMAC-SHA256, 32 bytes. */
export async function deriveKey(passphrase: string | Uint8Array, salt: Uint8Array, iterations: number): Promise<Buffer> {
  return promisify(pbkdf2)(passphrase, salt, iterations, 32, 'sha256');
}

/** The labels the Rust client seals under, so blobs mean the same to both. */
export const labels = {
  identity: (deviceId: string) => `identity:${deviceId}`,
  signedPreKey: (id: number) => `signed-prekey:${id}`,
  oneTimePreKey: (id: number) => `one-time-prekey:${id}`,
  kyberPreKey: (id: number) => `kyber-prekey:${id}`,
  session: (peerUser: string, peerDevice: string) => `session:${peerUser}:${peerDevice}`,
};
