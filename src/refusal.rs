//! Why a connection, stream or request was refused or closed: one enum for every role's
//! metrics labels, audit lines and log fields, so a reason is spelled once and a dashboard can
//! rely on the set. [`Refusal::label`] is the `snake_case` text used on the wire and in metrics.

use std::fmt;

macro_rules! refusals {
    ($($variant:ident => $label:literal,)*) => {
        /// A refusal or close reason (see the module docs).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Refusal {
            $(
                #[doc = concat!("`", $label, "`")]
                $variant,
            )*
        }

        impl Refusal {
            /// Every reason, for tests and documentation.
            pub const ALL: &'static [Refusal] = &[$(Refusal::$variant,)*];

            /// The metric label and audit text of this reason.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Refusal::$variant => $label,)*
                }
            }
        }
    };
}

refusals! {
    AlertReceived => "alert_received",
    AppUnreachable => "app_unreachable",
    BadCertificate => "bad_certificate",
    BadHeader => "bad_header",
    BadKeyUsage => "bad_key_usage",
    BadPeer => "bad_peer",
    BadRequest => "bad_request",
    BadSessionRequest => "bad_session_request",
    BadSignature => "bad_signature",
    BadSpiffeId => "bad_spiffe_id",
    Broken => "broken",
    ConnectionCap => "connection_cap",
    ConnectionCapIp => "connection_cap_ip",
    ConnectionQuota => "connection_quota",
    EofDuringHandshake => "eof_during_handshake",
    Expired => "expired",
    ExpiredCertificate => "expired_certificate",
    GatewayLost => "gateway_lost",
    HandshakeTimeout => "handshake_timeout",
    HeaderTimeout => "header_timeout",
    IncompatiblePeer => "incompatible_peer",
    Io => "io",
    LeafIsCa => "leaf_is_ca",
    NoAlpn => "no_alpn",
    NoAppAddress => "no_app_address",
    NoCertificate => "no_certificate",
    NoClientCertificate => "no_client_certificate",
    NoGateway => "no_gateway",
    NoPath => "no_path",
    NoRoute => "no_route",
    NoServerCertificate => "no_server_certificate",
    NotAllowed => "not_allowed",
    NotExposed => "not_exposed",
    NotReady => "not_ready",
    NotRedirected => "not_redirected",
    NotTls => "not_tls",
    NotYetValid => "not_yet_valid",
    PathLost => "path_lost",
    PolicyDenied => "policy_denied",
    PolicyReload => "policy_reload",
    ProtocolError => "protocol_error",
    ReauthBudget => "reauth_budget",
    ReauthMalformed => "reauth_malformed",
    ReauthRefused => "reauth_refused",
    ReauthTimeout => "reauth_timeout",
    RefusedByGateway => "refused_by_gateway",
    Reset => "reset",
    Revoked => "revoked",
    SameRegion => "same_region",
    SessionCapCaller => "session_cap_caller",
    SessionCapTotal => "session_cap_total",
    SessionDeniedBudget => "session_denied_budget",
    SessionFailed => "session_failed",
    SessionKeepaliveTimeout => "session_keepalive_timeout",
    SessionLost => "session_lost",
    SessionPrefaceTimeout => "session_preface_timeout",
    SessionResetFlood => "session_reset_flood",
    StrayCertificate => "stray_certificate",
    StreamQuota => "stream_quota",
    TimeWindowClosed => "time_window_closed",
    Timeout => "timeout",
    TlsError => "tls_error",
    UndeclaredPort => "undeclared_port",
    UnexpectedIdentity => "unexpected_identity",
    UnknownDestination => "unknown_destination",
    UnknownIssuer => "unknown_issuer",
    Unreachable => "unreachable",
    UpstreamUnreachable => "upstream_unreachable",
    WrongRegion => "wrong_region",
    WrongTrustDomain => "wrong_trust_domain",
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::Refusal;

    #[test]
    fn labels_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in Refusal::ALL {
            let l = r.label();
            assert!(seen.insert(l), "{l} twice");
            assert!(
                l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
        }
    }
}
