//! `trustline sidecar --config FILE`: the TOML file and its validation.
//!
//! ```toml
//! trust_domain = "example.org"
//! spiffe_id = "spiffe://example.org/ns/shop/sa/web"
//! bundle = "bundle.pem"          # trust roots (relative paths are relative to this file)
//!
//! [identity]
//! source = "ca"                  # or "files", or "workload-api" (with `socket`)
//! ca_url = "https://127.0.0.1:8443"
//! token_file = "web.token"
//!
//! [inbound]
//! listen = "0.0.0.0:15006"
//! allow = ["spiffe://example.org/ns/shop/sa/frontend"]
//! ports = [8080]                 # redirected connections reach 127.0.0.1 on these ports only
//!
//! [[service]]
//! name = "checkout"
//! addresses = ["10.0.0.7:8080"]
//! spiffe_ids = ["spiffe://example.org/ns/shop/sa/checkout"]
//!
//! [[federation]]                 # another trust domain whose IDs peers may hold
//! trust_domain = "other.org"
//! bundle_endpoint = "https://ca.other.org:8444"
//! endpoint_spiffe_id = "spiffe://other.org/trustline/ca"
//! bundle = "other-bundle.pem"
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{load_toml, ConfigError, Ctx};
use crate::federation::{federation_config, FederatedDomain, FederationFile};
use crate::identity::{parse_trust_domain, parse_workload_id, SpiffeId, TrustDomain};
use crate::region::{Region, ServiceName};
use crate::svid::config::{identity_config, IdentityFile};
use crate::svid::IdentityConfig;
use crate::tunnel::config::{tunnel_timing, TunnelFile};
use inbound::InboundFile;
pub use inbound::{Inbound, SessionLimits};

mod inbound;

/// Default admin listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";
/// Default transparent outbound listener.
pub const DEFAULT_OUTBOUND: &str = "127.0.0.1:15001";
/// Default inbound listener.
pub const DEFAULT_INBOUND: &str = "0.0.0.0:15006";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SidecarFile {
    trust_domain: String,
    spiffe_id: String,
    region: Option<String>,
    bundle: PathBuf,
    resumption: Option<bool>,
    pooling: Option<bool>,
    pool_idle_timeout: Option<String>,
    drain_timeout: Option<String>,
    handshake_timeout: Option<String>,
    workers: Option<usize>,
    audit_log: Option<PathBuf>,
    identity: IdentityFile,
    #[serde(default)]
    admin: AdminFile,
    outbound: Option<OutboundFile>,
    inbound: Option<InboundFile>,
    #[serde(default, rename = "service")]
    services: Vec<ServiceFile>,
    #[serde(default, rename = "listener")]
    listeners: Vec<ListenerFile>,
    tunnel: Option<TunnelFile>,
    #[serde(default)]
    federation: Vec<FederationFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundFile {
    listen: Option<String>,
    unknown_destination: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    name: String,
    region: Option<String>,
    addresses: Vec<String>,
    spiffe_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFile {
    listen: String,
    service: String,
    address: Option<String>,
}

/// What the outbound side does with a destination that is not a known service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownDestination {
    /// Close the connection (default).
    Refuse,
    /// Forward in plain text (logged).
    Passthrough,
}

/// A known service: where it is and who it must be.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: ServiceName,
    /// Another region's service (reached through the local gateways), or `None` for local.
    pub region: Option<Region>,
    pub addresses: Vec<SocketAddr>,
    pub spiffe_ids: Vec<SpiffeId>,
}

/// How the sidecar reaches other regions.
#[derive(Clone, Debug)]
pub struct TunnelSide {
    /// This region's gateways (QUIC, UDP).
    pub gateways: Vec<SocketAddr>,
    pub timing: crate::tunnel::Timing,
    /// Keep a session open to every remote service address ahead of need (default on).
    pub prewarm: bool,
}

/// An explicit-mode listener: plain text in on `listen`, mTLS out to `service` at `address`.
#[derive(Clone, Debug)]
pub struct Listener {
    pub listen: SocketAddr,
    pub service: usize,
    pub address: SocketAddr,
}

/// The validated sidecar configuration.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    pub trust_domain: TrustDomain,
    pub identity: IdentityConfig,
    pub region: Option<Region>,
    pub resumption: bool,
    /// Same-region services: one warm multiplexed session per destination sidecar address
    /// instead of a handshake per connection (see [`crate::proxy::session::pool`]).
    pub pooling: bool,
    /// A same-region session with no new stream for this long is closed (after its last open
    /// stream ends).
    pub pool_idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub handshake_timeout: Duration,
    pub workers: usize,
    /// Decision audit log (JSON lines); none when unset.
    pub audit_log: Option<PathBuf>,
    pub admin: SocketAddr,
    pub outbound: Option<(SocketAddr, UnknownDestination)>,
    pub inbound: Option<Inbound>,
    pub services: Vec<Service>,
    pub listeners: Vec<Listener>,
    /// Set when a service is in another region.
    pub tunnel: Option<TunnelSide>,
    /// `[[federation]]`: other trust domains whose IDs peers may hold.
    pub federation: Vec<FederatedDomain>,
}

