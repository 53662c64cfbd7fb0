/**
 * libsignal's session store, kept on the key server's SessionService: each session record is
 * sealed by the device's vault before it leaves the device, and every write is a
 * compare-and-swap on the version the device last saw, so a second client of the same device
 * (or a stale copy) can never overwrite newer ratchet state. It does: `SessionConflictError`.
 */
import { Code, ConnectError } from '@connectrpc/connect';
import {
  type IdentityKeyStore,
  processPreKeyBundle,
  ProtocolAddress,
  SessionRecord,
  SessionStore,
} from '@signalapp/libsignal-client';

import { type Addressing, type DeviceRef, dottedAddressing } from './addressing.js';
import type { PeerBundle } from './bundles.js';
import type { Keyserver } from './connection.js';
import type { Session } from './gen/keyserver/v1/session_service_pb.js';
import { labels, type Vault } from './vault.js';

/** Another writer changed the session since this store last read it; read it again. */
export class SessionConflictError extends Error {}

export class KeyserverSessionStore extends SessionStore {
  /**
   * What this store last read or wrote of each session: its version (0: none stored), the
   * compare-and-swap token of the next write, and whether this device started it.
   */
  private readonly seen = new Map<string, { version: bigint; isInitiator: boolean }>();
  /** Sessions `startSession` is setting up: the first save marks them as this device's. */
  private readonly starting = new Set<string>();

  constructor(
    private readonly keyserver: Keyserver,
    /** The caller's own device, whose sessions these are. */
    private readonly deviceId: string,
    private readonly vault: Vault,
    private readonly addressing: Addressing = dottedAddressing,
  ) {
    super();
  }

  async getSession(address: ProtocolAddress): Promise<SessionRecord | null> {
    const peer = this.addressing.fromProtocolAddress(address);
    const session = await this.read(peer);
    if (session === undefined || !session.active) return null;
    return SessionRecord.deserialize(this.vault.open(session.state, labels.session(peer.userId, peer.deviceId)));
  }

  async saveSession(address: ProtocolAddress, record: SessionRecord): Promise<void> {
    const peer = this.addressing.fromProtocolAddress(address);
    const { version, isInitiator: wasInitiator } = await this.lastSeen(peer);
    const isInitiator = wasInitiator || this.starting.has(cacheKey(peer));
    try {
      const saved = await this.keyserver.sessions.putSession({
        key: this.key(peer),
        state: this.vault.seal(record.serialize(), labels.session(peer.userId, peer.deviceId)),
        isInitiator,
        expectedVersion: version,
      });
      this.seen.set(cacheKey(peer), { version: saved.version, isInitiator });
    } catch (error) {
      throw this.conflict(error, peer);
    }
  }

  async getExistingSessions(addresses: ProtocolAddress[]): Promise<SessionRecord[]> {
    const records = [];
    for (const address of addresses) {
      const record = await this.getSession(address);
      if (record === null) throw new Error(`no session with ${address.toString()}`);
      records.push(record);
    }
    return records;
  }

  /**
   * Starts a session from a fetched bundle with libsignal's `processPreKeyBundle`, stored as
   * one this device started; the next `signalEncrypt` to `peer.address` makes the first
   * (PreKey) message.
   */
  async startSession(peer: PeerBundle, localAddress: ProtocolAddress, identityStore: IdentityKeyStore): Promise<void> {
    this.starting.add(cacheKey(peer));
    try {
      await processPreKeyBundle(peer.bundle, peer.address, localAddress, this, identityStore);
    } finally {
      this.starting.delete(cacheKey(peer));
    }
  }

  /** Ends the session with a peer device: its state is wiped on the server. */
  async destroySession(address: ProtocolAddress): Promise<void> {
    const peer = this.addressing.fromProtocolAddress(address);
    const { version, isInitiator } = await this.lastSeen(peer);
    try {
      const destroyed = await this.keyserver.sessions.destroySession({ key: this.key(peer), expectedVersion: version });
      this.seen.set(cacheKey(peer), { version: destroyed.version, isInitiator });
    } catch (error) {
      throw this.conflict(error, peer);
    }
  }

  /** Records that a message went over the session with a peer device now. */
  async touchSession(address: ProtocolAddress): Promise<void> {
    await this.keyserver.sessions.touchSession({ key: this.key(this.addressing.fromProtocolAddress(address)) });
  }

  /** What this store last saw of a session, read from the server when it has seen nothing. */
  private async lastSeen(peer: DeviceRef): Promise<{ version: bigint; isInitiator: boolean }> {
    const known = this.seen.get(cacheKey(peer));
    if (known !== undefined) return known;
    await this.read(peer);
    return this.seen.get(cacheKey(peer)) ?? { version: 0n, isInitiator: false };
  }

  /** The stored session (undefined when there is none), noting its version. */
  private async read(peer: DeviceRef): Promise<Session | undefined> {
    let session: Session | undefined;
    try {
      session = (await this.keyserver.sessions.getSession({ key: this.key(peer) })).session;
    } catch (error) {
      if (ConnectError.from(error).code !== Code.NotFound) throw error;
    }
    this.seen.set(cacheKey(peer), { version: session?.version ?? 0n, isInitiator: session?.isInitiator ?? false });
    return session;
  }

  /** A compare-and-swap refusal (ABORTED) as a `SessionConflictError`; other errors as they are. */
  private conflict(error: unknown, peer: DeviceRef): unknown {
    if (ConnectError.from(error).code !== Code.Aborted) return error;
    this.seen.delete(cacheKey(peer));
    return new SessionConflictError(
      `the session with ${peer.deviceId} was changed by another client of device ${this.deviceId}; read it again`,
    );
  }

  private key(peer: DeviceRef) {
    return { deviceId: this.deviceId, peerUserId: peer.userId, peerDeviceId: peer.deviceId };
  }
}

function cacheKey(peer: DeviceRef): string {
  return `${peer.userId}\u0000${peer.deviceId}`;
}
