//! The CA's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of a request outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Label naming a CA certificate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub cert: String,
}

/// Label naming a peer CA by URL.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// Metrics of `trustline ca serve`.
#[derive(Clone)]
pub struct CaMetrics {
    /// `POST /v1/svid` requests by outcome (issued, renewed, bad_request, unauthorized, ...).
    pub svid_requests: Family<OutcomeLabels, Counter>,
    /// Time from request to response for `POST /v1/svid`, in seconds.
    pub svid_latency: Histogram,
    /// Expiry (Unix seconds) of the issuing CA certificate and of the server's own certificate.
    pub cert_expiry: Family<CertLabels, Gauge>,
    /// Join tokens created and certificates revoked.
    pub admin_ops: Family<OutcomeLabels, Counter>,
    /// When each peer CA's revocation list last arrived (Unix seconds): alert on its age.
    pub peer_fetched: Family<PeerLabels, Gauge>,
    /// Failed pulls of a peer CA's revocation list.
    pub peer_failures: Family<PeerLabels, Counter>,
    /// GET requests (`/v1/bundle`, `/v1/revoked`) refused by the per-client rate limit.
    pub reads_rate_limited: Counter,
}

impl CaMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = CaMetrics {
            svid_requests: Family::default(),
            svid_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            cert_expiry: Family::default(),
            admin_ops: Family::default(),
            peer_fetched: Family::default(),
            peer_failures: Family::default(),
            reads_rate_limited: Counter::default(),
        };
        registry.register(
            "trustline_ca_svid_requests",
            "SVID issuance and renewal requests by outcome",
            m.svid_requests.clone(),
        );
        registry.register(
            "trustline_ca_svid_request_duration_seconds",
            "Latency of SVID requests, ledger commit included",
            m.svid_latency.clone(),
        );
        registry.register(
            "trustline_ca_cert_expiry_timestamp_seconds",
            "Expiry of the CA's certificates (issuing CA, HTTPS server)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "trustline_ca_admin_operations",
            "Admin socket operations by outcome",
            m.admin_ops.clone(),
        );
        registry.register(
            "trustline_ca_peer_revocations_fetched_timestamp_seconds",
            "When each peer CA's revocation list was last pulled successfully",
            m.peer_fetched.clone(),
        );
        registry.register(
            "trustline_ca_peer_revocation_failures",
            "Failed pulls of a peer CA's revocation list",
            m.peer_failures.clone(),
        );
        registry.register(
            "trustline_ca_reads_rate_limited",
            "GET /v1/bundle and /v1/revoked requests refused by the per-client rate limit",
            m.reads_rate_limited.clone(),
        );
        m
    }

    /// Counts one SVID request.
    pub fn count(&self, outcome: &str) {
        self.svid_requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Sets a certificate's expiry gauge.
    pub fn set_expiry(&self, cert: &str, unix: u64) {
        self.cert_expiry
            .get_or_create(&CertLabels {
                cert: cert.to_string(),
            })
            .set(unix as i64);
    }
}
