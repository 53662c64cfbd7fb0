/**
 * What a device keeps on its own side: libsignal's stores (identity, prekeys, signed prekeys,
 * Kyber prekeys) and the bookkeeping of the key loop (next key ids, which signed and
 * last-resort keys it still holds and since when). An application backs these with its own
 * storage; `MemoryDeviceStore` keeps them in memory, for tests and short-lived tools.
 */
import {
  IdentityChange,
  IdentityKeyPair,
  IdentityKeyStore,
  KyberPreKeyRecord,
  KyberPreKeyStore,
  PreKeyRecord,
  PreKeyStore,
  PrivateKey,
  ProtocolAddress,
  PublicKey,
  SignedPreKeyRecord,
  SignedPreKeyStore,
} from '@signalapp/libsignal-client';

/** A key the device holds and when it made it (milliseconds since the epoch). */
export interface HeldKey {
  id: number;
  createdAt: number;
}

/** The key loop's bookkeeping; saved after every change, before keys leave the device. */
export interface KeyState {
  nextPreKeyId: number;
  nextKyberPreKeyId: number;
  nextSignedPreKeyId: number;
  /** Signed prekeys still held, oldest first; the last one is active. */
  signedPreKeys: HeldKey[];
  /** Last-resort Kyber prekeys still held, oldest first; the last one is active. */
  lastResortKyberPreKeys: HeldKey[];
}

/** A device's own storage, as the key loop and libsignal use it. */
export interface DeviceStore {
  identity: IdentityKeyStore;
  preKeys: PreKeyStore;
  signedPreKeys: SignedPreKeyStore & { removeSignedPreKey(id: number): Promise<void> };
  kyberPreKeys: KyberPreKeyStore & { removeKyberPreKey(id: number): Promise<void> };
  loadKeyState(): Promise<KeyState | null>;
  saveKeyState(state: KeyState): Promise<void>;
}

/** Every store in memory. Peers' identity keys are trusted on first use. */
export class MemoryDeviceStore implements DeviceStore {
  readonly identity: IdentityKeyStore;
  readonly preKeys: PreKeyStore;
  readonly signedPreKeys: DeviceStore['signedPreKeys'];
  readonly kyberPreKeys: DeviceStore['kyberPreKeys'];
  private keyState: KeyState | null = null;

  constructor(identity: IdentityKeyPair, registrationId: number) {
    this.identity = new MemoryIdentityStore(identity, registrationId);
    this.preKeys = new MemoryPreKeyStore();
    this.signedPreKeys = new MemorySignedPreKeyStore();
    this.kyberPreKeys = new MemoryKyberPreKeyStore(
      (id) => this.keyState?.lastResortKyberPreKeys.some((key) => key.id === id) ?? false,
    );
  }

  async loadKeyState(): Promise<KeyState | null> {
    return this.keyState === null ? null : structuredClone(this.keyState);
  }

  async saveKeyState(state: KeyState): Promise<void> {
    this.keyState = structuredClone(state);
  }
}

class MemoryIdentityStore extends IdentityKeyStore {
  private readonly peers = new Map<string, PublicKey>();

  constructor(
    private readonly pair: IdentityKeyPair,
    private readonly registrationId: number,
  ) {
    super();
  }

  async getIdentityKey(): Promise<PrivateKey> {
    return this.pair.privateKey;
  }

  async getLocalRegistrationId(): Promise<number> {
    return this.registrationId;
  }

  async saveIdentity(address: ProtocolAddress, key: PublicKey): Promise<IdentityChange> {
    const known = this.peers.get(address.name());
    this.peers.set(address.name(), key);
    return known !== undefined && !known.equals(key) ? IdentityChange.ReplacedExisting : IdentityChange.NewOrUnchanged;
  }

  async isTrustedIdentity(address: ProtocolAddress, key: PublicKey): Promise<boolean> {
    const known = this.peers.get(address.name());
    return known === undefined || known.equals(key);
  }

  async getIdentity(address: ProtocolAddress): Promise<PublicKey | null> {
    return this.peers.get(address.name()) ?? null;
  }
}

/** A record by id, or an error naming what is missing (libsignal's stores throw likewise). */
function held<T>(records: Map<number, T>, id: number, what: string): T {
  const record = records.get(id);
  if (record === undefined) throw new Error(`no ${what} ${id} on this device`);
  return record;
}

class MemoryPreKeyStore extends PreKeyStore {
  private readonly records = new Map<number, PreKeyRecord>();
  async savePreKey(id: number, record: PreKeyRecord): Promise<void> {
    this.records.set(id, record);
  }
  async getPreKey(id: number): Promise<PreKeyRecord> {
    return held(this.records, id, 'one-time prekey');
  }
  async removePreKey(id: number): Promise<void> {
    this.records.delete(id);
  }
}

class MemorySignedPreKeyStore extends SignedPreKeyStore {
  private readonly records = new Map<number, SignedPreKeyRecord>();
  async saveSignedPreKey(id: number, record: SignedPreKeyRecord): Promise<void> {
    this.records.set(id, record);
  }
  async getSignedPreKey(id: number): Promise<SignedPreKeyRecord> {
    return held(this.records, id, 'signed prekey');
  }
  async removeSignedPreKey(id: number): Promise<void> {
    this.records.delete(id);
  }
}

class MemoryKyberPreKeyStore extends KyberPreKeyStore {
  private readonly records = new Map<number, KyberPreKeyRecord>();
  private readonly lastResortUses = new Set<string>();
  constructor(private readonly lastResort: (id: number) => boolean) {
    super();
  }
  async saveKyberPreKey(id: number, record: KyberPreKeyRecord): Promise<void> {
    this.records.set(id, record);
  }
  async getKyberPreKey(id: number): Promise<KyberPreKeyRecord> {
    return held(this.records, id, 'Kyber prekey');
  }
  async markKyberPreKeyUsed(id: number, signedPreKeyId: number, baseKey: PublicKey): Promise<void> {
    // One-time keys go after one use. The server serves a device's last-resort key only once
    // its one-time ones are gone, and libsignal asks to mark it too: it stays, but the same
    // (key, signed prekey, base key) must not start a session twice, or a replayed first
    // message would.
    if (!this.lastResort(id)) {
      this.records.delete(id);
      return;
    }
    const use = `${id}/${signedPreKeyId}/${Buffer.from(baseKey.serialize()).toString('hex')}`;
    if (this.lastResortUses.has(use)) throw new Error(`a replayed first message on last-resort Kyber prekey ${id}`);
    this.lastResortUses.add(use);
  }
  async removeKyberPreKey(id: number): Promise<void> {
    this.records.delete(id);
  }
}
