//! The CA service: template, signing, HTTP API, ledger, tokens, revocation.
//!
//! The CA knows nothing of the data path. [`authority`] makes and loads CAs and signs leaves;
//! [`ledger`] makes issuance durable; [`api`] and [`server`] serve HTTPS; [`admin`] is the
//! local admin socket; [`rotation`] replaces the CA's own keys while it serves; [`peers`] carries revocations and JWT keys between the regions' CAs; [`agents`] says which IDs each
//! host agent may obtain. Each operation
//! has its error enum, all gathered in [`error`] and convertible into [`Error`].

pub mod admin;
pub mod agents;
pub mod api;
pub mod authority;
pub mod bundle_endpoint;
pub mod bundle_json;
pub mod config;
pub mod error;
pub mod jwt;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod peers;
pub mod revoked_list;
pub mod rotation;
pub mod server;
mod server_cert;
mod tasks;

pub use error::Error;
