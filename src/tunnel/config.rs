//! `trustline gateway --config FILE`: the TOML file and its validation. The `[[rule]]` tables
//! become a [`RegionPolicy`] (the engine is `policy/region.rs`).
//!
//! ```toml
//! trust_domain = "example.org"
//! region = "eu"                      # the gateway's ID is spiffe://example.org/trustline/gateway/eu
//! bundle = "bundle.pem"
//! listen = "0.0.0.0:15443"           # QUIC (UDP): sidecars of this region and other gateways
//!
//! [identity]
//! source = "ca"
//! ca_url = "https://ca.eu.internal:8443"
//! token_file = "gateway.token"
//!
//! [[peer]]                           # another region's gateways, kept connected
//! region = "us"
//! addresses = ["198.51.100.7:15443", "198.51.100.8:15443"]
//!
//! [[expose]]                         # local services other regions may reach, and where
//! service = "checkout"
//! addresses = ["10.1.0.7:8080"]
//!
//! [[rule]]                           # region-level policy: deny first, then allow, default deny
//! name = "us-to-checkout"
//! from = ["us"]                      # source regions ("*": any)
//! to = ["eu"]                        # destination regions
//! services = ["checkout"]            # destination services ("*": any)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::Timing;
use crate::config::{load_toml, ConfigError, Ctx};
use crate::identity::parse_trust_domain;
use crate::policy::region::{Match, RegionPolicy, RegionRule};
use crate::region::{NameError, Region, ServiceName};
use crate::svid::config::{identity_config, IdentityFile};
use crate::svid::IdentityConfig;

/// Default QUIC listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15443";
/// Default admin listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15021";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    trust_domain: String,
    region: String,
    bundle: PathBuf,
    listen: Option<String>,
    audit_log: Option<PathBuf>,
    workers: Option<usize>,
    identity: IdentityFile,
    admin: Option<AdminFile>,
    tunnel: Option<TunnelFile>,
    #[serde(default, rename = "peer")]
    peers: Vec<PeerFile>,
    #[serde(default, rename = "expose")]
    exposed: Vec<ExposeFile>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    federation: Vec<crate::federation::FederationFile>,
}

/// `[limits]`: per-peer quotas of a gateway.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_connections_per_id: Option<usize>,
    max_streams_per_id: Option<usize>,
}

/// Quotas that keep one workload (or one address) from taking a region's tunnel: its streams
/// leaving for other regions, and its QUIC connections (each may buffer up to the transport's
/// receive window, 32 MiB).
#[derive(Clone, Copy, Debug)]
pub struct GatewayLimits {
    /// QUIC connections at once, from everyone.
    pub max_connections: usize,
    /// Connections (handshakes included) from one address (IPv6: one /64).
    pub max_connections_per_ip: usize,
    /// Connections from one workload SPIFFE ID (all its replicas together).
    pub max_connections_per_id: usize,
    /// Streams one workload SPIFFE ID may have open through this gateway, over all its
    /// connections; far below a tunnel connection's 10,000, so a workload cannot take a
    /// region's tunnel.
    pub max_streams_per_id: usize,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            max_connections: 16_384,
            max_connections_per_ip: 256,
            max_connections_per_id: 256,
            max_streams_per_id: 1024,
        }
    }
}

