//! The audit schema of tunnel events: paths up, down and replaced, failovers, refused
//! connections and streams (one JSON line each).

use serde::Serialize;

use crate::clock::Clock;

/// One tunnel audit event (JSON line).
#[derive(Clone, Debug, Serialize)]
pub struct TunnelEvent {
    pub time: String,
    /// `tunnel_up`, `tunnel_down`, `failover` or `stream_refused`.
    pub event: &'static str,
    /// The SPIFFE ID of the other end of the QUIC connection.
    pub peer_id: Option<String>,
    pub peer_address: String,
    pub peer_region: Option<String>,
    /// For streams: where the header said it goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_address: Option<String>,
    /// The deciding gateway rule, for refusals by policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why (refusals, losses), or how many other paths stay up (failover).
    pub detail: String,
}

impl TunnelEvent {
    /// An event with the common fields set, stamped now by `clock`.
    pub fn new(
        clock: &Clock,
        event: &'static str,
        peer_address: std::net::SocketAddr,
        peer_region: Option<&str>,
        detail: impl Into<String>,
    ) -> Self {
        TunnelEvent {
            time: crate::clock::rfc3339(clock.now()),
            event,
            peer_id: None,
            peer_address: peer_address.to_string(),
            peer_region: peer_region.map(str::to_string),
            destination_region: None,
            destination_service: None,
            destination_address: None,
            rule: None,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn stamped_by_the_clock_with_the_same_fields() {
        let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let mut ev = TunnelEvent::new(
            &clock,
            "stream_refused",
            "127.0.0.1:4433".parse().unwrap(),
            Some("eu-west"),
            "policy_denied: no",
        );
        ev.rule = Some("r1".into());
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2027-01-15T08:00:00Z",
                "event": "stream_refused",
                "peer_id": null,
                "peer_address": "127.0.0.1:4433",
                "peer_region": "eu-west",
                "rule": "r1",
                "detail": "policy_denied: no",
            })
        );
    }
}
