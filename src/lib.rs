//! trustline: a zero-trust service-mesh data plane.
//!
//! One crate, one binary, a subcommand per role. The layers point down only: the roles
//! ([`ca`], later the sidecar and the gateway) use the mechanisms ([`tls`], [`identity`],
//! [`audit`]), which use plain types ([`clock`]). See `DESIGN.md` in the shared folder and the
//! README for the whole picture.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod ca;
pub mod clock;
pub mod config;
pub mod copy;
pub mod crypto;
pub mod demo;
pub mod drain;
pub mod identity;
pub mod lab;
pub mod limits;
pub mod policy;
pub mod proxy;
pub mod refusal;
pub mod region;
pub mod svid;
pub mod tls;
pub mod tunnel;
pub mod util;
pub mod wan;
