//! The gRPC edge: request validation, the key, session and audit services' handlers, and the one place where
//! domain errors become gRPC statuses.

pub mod audit;
pub mod keys;
pub mod sessions;
pub mod status;
pub mod validate;
