//! The events the key server writes to `nchat_e2ee_audit_log`.
//!
//! Each is written in the same transaction as the change it records. Metadata carries counts,
//! key ids and outcomes only: never key material, encrypted blobs or tokens.

/// An `event_type` the schema's check constraint allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    /// A user stored their master-key record.
    MasterKeyCreated,
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
    /// A user verified a peer's safety number.
    SafetyNumberVerified,
    /// A safety number changed because an identity key did.
    SafetyNumberChanged,
    /// A recovery code restored a device.
    RecoveryCodeUsed,
}

impl AuditEvent {
    /// Every event type, as the schema lists them.
    pub const ALL: [AuditEvent; 9] = [
        Self::MasterKeyCreated,
        Self::DeviceKeysGenerated,
        Self::SessionEstablished,
        Self::SessionDestroyed,
        Self::SignedPrekeyRotated,
        Self::PrekeysReplenished,
        Self::SafetyNumberVerified,
        Self::SafetyNumberChanged,
        Self::RecoveryCodeUsed,
    ];

    /// The event type stored as `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// The stored `event_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MasterKeyCreated => "master_key_created",
            Self::DeviceKeysGenerated => "device_keys_generated",
            Self::PrekeysReplenished => "prekeys_replenished",
            Self::SignedPrekeyRotated => "signed_prekey_rotated",
            Self::SessionEstablished => "session_established",
            Self::SessionDestroyed => "session_destroyed",
            Self::SafetyNumberVerified => "safety_number_verified",
            Self::SafetyNumberChanged => "safety_number_changed",
            Self::RecoveryCodeUsed => "recovery_code_used",
        }
    }
}
