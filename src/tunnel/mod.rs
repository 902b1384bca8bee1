//! Cross-region transport: gateways joined by warm QUIC (mTLS 1.3) connections, and warm,
//! multiplexed sidecar-to-sidecar sessions riding them.
//!
//! ```text
//!  app ─▶ sidecar A ══ QUIC ══▶ gateway A ══ QUIC (WAN) ══▶ gateway B ── TCP ──▶ sidecar B ─▶ app
//!         └──────────── one mTLS 1.3 session, end to end, HTTP/2 inside ─────────────┘
//! ```
//!
//! # Why warm sessions, and not a handshake per connection
//!
//! Over a 150 ms link, plain TCP + TLS 1.3 spends three round trips before the first response
//! byte: TCP, TLS, then the request. A QUIC tunnel between gateways removes the TCP round trip,
//! but an end-to-end TLS handshake per application connection still costs one more, so two.
//! The only ways down to one are 0-RTT data (replayable, and sent before the client is
//! authenticated: refused here) or not handshaking at all on the hot path. trustline does the
//! latter, like ztunnel's HBONE pools: each sidecar keeps one **warm session** per remote
//! destination, a mutual TLS 1.3 connection to the destination *sidecar* (so both workload
//! identities are checked end to end, and the gateways only ever see ciphertext), carrying
//! HTTP/2. A new application connection is a new HTTP/2 `CONNECT` stream in that session: no
//! handshake, and the caller's first bytes go out with the stream's `HEADERS` instead of waiting
//! for the answer, so the first response byte comes back after one round trip. The destination
//! sidecar decides every stream with its policy, on the caller's own SPIFFE ID and the region of
//! its certificate chain, exactly as for a direct connection.
//!
//! A cold connection (no session yet) pays the session's TLS handshake once: two round trips.
//! Sessions are opened ahead of need (`prewarm`) for every remote service a sidecar is
//! configured to call, and re-opened as soon as one is lost. A session is retired at the
//! caller's next SVID rotation and when either certificate it was authenticated with expires
//! (always a full handshake, never resumption, so those are the certificates in force); the
//! destination also re-checks the caller's certificate (expiry, revocation) on every stream.
//!
//! The price is head-of-line blocking between the application connections of one session (one
//! QUIC stream carries it), which is what HBONE over HTTP/2 pays too.
//!
//! The same sessions serve sidecars of one region (`pooling`, on by default): there the session
//! is a direct TCP connection to the destination sidecar, and what it saves is not round trips
//! but CPU, a full mutual handshake per application connection. The destination's checks and
//! the retirement rules are the same; a session is also retired when the destination's
//! certificate is revoked, and a draining destination sends GOAWAY.
//!
//! # The tunnel
//!
//! Every QUIC connection (sidecar → local gateway, gateway → remote gateway) is mutually
//! authenticated with SVIDs; gateways are `spiffe://TD/trustline/gateway/REGION` and the region
//! in the ID must match the region of the certificate chain. Each stream begins with a
//! [`header::StreamHeader`] naming the destination region, service and address; a gateway
//! checks it against its own region-level policy and forwards the stream's bytes untouched.
//! Keep-alives detect a lost path within `idle_timeout`; new streams then take another path.

pub mod config;
mod error;
pub mod gateway;
pub mod header;
pub mod metrics;
pub mod paths;
pub mod quic;

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::identity::SpiffeId;
use crate::region::Region;
use crate::svid::Identity;
use crate::tls::mesh::MeshServerVerifier;
use crate::tls::ExpectedPeer;

pub use error::Error;

/// ALPN of tunnel QUIC connections (sidecar ↔ gateway, gateway ↔ gateway).
pub const TUNNEL_ALPN: &[u8] = b"trustline-tunnel/1";
/// How long a stream may take to send its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new stream may wait for a path to come up (a gateway restarting, a failover).
pub const PATH_WAIT: Duration = Duration::from_secs(3);

/// QUIC application error codes used to close one stream (never the tunnel).
pub mod code {
    /// The stream header was malformed or oversized.
    pub const BAD_HEADER: u32 = 0x10;
    /// The gateway's policy refused the stream.
    pub const REFUSED: u32 = 0x11;
    /// No gateway path to the destination region.
    pub const NO_ROUTE: u32 = 0x12;
    /// The destination address did not answer.
    pub const UNREACHABLE: u32 = 0x13;
    /// The other leg of the stream failed.
    pub const BROKEN: u32 = 0x14;

