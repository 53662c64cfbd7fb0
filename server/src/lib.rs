//! keyserver: the Signal-protocol key server behind end-to-end encrypted chat.
//!
//! A request enters at [`server`], is authenticated by [`auth`], handled in [`service`] and
//! stored through [`store`]. [`bundle_view`] keeps the operator read model fresh, [`secret`]
//! provides the token secret, [`shutdown`] stops everything gracefully.

pub mod audit;
pub mod auth;
pub mod bundle_view;
pub mod config;
pub mod secret;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
