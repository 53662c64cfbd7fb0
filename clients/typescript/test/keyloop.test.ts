/**
 * The key loop and sessions against a real key server, with libsignal on both ends: every
 * bundle is turned into a libsignal PreKeyBundle and every session is started and answered by
 * libsignal's own code.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Code, ConnectError } from '@connectrpc/connect';
import {
  CiphertextMessageType,
  PreKeySignalMessage,
  signalDecrypt,
  signalDecryptPreKey,
  signalEncrypt,
  SignalMessage,
} from '@signalapp/libsignal-client';

import {
  connect,
  fetchBundles,
  fetchBundlesBulk,
  KeyserverSessionStore,
  MemoryDeviceStore,
  mintToken,
  type PeerBundle,
  proto,
  SessionConflictError,
} from '../src/index.js';
import { SECRET, SERVER_URL, TestDevice } from './harness.js';

/** `from` sends a first (PreKey) message from `bundle`; `to` must read it. Returns its text. */
async function firstMessage(from: TestDevice, to: TestDevice, bundle: PeerBundle, text: string): Promise<string> {
  await from.sessions.startSession(bundle, from.address, from.store.identity);
  const sent = await signalEncrypt(Buffer.from(text), to.address, from.address, from.sessions, from.store.identity);
  assert.equal(sent.type(), CiphertextMessageType.PreKey);
  const read = await signalDecryptPreKey(
    PreKeySignalMessage.deserialize(sent.serialize()),
    from.address,
    to.address,
    to.sessions,
    to.store.identity,
    to.store.preKeys,
    to.store.signedPreKeys,
    to.store.kyberPreKeys,
  );
  return Buffer.from(read).toString();
}

/** A user's connection that has fetched nothing yet (fetches are rate-limited per requester). */
async function fetcher() {
  return connect({ url: SERVER_URL, token: await mintToken(SECRET, { user: crypto.randomUUID() }) });
}

/** A registered device: peers need one to store their sessions. */
async function registered(options: Parameters<typeof TestDevice.create>[0] = {}): Promise<TestDevice> {
  const device = await TestDevice.create(options);
  await device.device.register();
  return device;
}

async function status(device: TestDevice) {
  return device.keyserver.keys.getKeyStatus({ deviceId: device.deviceId });
}

test('a registered device is fetched as a libsignal bundle, answers a PQXDH first message, and its sessions live on the server', async () => {
  const bob = await TestDevice.create();
  const alice = await TestDevice.create();
  const registered = await bob.device.register();
  assert.equal(registered.outcome, proto.RegistrationOutcome.CREATED);
  assert.equal(registered.oneTimePrekeysAvailable, 100);
  assert.equal(registered.kyberOneTimePrekeysAvailable, 100);
  await alice.device.register();

  const bundles = await fetchBundles(alice.keyserver, { userId: bob.userId });
  assert.equal(bundles.length, 1);
  assert.equal(bundles[0].deviceId, bob.deviceId);
  assert.ok(bundles[0].withOneTimePreKey);
  const oneTimeId = bundles[0].bundle.preKeyId();
  assert.ok(oneTimeId !== null);
  await bob.store.preKeys.getPreKey(oneTimeId); // Bob holds the key he was fetched with.

  assert.equal(await firstMessage(alice, bob, bundles[0], 'hello Bob'), 'hello Bob');
  // libsignal used up the one-time keys on Bob's side, and the server handed them out once.
  await assert.rejects(bob.store.preKeys.getPreKey(oneTimeId), /no one-time prekey/);
  const after = await status(bob);
  assert.equal(after.oneTimePrekeysAvailable, 99);
  assert.equal(after.kyberOneTimePrekeysAvailable, 99);

  // Bob answers; Alice reads it through a new session store (a restarted client), which finds
  // the session sealed on the server.
  const reply = await signalEncrypt(Buffer.from('hello Alice'), alice.address, bob.address, bob.sessions, bob.store.identity);
  assert.equal(reply.type(), CiphertextMessageType.Whisper);
  const restarted = new KeyserverSessionStore(alice.keyserver, alice.deviceId, alice.vault);
  const read = await signalDecrypt(SignalMessage.deserialize(reply.serialize()), bob.address, alice.address, restarted, alice.store.identity);
  assert.equal(Buffer.from(read).toString(), 'hello Alice');

  const stored = await alice.keyserver.sessions.getSession({
    key: { deviceId: alice.deviceId, peerUserId: bob.userId, peerDeviceId: bob.deviceId },
  });
  assert.equal(stored.session?.isInitiator, true);
  assert.ok(stored.session !== undefined && stored.session.version >= 2n);
  const bobs = await bob.keyserver.sessions.getSession({
    key: { deviceId: bob.deviceId, peerUserId: alice.userId, peerDeviceId: alice.deviceId },
  });
  assert.equal(bobs.session?.isInitiator, false);
  // The server holds sealed state only: the vault's label binds it to the peer.
  assert.equal(bobs.session?.state[0], 1);
});

