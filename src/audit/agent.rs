//! The audit schema of `trustline agent`: which local process asked the Workload API for what,
//! and what it was given or refused (one JSON line per call).

use serde::Serialize;

/// One Workload API call. Every field is always written (`null` when absent), in this order.
#[derive(Clone, Debug, Serialize)]
pub struct AgentEvent {
    pub time: String,
    /// `grant` (identities served) or `deny` (refused).
    pub event: &'static str,
    /// `FetchX509SVID`, `FetchX509Bundles`, `FetchJWTSVID`, `FetchJWTBundles` or `ValidateJWTSVID`.
    pub rpc: &'static str,
    /// The caller's credentials, from the socket (`SO_PEERCRED`).
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The caller's executable (`/proc/PID/exe`), when it could be read safely.
    pub path: Option<String>,
    /// The SPIFFE IDs the caller was given (grant), or asked for (deny, when it named one).
    pub spiffe_ids: Vec<String>,
    /// Why it was refused (`no identity issued`, ...), or why the path is unknown.
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::AgentEvent;

    #[test]
    fn an_agent_event_writes_every_field_in_its_fixed_order() {
        let e = AgentEvent {
            time: "2026-01-02T03:04:05Z".into(),
            event: "deny",
            rpc: "FetchX509SVID",
            uid: 65534,
            gid: 65534,
            pid: Some(42),
            path: None,
            spiffe_ids: vec![],
            reason: Some("no identity issued".into()),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"time":"2026-01-02T03:04:05Z","event":"deny","rpc":"FetchX509SVID","uid":65534,"gid":65534,"pid":42,"path":null,"spiffe_ids":[],"reason":"no identity issued"}"#
        );
    }
}
