//! The sidecar's start-up around the two sides: the audit log, the admin state, the listeners
//! (bound before anything serves) and what is said once at start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use super::authz::Authz;
use super::config::{self, SidecarConfig};
use super::inbound::{self, Inbound};
use super::live::{LiveConns, Sweeper};
use super::metrics::ProxyMetrics;
use super::outbound::{self, Outbound};
use super::ProxyError;
use crate::clock::{unix_secs, Clock};
use crate::svid::{self, Identity};
use crate::tunnel::paths::Paths;

/// What start-up makes before the listeners are bound: everything that registers metrics, then
/// the admin listener that serves them.
pub(super) struct Setup {
    pub identity: Arc<Identity>,
    pub metrics: ProxyMetrics,
    pub audit: Arc<crate::audit::AuditLog>,
    /// The inbound policy, if configured.
    pub authz: Option<Arc<Authz>>,
    /// The paths to this region's gateways, when a service is in another region.
    pub gateways: Option<Arc<Paths>>,
    /// The admin listener's address.
    pub admin: SocketAddr,
    /// The `[[federation]]` bundles, fed to the identity's trust and refreshed until `stop`.
    pub federation: Arc<crate::federation::Federation>,
}

impl Setup {
    /// Starts the identity task, opens the audit log, loads the policy, opens the gateway
    /// paths and serves the admin listener; their tasks end when `stop` changes.
    pub async fn new(
        config: &SidecarConfig,
        clock: &Clock,
        stop: &watch::Receiver<bool>,
    ) -> Result<Self, ProxyError> {
        let identity = svid::start(config.identity.clone(), clock.clone(), stop.clone())
            .map_err(|e| ProxyError::Identity(e.into()))?;
        let federation = crate::federation::Federation::new(
            config.federation.clone(),
            Some(identity.trust()),
            clock.clone(),
        )?;
        federation.spawn(stop.clone());
        feed_federated_jwt_keys(&federation, &identity, stop.clone());
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::new(&mut registry);
        identity.register(&mut registry);
        let audit = open_audit(config)?;
        let authz = inbound::load_policy(config, &audit, clock, &mut registry, stop)?;
        if let Some(a) = &authz {
            a.use_jwt_bundles_of(identity.clone());
        }
        let gateways = match &config.tunnel {
            Some(t) => Some(outbound::gateway_paths(
                config,
                t,
                &identity,
                clock,
                audit.clone(),
                &mut registry,
                stop,
            )?),
            None => None,
        };
        let state = admin_state(registry, &identity, &federation, clock);
        let admin = crate::admin::serve(config.admin, state, stop.clone())
            .await
            .map_err(|source| ProxyError::Bind {
                what: "admin",
                addr: config.admin,
                source,
            })?;
        Ok(Setup {
            identity,
            metrics,
            audit,
            authz,
            gateways,
            admin,
            federation,
        })
    }

    /// The live connections (the policy's registry, when there is a policy), re-checked by a
    /// [`Sweeper`] until `stop`.
    pub fn sweep(
        &self,
        config: &SidecarConfig,
        clock: &Clock,
        stop: &watch::Receiver<bool>,
    ) -> Arc<LiveConns> {
        let live = self
            .authz
            .as_ref()
            .map_or_else(LiveConns::new, |a| a.live());
        let sweeper = Sweeper {
            live: live.clone(),
            identity: self.identity.clone(),
            authz: self.authz.clone(),
            audit: self.audit.clone(),
            service: self
                .authz
                .as_ref()
                .map_or_else(|| self.identity.id().to_string(), |a| a.service.clone()),
            region: config.region.clone(),
            clock: clock.clone(),
            every: config.identity.refresh,
        };
        let span = tracing::info_span!("sweeper");
        tokio::spawn(sweeper.run(stop.clone()).instrument(span));
        live
    }
}

