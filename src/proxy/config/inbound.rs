//! The `[inbound]` table of a sidecar config: the listener, who may connect (allow list or
//! policy), the app ports, and the caps of inbound sessions (`[inbound.sessions]`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::DEFAULT_INBOUND;
use crate::config::{ConfigError, Ctx};
use crate::identity::SpiffeId;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InboundFile {
    listen: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    app_address: Option<String>,
    #[serde(default)]
    ports: Vec<u16>,
    policy: Option<PathBuf>,
    service: Option<String>,
    reload_interval: Option<String>,
    /// `[inbound.sessions]`: caps of multiplexed sessions from other sidecars.
    #[serde(default)]
    sessions: SessionLimitsFile,
    #[serde(default)]
    single_region_ids: Vec<String>,
    anomaly_window: Option<String>,
    refuse_on_anomaly: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionLimitsFile {
    idle_timeout: Option<String>,
    max_total: Option<usize>,
    max_per_caller: Option<usize>,
    max_streams: Option<u32>,
    max_denied_streams: Option<u32>,
}

/// The inbound side.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub listen: SocketAddr,
    /// Callers allowed in (default deny: empty means nobody).
    pub allow: Vec<SpiffeId>,
    /// Where connections that were not redirected go (explicit mode).
    pub app_address: Option<SocketAddr>,
    /// The app ports a redirected connection may reach on 127.0.0.1 (transparent mode); any
    /// other destination port is refused (`undeclared_port`). Never a port of the sidecar's own.
    pub ports: Vec<u16>,
    /// A policy file and the service of it this sidecar protects (replaces `allow`).
    pub policy: Option<(PathBuf, String)>,
    /// How often the policy file is checked for changes.
    pub reload_interval: Duration,
    /// Impossible-travel detection.
    pub anomaly: crate::proxy::authz::AnomalyConfig,
    /// Caps of the multiplexed sessions other sidecars open to this one.
    pub sessions: SessionLimits,
}

/// Caps of inbound multiplexed sessions (`[inbound.sessions]`): what one caller, or one
/// session, can hold of this sidecar.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// A session with no open stream for this long is closed (GOAWAY). Callers re-open on
    /// demand; a pre-warmed cross-region session is re-opened at once.
    pub idle_timeout: Duration,
    /// Sessions open at once, from all callers.
    pub max_total: usize,
    /// Sessions open at once from one caller SPIFFE ID (all its replicas together).
    pub max_per_caller: usize,
    /// Concurrent streams (application connections) of one session. A caller's pool holds one
    /// session per destination, so this is also its concurrency to this sidecar.
    pub max_streams: u32,
    /// Streams of one session that may be refused (policy, a revoked or expired certificate)
    /// before the session is closed: each refusal is an audit line and a log line, so this
    /// bounds them per handshake, as for plain connections.
    pub max_denied_streams: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            idle_timeout: Duration::from_secs(120),
            max_total: 4096,
            max_per_caller: 256,
            max_streams: 1000,
            max_denied_streams: 16,
        }
    }
}

fn session_limits(ctx: &Ctx<'_>, f: &SessionLimitsFile) -> Result<SessionLimits, ConfigError> {
    let d = SessionLimits::default();
    let at_least_one = |key: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(ctx.err(format!("inbound.sessions.{key}"), "must be at least 1")),
        v => Ok(v.unwrap_or(default)),
    };
    let idle_timeout = ctx.duration(
        "inbound.sessions.idle_timeout",
        f.idle_timeout.as_deref(),
        d.idle_timeout,
    )?;
    if idle_timeout.is_zero() {
        return Err(ctx.err("inbound.sessions.idle_timeout", "must be more than 0"));
    }
    Ok(SessionLimits {
        idle_timeout,
        max_total: at_least_one("max_total", f.max_total, d.max_total)?,
        max_per_caller: at_least_one("max_per_caller", f.max_per_caller, d.max_per_caller)?,
        max_streams: at_least_one(
            "max_streams",
            f.max_streams.map(|v| v as usize),
            d.max_streams as usize,
        )? as u32,
        max_denied_streams: at_least_one(
            "max_denied_streams",
            f.max_denied_streams.map(|v| v as usize),
            d.max_denied_streams as usize,
        )? as u32,
    })
}

/// `[inbound]` of a sidecar whose peers are `members` (its trust domain and federated ones).
pub(super) fn inbound(
    ctx: &Ctx<'_>,
    i: &InboundFile,
    members: &super::Members<'_>,
) -> Result<Inbound, ConfigError> {
    let td = members.own;
    Ok(Inbound {
        policy: inbound_policy(ctx, i)?,
        sessions: session_limits(ctx, &i.sessions)?,
        anomaly: crate::proxy::authz::AnomalyConfig {
            window: ctx.duration(
                "inbound.anomaly_window",
                i.anomaly_window.as_deref(),
                Duration::from_secs(600),
            )?,
            single_region: i
                .single_region_ids
                .iter()
                .enumerate()
                .map(|(n, v)| {
                    ctx.id(&format!("inbound.single_region_ids[{n}]"), v, td)
                        .map(|id| id.to_string())
                })
                .collect::<Result<_, _>>()?,
            refuse: i.refuse_on_anomaly.unwrap_or(false),
        },
        reload_interval: ctx.duration(
            "inbound.reload_interval",
            i.reload_interval.as_deref(),
            Duration::from_secs(2),
        )?,
        listen: ctx.addr(
            "inbound.listen",
            i.listen.as_deref().unwrap_or(DEFAULT_INBOUND),
        )?,
        allow: i
            .allow
            .iter()
            .enumerate()
            .map(|(n, v)| members.id(ctx, &format!("inbound.allow[{n}]"), v))
            .collect::<Result<_, _>>()?,
        app_address: i
            .app_address
            .as_deref()
            .map(|a| ctx.addr("inbound.app_address", a))
            .transpose()?,
        ports: i.ports.clone(),
    })
}

fn inbound_policy(
    ctx: &Ctx<'_>,
    i: &InboundFile,
) -> Result<Option<(PathBuf, String)>, ConfigError> {
    match (&i.policy, &i.service) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(ctx.err("inbound.service", "required with inbound.policy: which [service.NAME] of the policy file this sidecar protects")),
        (None, Some(_)) => Err(ctx.err("inbound.policy", "inbound.service is set but no policy file is given")),
        (Some(_), Some(_)) if !i.allow.is_empty() => Err(ctx.err("inbound.allow", "use either `allow` or `policy`, not both")),
        (Some(p), Some(s)) => Ok(Some((ctx.path(p), s.clone()))),
    }
}

/// `inbound.ports` are app ports: not 0, each once, and none of the sidecar's own (`own`: its
/// listeners), which a caller would otherwise reach as a confused deputy.
pub(super) fn check_app_ports(
    ctx: &Ctx<'_>,
    ports: &[u16],
    own: impl Iterator<Item = SocketAddr>,
) -> Result<(), ConfigError> {
    let own: Vec<SocketAddr> = own.collect();
    for (n, p) in ports.iter().enumerate() {
        let field = format!("inbound.ports[{n}]");
        if *p == 0 {
            return Err(ctx.err(field, "0 is not a port"));
        }
        if ports[..n].contains(p) {
            return Err(ctx.err(field, format!("{p} is listed twice")));
        }
        if let Some(a) = own.iter().find(|a| a.port() == *p) {
            return Err(ctx.err(
                field,
                format!("{p} is a port of the sidecar itself ({a}), not of the app"),
            ));
        }
    }
    Ok(())
}
