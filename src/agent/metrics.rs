//! The agent's Prometheus metrics (on the optional `admin` listener).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::socket::Refusals;

/// A Workload API call's method and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub rpc: &'static str,
    /// `ok`, `no_metadata`, `not_attested`, `no_identity`, `bad_request`, `unavailable`.
    pub outcome: &'static str,
}

/// An identity the agent holds (its own, or a workload's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdLabels {
    pub spiffe_id: String,
}

/// Metrics of `trustline agent`.
#[derive(Clone, Default)]
pub struct AgentMetrics {
    pub calls: Family<CallLabels, Counter>,
    /// `not_after` (Unix seconds) of each SVID held; 0 when none. `time()` minus this is how
    /// long the identity lasts if the CA stays down from now.
    pub svid_expiry: Family<IdLabels, Gauge>,
    /// Connections closed at the caps.
    pub refusals: Refusals,
    /// Open Workload API connections.
    pub connections: Gauge,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = AgentMetrics::default();
        registry.register(
            "trustline_agent_calls",
            "Workload API calls by method and outcome",
            m.calls.clone(),
        );
        registry.register(
            "trustline_agent_svid_expiry_timestamp_seconds",
            "Expiry of each SVID the agent holds (its own and its workloads'; 0 = none held)",
            m.svid_expiry.clone(),
        );
        registry.register(
            "trustline_agent_connections_refused_max_connections",
            "Workload API connections closed at max_connections",
            m.refusals.total_cap.clone(),
        );
        registry.register(
            "trustline_agent_connections_refused_max_connections_per_uid",
            "Workload API connections closed at max_connections_per_uid",
            m.refusals.uid_cap.clone(),
        );
        registry.register(
            "trustline_agent_connections_open",
            "Open Workload API connections",
            m.connections.clone(),
        );
        m
    }

    /// Counts one call.
    pub fn call(&self, rpc: &'static str, outcome: &'static str) {
        self.calls.get_or_create(&CallLabels { rpc, outcome }).inc();
    }
}
