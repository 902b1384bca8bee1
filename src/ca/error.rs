//! The CA role's errors: one enum per operation, each saying what went wrong and with what, and
//! [`Error`], which every one of them converts into, for glue that runs several operations and
//! only reports (the CLI, the demo, the lab).
//!
//! | operation | enum |
//! |---|---|
//! | making, loading and signing with a CA ([`super::authority`]) | [`AuthorityError`] |
//! | reading a certificate request | [`CsrError`] |
//! | whether a SPIFFE ID may hold a workload SVID | [`WorkloadIdError`] |
//! | the ledger ([`super::ledger::Ledger`]) | [`LedgerError`] |
//! | starting `ca serve` ([`super::server::build`]) | [`ServeError`] |
//! | issuing the CA server's own certificate | [`ServerCertError`] |
//! | the client certificate a connection to the API presented | [`ClientCertError`] |
//! | configuring the peer CAs | [`PeerConfigError`] |
//! | taking a peer CA's revocation list | [`PeerError`] |
//! | an admin request, at the CA | [`AdminError`] |
//! | an admin request, from its client | [`AdminClientError`] |
//!
//! The API's answers ([`super::api::ApiError`]) are not one of them: they are what these turn
//! into on the wire (status, code, detail).

use std::path::PathBuf;
use std::time::Duration;

use crate::identity::{IdentityError, Serial, SpiffeId, TrustDomain};
use crate::region::{NameError, Region};
use crate::svid::ca_client::ClientError;

/// Any failure of the CA role.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    WorkloadId(#[from] WorkloadIdError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    ServerCert(#[from] ServerCertError),
    #[error(transparent)]
    ClientCert(#[from] ClientCertError),
    #[error(transparent)]
    PeerConfig(#[from] PeerConfigError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    AdminClient(#[from] AdminClientError),
}

/// What can go wrong making, loading or using a CA.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `ca init` would replace an existing key.
    #[error("{0} exists; refusing to overwrite a CA key (use --force to replace it)")]
    Exists(PathBuf),
    /// A CA file is there but not what it should be.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// A region name broke the one rule ([`Region`]).
    #[error("region name {0}")]
    BadRegion(String),
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Why a CSR was refused. Every variant is the client's fault (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("body is not a PEM certificate request: {0}")]
    NotPem(String),
    #[error("malformed certificate request: {0}")]
    Malformed(String),
    #[error("certificate request signature does not verify")]
    BadSignature,
    #[error("unsupported key type {0}; use ECDSA P-256, ECDSA P-384 or Ed25519")]
    UnsupportedKey(String),
    #[error("certificate request must name exactly one URI SAN (the SPIFFE ID), found {0}")]
    UriCount(usize),
    #[error("requested URI {0:?} is not a valid SPIFFE ID")]
    BadUri(String),
    /// The CSR asks for another ID than the token or the presented SVID authorises.
    #[error("requested SPIFFE ID {requested} does not match the authorised {authorised}")]
    Mismatch {
        requested: String,
        authorised: String,
    },
}

/// Why a SPIFFE ID may not hold a workload SVID from this CA.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadIdError {
    #[error("{id} is not in trust domain {trust_domain}")]
    OtherTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("{0} has no path; workload IDs need one")]
    NoPath(SpiffeId),
    /// The CA's server ID and the region IDs of CA certificates.
    #[error("{0} is reserved for trustline's own CAs")]
    ReservedForCas(SpiffeId),
    /// A gateway ID of another region (or asked of the root).
    #[error(
        "{id} is a gateway ID of region {region}; only region {region}'s CA issues it (this CA is {})",
        this_ca(.ours.as_ref())
    )]
    OtherRegionsGateway {
        id: SpiffeId,
        region: String,
        ours: Option<Region>,
    },
    #[error("{0} is under /trustline/, reserved for trustline's own roles (ca, gateway/REGION)")]
    ReservedForRoles(SpiffeId),
}

fn this_ca(ours: Option<&Region>) -> String {
    ours.map_or("the root".to_string(), |o| format!("region {o}"))
}

