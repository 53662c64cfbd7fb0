//! The gRPC edge: request validation, every service's handlers, and the one place where
//! domain errors become gRPC statuses.

pub mod audit;
pub mod keys;
pub mod master_keys;
pub mod safety_numbers;
pub mod sessions;
pub mod status;
pub mod validate;

/// A stored time as a protobuf timestamp.
fn timestamp(at: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: at.nanosecond() as i32,
    }
}
