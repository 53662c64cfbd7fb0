/**
 * The device-side key loop on top of libsignal: register a device from its libsignal identity,
 * keep its one-time EC and Kyber prekeys topped up, rotate its signed and last-resort Kyber
 * prekeys on schedule and forget old ones once late messages can no longer need them.
 *
 * Every key is made by libsignal and saved in the device's own stores (so libsignal finds it
 * when a peer's first message arrives) before its public half goes to the server, with its
 * private half sealed by the device's vault. Key ids are reserved in the saved `KeyState` before
 * any key leaves the device, so a crash can never reuse one.
 */
import { randomInt } from 'node:crypto';

import {
  KEMKeyPair,
  KyberPreKeyRecord,
  PreKeyRecord,
  PrivateKey,
  SignedPreKeyRecord,
} from '@signalapp/libsignal-client';

import type { Keyserver } from './connection.js';
import type { MessageInitShape } from '@bufbuild/protobuf';

import type {
  GetKeyStatusResponse,
  KyberPreKeyUploadSchema,
  OneTimePreKeyUploadSchema,
  RegisterDeviceResponse,
  SignedPreKeyUploadSchema,
} from './gen/keyserver/v1/key_service_pb.js';
import type { DeviceStore, HeldKey, KeyState } from './store.js';
import { labels, type Vault } from './vault.js';

/** Prekey ids are below 2^24, as Signal clients keep them (the server refuses larger ones). */
const MAX_KEY_ID = 0xff_ffff;
/** Most one-time keys of one kind the server takes in one upload. */
const MAX_UPLOAD = 100;
const DAY_MS = 24 * 60 * 60 * 1000;

/** How many keys a device keeps on the server and how long it keeps its own. */
export interface KeyPolicy {
  /** One-time EC prekeys to keep on the server (default 100). */
  oneTimePreKeys: number;
  /** One-time Kyber prekeys to keep on the server (default 100). */
  kyberPreKeys: number;
  /** Top up when fewer than this many of a kind are left (default 10). */
  replenishBelow: number;
  /** Rotate the signed and last-resort Kyber prekeys when older than this (default 7 days). */
  rotateAfterMs: number;
  /** Keep replaced signed and last-resort keys this long for late messages (default 30 days). */
  keepReplacedMs: number;
}

export const DEFAULT_POLICY: KeyPolicy = {
  oneTimePreKeys: 100,
  kyberPreKeys: 100,
  replenishBelow: 10,
  rotateAfterMs: 7 * DAY_MS,
  keepReplacedMs: 30 * DAY_MS,
};

/** What one `maintain()` did. */
export interface MaintenanceReport {
  oneTimePreKeysUploaded: number;
  kyberPreKeysUploaded: number;
  signedPreKeyRotated: boolean;
  lastResortKyberPreKeyRotated: boolean;
  /** Replaced signed and last-resort keys forgotten, past `keepReplacedMs`. */
  replacedKeysRemoved: number;
  /** The server's drain warning: someone may be using up this device's one-time keys. */
  drainSuspected: boolean;
}

export interface DeviceOptions {
  keyserver: Keyserver;
  /** The key server's device id (the token must be bound to it). */
  deviceId: string;
  store: DeviceStore;
  /** Seals the private keys the server keeps a copy of. */
  vault: Vault;
  policy?: Partial<KeyPolicy>;
}

/** One device's keys on one key server. */
export class KeyserverDevice {
  readonly deviceId: string;
  readonly policy: KeyPolicy;
  private readonly keyserver: Keyserver;
  private readonly store: DeviceStore;
  private readonly vault: Vault;

  constructor(options: DeviceOptions) {
    this.keyserver = options.keyserver;
    this.deviceId = options.deviceId;
    this.store = options.store;
    this.vault = options.vault;
    this.policy = { ...DEFAULT_POLICY, ...options.policy };
    if (this.policy.oneTimePreKeys > MAX_UPLOAD || this.policy.kyberPreKeys > MAX_UPLOAD) {
      throw new Error(`a device keeps at most ${MAX_UPLOAD} one-time keys of each kind on the server`);
    }
  }

