//! The events the key server writes to `nchat_e2ee_audit_log`.
//!
//! Each is written in the same transaction as the change it records. Metadata carries counts,
//! key ids and outcomes only: never key material, encrypted blobs or tokens.

/// An `event_type` the schema's check constraint allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    /// A device registered or re-registered its keys.
    DeviceKeysGenerated,
    /// A device uploaded one-time prekeys.
    PrekeysReplenished,
    /// A device installed a new signed prekey.
    SignedPrekeyRotated,
    /// A device stored a session with a peer device for the first time (or again after
    /// destroying it).
    SessionEstablished,
    /// A device destroyed a session.
    SessionDestroyed,
}

impl AuditEvent {
    /// The stored `event_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceKeysGenerated => "device_keys_generated",
            Self::PrekeysReplenished => "prekeys_replenished",
            Self::SignedPrekeyRotated => "signed_prekey_rotated",
            Self::SessionEstablished => "session_established",
            Self::SessionDestroyed => "session_destroyed",
        }
    }
}
