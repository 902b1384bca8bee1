//! The `[[federation]]` tables of the sidecar and gateway configs: one per federated trust
//! domain.
//!
//! ```toml
//! [[federation]]
//! trust_domain = "other.org"
//! bundle_endpoint = "https://ca.other.org:8444"
//! profile = "https_spiffe"                       # the default; or "https_web"
//! endpoint_spiffe_id = "spiffe://other.org/trustline/ca"   # https_spiffe: required
//! bundle = "other-bundle.pem"                    # https_spiffe: required (the initial bundle)
//! # web_roots = "roots.pem"                      # https_web: required (no built-in roots)
//! # refresh = "5m"                               # overrides the document's refresh hint
//! ```

use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::config::{ConfigError, Ctx};
use crate::identity::{certs_from_pem, parse_id, parse_trust_domain, SpiffeId, TrustDomain};

/// Shortest `refresh` override accepted (tests use a fraction of a second).
pub const MIN_REFRESH_OVERRIDE: Duration = Duration::from_millis(100);

/// One `[[federation]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationFile {
    pub trust_domain: String,
    pub bundle_endpoint: String,
    pub profile: Option<String>,
    pub endpoint_spiffe_id: Option<String>,
    pub bundle: Option<PathBuf>,
    pub web_roots: Option<PathBuf>,
    pub refresh: Option<String>,
}

/// How the bundle endpoint's server is authenticated (SPIFFE Federation spec, section 5).
#[derive(Clone, Debug)]
pub enum Profile {
    /// The server presents an X.509-SVID of the federated trust domain, verified against that
    /// trust domain's current bundle, with exactly this SPIFFE ID.
    HttpsSpiffe { endpoint_id: SpiffeId },
    /// The server presents a WebPKI certificate for the endpoint's host name, verified against
    /// these roots (trustline ships no public root store: the file is required).
    HttpsWeb {
        web_roots: Vec<CertificateDer<'static>>,
    },
}

impl Profile {
    /// The name as written in the config.
    pub fn name(&self) -> &'static str {
        match self {
            Profile::HttpsSpiffe { .. } => "https_spiffe",
            Profile::HttpsWeb { .. } => "https_web",
        }
    }
}

/// A bundle endpoint URL, split.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// As written.
    pub url: String,
    /// The host (brackets of an IPv6 literal removed): connected to, and the TLS server name.
    pub host: String,
    pub port: u16,
    /// `host:port` as the `Host` header carries it.
    pub authority: String,
    /// Path and query (`/` when none).
    pub path: String,
}

impl Endpoint {
    /// Parses `https://HOST[:PORT][/PATH]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "{url:?}: a bundle endpoint is https://HOST:PORT (SPIFFE Federation requires TLS)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: user information is not allowed"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = authority.port_u16().unwrap_or(443);
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(Endpoint {
            url: url.to_string(),
            host: host.to_string(),
            port,
            authority: authority.as_str().to_string(),
            path: if path.is_empty() { "/".into() } else { path },
        })
    }
}

/// One federated trust domain, validated.
#[derive(Clone, Debug)]
pub struct FederatedDomain {
    pub trust_domain: TrustDomain,
    pub endpoint: Endpoint,
    pub profile: Profile,
    /// The roots known before the first fetch (the spec's initial bundle): required for
    /// `https_spiffe`, optional for `https_web`.
    pub bootstrap: Vec<CertificateDer<'static>>,
    /// Fixed refresh interval instead of the document's `spiffe_refresh_hint`.
    pub refresh: Option<Duration>,
}