    /// A short label for logs and metrics.
    pub fn label(code: u64) -> &'static str {
        match code as u32 {
            BAD_HEADER => "bad_header",
            REFUSED => "refused_by_gateway",
            NO_ROUTE => "no_route",
            UNREACHABLE => "unreachable",
            BROKEN => "broken",
            _ => "reset",
        }
    }
}

/// Keep-alive timing of tunnel connections.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// A PING after this much silence.
    pub keepalive: Duration,
    /// A path with no answer for this long is dead (failover starts).
    pub idle_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            keepalive: Duration::from_millis(250),
            idle_timeout: Duration::from_millis(1500),
        }
    }
}

/// The SPIFFE ID of a region's gateways, and the region a gateway ID names.
pub use crate::identity::ids::{gateway_id, gateway_region};

/// QUIC transport settings for long-lived tunnels over a WAN.
pub fn transport(timing: Timing) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(timing.keepalive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(timing.idle_timeout)
            .unwrap_or(quinn::VarInt::from_u32(1500).into()),
    ));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(10_000));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Windows sized for a 150-300 ms path: 4 MiB per stream, 32 MiB per connection.
    t.stream_receive_window(quinn::VarInt::from_u32(4 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    t.initial_rtt(Duration::from_millis(100));
    Arc::new(t)
}

/// Builds the QUIC server config from a rustls server config (TLS 1.3, our provider).
pub fn quic_server(
    mut tls: rustls::ServerConfig,
    timing: Timing,
) -> Result<quinn::ServerConfig, Error> {
    tls.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(|error| {
            Error::QuicTls {
                side: "server",
                error,
            }
        })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(timing));
    Ok(cfg)
}

/// Builds the QUIC client config from a rustls client config (TLS 1.3, our provider).
pub fn quic_client(
    mut tls: rustls::ClientConfig,
    timing: Timing,
) -> Result<quinn::ClientConfig, Error> {
    tls.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).map_err(|error| {
            Error::QuicTls {
                side: "client",
                error,
            }
        })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(timing));
    Ok(cfg)
}

/// The QUIC client config with which `identity` (a sidecar, or a gateway) reaches the gateways
/// of `region`: each must present `spiffe://TD/trustline/gateway/REGION` and pass the mesh's
/// checks. No resumption: tunnel connections are long-lived and fully verified.
pub fn gateway_client(
    identity: &Identity,
    region: &str,
    timing: Timing,
    clock: &Clock,
) -> Result<quinn::ClientConfig, Error> {
    let verifier = Arc::new(MeshServerVerifier::new(
        identity.trust(),
        ExpectedPeer::AnyOf(vec![gateway_id(identity.id().trust_domain(), region)]),
        identity.peer_checks(),
    ));
    let tls = crate::tls::mesh::client_config(verifier, identity.resolver.clone(), false, clock)
        .map_err(Error::Tls)?;
    quic_client(tls, timing)
}

/// The other end of a tunnel connection, from its verified chain.
pub struct TunnelPeer {
    pub id: SpiffeId,
    /// The region of the CA that issued its certificate.
    pub issued_in: Option<Region>,
}

impl TunnelPeer {
    /// Reads the peer of `conn`. A gateway ID (`.../trustline/gateway/REGION`) must come from
    /// that same region's CA, or the peer is refused.
    pub fn of(conn: &quinn::Connection) -> Result<Self, Error> {
        let chain = peer_chain(conn);
        let leaf = chain.first().ok_or(Error::NoCertificate)?;
        let id = crate::identity::inspect_cert(leaf)
            .map_err(Error::Certificate)?
            .id;
        let issued_in = crate::identity::region_of_chain(&chain);
        if let Some(r) = gateway_region(&id) {
            if issued_in.as_deref() != Some(r) {
                let claimed = r.to_string();
                return Err(Error::GatewayOfOtherRegion {
                    id,
                    issued_in,
                    claimed,
                });
            }
        }
        Ok(TunnelPeer { id, issued_in })
    }

    /// The region this peer is a gateway of, if it is one.
    pub fn gateway_of(&self) -> Option<&str> {
        gateway_region(&self.id)
    }
}

/// The verified peer chain of a QUIC connection.
pub fn peer_chain(conn: &quinn::Connection) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|a| {
            a.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|b| *b)
        .unwrap_or_default()
}