fn limits(ctx: &Ctx<'_>, f: &LimitsFile) -> Result<GatewayLimits, ConfigError> {
    let d = GatewayLimits::default();
    let get = |key: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(ctx.err(format!("limits.{key}"), "must be at least 1")),
        v => Ok(v.unwrap_or(default)),
    };
    Ok(GatewayLimits {
        max_connections: get("max_connections", f.max_connections, d.max_connections)?,
        max_connections_per_ip: get(
            "max_connections_per_ip",
            f.max_connections_per_ip,
            d.max_connections_per_ip,
        )?,
        max_connections_per_id: get(
            "max_connections_per_id",
            f.max_connections_per_id,
            d.max_connections_per_id,
        )?,
        max_streams_per_id: get(
            "max_streams_per_id",
            f.max_streams_per_id,
            d.max_streams_per_id,
        )?,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerFile {
    region: String,
    addresses: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExposeFile {
    service: String,
    addresses: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    action: Option<String>,
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
}

/// Another region's gateways.
#[derive(Clone, Debug)]
pub struct Peer {
    pub region: Region,
    pub addresses: Vec<SocketAddr>,
}

/// A local service other regions may reach.
#[derive(Clone, Debug)]
pub struct Exposed {
    pub service: ServiceName,
    pub addresses: Vec<SocketAddr>,
}

/// The validated gateway configuration.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub region: Region,
    pub identity: IdentityConfig,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub audit_log: Option<PathBuf>,
    pub workers: usize,
    pub timing: Timing,
    pub peers: Vec<Peer>,
    pub exposed: Vec<Exposed>,
    pub policy: RegionPolicy,
    /// How long a stream to an exposed address may take to connect.
    pub connect_timeout: Duration,
    /// Per-peer quotas.
    pub limits: GatewayLimits,
    /// `[[federation]]`: other trust domains whose bundles the gateway trusts for their IDs.
    pub federation: Vec<crate::federation::FederatedDomain>,
}

fn names<T: FromStr<Err = NameError>>(
    ctx: &Ctx<'_>,
    field: &str,
    v: &[String],
) -> Result<Match<T>, ConfigError> {
    if v.is_empty() {
        return Err(ctx.err(field, "empty: list names, or [\"*\"] for any"));
    }
    if v.iter().any(|x| x == "*") {
        if v.len() > 1 {
            return Err(ctx.err(field, "\"*\" cannot be combined with names"));
        }
        return Ok(Match::Any);
    }
    v.iter()
        .enumerate()
        .map(|(n, x)| {
            T::from_str(x).map_err(|e| ctx.err(format!("{field}[{n}]"), format!("{x:?}: {e}")))
        })
        .collect::<Result<_, _>>()
        .map(Match::Names)
}

/// The `[[rule]]` tables, validated, in file order.
fn region_policy(ctx: &Ctx<'_>, raw: &[RuleFile]) -> Result<RegionPolicy, ConfigError> {
    let mut rules: Vec<RegionRule> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let f = |x: &str| format!("rule[{i}] ({}).{x}", r.name);
        if r.name.is_empty() || rules.iter().any(|x| x.name == r.name) {
            return Err(ctx.err(f("name"), "rule names must be non-empty and unique"));
        }
        let allow = match r.action.as_deref().unwrap_or("allow") {
            "allow" => true,
            "deny" => false,
            other => {
                return Err(ctx.err(
                    f("action"),
                    format!("{other:?}: expected \"allow\" or \"deny\""),
                ))
            }
        };
        rules.push(RegionRule {
            name: r.name.clone(),
            allow,
            from: names(ctx, &f("from"), &r.from)?,
            to: names(ctx, &f("to"), &r.to)?,
            services: names(ctx, &f("services"), &r.services)?,
        });
    }
    Ok(RegionPolicy { rules })
}

/// The `[[peer]]` tables: other regions than `own`, each once, with at least one address.
fn peers(ctx: &Ctx<'_>, own: &Region, raw: &[PeerFile]) -> Result<Vec<Peer>, ConfigError> {
    let mut peers: Vec<Peer> = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let f = |x: &str| format!("peer[{i}].{x}");
        let peer_region = ctx.region(&f("region"), &p.region)?;
        if peer_region == *own {
            return Err(ctx.err(f("region"), "a peer must be another region"));
        }
        if peers.iter().any(|q| q.region == peer_region) {
            return Err(ctx.err(
                f("region"),
                format!(
                    "region {} is listed twice; put all its addresses in one [[peer]]",
                    p.region
                ),
            ));
        }
        if p.addresses.is_empty() {
            return Err(ctx.err(f("addresses"), "at least one gateway address"));
        }
        peers.push(Peer {
            region: peer_region,
            addresses: addresses(ctx, &f, &p.addresses)?,
        });
    }
    Ok(peers)
}

/// The `[[expose]]` tables: each service once, with at least one address.
fn exposed(ctx: &Ctx<'_>, raw: &[ExposeFile]) -> Result<Vec<Exposed>, ConfigError> {
    let mut exposed: Vec<Exposed> = Vec::new();
    for (i, e) in raw.iter().enumerate() {
        let f = |x: &str| format!("expose[{i}].{x}");
        let service = ctx.service(&f("service"), &e.service)?;
        if exposed.iter().any(|x| x.service == service) {
            return Err(ctx.err(f("service"), format!("{} is exposed twice", e.service)));
        }
        if e.addresses.is_empty() {
            return Err(ctx.err(f("addresses"), "at least one address"));
        }
        exposed.push(Exposed {
            service,
            addresses: addresses(ctx, &f, &e.addresses)?,
        });
    }
    Ok(exposed)
}

