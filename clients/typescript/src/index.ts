/**
 * keyserver's TypeScript client: typed gRPC calls generated from the server's `proto/`
 * (`connect`), tokens as a chat backend mints them (`mintToken`), and the device side of
 * Signal's key handling on top of the official libsignal client: the key loop
 * (`KeyserverDevice`), bundles as libsignal takes them (`fetchBundles`), and sessions kept
 * sealed on the server (`KeyserverSessionStore`).
 */
export { type Addressing, type DeviceRef, dottedAddressing } from './addressing.js';
export {
  fetchBundles,
  fetchBundlesBulk,
  type FetchOptions,
  type PeerBundle,
  type Target,
  type TargetBundles,
  toPreKeyBundle,
} from './bundles.js';
export { connect, type ConnectOptions, type Keyserver } from './connection.js';
export {
  DEFAULT_POLICY,
  type DeviceOptions,
  type KeyPolicy,
  KeyserverDevice,
  type MaintenanceReport,
} from './device.js';
export { KeyserverSessionStore, SessionConflictError } from './sessions.js';
export { type DeviceStore, type HeldKey, type KeyState, MemoryDeviceStore } from './store.js';
export { mintToken, type TokenClaims } from './token.js';
export { DEFAULT_ITERATIONS, labels, MIN_ITERATIONS, Vault, VaultError } from './vault.js';
export * as proto from './generated.js';
