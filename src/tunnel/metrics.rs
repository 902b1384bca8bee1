//! Tunnel metrics (per path: RTT, streams, bytes, reconnects). The audit events are
//! [`crate::audit::tunnel::TunnelEvent`].

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::refusal::Refusal;

/// One tunnel path: the peer's configured address (or, for an accepted peer gateway, its
/// SPIFFE ID; never an ephemeral ip:port) and region.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub peer: String,
    pub region: String,
}

/// Bytes of one path, by direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub peer: String,
    pub region: String,
    /// `tx` or `rx`.
    pub dir: &'static str,
}

/// A refused stream's (or connection's) reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    /// A [`Refusal`] label.
    pub reason: &'static str,
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Self {
        Refused { reason: r.label() }
    }
}

/// Metrics of tunnel paths, shared by gateways and sidecars.
#[derive(Clone, Default)]
pub struct TunnelMetrics {
    pub up: Family<PathLabels, Gauge>,
    pub rtt: Family<PathLabels, Gauge<f64, AtomicU64>>,
    pub streams: Family<PathLabels, Counter>,
    pub active: Family<PathLabels, Gauge>,
    pub bytes: Family<ByteLabels, Counter>,
    pub reconnects: Family<PathLabels, Counter>,
    /// Connections replaced by a new one (make-before-break) on a certificate change.
    pub replaced: Family<PathLabels, Counter>,
    pub failovers: Counter,
    pub refused: Family<Refused, Counter>,
    /// QUIC connections refused by a quota, by reason.
    pub refused_connections: Family<Refused, Counter>,
    /// QUIC handshakes that failed at a gateway, by reason (see `gateway::handshake_failure`).
    pub failed_handshakes: Family<Refused, Counter>,
    /// Stream opens that found no stream credit on the path within their wait.
    pub open_timeouts: Counter,
}

impl TunnelMetrics {
    /// Registers the metrics.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "trustline_tunnel_up",
            "1 while the QUIC path to the peer is connected",
            self.up.clone(),
        );
        r.register(
            "trustline_tunnel_rtt_seconds",
            "Smoothed RTT of the QUIC path",
            self.rtt.clone(),
        );
        r.register(
            "trustline_tunnel_streams",
            "Streams carried by the path",
            self.streams.clone(),
        );
        r.register(
            "trustline_tunnel_active_streams",
            "Streams open on the path",
            self.active.clone(),
        );
        r.register(
            "trustline_tunnel_bytes",
            "Bytes carried by the path's streams",
            self.bytes.clone(),
        );
        r.register(
            "trustline_tunnel_reconnects",
            "Times the path was lost and connected again",
            self.reconnects.clone(),
        );
        r.register(
            "trustline_tunnel_replaced",
            "Times the path's connection was replaced by a new one on a certificate rotation",
            self.replaced.clone(),
        );
        r.register(
            "trustline_tunnel_failovers",
            "Paths lost while another path to the same region stayed up",
            self.failovers.clone(),
        );
        r.register(
            "trustline_tunnel_open_timeouts",
            "Streams not opened: the path had no stream credit within the wait",
            self.open_timeouts.clone(),
        );
        r.register(
            "trustline_tunnel_refused_connections",
            "QUIC connections refused by a quota (per address, per workload, in total), by reason",
            self.refused_connections.clone(),
        );
        r.register(
            "trustline_tunnel_failed_handshakes",
            "QUIC handshakes that failed at this gateway (timed out, bad or missing certificate, protocol error), by reason",
            self.failed_handshakes.clone(),
        );
        r.register(
            "trustline_tunnel_refused_streams",
            "Streams refused, by reason",
            self.refused.clone(),
        );
    }

    /// Counts bytes carried on a path.
    pub fn count_bytes(&self, l: &PathLabels, tx: u64, rx: u64) {
        for (dir, n) in [("tx", tx), ("rx", rx)] {
            self.bytes
                .get_or_create(&ByteLabels {
                    peer: l.peer.clone(),
                    region: l.region.clone(),
                    dir,
                })
                .inc_by(n);
        }
    }
}
