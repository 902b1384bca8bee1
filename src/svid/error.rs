//! Why the identity task could not obtain, check or publish an SVID or a bundle.
//!
//! The messages are the ones the task has always logged (operators grep for them); a variant
//! that wraps another error shows that error's message unchanged.

use std::path::PathBuf;

use hyper::StatusCode;

use super::ca_client::ClientError;
use crate::identity::{IdentityError, Serial, SpiffeId};

/// What went wrong in the identity task, and with what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured trust bundle cannot be turned into a verifier.
    #[error("trust bundle: {0}")]
    TrustBundle(#[source] rustls::Error),
    /// An SVID does not verify against the bundle in force at this time.
    #[error(transparent)]
    Unverified(IdentityError),
    /// An SVID names another SPIFFE ID than this sidecar's.
    #[error("SVID is for {got}, this sidecar is {ours}")]
    NotOurs { got: SpiffeId, ours: SpiffeId },
    /// rustls refused the chain and key pair (e.g. the key does not match the leaf).
    #[error("certificate and key: {0}")]
    KeyPair(#[source] rustls::Error),
    /// Roots from a source, with the configured ones, do not make a bundle of our trust domain.
    #[error(transparent)]
    Bundle(IdentityError),
    /// A refreshed bundle would hold no root of our own trust domain (kept the last one).
    #[error("the refreshed bundle holds no root of our trust domain; keeping the last one")]
    NoOwnRoot,
    /// The trust state refused a new bundle.
    #[error(transparent)]
    SetBundle(rustls::Error),

    /// A host agent holds no SVID of its own (not yet, or it expired), so it cannot ask the CA
    /// for its workloads'.
    #[error(
        "the agent holds no valid SVID of its own ({0}); its workloads' SVIDs cannot be obtained"
    )]
    NoAgentSvid(&'static str),

    /// The join token file (CA source) cannot be read.
    #[error("join token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A call to the CA failed: connect, TLS, HTTP, a refusal or an unusable answer.
    #[error(transparent)]
    Ca(#[from] ClientError),
    /// The CA's bundle holds no usable PEM certificates.
    #[error(transparent)]
    CaBundle(IdentityError),
    /// The CA answered `GET /v1/revoked` with an error status.
    #[error("CA answered {0}")]
    RevokedStatus(StatusCode),
    /// The revocation list is not JSON.
    #[error(transparent)]
    RevokedJson(serde_json::Error),
    /// The revocation list's JSON has no `revoked` array.
    #[error("no revoked list in answer")]
    NoRevokedList,
    /// An entry of the revocation list has no hex `serial`.
    #[error("bad serial in revocation list: {0}")]
    BadSerial(serde_json::Value),

    /// An SVID file (files source) cannot be read.
    #[error("{}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no usable PEM certificates (the message names the file).
    #[error(transparent)]
    CertFile(IdentityError),
    /// The key file holds no usable PEM private key.
    #[error("{}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The leaf of the certificate file is not an SVID.
    #[error("{}: {source}", path.display())]
    LeafFile {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },

    /// The Workload API offers no SVID for our SPIFFE ID.
    #[error(
        "the agent offers SVIDs for [{}], none for this sidecar's spiffe_id {ours}; \
         check the registration entry",
        offered.join(", ")
    )]
    NotOffered {
        offered: Vec<String>,
        ours: SpiffeId,
    },
    /// The Workload API sent an SVID without certificates.
    #[error("the agent sent an empty chain")]
    EmptyChain,
    /// The Workload API's leaf is not an SVID.
    #[error(transparent)]
    AgentLeaf(IdentityError),
    /// The Workload API's SVID does not verify against its bundle plus the configured roots.
    #[error("SVID {serial}: {source}")]
    AgentUnverified {
        serial: Serial,
        #[source]
        source: IdentityError,
    },
}
