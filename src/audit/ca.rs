//! The audit schema of the CA: issuances, renewals and refused SVID requests from the API, and
//! token, revocation and ban requests from the admin socket (JSON lines).

use serde::Serialize;

/// One CA event. Every field is always written (`null` when absent), in this order.
#[derive(Clone, Debug, Serialize)]
pub struct CaEvent {
    pub time: String,
    /// `issue`, `renew` or `deny` (API); `token`, `revoke`, `revoke_id` or `lift_id` (admin).
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
}
