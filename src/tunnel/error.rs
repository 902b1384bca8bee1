//! What can go wrong building the tunnel transport, dialling a gateway, checking a tunnel peer
//! or opening a stream on a path. Each message is complete on its own (it carries its cause's
//! text): these end up in logs, audit details and QUIC close reasons.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::SpiffeId;
use crate::region::Region;

/// A tunnel error (see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The identity task could not start (its message as it gave it).
    #[error("{0}")]
    Identity(String),
    /// The audit log could not be opened.
    #[error("audit log {}: {error}", path.display())]
    AuditLog {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The mesh's rustls configuration for a tunnel endpoint could not be built.
    #[error("{0}")]
    Tls(rustls::Error),
    /// The rustls configuration cannot carry QUIC (`side`: `server` or `client`).
    #[error("QUIC {side} TLS: {error}")]
    QuicTls {
        side: &'static str,
        error: quinn::crypto::rustls::NoInitialCipherSuite,
    },
    /// A listener could not be bound (`what`: `QUIC` or `admin`).
    #[error("binding {what} on {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The bound QUIC socket has no local address.
    #[error("QUIC socket: {0}")]
    LocalAddr(std::io::Error),
    /// A gateway could not be dialled.
    #[error("{0}")]
    Connect(quinn::ConnectError),
    /// The QUIC handshake with a gateway failed.
    #[error("{0}")]
    Connection(quinn::ConnectionError),
    /// The QUIC handshake with a gateway took too long.
    #[error("connection timed out")]
    ConnectTimeout,
    /// The tunnel peer presented no certificate.
    #[error("no certificate")]
    NoCertificate,
    /// The tunnel peer's leaf could not be read.
    #[error("{0}")]
    Certificate(crate::identity::IdentityError),
    /// A gateway ID whose certificate another region's CA issued.
    #[error("{id} has a certificate of region {issued_in:?}, not {claimed}")]
    GatewayOfOtherRegion {
        id: SpiffeId,
        issued_in: Option<Region>,
        /// The region its ID names.
        claimed: String,
    },
    /// A gateway of our own region connected to us as a peer gateway.
    #[error("{id} is a gateway of this same region")]
    SameRegionGateway { id: SpiffeId },
    /// A workload (not a gateway) whose certificate is not of the gateway's region.
    #[error("{id} (certificate of region {issued_in:?}) is not a workload of region {region}")]
    NotWorkloadOfRegion {
        id: SpiffeId,
        issued_in: Option<Region>,
        region: Region,
    },
    /// The dialled peer is not a gateway of the region it was dialled for.
    #[error("{id} (certificate of region {issued_in:?}) is not a gateway of region {region}")]
    NotGatewayOfRegion {
        id: SpiffeId,
        issued_in: Option<Region>,
        region: String,
    },
    /// The best path to a region granted no stream within the wait.
    #[error("no stream credit on the path to region {region} ({addr}) within {wait:?}")]
    NoStreamCredit {
        region: Region,
        addr: SocketAddr,
        wait: Duration,
    },
    /// No path to a region came up within the wait.
    #[error("no gateway path to region {region} is up ({configured} configured)")]
    NoPathUp { region: Region, configured: usize },
}
