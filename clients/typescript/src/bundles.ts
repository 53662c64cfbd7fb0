/**
 * Fetching prekey bundles and handing them to libsignal: each of the server's bundles becomes
 * a libsignal `PreKeyBundle` at the address the `Addressing` gives its device, ready for
 * `processPreKeyBundle`. A fetch takes one-time keys, so a retry after a lost answer carries
 * the same idempotency key and gets the same keys back instead of burning more.
 */
import { randomUUID } from 'node:crypto';

import { Code, ConnectError } from '@connectrpc/connect';
import { KEMPublicKey, PreKeyBundle, ProtocolAddress, PublicKey } from '@signalapp/libsignal-client';

import { type Addressing, type DeviceRef, dottedAddressing } from './addressing.js';
import type { Keyserver } from './connection.js';
import { type DevicePreKeyBundle, TargetStatus } from './gen/keyserver/v1/key_service_pb.js';

/** Whose bundles: every device of a user, or one. */
export interface Target {
  userId: string;
  deviceId?: string;
}

/** One device's bundle, as libsignal takes it. */
export interface PeerBundle extends DeviceRef {
  address: ProtocolAddress;
  bundle: PreKeyBundle;
  /** True when the server handed out a one-time EC prekey with it. */
  withOneTimePreKey: boolean;
  /** True when the device's signed prekey is past the server's staleness age. */
  staleSignedPreKey: boolean;
}

/** What a bulk fetch found for one target. */
export interface TargetBundles {
  target: Target;
  /** False when the user (or the named device) is unknown to the server. */
  found: boolean;
  bundles: PeerBundle[];
}

/** Options of a fetch. */
export interface FetchOptions {
  addressing?: Addressing;
}

/** Waits before the second and third attempt of a call whose answer may have been lost. */
const LOST_ANSWER_RETRIES_MS = [250, 1000];

/**
 * The bundles of one user's devices (or one device). NOT_FOUND (a ConnectError) when the user
 * or device is unknown; a device without a Kyber prekey (an X3DH-only device) is refused with
 * an error, as current libsignal would refuse it.
 */
export async function fetchBundles(keyserver: Keyserver, target: Target, options: FetchOptions = {}): Promise<PeerBundle[]> {
  const idempotencyKey = randomUUID();
  const answer = await retryingLostAnswers(() =>
    keyserver.keys.fetchPreKeyBundle({ target: toTarget(target), idempotencyKey }),
  );
  return answer.devices.map((device) => toPeerBundle(target.userId, device, options.addressing ?? dottedAddressing));
}

/** Several users' bundles in one call (at most 100 targets, the server's limit). */
export async function fetchBundlesBulk(keyserver: Keyserver, targets: Target[], options: FetchOptions = {}): Promise<TargetBundles[]> {
  const idempotencyKey = randomUUID();
  const answer = await retryingLostAnswers(() =>
    keyserver.keys.fetchPreKeyBundles({ targets: targets.map(toTarget), idempotencyKey }),
  );
  const addressing = options.addressing ?? dottedAddressing;
  // The server answers targets in the order asked.
  return answer.results.map((result, i) => ({
    target: targets[i],
    found: result.status === TargetStatus.FOUND,
    bundles: result.devices.map((device) => toPeerBundle(targets[i].userId, device, addressing)),
  }));
}

/** libsignal's `PreKeyBundle` for a bundle the server sent, at libsignal device `deviceNumber`. */
export function toPreKeyBundle(device: DevicePreKeyBundle, deviceNumber: number): PreKeyBundle {
  const signed = device.signedPrekey;
  const kyber = device.kyberPrekey;
  if (signed === undefined) throw new Error(`the bundle of device ${device.deviceId} has no signed prekey`);
  if (kyber === undefined) {
    throw new Error(
      `device ${device.deviceId} has no Kyber prekey (an X3DH-only device): libsignal starts PQXDH sessions only`,
    );
  }
  const oneTime = device.oneTimePrekey;
  return PreKeyBundle.new(
    device.registrationId,
    deviceNumber,
    oneTime?.keyId ?? null,
    oneTime === undefined ? null : PublicKey.deserialize(bytes(oneTime.publicKey)),
    signed.keyId,
    PublicKey.deserialize(bytes(signed.publicKey)),
    bytes(signed.signature),
    PublicKey.deserialize(bytes(device.identityKey)),
    kyber.keyId,
    KEMPublicKey.deserialize(bytes(kyber.publicKey)),
    bytes(kyber.signature),
  );
}

function toPeerBundle(userId: string, device: DevicePreKeyBundle, addressing: Addressing): PeerBundle {
  const address = addressing.toProtocolAddress({ userId, deviceId: device.deviceId });
  return {
    userId,
    deviceId: device.deviceId,
    address,
    bundle: toPreKeyBundle(device, address.deviceId()),
    withOneTimePreKey: device.oneTimePrekey !== undefined,
    staleSignedPreKey: device.signedPrekey?.stale ?? false,
  };
}

function toTarget(target: Target) {
  return { userId: target.userId, deviceId: target.deviceId };
}

/** A copy libsignal takes (it wants bytes over a plain ArrayBuffer). */
function bytes(view: Uint8Array): Uint8Array<ArrayBuffer> {
  return new Uint8Array(view);
}

/** Runs `call` again, up to twice, while its answer may have been lost on the way. */
export async function retryingLostAnswers<T>(call: () => Promise<T>): Promise<T> {
  for (const wait of LOST_ANSWER_RETRIES_MS) {
    try {
      return await call();
    } catch (error) {
      if (!answerMayBeLost(error)) throw error;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }
  return call();
}

function answerMayBeLost(error: unknown): boolean {
  const code = ConnectError.from(error).code;
  return code === Code.Unavailable || code === Code.DeadlineExceeded || code === Code.Unknown;
}