/// Ledger failures. The token variants map to HTTP 401, `Db` and `Closed` (the store failed) to
/// 503, the rest to 500 or admin errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store itself failed (I/O, a damaged record); the operation did not happen.
    #[error("ledger database: {0}")]
    Db(String),
    #[error("unknown join token")]
    TokenUnknown,
    #[error("join token already used")]
    TokenUsed,
    #[error("join token expired")]
    TokenExpired,
    #[error("join token is bound to another SPIFFE ID")]
    TokenWrongId,
    #[error("serial {0} already issued")]
    DuplicateSerial(Serial),
    #[error("serial {0} was not issued by this CA")]
    UnknownSerial(Serial),
    #[error("serial {0} is already revoked, and so is every SVID renewed from it")]
    AlreadyRevoked(Serial),
    #[error("{0} is revoked at this CA (lift with `trustline ca revoke --lift --spiffe-id`)")]
    Banned(String),
    #[error("{0} is already revoked")]
    AlreadyBanned(String),
    #[error("{0} is not revoked")]
    NotBanned(String),
    #[error("the SVID {0} renewing was revoked")]
    ParentRevoked(Serial),
    #[error("join token was voided when its SPIFFE ID was revoked")]
    TokenVoided,
    #[error("ledger writer stopped")]
    Closed,
}

/// The errors `build` can report; all are fatal at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading CA from {dir}: {source}")]
    Authority {
        dir: PathBuf,
        source: AuthorityError,
    },
    #[error("loading CA from {dir}: {source}")]
    Keys {
        dir: PathBuf,
        source: super::rotation::RotationError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("JWT-SVID key: {0}")]
    JwtKey(#[from] super::jwt::JwtKeyError),
    #[error("TLS configuration: {0}")]
    ServerCert(#[from] ServerCertError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS configuration: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("peer CAs: {0}")]
    Peers(#[from] PeerConfigError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Why the CA server's own certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum ServerCertError {
    /// Making its key.
    #[error(transparent)]
    Key(rcgen::Error),
    #[error(transparent)]
    Sign(#[from] AuthorityError),
    /// rustls refused the chain and key.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
}

/// Why the client certificate of a connection is not an SVID the API can renew.
#[derive(Debug, thiserror::Error)]
pub enum ClientCertError {
    #[error(transparent)]
    Inspect(#[from] IdentityError),
    #[error("a CA certificate is not an SVID")]
    IsCa,
}

/// Why a `peers` list (config, flags or [`super::server::Bound::set_peers`]) was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerConfigError {
    #[error("{count} peers, more than the {max} allowed")]
    TooMany { count: usize, max: usize },
    #[error("{entry:?}: region {region:?}: {why}")]
    Region {
        entry: String,
        region: String,
        why: NameError,
    },
    #[error(
        "{0:?} is not a CA URL like https://ca.eu-west:8443 (or eu-west=https://ca.eu-west:8443)"
    )]
    Url(String),
    #[error("{0:?} is listed twice")]
    Twice(String),
    #[error(
        "peer {url} is named as region {region}'s CA, this CA's own region: a peer is another \
         region's CA"
    )]
    OwnRegion { url: String, region: Region },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Why a peer list was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the list is not revocation JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{what}: {count} entries, over the cap of {cap}; keeping the last good list")]
    TooMany {
        what: &'static str,
        count: usize,
        cap: usize,
    },
    #[error("bad entry {0:?}")]
    Entry(String),
    #[error("revoking this CA's SVIDs of {id}, which the peer bans: {error}")]
    Ledger { id: String, error: LedgerError },
}

/// Why the CA refused an admin request (the text is the answer's `error`).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("malformed admin request: {0}")]
    Malformed(serde_json::Error),
    #[error("serial {0:?} is not hex")]
    BadSerial(String),
    #[error(transparent)]
    Id(#[from] IdentityError),
    #[error(transparent)]
    WorkloadId(#[from] WorkloadIdError),
    #[error("token ttl must be between 1s and {}", humantime::format_duration(*.max))]
    TokenTtl { max: Duration },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Rotation(#[from] super::rotation::RotationError),
    #[error("publish wait: {0}")]
    Wait(String),
}

/// Why an admin request from the CLI (or a test) got no answer, or a refusal.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error(
        "cannot reach the CA admin socket {}: {source} (is `trustline ca serve` running with this \
         --data dir, and are you allowed to open the socket?)",
        .socket.display()
    )]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Encode(serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("bad answer from CA: {0}")]
    BadAnswer(serde_json::Error),
    /// The CA answered with a refusal (its text).
    #[error("{0}")]
    Refused(String),
    #[error("no token returned")]
    NoToken,
}