/// Validates the `[[federation]]` tables of a config whose own trust domain is `own`.
pub fn federation_config(
    ctx: &Ctx<'_>,
    raw: &[FederationFile],
    own: &TrustDomain,
) -> Result<Vec<FederatedDomain>, ConfigError> {
    let mut out: Vec<FederatedDomain> = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        let field = |name: &str| format!("federation[{i}].{name}");
        let td = parse_trust_domain(&f.trust_domain)
            .map_err(|e| ctx.err(field("trust_domain"), e.to_string()))?;
        if &td == own {
            return Err(ctx.err(
                field("trust_domain"),
                format!("{td} is this config's own trust domain; federate with other ones"),
            ));
        }
        if out.iter().any(|d| d.trust_domain == td) {
            return Err(ctx.err(
                field("trust_domain"),
                format!("{td} has two [[federation]] tables"),
            ));
        }
        let endpoint = Endpoint::parse(&f.bundle_endpoint)
            .map_err(|e| ctx.err(field("bundle_endpoint"), e))?;
        let pem = |name: &str, p: &PathBuf| {
            let path = ctx.path(p);
            let what = path.display().to_string();
            let bytes = std::fs::read(&path)
                .map_err(|e| ctx.err(field(name), format!("reading {what}: {e}")))?;
            certs_from_pem(&bytes, &what).map_err(|e| ctx.err(field(name), e.to_string()))
        };
        let bootstrap = match &f.bundle {
            Some(p) => pem("bundle", p)?,
            None => Vec::new(),
        };
        let profile = match f.profile.as_deref().unwrap_or("https_spiffe") {
            "https_spiffe" => {
                let id = f.endpoint_spiffe_id.as_deref().ok_or_else(|| {
                    ctx.err(
                        field("endpoint_spiffe_id"),
                        format!("required with profile https_spiffe: the bundle endpoint server's SPIFFE ID, e.g. spiffe://{td}/trustline/ca"),
                    )
                })?;
                let endpoint_id = parse_id(id)
                    .map_err(|e| ctx.err(field("endpoint_spiffe_id"), e.to_string()))?;
                if !endpoint_id.is_member_of(&td) {
                    return Err(ctx.err(
                        field("endpoint_spiffe_id"),
                        format!("{endpoint_id} is not in trust domain {td}: the endpoint is verified with {td}'s own bundle"),
                    ));
                }
                if bootstrap.is_empty() {
                    return Err(ctx.err(
                        field("bundle"),
                        format!("required with profile https_spiffe: a PEM file of {td}'s roots, obtained out of band, to authenticate its bundle endpoint the first time"),
                    ));
                }
                Profile::HttpsSpiffe { endpoint_id }
            }
            "https_web" => {
                if f.endpoint_spiffe_id.is_some() {
                    return Err(ctx.err(
                        field("endpoint_spiffe_id"),
                        "only for profile https_spiffe (an https_web endpoint is authenticated by its host name)",
                    ));
                }
                let p = f.web_roots.as_ref().ok_or_else(|| {
                    ctx.err(
                        field("web_roots"),
                        "required with profile https_web: a PEM file of the WebPKI roots to trust (trustline carries no public root store)",
                    )
                })?;
                Profile::HttpsWeb {
                    web_roots: pem("web_roots", p)?,
                }
            }
            other => {
                return Err(ctx.err(
                    field("profile"),
                    format!("{other:?}: expected \"https_spiffe\" or \"https_web\""),
                ))
            }
        };
        if f.web_roots.is_some() && matches!(profile, Profile::HttpsSpiffe { .. }) {
            return Err(ctx.err(
                field("web_roots"),
                "only for profile https_web (an https_spiffe endpoint is verified with the trust domain's bundle)",
            ));
        }
        let refresh = match &f.refresh {
            None => None,
            Some(v) => {
                let t = ctx.duration(&field("refresh"), Some(v), Duration::ZERO)?;
                if t < MIN_REFRESH_OVERRIDE {
                    return Err(ctx.err(
                        field("refresh"),
                        format!("{v}: at least {MIN_REFRESH_OVERRIDE:?}"),
                    ));
                }
                Some(t)
            }
        };
        out.push(FederatedDomain {
            trust_domain: td,
            endpoint,
            profile,
            bootstrap,
            refresh,
        });
    }
    Ok(out)
}
