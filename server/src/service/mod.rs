//! The gRPC edge: request validation, the key, session, safety-number and audit services' handlers, and the one place where
//! domain errors become gRPC statuses.

pub mod audit;
pub mod keys;
pub mod safety_numbers;
pub mod sessions;
pub mod status;
pub mod validate;
