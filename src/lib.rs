//! trustline: a zero-trust service-mesh data plane.
//!
//! One crate, one binary, a subcommand per role. The module tree is the layer diagram, and
//! `tests/layers.rs` holds it there: arrows point down only and no two top-level modules import
//! each other, directly or round a circle.
//!
//! - Roles: [`ca`] (the CA service), [`agent`] (the Workload API for a host's processes),
//!   [`proxy`] (the sidecar, with its session protocol), [`tunnel`] (the QUIC transport and the
//!   gateway), [`wan`] (the WAN relay); [`lab`] and [`demo`] build whole meshes from them; the
//!   binary's `cli/` dispatches to them.
//! - Mechanisms: [`svid`] (the SVID rotation task and the CA client), [`tls`] (rustls configs
//!   and SPIFFE verifiers), [`jwt`] (JWT-SVIDs, their keys and the SPIFFE bundle document),
//!   [`policy`] (the sidecar and gateway engines), [`audit`] (one schema
//!   per event family), [`admin`] (the metrics listener), [`drain`], [`copy`], [`limits`].
//! - Plain types: [`identity`] (SpiffeId, Serial, Svid, Bundle, certificate facts), [`region`]
//!   (Region, ServiceName), [`refusal`] (failure reasons), [`crypto`] (the one provider),
//!   [`config`] (TOML loading), [`clock`], [`util`].
//!
//! See `DESIGN.md` in the shared folder and the README for the whole picture.
#![forbid(unsafe_code)]
// Production code never unwraps (tests may: clippy.toml allow-unwrap-in-tests).
#![deny(clippy::unwrap_used)]

pub mod admin;
pub mod agent;
pub mod audit;
pub mod ca;
pub mod clock;
pub mod config;
pub mod copy;
pub mod crypto;
pub mod demo;
pub mod drain;
pub mod federation;
pub mod identity;
pub mod jwt;
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
