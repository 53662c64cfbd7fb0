//! keyserver: the Signal-protocol key server behind end-to-end encrypted chat.
//!
//! A request enters at [`server`], passes the [`edge`] (TLS, request id and logs, metrics,
//! authentication with [`auth`]'s tokens, readiness), is handled in [`service`] (within [`limits`]) and stored
//! through [`store`]. [`jobs`] rotates, cleans up and keeps the operator read model fresh,
//! by the server's schedule or by cron; [`clock`] is the time their policies use. [`secret`]
//! provides the token secrets, [`logging`] writes the logs, [`shutdown`] stops everything
//! gracefully.

pub mod auth;
pub mod clock;
pub mod config;
pub mod edge;
pub mod jobs;
pub mod limits;
pub mod logging;
pub mod secret;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