test('a session written by another client of the same device since it was read is a conflict, not an overwrite', async () => {
  const bob = await TestDevice.create();
  const alice = await TestDevice.create();
  await bob.device.register();
  await alice.device.register();
  const [bundle] = await fetchBundles(alice.keyserver, { userId: bob.userId });
  await alice.sessions.startSession(bundle, alice.address, alice.store.identity);

  // A second client of Alice's device reads the session, then the first one moves it on.
  const second = new KeyserverSessionStore(alice.keyserver, alice.deviceId, alice.vault);
  const record = await second.getSession(bob.address);
  assert.ok(record !== null);
  await signalEncrypt(Buffer.from('one'), bob.address, alice.address, alice.sessions, alice.store.identity);
  await assert.rejects(second.saveSession(bob.address, record), SessionConflictError);
  // Read again, it writes.
  const fresh = await second.getSession(bob.address);
  assert.ok(fresh !== null);
  await second.saveSession(bob.address, fresh);

  await assert.rejects(alice.sessions.destroySession(bob.address), SessionConflictError);
  await second.destroySession(bob.address);
  assert.equal(await new KeyserverSessionStore(alice.keyserver, alice.deviceId, alice.vault).getSession(bob.address), null);
});

test('maintain tops up drained keys, rotates due keys and keeps replaced ones only for the keep time', async () => {
  const policy = { oneTimePreKeys: 20, kyberPreKeys: 20 };
  const bob = await TestDevice.create({ policy });
  const carol = await registered();
  await bob.device.register();

  // Nothing is due on a fresh device.
  assert.deepEqual(await bob.device.maintain(), {
    oneTimePreKeysUploaded: 0,
    kyberPreKeysUploaded: 0,
    signedPreKeyRotated: false,
    lastResortKyberPreKeyRotated: false,
    replacedKeysRemoved: 0,
    drainSuspected: false,
  });

  // Carol takes 15 of each kind: below the threshold of 10, Bob tops up to 20 again.
  for (let i = 0; i < 15; i++) await fetchBundles(await fetcher(), { userId: bob.userId });
  const drained = await status(bob);
  assert.equal(drained.oneTimePrekeysAvailable, 5);
  assert.equal(drained.kyberOneTimePrekeysAvailable, 5);
  const topped = await bob.device.maintain();
  assert.equal(topped.oneTimePreKeysUploaded, 15);
  assert.equal(topped.kyberPreKeysUploaded, 15);
  const full = await status(bob);
  assert.equal(full.oneTimePrekeysAvailable, 20);
  assert.equal(full.kyberOneTimePrekeysAvailable, 20);

  // A bundle fetched before the rotation, used after it (a late first message).
  const [early] = await fetchBundles(carol.keyserver, { userId: bob.userId });
  const rotating = await TestDevice.over(bob.userId, 1, bob.store, bob.vault, { ...policy, rotateAfterMs: 0 });
  const rotated = await rotating.device.maintain();
  assert.equal(rotated.signedPreKeyRotated, true);
  assert.equal(rotated.lastResortKyberPreKeyRotated, true);
  const now = await status(bob);
  assert.notEqual(now.activeSignedPrekeyId, early.bundle.signedPreKeyId());
  const state = await bob.store.loadKeyState();
  assert.equal(state?.signedPreKeys.length, 2);
  assert.equal(state?.signedPreKeys[1].id, now.activeSignedPrekeyId);
  assert.equal(state?.lastResortKyberPreKeys[1].id, now.kyberLastResortPrekeyId);
  assert.equal(await firstMessage(carol, bob, early, 'late but readable'), 'late but readable');

  // Past the keep time the replaced keys go, and a first message to them cannot be read.
  const [stale] = await fetchBundles(await fetcher(), { userId: bob.userId });
  const dave = await registered();
  const forgetting = await TestDevice.over(bob.userId, 1, bob.store, bob.vault, { ...policy, keepReplacedMs: 0 });
  await forgetting.device.rotateSignedPreKey();
  // Two replaced signed prekeys and one replaced last-resort key; the active ones stay.
  assert.equal((await forgetting.device.maintain()).replacedKeysRemoved, 3);
  const kept = await bob.store.loadKeyState();
  assert.deepEqual([kept?.signedPreKeys.length, kept?.lastResortKyberPreKeys.length], [1, 1]);
  await assert.rejects(firstMessage(dave, bob, stale, 'too late'), /signed prekey/);
});