  /**
   * Registers the device with its libsignal identity, a signed prekey, a last-resort Kyber
   * prekey and the policy's one-time keys of both kinds. Again with the same identity it
   * installs the new keys as rotations and uploads would. `replaceOneTimePreKeys`: a device
   * restored from a backup, which holds none of its earlier one-time private keys, has every
   * unused one-time key on the server withdrawn in the same transaction, so no peer gets a key
   * it cannot answer.
   */
  async register(options: { replaceOneTimePreKeys?: boolean } = {}): Promise<RegisterDeviceResponse> {
    const identity = await this.store.identity.getIdentityKeyPair();
    const registrationId = await this.store.identity.getLocalRegistrationId();
    const state = await this.keyState();
    const signedId = reserve(state, 'nextSignedPreKeyId', 1)[0];
    const lastResortId = reserve(state, 'nextKyberPreKeyId', 1)[0];
    const oneTimeIds = reserve(state, 'nextPreKeyId', this.policy.oneTimePreKeys);
    const kyberIds = reserve(state, 'nextKyberPreKeyId', this.policy.kyberPreKeys);
    const now = Date.now();
    state.signedPreKeys.push({ id: signedId, createdAt: now });
    state.lastResortKyberPreKeys.push({ id: lastResortId, createdAt: now });
    await this.store.saveKeyState(state);

    const response = await this.keyserver.keys.registerDevice({
      deviceId: this.deviceId,
      registrationId,
      identityKey: identity.publicKey.serialize(),
      encryptedIdentityPrivateKey: this.vault.seal(identity.privateKey.serialize(), labels.identity(this.deviceId)),
      signedPrekey: await this.signedPreKey(signedId, now),
      kyberLastResortPrekey: await this.kyberPreKey(lastResortId, now),
      oneTimePrekeys: await Promise.all(oneTimeIds.map((id) => this.oneTimePreKey(id))),
      kyberOneTimePrekeys: await Promise.all(kyberIds.map((id) => this.kyberPreKey(id, now))),
      replaceOneTimePrekeys: options.replaceOneTimePreKeys ?? false,
    });
    this.deviceIdMustMatch(response.deviceId);
    return response;
  }

  /**
   * One round of upkeep, for a timer or app start: reads the device's key status from the
   * server, tops up whichever one-time keys run low (or were drained), rotates the signed and
   * last-resort Kyber prekeys when they are due, and forgets replaced ones past their keep time.
   */
  async maintain(): Promise<MaintenanceReport> {
    const status = await this.keyserver.keys.getKeyStatus({ deviceId: this.deviceId });
    const report: MaintenanceReport = {
      oneTimePreKeysUploaded: 0,
      kyberPreKeysUploaded: 0,
      signedPreKeyRotated: false,
      lastResortKyberPreKeyRotated: false,
      replacedKeysRemoved: 0,
      drainSuspected: status.drainSuspected,
    };
    const missingOneTime = this.missing(status.oneTimePrekeysAvailable, this.policy.oneTimePreKeys, status.drainSuspected);
    if (missingOneTime > 0) report.oneTimePreKeysUploaded = await this.uploadOneTimePreKeys(missingOneTime);
    if (status.kyberLastResortPrekeyId !== undefined) {
      const missingKyber = this.missing(status.kyberOneTimePrekeysAvailable, this.policy.kyberPreKeys, status.drainSuspected);
      if (missingKyber > 0) report.kyberPreKeysUploaded = await this.uploadKyberPreKeys(missingKyber);
    }
    if (this.signedPreKeyDue(status)) report.signedPreKeyRotated = await this.rotateSignedPreKey();
    if (this.lastResortDue(status)) report.lastResortKyberPreKeyRotated = await this.rotateLastResortKyberPreKey();
    report.replacedKeysRemoved = await this.forgetReplacedKeys();
    return report;
  }

