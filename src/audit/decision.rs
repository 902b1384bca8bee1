//! The audit schema of authorization decisions (one per connection or request, JSON lines).

use serde::Serialize;

/// One decision. Allows on long-lived connections are logged once per connection; denials always.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionEvent {
    pub time: String,
    /// `decision`, or `anomaly` for impossible travel.
    pub event: &'static str,
    pub source_id: String,
    pub source_serial: String,
    pub source_region: Option<String>,
    pub destination_service: String,
    pub destination_region: Option<String>,
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    /// `allow` or `deny` (for dry-run: what the rule would have done).
    pub outcome: &'static str,
    /// The deciding rule, or `default`.
    pub rule: String,
    /// `enforced` or `dry-run`.
    pub mode: &'static str,
    /// Extra words for anomalies and closures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The request's JWT-SVID, on services whose rules read tokens (`jwt_sub`, `jwt_region`,
    /// `jwt_error`); absent otherwise.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtAudit>,
}

/// What a request's `Authorization: Bearer` token established: its verified subject and
/// region, or why it was not valid. Never the token itself.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JwtAudit {
    /// The verified `sub`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_sub: Option<String>,
    /// The verified region (the signing key's); absent for a valid token of unknown region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_region: Option<String>,
    /// Why no valid token was found ("no Authorization header", "expired at ...").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_error: Option<String>,
}