impl SidecarConfig {
    /// Reads and validates a sidecar config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let raw: SidecarFile = load_toml(file)?;
        let ctx = Ctx {
            file,
            dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let td = parse_trust_domain(&raw.trust_domain)
            .map_err(|e| ctx.err("trust_domain", e.to_string()))?;
        let id = ctx.id("spiffe_id", &raw.spiffe_id, &td)?;
        let region = match &raw.region {
            Some(r) => Some(ctx.region("region", r)?),
            None => None,
        };
        let identity = identity_config(&ctx, &td, id, &raw.bundle, region.as_ref(), &raw.identity)?;
        let federation = federation_config(&ctx, &raw.federation, &td)?;
        let members = Members {
            own: &td,
            federated: &federation,
        };
        let services = services(&ctx, &raw.services, &members, region.as_ref())?;
        let tunnel = tunnel_side(&ctx, raw.tunnel.as_ref(), &services)?;
        let listeners = listeners(&ctx, &raw.listeners, &services)?;
        let outbound = match &raw.outbound {
            None => None,
            Some(o) => Some(outbound(&ctx, o)?),
        };
        let admin = ctx.addr(
            "admin.listen",
            raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN),
        )?;
        let inbound = match &raw.inbound {
            None => None,
            Some(i) => Some(inbound::inbound(&ctx, i, &members)?),
        };
        check_listeners(&ctx, admin, inbound.as_ref(), outbound, &listeners)?;
        let pool_idle_timeout = pool_idle_timeout(&ctx, raw.pool_idle_timeout.as_deref())?;
        let workers = raw.workers.unwrap_or(1);
        if !(1..=64).contains(&workers) {
            return Err(ctx.err("workers", format!("{workers}: expected 1..=64")));
        }
        let ten_seconds = |field: &str, v: &Option<String>| {
            ctx.duration(field, v.as_deref(), Duration::from_secs(10))
        };
        Ok(SidecarConfig {
            identity,
            trust_domain: td,
            region,
            resumption: raw.resumption.unwrap_or(true),
            pooling: raw.pooling.unwrap_or(true),
            pool_idle_timeout,
            drain_timeout: ten_seconds("drain_timeout", &raw.drain_timeout)?,
            handshake_timeout: ten_seconds("handshake_timeout", &raw.handshake_timeout)?,
            workers,
            audit_log: raw.audit_log.as_deref().map(|p| ctx.path(p)),
            admin,
            outbound,
            inbound,
            services,
            listeners,
            tunnel,
            federation,
        })
    }
}

/// The trust domains whose workload IDs a sidecar's config may name: its own and the
/// `[[federation]]` ones.
pub(super) struct Members<'a> {
    pub own: &'a TrustDomain,
    pub federated: &'a [FederatedDomain],
}

impl Members<'_> {
    /// A workload ID of our trust domain or of a federated one.
    pub fn id(&self, ctx: &Ctx<'_>, field: &str, v: &str) -> Result<SpiffeId, ConfigError> {
        let id = parse_workload_id(v).map_err(|e| ctx.err(field, e.to_string()))?;
        let federated = || {
            self.federated
                .iter()
                .any(|f| id.is_member_of(&f.trust_domain))
        };
        if !id.is_member_of(self.own) && !federated() {
            return Err(ctx.err(
                field,
                format!(
                    "{id} is not in trust domain {} nor in a [[federation]] one",
                    self.own
                ),
            ));
        }
        Ok(id)
    }
}

/// The listeners taken together: no app port of `[inbound]` is one of the sidecar's own
/// listeners, and there is at least one of `[inbound]`, `[outbound]` and a `[[listener]]`.
fn check_listeners(
    ctx: &Ctx<'_>,
    admin: SocketAddr,
    inbound: Option<&Inbound>,
    outbound: Option<(SocketAddr, UnknownDestination)>,
    listeners: &[Listener],
) -> Result<(), ConfigError> {
    if let Some(i) = inbound {
        let own = [Some(admin), Some(i.listen), outbound.map(|o| o.0)]
            .into_iter()
            .flatten()
            .chain(listeners.iter().map(|l| l.listen));
        inbound::check_app_ports(ctx, &i.ports, own)?;
    }
    if inbound.is_none() && outbound.is_none() && listeners.is_empty() {
        return Err(ctx.err(
            "(file)",
            "nothing to do: configure [inbound], [outbound] or a [[listener]]",
        ));
    }
    Ok(())
}

