// The official libsignal client (@signalapp/libsignal-client, pinned in package.json) against a
// real keyserver over gRPC, with proto/ loaded as it is. Devices register keys libsignal made,
// fetch each other's bundles (one device, all devices, bulk), and start PQXDH sessions from
// them with libsignal's own session setup: messages encrypted with signalEncrypt must decrypt
// with signalDecryptPreKey on the other side, and replies must come back. Then: one-time Kyber
// prekeys run out and the last-resort key keeps sessions starting; tampered Kyber signatures
// are refused on upload (and by libsignal in a bundle); a keyctl-registered device's bundle is
// accepted by libsignal. Prints the counts as one JSON line; exits non-zero on any error.
//
// Environment (set by server/tests/libsignal.rs): KEYSERVER_ADDR (host:port), INTEROP_USERS
// (JSON [{"user", "tokens": {device id: token}}]), INTEROP_KEYCTL (JSON {"user", "device_id"}), PROTO_ROOT.

import { createCipheriv, randomBytes, randomInt } from 'node:crypto';
import assert from 'node:assert/strict';
import * as S from '@signalapp/libsignal-client';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const ADDR = process.env.KEYSERVER_ADDR;
const USERS = JSON.parse(process.env.INTEROP_USERS);
const KEYCTL = JSON.parse(process.env.INTEROP_KEYCTL);
const PROTO_ROOT = process.env.PROTO_ROOT;

