/**
 * Over TLS: a second server on the same database (started by `server/tests/typescript.rs` with
 * a self-signed certificate) is reached only when the client is given the CA that signed it.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { ConnectError } from '@connectrpc/connect';

import { connect, fetchBundles, mintToken } from '../src/index.js';
import { required, SECRET, TestDevice } from './harness.js';

const TLS_URL = required('KEYSERVER_TLS_URL');
const CA = readFileSync(required('KEYSERVER_TLS_CA'));

test('over https a bundle is fetched with the CA given, and an untrusted certificate is refused', async () => {
  assert.match(TLS_URL, /^https:\/\//);
  const bob = await TestDevice.create();
  await bob.device.register();
  const token = await mintToken(SECRET, { user: crypto.randomUUID() });

  const trusted = connect({ url: TLS_URL, token, caCert: CA });
  const bundles = await fetchBundles(trusted, { userId: bob.userId });
  assert.deepEqual(
    bundles.map((b) => [b.deviceId, b.withOneTimePreKey]),
    [[bob.deviceId, true]],
  );
  const identity = await bob.store.identity.getIdentityKey();
  assert.deepEqual(bundles[0].bundle.identityKey().serialize(), identity.getPublicKey().serialize());

  // Without the CA, Node's default trust store does not know the certificate: no call goes out.
  const untrusted = connect({ url: TLS_URL, token });
  await assert.rejects(fetchBundles(untrusted, { userId: bob.userId }), (error) => {
    const why = ConnectError.from(error);
    assert.match(why.message, /self[- ]signed certificate|unable to verify/i, why.message);
    return true;
  });
});
