//! The numbers server and client must agree on: id ranges, batch sizes and the thresholds at
//! which a device tops up its keys (what Signal's clients and server use).

/// Prekey ids (one-time, signed and Kyber) are below 2^24, as Signal clients keep them.
pub const MAX_KEY_ID: u32 = 0xFF_FFFF;
/// libsignal's registration ids are 14 bits, 1 to 16383.
pub const MAX_REGISTRATION_ID: u32 = 0x3FFF;
/// Most one-time prekeys (EC or Kyber) in one upload: Signal-Server's cap.
pub const MAX_ONE_TIME_PREKEYS: usize = 100;
/// One-time prekeys of each kind a device keeps on the server (Signal's batch size).
pub const ONE_TIME_PREKEY_TARGET: u32 = 100;
/// Below this many one-time prekeys of a kind on the server, a device should upload more.
pub const REPLENISH_BELOW: u32 = 10;