test('a restored device withdraws the one-time keys it cannot answer, and peers reach it', async () => {
  const erin = await TestDevice.create({ policy: { oneTimePreKeys: 30, kyberPreKeys: 30 } });
  await erin.device.register();
  await fetchBundles(await fetcher(), { userId: erin.userId }); // one key of each kind handed out

  // The backup held the identity and registration id; every prekey and the key state are gone.
  const backup = {
    identity: await erin.store.identity.getIdentityKeyPair(),
    registrationId: await erin.store.identity.getLocalRegistrationId(),
  };
  const restored = await TestDevice.over(
    erin.userId,
    1,
    new MemoryDeviceStore(backup.identity, backup.registrationId),
    erin.vault,
    { oneTimePreKeys: 30, kyberPreKeys: 30 },
  );
  const answer = await restored.device.register({ replaceOneTimePreKeys: true });
  assert.equal(answer.outcome, proto.RegistrationOutcome.UPDATED);
  assert.equal(answer.oneTimePrekeysWithdrawn, 29);
  assert.equal(answer.kyberOneTimePrekeysWithdrawn, 29);
  assert.equal(answer.oneTimePrekeysAvailable, 30);
  assert.equal(answer.kyberOneTimePrekeysAvailable, 30);

  // Every key a peer can now get is one the restored device holds.
  for (let i = 0; i < 3; i++) {
    const peer = await registered();
    const [bundle] = await fetchBundles(peer.keyserver, { userId: erin.userId });
    assert.equal(await firstMessage(peer, restored, bundle, `hello ${i}`), `hello ${i}`);
  }
});

test('bulk fetches say which targets were found, and refusals are gRPC statuses', async () => {
  const grace = await TestDevice.create();
  const heidi = await TestDevice.create();
  await grace.device.register();
  await heidi.device.register();
  const unknown = crypto.randomUUID();
  const results = await fetchBundlesBulk(grace.keyserver, [{ userId: heidi.userId }, { userId: unknown }]);
  assert.deepEqual(
    results.map((r) => [r.target.userId, r.found, r.bundles.length]),
    [
      [heidi.userId, true, 1],
      [unknown, false, 0],
    ],
  );
  await assert.rejects(fetchBundles(grace.keyserver, { userId: unknown }), (error) => ConnectError.from(error).code === Code.NotFound);

  // A token signed with another secret is refused; one bound to another device may not
  // change this one.
  const forged = connect({ url: SERVER_URL, token: await mintToken('not the server secret, 32+ bytes long', { user: grace.userId }) });
  await assert.rejects(forged.keys.getKeyStatus({ deviceId: grace.deviceId }), (error) => ConnectError.from(error).code === Code.Unauthenticated);
  const other = connect({ url: SERVER_URL, token: await mintToken(SECRET, { user: grace.userId, device: `${grace.userId}.2` }) });
  await assert.rejects(
    other.keys.rotateSignedPreKey({ deviceId: grace.deviceId }),
    (error) => ConnectError.from(error).code === Code.PermissionDenied,
  );
});