  /** Uploads `count` new one-time EC prekeys; answers how many the server stored. */
  async uploadOneTimePreKeys(count: number): Promise<number> {
    let stored = 0;
    for (const batch of batches(count)) {
      const state = await this.keyState();
      const ids = reserve(state, 'nextPreKeyId', batch);
      await this.store.saveKeyState(state);
      const answer = await this.keyserver.keys.uploadOneTimePreKeys({
        deviceId: this.deviceId,
        oneTimePrekeys: await Promise.all(ids.map((id) => this.oneTimePreKey(id))),
      });
      // Ids the server handed out before (a key state restored from an old backup) can
      // never be served again: their new private keys are of no use.
      for (const id of answer.refusedConsumedKeyIds) await this.store.preKeys.removePreKey(id);
      stored += answer.storedKeyIds.length;
    }
    return stored;
  }

  /** Uploads `count` new one-time Kyber prekeys; answers how many the server stored. */
  async uploadKyberPreKeys(count: number): Promise<number> {
    let stored = 0;
    for (const batch of batches(count)) {
      const state = await this.keyState();
      const ids = reserve(state, 'nextKyberPreKeyId', batch);
      await this.store.saveKeyState(state);
      const now = Date.now();
      const answer = await this.keyserver.keys.uploadKyberPreKeys({
        deviceId: this.deviceId,
        kyberOneTimePrekeys: await Promise.all(ids.map((id) => this.kyberPreKey(id, now))),
      });
      for (const id of answer.refusedConsumedKeyIds) await this.store.kyberPreKeys.removeKyberPreKey(id);
      stored += answer.storedKeyIds.length;
    }
    return stored;
  }

  /** Installs a new signed prekey; the replaced one stays on the device for late messages. */
  async rotateSignedPreKey(): Promise<boolean> {
    const state = await this.keyState();
    const id = reserve(state, 'nextSignedPreKeyId', 1)[0];
    const now = Date.now();
    state.signedPreKeys.push({ id, createdAt: now });
    await this.store.saveKeyState(state);
    const answer = await this.keyserver.keys.rotateSignedPreKey({
      deviceId: this.deviceId,
      signedPrekey: await this.signedPreKey(id, now),
    });
    return answer.rotated;
  }

  /** Installs a new last-resort Kyber prekey; the replaced one stays for late messages. */
  async rotateLastResortKyberPreKey(): Promise<boolean> {
    const state = await this.keyState();
    const id = reserve(state, 'nextKyberPreKeyId', 1)[0];
    const now = Date.now();
    state.lastResortKyberPreKeys.push({ id, createdAt: now });
    await this.store.saveKeyState(state);
    const answer = await this.keyserver.keys.rotateKyberLastResortPreKey({
      deviceId: this.deviceId,
      kyberLastResortPrekey: await this.kyberPreKey(id, now),
    });
    return answer.rotated;
  }

  /** How many keys to upload: up to the target when below the threshold, or when drained. */
  private missing(available: number, target: number, drained: boolean): number {
    return available < this.policy.replenishBelow || (drained && available < target) ? target - available : 0;
  }

  private signedPreKeyDue(status: GetKeyStatusResponse): boolean {
    return (
      status.activeSignedPrekeyId === undefined ||
      Number(status.activeSignedPrekeyAgeSeconds) * 1000 >= this.policy.rotateAfterMs ||
      // The server's rotation age may be shorter than ours; it flags the signed prekey
      // by `rotation_due` without `kyber_rotation_due`.
      (status.rotationDue && !status.kyberRotationDue)
    );
  }

  private lastResortDue(status: GetKeyStatusResponse): boolean {
    return (
      status.kyberLastResortPrekeyId === undefined ||
      Number(status.kyberLastResortPrekeyAgeSeconds) * 1000 >= this.policy.rotateAfterMs ||
      status.kyberRotationDue
    );
  }

