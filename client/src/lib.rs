//! The device side of the key server.
//!
//! [`keys`] makes Curve25519 and Kyber1024 key pairs and XEdDSA signatures, [`vault`] seals
//! private keys under the user's passphrase, [`state`] keeps them in a local file, [`api`] talks
//! to the server and verifies what it returns, [`device`] ties these into what a device does,
//! [`safety`] checks safety numbers locally, and [`pqxdh`] shows two devices agreeing on a
//! secret through fetched bundles. `keyctl` is the command line over [`device`].

pub mod api;
pub mod device;
pub mod keys;
pub mod pqxdh;
pub mod safety;
pub mod state;
pub mod vault;