/// `pool_idle_timeout`: 60 s unless set, never 0.
fn pool_idle_timeout(ctx: &Ctx<'_>, v: Option<&str>) -> Result<Duration, ConfigError> {
    let t = ctx.duration("pool_idle_timeout", v, Duration::from_secs(60))?;
    if t.is_zero() {
        return Err(ctx.err("pool_idle_timeout", "must be more than 0"));
    }
    Ok(t)
}

/// `[outbound]`: the transparent listener and what it does with unknown destinations.
fn outbound(
    ctx: &Ctx<'_>,
    o: &OutboundFile,
) -> Result<(SocketAddr, UnknownDestination), ConfigError> {
    let listen = ctx.addr(
        "outbound.listen",
        o.listen.as_deref().unwrap_or(DEFAULT_OUTBOUND),
    )?;
    let unknown = match o.unknown_destination.as_deref().unwrap_or("refuse") {
        "refuse" => UnknownDestination::Refuse,
        "passthrough" => UnknownDestination::Passthrough,
        other => {
            return Err(ctx.err(
                "outbound.unknown_destination",
                format!("{other:?}: expected \"refuse\" or \"passthrough\""),
            ))
        }
    };
    Ok((listen, unknown))
}

fn tunnel_side(
    ctx: &Ctx<'_>,
    t: Option<&TunnelFile>,
    services: &[Service],
) -> Result<Option<TunnelSide>, ConfigError> {
    let remote = services.iter().find(|s| s.region.is_some());
    let gateways = t
        .map(|t| &t.gateways[..])
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(n, a)| ctx.addr(&format!("tunnel.gateways[{n}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    match remote {
        None => Ok(None),
        Some(s) if gateways.is_empty() => Err(ctx.err(
            "tunnel.gateways",
            format!(
                "service {} is in region {}: list this region's gateways",
                s.name,
                s.region.as_deref().unwrap_or_default()
            ),
        )),
        Some(_) => Ok(Some(TunnelSide {
            gateways,
            timing: tunnel_timing(ctx, t)?,
            prewarm: t.and_then(|t| t.prewarm).unwrap_or(true),
        })),
    }
}

fn services(
    ctx: &Ctx<'_>,
    raw: &[ServiceFile],
    members: &Members<'_>,
    own_region: Option<&Region>,
) -> Result<Vec<Service>, ConfigError> {
    let mut seen: HashMap<SocketAddr, &str> = HashMap::new();
    let mut out = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let f = |field: &str| format!("service[{i}] ({}).{field}", s.name);
        if s.spiffe_ids.is_empty() {
            return Err(ctx.err(
                f("spiffe_ids"),
                "at least one SPIFFE ID the service must present",
            ));
        }
        let mut addresses = Vec::new();
        for (n, a) in s.addresses.iter().enumerate() {
            let addr = ctx.addr(&f(&format!("addresses[{n}]")), a)?;
            if let Some(other) = seen.insert(addr, &s.name) {
                return Err(ctx.err(
                    f(&format!("addresses[{n}]")),
                    format!("{addr} is also an address of service {other}"),
                ));
            }
            addresses.push(addr);
        }
        let name = ctx.service(&f("name"), &s.name)?;
        let region = match (&s.region, own_region) {
            (None, _) => None,
            (Some(r), Some(own)) if own == r.as_str() => None,
            (Some(r), None) => {
                return Err(ctx.err(
                    f("region"),
                    format!("service is in region {r}: set this sidecar's own `region` too"),
                ))
            }
            (Some(r), Some(_)) => Some(ctx.region(&f("region"), r)?),
        };
        out.push(Service {
            name,
            region,
            addresses,
            spiffe_ids: s
                .spiffe_ids
                .iter()
                .enumerate()
                .map(|(n, v)| members.id(ctx, &f(&format!("spiffe_ids[{n}]")), v))
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(out)
}

fn listeners(
    ctx: &Ctx<'_>,
    raw: &[ListenerFile],
    services: &[Service],
) -> Result<Vec<Listener>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, l)| {
            let service = services
                .iter()
                .position(|s| s.name == l.service.as_str())
                .ok_or_else(|| {
                    ctx.err(
                        format!("listener[{i}].service"),
                        format!("no [[service]] named {:?}", l.service),
                    )
                })?;
            let address = match &l.address {
                Some(a) => ctx.addr(&format!("listener[{i}].address"), a)?,
                None => *services[service].addresses.first().ok_or_else(|| {
                    ctx.err(
                        format!("listener[{i}].address"),
                        format!("service {:?} has no addresses", l.service),
                    )
                })?,
            };
            Ok(Listener {
                listen: ctx.addr(&format!("listener[{i}].listen"), &l.listen)?,
                service,
                address,
            })
        })
        .collect()
}
