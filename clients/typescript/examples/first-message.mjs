// A first PQXDH message through the key server, with the official libsignal client: Bob's
// device registers its keys, Alice's device fetches Bob's bundle, starts a session and
// encrypts; Bob's device reads the message. Both devices live in this one program here; in a
// chat app each runs on its own phone or laptop and the ciphertext travels over the chat
// backend.
//
//   KEYSERVER_URL=http://127.0.0.1:50051 KEYSERVER_TOKEN_SECRET=… node examples/first-message.mjs
import { randomBytes, randomInt, randomUUID } from 'node:crypto';

import * as libsignal from '@signalapp/libsignal-client';
import {
  connect, fetchBundles, KeyserverDevice, KeyserverSessionStore, MemoryDeviceStore, mintToken, Vault,
} from '@keyserver/client';

const url = process.env.KEYSERVER_URL ?? 'http://127.0.0.1:50051';
const secret = process.env.KEYSERVER_TOKEN_SECRET;

/** One device: libsignal identity and stores, a vault for its private keys, a bound token. */
async function device(userId) {
  const deviceId = `${userId}.1`;
  // The chat backend mints this when the device logs in; here the program holds the secret.
  const keyserver = connect({ url, token: await mintToken(secret, { user: userId, device: deviceId }) });
  const store = new MemoryDeviceStore(libsignal.IdentityKeyPair.generate(), randomInt(1, 16384));
  const vault = Vault.fromKey(randomBytes(32)); // keep this key in the platform's keychain
  return {
    keyserver,
    store,
    address: libsignal.ProtocolAddress.new(userId, 1),
    keys: new KeyserverDevice({ keyserver, deviceId, store, vault }),
    sessions: new KeyserverSessionStore(keyserver, deviceId, vault),
  };
}

const bobId = randomUUID();
const bob = await device(bobId);
const alice = await device(randomUUID());
await bob.keys.register(); // identity, signed prekey, last-resort Kyber prekey, 100 + 100 one-time keys
await alice.keys.register();

// Alice: fetch Bob's bundle, start the session, encrypt.
const [bundle] = await fetchBundles(alice.keyserver, { userId: bobId });
await alice.sessions.startSession(bundle, alice.address, alice.store.identity);
const message = await libsignal.signalEncrypt(
  Buffer.from('hello Bob'), bundle.address, alice.address, alice.sessions, alice.store.identity);
console.log(`Alice sent a ${message.type() === libsignal.CiphertextMessageType.PreKey ? 'PreKey' : 'other'} message of ${message.serialize().length} bytes`);

// Bob: read it with the one-time keys the server handed Alice.
const plaintext = await libsignal.signalDecryptPreKey(
  libsignal.PreKeySignalMessage.deserialize(message.serialize()), alice.address, bob.address,
  bob.sessions, bob.store.identity, bob.store.preKeys, bob.store.signedPreKeys, bob.store.kyberPreKeys);
console.log(`Bob read: ${Buffer.from(plaintext).toString()}`);

// Each device tops up and rotates its keys on a timer; once is enough here.
console.log('Bob maintain:', JSON.stringify(await bob.keys.maintain()));
