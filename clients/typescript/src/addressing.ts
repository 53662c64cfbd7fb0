/**
 * Key-server device ids are strings of the chat backend's choosing; libsignal addresses a device
 * by a name and a number from 1 to 127. An `Addressing` maps one onto the other, both ways, so
 * bundles and sessions land at the address libsignal uses for that device.
 */
import { ProtocolAddress } from '@signalapp/libsignal-client';

/** One device as the key server names it. */
export interface DeviceRef {
  userId: string;
  deviceId: string;
}

/** How a backend's device ids map to libsignal addresses. */
export interface Addressing {
  toProtocolAddress(device: DeviceRef): ProtocolAddress;
  fromProtocolAddress(address: ProtocolAddress): DeviceRef;
}

/**
 * Device ids of the form `<user id>.<n>`, n from 1 to 127, at libsignal address
 * (user id, n): the scheme a backend gets by registering each device of a user as `user.1`,
 * `user.2`, …
 */
export const dottedAddressing: Addressing = {
  toProtocolAddress({ userId, deviceId }) {
    const prefix = `${userId}.`;
    const n = deviceId.startsWith(prefix) ? Number(deviceId.slice(prefix.length)) : NaN;
    if (!Number.isInteger(n) || n < 1 || n > 127) {
      throw new Error(
        `device id "${deviceId}" is not "${prefix}<1 to 127>"; pass an Addressing that maps this backend's device ids to libsignal device numbers`,
      );
    }
    return ProtocolAddress.new(userId, n);
  },
  fromProtocolAddress(address) {
    return { userId: address.name(), deviceId: `${address.name()}.${address.deviceId()}` };
  },
};
