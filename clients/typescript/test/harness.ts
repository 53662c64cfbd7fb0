/**
 * What every test needs: the key server under test (started by the Rust test
 * `server/tests/typescript.rs`, which passes its address and token secret) and devices made of
 * a libsignal identity, in-memory stores, a vault and a token bound to the device.
 */
import { randomBytes, randomInt, randomUUID } from 'node:crypto';

import { IdentityKeyPair, ProtocolAddress } from '@signalapp/libsignal-client';

import {
  connect,
  dottedAddressing,
  type Keyserver,
  type KeyPolicy,
  KeyserverDevice,
  KeyserverSessionStore,
  MemoryDeviceStore,
  mintToken,
  Vault,
} from '../src/index.js';

/** An environment variable the Rust test sets. */
export function required(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === '') {
    throw new Error(
      `${name} is not set: these tests run against a real key server; ` +
        '`cargo test -p keyserver --test typescript` starts one and runs them',
    );
  }
  return value;
}

export const SERVER_URL = required('KEYSERVER_URL');
export const SECRET = required('KEYSERVER_TOKEN_SECRET');

/** A libsignal device of a user: its identity and stores, and its key loop and sessions. */
export class TestDevice {
  readonly deviceId: string;
  readonly address: ProtocolAddress;
  readonly keyserver: Keyserver;
  readonly device: KeyserverDevice;
  readonly sessions: KeyserverSessionStore;

  constructor(
    readonly userId: string,
    readonly number: number,
    readonly store: MemoryDeviceStore,
    readonly vault: Vault,
    token: string,
    policy: Partial<KeyPolicy> = {},
  ) {
    this.deviceId = `${userId}.${number}`;
    this.address = dottedAddressing.toProtocolAddress({ userId, deviceId: this.deviceId });
    this.keyserver = connect({ url: SERVER_URL, token });
    this.device = new KeyserverDevice({ keyserver: this.keyserver, deviceId: this.deviceId, store, vault, policy });
    this.sessions = new KeyserverSessionStore(this.keyserver, this.deviceId, vault);
  }

  /** A new device (user `userId`, or a new user) with a fresh identity. */
  static async create(options: { userId?: string; number?: number; policy?: Partial<KeyPolicy> } = {}): Promise<TestDevice> {
    const userId = options.userId ?? randomUUID();
    const number = options.number ?? 1;
    const store = new MemoryDeviceStore(IdentityKeyPair.generate(), randomInt(1, 16_384));
    return TestDevice.over(userId, number, store, Vault.fromKey(randomBytes(32)), options.policy);
  }

  /** The same device over the given stores and vault (a restart, a restore, another policy). */
  static async over(userId: string, number: number, store: MemoryDeviceStore, vault: Vault, policy: Partial<KeyPolicy> = {}): Promise<TestDevice> {
    const token = await mintToken(SECRET, { user: userId, device: `${userId}.${number}` });
    return new TestDevice(userId, number, store, vault, token, policy);
  }
}
