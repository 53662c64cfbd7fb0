/** The vault's primitives against published vectors, and its blobs' binding to their labels. */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { deriveKey, MIN_ITERATIONS, Vault, VaultError } from '../src/vault.js';

test('PBKDF2-HMAC-SHA256 matches the RFC 7914 vector', async () => {
  // RFC 7914 §11: PBKDF2-HMAC-SHA256("passwd", "salt", 1); the first 32 bytes of its dkLen 64.
  const key = await deriveKey('passwd', Buffer.from('salt'), 1);
  assert.equal(key.toString('hex'), '55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc');
});

test('a blob in the vault format opens to GCM test case 14', () => {
  // McGrew–Viega test case 14: AES-256, zero key, zero IV, one zero block, no AAD.
  const blob = Buffer.concat([
    Buffer.from([1]),
    Buffer.alloc(12),
    Buffer.from('cea7403d4d606b6e074ec5d3baf39d18', 'hex'),
    Buffer.from('d0d1c8a799996bf0265b98b5d48ab919', 'hex'),
  ]);
  assert.deepEqual(Buffer.from(Vault.fromKey(Buffer.alloc(32)).open(blob, '')), Buffer.alloc(16));
});

test('a blob opens only under its key and label, and unaltered', async () => {
  const vault = await Vault.derive('a long passphrase', Buffer.alloc(32, 7), MIN_ITERATIONS);
  const blob = vault.seal(Buffer.from('private key'), 'one-time-prekey:7');
  assert.equal(Buffer.from(vault.open(blob, 'one-time-prekey:7')).toString(), 'private key');
  assert.throws(() => vault.open(blob, 'one-time-prekey:8'), VaultError);
  const other = await Vault.derive('another passphrase', Buffer.alloc(32, 7), MIN_ITERATIONS);
  assert.throws(() => other.open(blob, 'one-time-prekey:7'), VaultError);
  blob[20] ^= 1;
  assert.throws(() => vault.open(blob, 'one-time-prekey:7'), VaultError);
  await assert.rejects(Vault.derive('x', Buffer.alloc(32), MIN_ITERATIONS - 1), VaultError);
});
