//! The sidecar's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::refusal::Refusal;

/// Direction of a proxied connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Dir {
    pub direction: &'static str,
}

/// Direction and reason of a failed connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Failure {
    pub direction: &'static str,
    pub reason: &'static str,
}

/// Bytes by direction of the connection and of the flow.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Flow {
    pub direction: &'static str,
    /// `to_peer` (towards the mesh side) or `from_peer`.
    pub flow: &'static str,
}

/// Metrics of `trustline sidecar`.
#[derive(Clone)]
pub struct ProxyMetrics {
    pub opened: Family<Dir, Counter>,
    pub closed: Family<Dir, Counter>,
    pub failed: Family<Failure, Counter>,
    /// Live connections closed by a re-check (see [`super::live`]), by reason.
    pub closed_live: Family<Failure, Counter>,
    pub bytes: Family<Flow, Counter>,
    pub handshake: Family<Dir, Histogram, fn() -> Histogram>,
    pub svid_expiry: Gauge,
    pub rotations: Counter,
}

fn handshake_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00025, 2.0, 14))
}

impl ProxyMetrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ProxyMetrics {
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            closed_live: Family::default(),
            bytes: Family::default(),
            handshake: Family::new_with_constructor(handshake_histogram as fn() -> Histogram),
            svid_expiry: Gauge::default(),
            rotations: Counter::default(),
        };
        registry.register(
            "trustline_connections_opened",
            "Connections accepted into the mesh",
            m.opened.clone(),
        );
        registry.register(
            "trustline_connections_closed",
            "Connections that ended after being established",
            m.closed.clone(),
        );
        registry.register(
            "trustline_connections_failed",
            "Connections refused or failed, by reason",
            m.failed.clone(),
        );
        registry.register(
            "trustline_live_connections_closed",
            "Live connections closed because their peer's certificate was revoked or expired, or the policy no longer allows them",
            m.closed_live.clone(),
        );
        registry.register("trustline_bytes", "Bytes proxied", m.bytes.clone());
        registry.register(
            "trustline_handshake_duration_seconds",
            "mTLS handshake latency",
            m.handshake.clone(),
        );
        registry.register(
            "trustline_svid_expiry_timestamp_seconds",
            "Expiry of the current SVID (Unix time)",
            m.svid_expiry.clone(),
        );
        registry.register(
            "trustline_svid_rotations",
            "SVIDs published",
            m.rotations.clone(),
        );
        m
    }

    /// Counts a failure.
    pub fn fail(&self, direction: &'static str, reason: Refusal) {
        self.failed
            .get_or_create(&Failure {
                direction,
                reason: reason.label(),
            })
            .inc();
    }

    /// Counts the bytes of a finished connection of `direction`.
    pub fn count_bytes(&self, direction: &'static str, to_peer: u64, from_peer: u64) {
        for (flow, n) in [("to_peer", to_peer), ("from_peer", from_peer)] {
            self.bytes
                .get_or_create(&Flow { direction, flow })
                .inc_by(n);
        }
    }

    /// Counts a live connection closed by a re-check.
    pub fn closed_live(&self, direction: &'static str, reason: super::live::CloseReason) {
        self.closed_live
            .get_or_create(&Failure {
                direction,
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Live connections of `direction` closed for `reason`, a label (for tests and logs).
    pub fn closed_live_count(&self, direction: &'static str, reason: &'static str) -> u64 {
        self.closed_live
            .get_or_create(&Failure { direction, reason })
            .get()
    }

    /// Reads a failure count by its label (for tests and logs).
    pub fn failures(&self, direction: &'static str, reason: &'static str) -> u64 {
        self.failed
            .get_or_create(&Failure { direction, reason })
            .get()
    }
}