/// A table's `addresses`, in order; `f` names a field of the table.
fn addresses(
    ctx: &Ctx<'_>,
    f: &dyn Fn(&str) -> String,
    raw: &[String],
) -> Result<Vec<SocketAddr>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(n, a)| ctx.addr(&f(&format!("addresses[{n}]")), a))
        .collect()
}

/// A gateway's region and its region-level policy: what `policy explain --gateway` needs.
#[derive(Clone, Debug)]
pub struct GatewayRules {
    pub region: Region,
    pub policy: RegionPolicy,
}

impl GatewayConfig {
    /// Reads a gateway config file and validates only its `region` and `[[rule]]` tables (with
    /// the errors of [`Self::load`]): the bundle and identity files need not exist.
    pub fn load_rules(file: &Path) -> Result<GatewayRules, ConfigError> {
        let raw: GatewayFile = load_toml(file)?;
        let ctx = Ctx {
            file,
            dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        Ok(GatewayRules {
            region: ctx.region("region", &raw.region)?,
            policy: region_policy(&ctx, &raw.rules)?,
        })
    }

    /// Reads and validates a gateway config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let raw: GatewayFile = load_toml(file)?;
        let ctx = Ctx {
            file,
            dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let td = parse_trust_domain(&raw.trust_domain)
            .map_err(|e| ctx.err("trust_domain", e.to_string()))?;
        let region = ctx.region("region", &raw.region)?;
        let id = super::gateway_id(&td, &region);
        let identity = identity_config(&ctx, &td, id, &raw.bundle, Some(&region), &raw.identity)?;
        let peers = peers(&ctx, &region, &raw.peers)?;
        let exposed = exposed(&ctx, &raw.exposed)?;
        let policy = region_policy(&ctx, &raw.rules)?;
        let workers = raw.workers.unwrap_or(1);
        if !(1..=64).contains(&workers) {
            return Err(ctx.err("workers", format!("{workers}: expected 1..=64")));
        }
        Ok(GatewayConfig {
            region,
            identity,
            listen: ctx.addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?,
            admin: ctx.addr(
                "admin.listen",
                raw.admin
                    .as_ref()
                    .and_then(|a| a.listen.as_deref())
                    .unwrap_or(DEFAULT_ADMIN),
            )?,
            audit_log: raw.audit_log.as_deref().map(|p| ctx.path(p)),
            workers,
            timing: tunnel_timing(&ctx, raw.tunnel.as_ref())?,
            peers,
            exposed,
            policy,
            connect_timeout: Duration::from_secs(5),
            limits: limits(&ctx, &raw.limits)?,
            federation: crate::federation::federation_config(&ctx, &raw.federation, &td)?,
        })
    }
}

/// `[tunnel]`: how this sidecar reaches other regions (shared with the gateway config).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelFile {
    #[serde(default)]
    pub gateways: Vec<String>,
    pub keepalive: Option<String>,
    pub idle_timeout: Option<String>,
    pub prewarm: Option<bool>,
}

/// The keep-alive timing of a `[tunnel]` table.
pub fn tunnel_timing(ctx: &Ctx<'_>, t: Option<&TunnelFile>) -> Result<Timing, ConfigError> {
    let d = Timing::default();
    let timing = Timing {
        keepalive: ctx.duration(
            "tunnel.keepalive",
            t.and_then(|t| t.keepalive.as_deref()),
            d.keepalive,
        )?,
        idle_timeout: ctx.duration(
            "tunnel.idle_timeout",
            t.and_then(|t| t.idle_timeout.as_deref()),
            d.idle_timeout,
        )?,
    };
    if timing.keepalive.is_zero() || timing.keepalive >= timing.idle_timeout {
        return Err(ctx.err(
            "tunnel.keepalive",
            "must be above 0 and below tunnel.idle_timeout",
        ));
    }
    Ok(timing)
}
