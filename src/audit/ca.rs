//! The audit schema of the CA: issuances, renewals and refused SVID requests from the API, and
//! token, revocation and ban requests from the admin socket (JSON lines).

use serde::Serialize;

/// One CA event. Every field is always written (`null` when absent), in this order.
#[derive(Clone, Debug, Serialize)]
pub struct CaEvent {
    pub time: String,
    /// `issue`, `renew`, `jwt` or `deny` (API); `token`, `revoke`, `revoke_id` or `lift_id` (admin).
    pub event: &'static str,
    /// The SPIFFE ID asked for or acted on.
    pub spiffe_id: Option<String>,
    /// The serial issued, or named by a revocation.
    pub serial: Option<String>,
    /// The client's address, or `admin-socket`.
    pub client: String,
    /// `ok`, `error`, or the refusal (`unauthorized`, `rate_limited`, ...).
    pub outcome: &'static str,
    /// Why it was refused.
    pub reason: Option<String>,
    /// The host agent that asked on the workload's behalf (`trustline agent`), if one did.
    pub agent: Option<String>,
    /// The audiences of a JWT-SVID (`jwt` events).
    pub audience: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::CaEvent;

    #[test]
    fn a_ca_event_writes_every_field_in_its_fixed_order() {
        let e = CaEvent {
            time: "2026-01-02T03:04:05Z".into(),
            event: "revoke",
            spiffe_id: None,
            serial: Some("0a".into()),
            client: "admin-socket".into(),
            outcome: "error",
            reason: Some("serial 0a was not issued by this CA".into()),
            agent: None,
            audience: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"time":"2026-01-02T03:04:05Z","event":"revoke","spiffe_id":null,"serial":"0a","client":"admin-socket","outcome":"error","reason":"serial 0a was not issued by this CA","agent":null,"audience":null}"#
        );
    }
}