const definition = protoLoader.loadSync('keyserver/v1/key_service.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const KeyService = grpc.loadPackageDefinition(definition).keyserver.v1.KeyService;
const service = new KeyService(ADDR, grpc.credentials.createInsecure());

/** One RPC with the caller's bearer token; rejects with the gRPC status. */
function rpc(method, request, token) {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return new Promise((resolve, reject) =>
    service[method](request, metadata, (error, response) => (error ? reject(error) : resolve(response))));
}

/** Runs `call`, which must fail with gRPC `code` and a message starting with `prefix`. */
async function refused(call, code, prefix) {
  try {
    await call();
  } catch (error) {
    assert.equal(error.code, code, `${error.code} ${error.details}`);
    assert.ok(error.details.startsWith(prefix), `"${error.details}" should start with "${prefix}"`);
    return;
  }
  assert.fail(`the call should have failed with ${prefix}`);
}

const counts = {
  devices_registered: 0,
  bundles_accepted: 0,
  sessions_started: 0,
  sessions_with_one_time_kyber_prekey: 0,
  sessions_with_last_resort_kyber_prekey: 0,
  messages_exchanged: 0,
  refused_tampered_uploads: 0,
  refused_tampered_bundles: 0,
  keyctl_bundles_accepted: 0,
};

/** A real client would seal private keys under a key of its own; so does this one. */
function seal(key, bytes) {
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  return Buffer.concat([Buffer.from([1]), nonce, cipher.update(bytes), cipher.final(), cipher.getAuthTag()]);
}

const LAST_RESORT_ID = 0xF0_0000;

/** One libsignal install: its identity, prekeys and sessions, in libsignal's store interfaces. */
class Device {
  constructor(user, tokens, deviceNumber) {
    this.user = user;
    // Device ids are unique across all users on the keyserver; libsignal's are 1..127 per user.
    this.deviceId = `${user}.${deviceNumber}`;
    // The token the chat backend gave this device: bound to it, so it may change it.
    this.token = tokens[this.deviceId];
    this.address = S.ProtocolAddress.new(user, deviceNumber);
    this.identity = S.IdentityKeyPair.generate();
    this.registrationId = randomInt(1, 16384);
    this.sealKey = randomBytes(32);
    this.sessions = new Map();
    this.identities = new Map();
    this.preKeys = new Map();
    this.signedPreKeys = new Map();
    this.kyberPreKeys = new Map();
    this.usedLastResort = new Set();
    const device = this;
    this.sessionStore = new (class extends S.SessionStore {
      async saveSession(address, record) { device.sessions.set(address.toString(), record.serialize()); }
      async getSession(address) {
        const bytes = device.sessions.get(address.toString());
        return bytes ? S.SessionRecord.deserialize(bytes) : null;
      }
      async getExistingSessions(addresses) {
        return addresses.map((a) => {
          const bytes = device.sessions.get(a.toString());
          assert.ok(bytes, `no session with ${a.toString()}`);
          return S.SessionRecord.deserialize(bytes);
        });
      }
    })();
    this.identityStore = new (class extends S.IdentityKeyStore {
      async getIdentityKey() { return device.identity.privateKey; }
      async getLocalRegistrationId() { return device.registrationId; }
      async saveIdentity(address, key) {
        const known = device.identities.get(address.name());
        device.identities.set(address.name(), key.serialize());
        return known && !Buffer.from(known).equals(Buffer.from(key.serialize()))
          ? S.IdentityChange.ReplacedExisting : S.IdentityChange.NewOrUnchanged;
      }
      async isTrustedIdentity() { return true; }
      async getIdentity(address) {
        const bytes = device.identities.get(address.name());
        return bytes ? S.PublicKey.deserialize(bytes) : null;
      }
    })();
    this.preKeyStore = new (class extends S.PreKeyStore {
      async savePreKey(id, record) { device.preKeys.set(id, record); }
      async getPreKey(id) { return device.preKeys.get(id); }
      async removePreKey(id) { device.preKeys.delete(id); }
    })();
    this.signedPreKeyStore = new (class extends S.SignedPreKeyStore {
      async saveSignedPreKey(id, record) { device.signedPreKeys.set(id, record); }
      async getSignedPreKey(id) { return device.signedPreKeys.get(id); }
    })();
    this.kyberPreKeyStore = new (class extends S.KyberPreKeyStore {
      async saveKyberPreKey(id, record) { device.kyberPreKeys.set(id, record); }
      async getKyberPreKey(id) { return device.kyberPreKeys.get(id); }
      async markKyberPreKeyUsed(id, signedPreKeyId, baseKey) {
        if (id === LAST_RESORT_ID) {
          // A last-resort key stays; a replayed (key, base key) pair must not start twice.
          const use = `${id}/${signedPreKeyId}/${Buffer.from(baseKey.serialize()).toString('hex')}`;
          assert.ok(!device.usedLastResort.has(use), 'a last-resort PreKey message replayed');
          device.usedLastResort.add(use);
        } else {
          device.kyberPreKeys.delete(id);
        }
      }
    })();
  }

  signedPreKey(id) {
    const key = S.PrivateKey.generate();
    const signature = this.identity.privateKey.sign(key.getPublicKey().serialize());
    this.signedPreKeys.set(id, S.SignedPreKeyRecord.new(id, Date.now(), key.getPublicKey(), key, signature));
    return {
      key_id: id,
      public_key: Buffer.from(key.getPublicKey().serialize()),
      signature: Buffer.from(signature),
      encrypted_private_key: seal(this.sealKey, key.serialize()),
    };
  }

  oneTimePreKey(id) {
    const key = S.PrivateKey.generate();
    this.preKeys.set(id, S.PreKeyRecord.new(id, key.getPublicKey(), key));
    return {
      key_id: id,
      public_key: Buffer.from(key.getPublicKey().serialize()),
      encrypted_private_key: seal(this.sealKey, key.serialize()),
    };
  }

  kyberPreKey(id) {
    const pair = S.KEMKeyPair.generate();
    const publicKey = pair.getPublicKey().serialize();
    const signature = this.identity.privateKey.sign(publicKey);
    this.kyberPreKeys.set(id, S.KyberPreKeyRecord.new(id, Date.now(), pair, signature));
    return {
      key_id: id,
      public_key: Buffer.from(publicKey),
      signature: Buffer.from(signature),
      encrypted_private_key: seal(this.sealKey, pair.getSecretKey().serialize()),
    };
  }

  async register(oneTime, kyberOneTime) {
    const response = await rpc('RegisterDevice', {
      device_id: this.deviceId,
      registration_id: this.registrationId,
      identity_key: Buffer.from(this.identity.publicKey.serialize()),
      encrypted_identity_private_key: seal(this.sealKey, this.identity.privateKey.serialize()),
      signed_prekey: this.signedPreKey(1),
      one_time_prekeys: Array.from({ length: oneTime }, (_, i) => this.oneTimePreKey(i + 1)),
      kyber_last_resort_prekey: this.kyberPreKey(LAST_RESORT_ID),
      kyber_one_time_prekeys: Array.from({ length: kyberOneTime }, (_, i) => this.kyberPreKey(i + 1)),
    }, this.token);
    assert.equal(response.outcome, 'REGISTRATION_OUTCOME_CREATED');
    assert.equal(response.one_time_prekeys_available, oneTime);
    assert.equal(response.kyber_one_time_prekeys_available, kyberOneTime);
    counts.devices_registered += 1;
  }
}

/** libsignal's PreKeyBundle from one of ours; throws where libsignal refuses it. */
function toLibsignal(bundle, deviceNumber) {
  const otk = bundle.one_time_prekey;
  const spk = bundle.signed_prekey;
  const kyber = bundle.kyber_prekey;
  assert.ok(kyber, `device ${bundle.device_id} came without a Kyber prekey`);
  assert.equal(kyber.public_key.length, 1569);
  return S.PreKeyBundle.new(
    bundle.registration_id,
    deviceNumber,
    otk ? otk.key_id : null,
    otk ? S.PublicKey.deserialize(otk.public_key) : null,
    spk.key_id,
    S.PublicKey.deserialize(spk.public_key),
    spk.signature,
    S.PublicKey.deserialize(bundle.identity_key),
    kyber.key_id,
    S.KEMPublicKey.deserialize(kyber.public_key),
    kyber.signature,
  );
}

const devices = new Map();

/** `from` starts a session with the device a bundle is of, sends, and gets a reply back. */
async function startSession(from, bundle) {
  const to = devices.get(bundle.device_id);
  assert.ok(to, `a bundle of an unknown device ${bundle.device_id}`);
  const deviceNumber = Number(bundle.device_id.split('.').pop());
  const libsignalBundle = toLibsignal(bundle, deviceNumber);
  counts.bundles_accepted += 1;
  await S.processPreKeyBundle(libsignalBundle, to.address, from.address, from.sessionStore, from.identityStore);

  const hello = Buffer.from(`hello ${to.deviceId} from ${from.deviceId}`);
  const sent = await S.signalEncrypt(hello, to.address, from.address, from.sessionStore, from.identityStore);
  assert.equal(sent.type(), S.CiphertextMessageType.PreKey);
  const received = await S.signalDecryptPreKey(
    S.PreKeySignalMessage.deserialize(sent.serialize()),
    from.address, to.address,
    to.sessionStore, to.identityStore, to.preKeyStore, to.signedPreKeyStore, to.kyberPreKeyStore,
  );
  assert.deepEqual(Buffer.from(received), hello);

  const reply = Buffer.from(`reply to ${from.deviceId}`);
  const answer = await S.signalEncrypt(reply, from.address, to.address, to.sessionStore, to.identityStore);
  assert.equal(answer.type(), S.CiphertextMessageType.Whisper);
  const back = await S.signalDecrypt(
    S.SignalMessage.deserialize(answer.serialize()), to.address, from.address, from.sessionStore, from.identityStore,
  );
  assert.deepEqual(Buffer.from(back), reply);

  counts.sessions_started += 1;
  counts.messages_exchanged += 2;
  if (bundle.kyber_prekey.key_id === LAST_RESORT_ID) {
    counts.sessions_with_last_resort_kyber_prekey += 1;
  } else {
    counts.sessions_with_one_time_kyber_prekey += 1;
  }
}

const target = (device, all = false) =>
  (all ? { user_id: device.user } : { user_id: device.user, device_id: device.deviceId });

async function main() {
  // Five libsignal devices of four users: Alice has two.
  assert.ok(USERS.length >= 4);
  const [alice, bob, carol, dave] = USERS;
  const roster = [
    new Device(alice.user, alice.tokens, 1),
    new Device(alice.user, alice.tokens, 2),
    new Device(bob.user, bob.tokens, 1),
    new Device(carol.user, carol.tokens, 1),
    new Device(dave.user, dave.tokens, 1),
  ];
  const KYBER_ONE_TIME = 3;
  for (const device of roster) {
    devices.set(device.deviceId, device);
    await device.register(5, KYBER_ONE_TIME);
  }
  const [alice1, alice2, bobPhone, carolPhone, davePhone] = roster;

  // One device: Bob fetches Alice's first device.
  const one = await rpc('FetchPreKeyBundle', { target: target(alice1) }, bobPhone.token);
  assert.equal(one.devices.length, 1);
  await startSession(bobPhone, one.devices[0]);

  // All devices: Carol fetches both of Alice's.
  const all = await rpc('FetchPreKeyBundle', { target: target(alice1, true) }, carolPhone.token);
  assert.deepEqual(all.devices.map((d) => d.device_id).sort(), [alice1.deviceId, alice2.deviceId].sort());
  for (const bundle of all.devices) await startSession(carolPhone, bundle);

  // Bulk: Dave fetches Alice (all devices), Bob and Carol in one call.
  const bulk = await rpc('FetchPreKeyBundles', {
    targets: [target(alice1, true), target(bobPhone), target(carolPhone)],
  }, davePhone.token);
  assert.equal(bulk.results.length, 3);
  for (const result of bulk.results) {
    assert.equal(result.status, 'TARGET_STATUS_FOUND');
    for (const bundle of result.devices) await startSession(davePhone, bundle);
  }

  // Bob's one-time Kyber prekeys run out (Dave took one): the last-resort key is served, to
  // every fetcher, and sessions still start from it.
  const servedKyber = new Set();
  let lastResort = 0;
  for (const fetcher of [alice1, alice2, carolPhone, davePhone, alice1, carolPhone]) {
    const answer = await rpc('FetchPreKeyBundle', { target: target(bobPhone) }, fetcher.token);
    const kyberId = answer.devices[0].kyber_prekey.key_id;
    if (kyberId === LAST_RESORT_ID) {
      lastResort += 1;
    } else {
      assert.ok(!servedKyber.has(kyberId), `one-time Kyber prekey ${kyberId} served twice`);
      servedKyber.add(kyberId);
    }
    await startSession(fetcher, answer.devices[0]);
  }
  assert.equal(servedKyber.size, KYBER_ONE_TIME - 1, 'the one-time Kyber prekeys Dave left');
  assert.equal(lastResort, 6 - servedKyber.size);
  const status = await rpc('GetKeyStatus', { device_id: bobPhone.deviceId }, bobPhone.token);
  assert.equal(status.kyber_one_time_prekeys_available, 0);
  assert.equal(status.kyber_last_resort_prekey_id, LAST_RESORT_ID);
  assert.equal(status.kyber_replenish_recommended, true);

  // Replenished, one-time Kyber prekeys are served again, oldest first.
  const upload = await rpc('UploadKyberPreKeys', {
    device_id: bobPhone.deviceId,
    kyber_one_time_prekeys: [bobPhone.kyberPreKey(100), bobPhone.kyberPreKey(101)],
  }, bobPhone.token);
  assert.deepEqual(upload.stored_key_ids, [100, 101]);
  const refilled = await rpc('FetchPreKeyBundle', { target: target(bobPhone) }, alice2.token);
  assert.equal(refilled.devices[0].kyber_prekey.key_id, 100);
  await startSession(alice2, refilled.devices[0]);

  // A tampered Kyber signature is refused on upload, and nothing is stored.
  const tampered = bobPhone.kyberPreKey(200);
  tampered.signature[5] ^= 1;
  await refused(() => rpc('UploadKyberPreKeys', {
    device_id: bobPhone.deviceId, kyber_one_time_prekeys: [tampered],
  }, bobPhone.token), grpc.status.INVALID_ARGUMENT, 'kyber_one_time_prekeys[0].signature: does not verify');
  counts.refused_tampered_uploads += 1;
  const lastResortTampered = bobPhone.kyberPreKey(201);
  lastResortTampered.signature[60] ^= 0x40;
  await refused(() => rpc('RotateKyberLastResortPreKey', {
    device_id: bobPhone.deviceId, kyber_last_resort_prekey: lastResortTampered,
  }, bobPhone.token), grpc.status.INVALID_ARGUMENT, 'kyber_last_resort_prekey.signature: does not verify');
  counts.refused_tampered_uploads += 1;
  // A Kyber key signed by another identity key is refused as well.
  const foreign = carolPhone.kyberPreKey(202);
  await refused(() => rpc('UploadKyberPreKeys', {
    device_id: bobPhone.deviceId, kyber_one_time_prekeys: [foreign],
  }, bobPhone.token), grpc.status.INVALID_ARGUMENT, 'kyber_one_time_prekeys[0].signature: does not verify');
  counts.refused_tampered_uploads += 1;
  const after = await rpc('GetKeyStatus', { device_id: bobPhone.deviceId }, bobPhone.token);
  assert.equal(after.kyber_one_time_prekeys_available, 1);

  // And libsignal itself refuses a bundle whose Kyber signature was altered in transit, so the
  // acceptance above means something.
  const altered = await rpc('FetchPreKeyBundle', { target: target(carolPhone) }, bobPhone.token);
  altered.devices[0].kyber_prekey.signature[7] ^= 1;
  await assert.rejects(() => S.processPreKeyBundle(
    toLibsignal(altered.devices[0], 1), carolPhone.address, bobPhone.address, bobPhone.sessionStore, bobPhone.identityStore,
  ), 'libsignal must refuse a bad Kyber signature');
  counts.refused_tampered_bundles += 1;

  // A keyctl-registered device: libsignal accepts its bundle (Kyber key and both signatures)
  // and can encrypt to it.
  const keyctl = await rpc('FetchPreKeyBundle', {
    target: { user_id: KEYCTL.user, device_id: KEYCTL.device_id },
  }, davePhone.token);
  const keyctlAddress = S.ProtocolAddress.new(KEYCTL.user, 1);
  await S.processPreKeyBundle(
    toLibsignal(keyctl.devices[0], 1), keyctlAddress, davePhone.address, davePhone.sessionStore, davePhone.identityStore,
  );
  const toKeyctl = await S.signalEncrypt(Buffer.from('hello keyctl'), keyctlAddress, davePhone.address,
    davePhone.sessionStore, davePhone.identityStore);
  assert.equal(toKeyctl.type(), S.CiphertextMessageType.PreKey);
  counts.keyctl_bundles_accepted += 1;

  console.log(JSON.stringify(counts));
}

main().then(
  () => { service.close(); },
  (error) => {
    console.error('libsignal interop failed:', error);
    process.exit(1);
  },
);
