//! The gRPC edge: request validation, every service's handlers, and the one place where
//! domain errors become gRPC statuses.

pub mod audit;
pub mod keys;
pub mod master_keys;
pub mod safety_numbers;
pub mod sessions;
pub mod status;
pub mod validate;
