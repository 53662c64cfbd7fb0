//! The gRPC edge: request validation, the key service's handlers, and the one place where
//! domain errors become gRPC statuses.

pub mod keys;
pub mod status;
pub mod validate;