  /** Forgets replaced keys older than the keep time; the active (last) one always stays. */
  private async forgetReplacedKeys(): Promise<number> {
    const state = await this.keyState();
    const cutoff = Date.now() - this.policy.keepReplacedMs;
    const expired = (keys: HeldKey[]) => keys.slice(0, -1).filter((key) => key.createdAt <= cutoff);
    const signed = expired(state.signedPreKeys);
    const lastResort = expired(state.lastResortKyberPreKeys);
    if (signed.length + lastResort.length === 0) return 0;
    state.signedPreKeys = state.signedPreKeys.filter((key) => !signed.includes(key));
    state.lastResortKyberPreKeys = state.lastResortKyberPreKeys.filter((key) => !lastResort.includes(key));
    await this.store.saveKeyState(state);
    for (const key of signed) await this.store.signedPreKeys.removeSignedPreKey(key.id);
    for (const key of lastResort) await this.store.kyberPreKeys.removeKyberPreKey(key.id);
    return signed.length + lastResort.length;
  }

  /**
   * The saved key state, or a new one whose counters start at random ids, as Signal's clients
   * start theirs: a device restored without its key state then rarely reuses an id its
   * earlier self had (the server refuses ids it has handed out, or withdrawn).
   */
  private async keyState(): Promise<KeyState> {
    return (
      (await this.store.loadKeyState()) ?? {
        nextPreKeyId: randomInt(1, MAX_KEY_ID),
        nextKyberPreKeyId: randomInt(1, MAX_KEY_ID),
        nextSignedPreKeyId: randomInt(1, MAX_KEY_ID),
        signedPreKeys: [],
        lastResortKyberPreKeys: [],
      }
    );
  }

  private deviceIdMustMatch(answered: string): void {
    if (answered !== this.deviceId) {
      throw new Error(`the server registered device "${answered}", not "${this.deviceId}"`);
    }
  }

  private async signedPreKey(id: number, now: number): Promise<MessageInitShape<typeof SignedPreKeyUploadSchema>> {
    const identity = await this.store.identity.getIdentityKey();
    const key = PrivateKey.generate();
    const publicKey = key.getPublicKey().serialize();
    const signature = identity.sign(publicKey);
    await this.store.signedPreKeys.saveSignedPreKey(id, SignedPreKeyRecord.new(id, now, key.getPublicKey(), key, signature));
    return {
      keyId: id,
      publicKey,
      signature,
      encryptedPrivateKey: this.vault.seal(key.serialize(), labels.signedPreKey(id)),
    };
  }

  private async oneTimePreKey(id: number): Promise<MessageInitShape<typeof OneTimePreKeyUploadSchema>> {
    const key = PrivateKey.generate();
    await this.store.preKeys.savePreKey(id, PreKeyRecord.new(id, key.getPublicKey(), key));
    return {
      keyId: id,
      publicKey: key.getPublicKey().serialize(),
      encryptedPrivateKey: this.vault.seal(key.serialize(), labels.oneTimePreKey(id)),
    };
  }

  private async kyberPreKey(id: number, now: number): Promise<MessageInitShape<typeof KyberPreKeyUploadSchema>> {
    const identity = await this.store.identity.getIdentityKey();
    const pair = KEMKeyPair.generate();
    const publicKey = pair.getPublicKey().serialize();
    const signature = identity.sign(publicKey);
    await this.store.kyberPreKeys.saveKyberPreKey(id, KyberPreKeyRecord.new(id, now, pair, signature));
    return {
      keyId: id,
      publicKey,
      signature,
      encryptedPrivateKey: this.vault.seal(pair.getSecretKey().serialize(), labels.kyberPreKey(id)),
    };
  }
}

/** Takes `count` ids from one of the state's counters, wrapping below 2^24 and skipping 0. */
function reserve(state: KeyState, counter: 'nextPreKeyId' | 'nextKyberPreKeyId' | 'nextSignedPreKeyId', count: number): number[] {
  const ids: number[] = [];
  for (let i = 0; i < count; i++) {
    const id = state[counter];
    ids.push(id);
    state[counter] = id >= MAX_KEY_ID ? 1 : id + 1;
  }
  return ids;
}

/** `count` split into uploads of at most MAX_UPLOAD. */
function batches(count: number): number[] {
  const sizes: number[] = [];
  for (let left = count; left > 0; left -= MAX_UPLOAD) sizes.push(Math.min(left, MAX_UPLOAD));
  return sizes;
}