/// The decision audit log of `config` (a disabled one when none is configured).
fn open_audit(config: &SidecarConfig) -> Result<Arc<crate::audit::AuditLog>, ProxyError> {
    Ok(Arc::new(match &config.audit_log {
        Some(p) => crate::audit::AuditLog::open(p).map_err(|source| ProxyError::Audit {
            path: p.clone(),
            source,
        })?,
        None => crate::audit::AuditLog::disabled(),
    }))
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ProxyError> {
    let err = |source| ProxyError::Bind { what, addr, source };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

/// The inbound, outbound and explicit listeners, bound, with their real addresses.
pub(super) struct Listeners {
    inbound: Option<(TcpListener, SocketAddr)>,
    outbound: Option<(TcpListener, SocketAddr)>,
    explicit: Vec<(TcpListener, SocketAddr)>,
}

impl Listeners {
    /// Binds every listener of `config`.
    pub async fn bind(config: &SidecarConfig) -> Result<Self, ProxyError> {
        let inbound = match &config.inbound {
            Some(i) => Some(bind("inbound", i.listen).await?),
            None => None,
        };
        let outbound = match config.outbound {
            Some((listen, _)) => Some(bind("outbound", listen).await?),
            None => None,
        };
        let mut explicit = Vec::new();
        for lc in &config.listeners {
            explicit.push(bind("listener", lc.listen).await?);
        }
        Ok(Listeners {
            inbound,
            outbound,
            explicit,
        })
    }

    /// The ports of these listeners and of `admin`.
    pub fn own_ports(&self, admin: SocketAddr) -> Vec<u16> {
        [
            Some(admin),
            self.inbound.as_ref().map(|l| l.1),
            self.outbound.as_ref().map(|l| l.1),
        ]
        .into_iter()
        .flatten()
        .chain(self.explicit.iter().map(|l| l.1))
        .map(|a| a.port())
        .collect()
    }

    /// Serves each listener with its side; returns the inbound, outbound and explicit
    /// listeners' addresses.
    pub fn serve(
        self,
        config: &SidecarConfig,
        inbound: Option<Arc<Inbound>>,
        outbound: Arc<Outbound>,
    ) -> (Option<SocketAddr>, Option<SocketAddr>, Vec<SocketAddr>) {
        let inbound_addr = match (self.inbound, inbound) {
            (Some((l, addr)), Some(side)) => {
                tokio::spawn(inbound::serve(l, side));
                Some(addr)
            }
            _ => None,
        };
        let outbound_addr = self.outbound.map(|(l, addr)| {
            tokio::spawn(outbound::serve_transparent(l, outbound.clone()));
            addr
        });
        let mut listeners = Vec::new();
        for ((l, addr), lc) in self.explicit.into_iter().zip(&config.listeners) {
            let service = outbound.services[lc.service].clone();
            tokio::spawn(outbound::serve_explicit(
                l,
                outbound.clone(),
                service,
                lc.address,
            ));
            listeners.push(addr);
        }
        (inbound_addr, outbound_addr, listeners)
    }
}

/// Settings that are valid but open something up: said once at start, loudly.
pub(super) fn warn_of_footguns(config: &SidecarConfig) {
    if let Some(i) = config.inbound.as_ref() {
        if i.ports.is_empty() && i.app_address.is_none() {
            tracing::warn!("inbound has no `ports` and no `app_address`: every inbound connection will be refused (undeclared_port)");
        }
    }
    for l in config
        .listeners
        .iter()
        .filter(|l| !l.listen.ip().is_loopback())
    {
        tracing::warn!(listen = %l.listen, id = %config.identity.id, "a [[listener]] on a non-loopback address lends this workload's identity to anyone who can reach it; bind it to 127.0.0.1 unless that is intended");
    }
    if config
        .outbound
        .is_some_and(|(_, unknown)| unknown == config::UnknownDestination::Passthrough)
    {
        tracing::warn!("outbound.unknown_destination = \"passthrough\": the app's connections to addresses no [[service]] names leave in clear text, with no identity and no policy");
    }
}

/// What the admin listener serves: metrics, readiness and `/identity`.
fn admin_state(
    registry: Registry,
    identity: &Arc<Identity>,
    federation: &Arc<crate::federation::Federation>,
    clock: &Clock,
) -> Arc<crate::admin::AdminState> {
    let ready_id = identity.clone();
    let info_id = identity.clone();
    let clock = clock.clone();
    Arc::new(crate::admin::AdminState {
        registry,
        ready: Box::new(move || ready_id.ready()),
        json: vec![
            (
                "/identity",
                Box::new(move || match info_id.current() {
                    None => {
                        serde_json::json!({"spiffe_id": info_id.id().to_string(), "ready": false})
                    }
                    Some(s) => {
                        let left = s
                            .info
                            .not_after
                            .duration_since(clock.now())
                            .unwrap_or_default();
                        serde_json::json!({
                            "spiffe_id": s.id().to_string(),
                            "serial": s.info.serial.to_string(),
                            "not_after": crate::clock::rfc3339(s.info.not_after),
                            "region": crate::identity::region_of_chain(&s.chain),
                            // How long traffic can go on if the CA stayed down from now.
                            "seconds_left_if_ca_down": left.as_secs(),
                            "ready": left > Duration::ZERO,
                        })
                    }
                }),
            ),
            {
                let federation = federation.clone();
                ("/federation", Box::new(move || federation.status_json()))
            },
        ],
    })
}

/// Counts rotations and publishes the SVID's expiry, until `stop`.
pub(super) async fn watch_rotations(
    identity: Arc<Identity>,
    metrics: ProxyMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut rx = identity.rotations();
    loop {
        if let Some(s) = identity.current() {
            metrics.svid_expiry.set(unix_secs(s.info.not_after) as i64);
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        metrics.rotations.inc();
    }
}

/// Hands each federated trust domain's JWT keys (no region: only our own CAs' regions are
/// vouched for) to the identity's JWT bundles, now and on every change, until `stop`.
fn feed_federated_jwt_keys(
    federation: &Arc<crate::federation::Federation>,
    identity: &Arc<crate::svid::Identity>,
    mut stop: watch::Receiver<bool>,
) {
    let feed = |f: &crate::federation::Federation, id: &crate::svid::Identity| {
        for (_, _, jwt) in f.bundles() {
            id.set_jwt_bundle(jwt);
        }
    };
    feed(federation, identity);
    let mut changes = federation.changes();
    let (federation, identity) = (federation.clone(), identity.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            feed(&federation, &identity);
        }
    });
}
