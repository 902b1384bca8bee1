//! `trustline sidecar`: the per-workload proxy.
//!
//! - **Outbound** (transparent, default 15001): `SO_ORIGINAL_DST` → known service → mTLS 1.3 with
//!   the service's expected SPIFFE ID → splice. Unknown destinations are refused (or passed
//!   through in plain text if configured), always logged.
//! - **Explicit listeners** (`[[listener]]`): plain text on a local port → mTLS to one service,
//!   for hosts without interception (like ghostunnel).
//! - **Inbound** (default 15006): mTLS 1.3 server requiring an X.509-SVID of our trust domain,
//!   then the allow list (default deny), then the app on localhost at the original port when
//!   that port is declared in `inbound.ports` (see [`inbound`]).
//! - **Live connections** are re-checked while they last ([`live`]): a revoked or expired
//!   certificate, a policy reload or a closing time window closes them, not only new ones.
//!
//! The identity task ([`crate::svid`]) publishes the SVID; every handshake reads
//! the newest. Until one is held, `/readyz` fails and connections are closed at once.

pub mod authz;
pub mod config;
mod http;
mod inbound;
pub mod live;
pub mod metrics;
mod outbound;
pub mod redirect;
pub mod session;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock::{unix_secs, Clock};
use crate::drain::Tracker;
use crate::svid::{self, Identity};
use crate::tls::mesh;
use crate::tls::ExpectedPeer;
use config::SidecarConfig;
use metrics::ProxyMetrics;

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("identity: {0}")]
    Identity(String),
    #[error("policy: {0}")]
    Policy(String),
    #[error("audit log {path}: {source}")]
    Audit {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What every connection handler shares.
pub(crate) struct Shared {
    pub config: SidecarConfig,
    pub identity: Arc<Identity>,
    pub metrics: ProxyMetrics,
    pub tracker: Arc<Tracker>,
    pub server_tls: tokio_rustls::TlsAcceptor,
    /// The inbound verifier, re-run on resumed sessions.
    pub client_verifier: Arc<mesh::SpiffeClientVerifier>,
    /// Per service, the outbound verifier, re-run on resumed sessions.
    pub server_verifiers: Vec<Arc<mesh::MeshServerVerifier>>,
    pub clock: Clock,
    /// One client config per service (its expected identities).
    pub client_tls: Vec<tokio_rustls::TlsConnector>,
    pub next_id: AtomicU64,
    /// The policy, when the inbound side has one (else the `allow` list applies).
    pub authz: Option<Arc<authz::Authz>>,
    /// Warm sessions to other sidecars (`pooling`, or a service in another region).
    pub sessions: Option<Arc<session::pool::SessionPool>>,
    /// Turns true when the sidecar drains: inbound sessions then refuse new streams (GOAWAY).
    pub draining: watch::Receiver<bool>,
    /// Live connections, re-checked by the sweeper.
    pub live: Arc<live::LiveConns>,
    /// Ports of the sidecar's own listeners (admin, inbound, outbound, explicit): never an app
    /// port, whatever `inbound.ports` says.
    pub own_ports: Vec<u16>,
    /// Caps of inbound sessions, per caller and in total.
    pub session_gate: session::limits::SessionGate,
}

/// A running sidecar: real addresses, identity, metrics, and the drain handle.
pub struct Bound {
    pub admin: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    /// Explicit listeners, in config order.
    pub listeners: Vec<SocketAddr>,
    pub identity: Arc<Identity>,
    pub metrics: ProxyMetrics,
    /// The inbound policy, if configured.
    pub authz: Option<Arc<authz::Authz>>,
    /// Sessions to other regions, if a service is in another region.
    pub sessions: Option<Arc<session::pool::SessionPool>>,
    /// The live connections, re-checked while they last.
    pub live: Arc<live::LiveConns>,
    tracker: Arc<Tracker>,
    stop_accepting: watch::Sender<bool>,
    stop_all: watch::Sender<bool>,
}

impl Bound {
    /// Stops accepting, waits for open connections to finish up to `deadline`, then stops the
    /// remaining tasks (open connections are closed). Returns the connections cut off.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let _ = self.stop_accepting.send(true);
        let _ = tokio::time::timeout(deadline, self.tracker.idle()).await;
        let left = self.tracker.active();
        let _ = self.stop_all.send(true);
        left
    }

    /// Connections in flight.
    pub fn active_connections(&self) -> usize {
        self.tracker.active()
    }
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

/// Starts the identity task, binds every listener and serves. Returns once bound.
/// Settings that are valid but open something up: said once at start, loudly.
fn warn_of_footguns(config: &SidecarConfig) {
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

pub async fn build(config: SidecarConfig, clock: Clock) -> Result<Bound, ProxyError> {
    let (stop_all, stop_all_rx) = watch::channel(false);
    let (stop_accepting, stop_accepting_rx) = watch::channel(false);
    let identity = svid::start(config.identity.clone(), clock.clone(), stop_all_rx.clone())
        .map_err(|e| ProxyError::Identity(e.to_string()))?;
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::new(&mut registry);
    identity.register(&mut registry);
    let audit = Arc::new(match &config.audit_log {
        Some(p) => crate::audit::AuditLog::open(p).map_err(|source| ProxyError::Audit {
            path: p.clone(),
            source,
        })?,
        None => crate::audit::AuditLog::disabled(),
    });
    let authz = match config.inbound.as_ref().and_then(|i| i.policy.clone()) {
        Some((path, service)) => {
            let anomaly = config
                .inbound
                .as_ref()
                .map(|i| i.anomaly.clone())
                .unwrap_or_default();
            let a = authz::Authz::load(
                path,
                service,
                config.region.clone(),
                audit.clone(),
                clock.clone(),
                anomaly,
            )
            .map_err(ProxyError::Policy)?;
            a.metrics.register(&mut registry);
            let every = config
                .inbound
                .as_ref()
                .map_or(Duration::from_secs(2), |i| i.reload_interval);
            tokio::spawn(a.clone().watch(every, stop_all_rx.clone()));
            Some(a)
        }
        None => None,
    };
    let checks = identity.peer_checks();
    let trust = identity.trust();
    let client_verifier = Arc::new(mesh::SpiffeClientVerifier::new(
        trust.clone(),
        checks.clone(),
    ));
    let mut server = mesh::server_config(
        client_verifier.clone(),
        identity.resolver.clone(),
        config.resumption,
        &clock,
    )?;
    // Sidecars of other regions open multiplexed sessions (see `crate::tunnel`).
    server
        .alpn_protocols
        .push(crate::proxy::session::SESSION_ALPN.to_vec());
    let server_verifiers: Vec<_> = config
        .services
        .iter()
        .map(|s| {
            Arc::new(mesh::MeshServerVerifier::new(
                trust.clone(),
                ExpectedPeer::AnyOf(s.spiffe_ids.clone()),
                checks.clone(),
            ))
        })
        .collect();
    let client_tls = server_verifiers
        .iter()
        .map(|v| {
            mesh::client_config(
                v.clone(),
                identity.resolver.clone(),
                config.resumption,
                &clock,
            )
            .map(|c| tokio_rustls::TlsConnector::from(Arc::new(c)))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let sessions = sessions(
        &config,
        &identity,
        &server_verifiers,
        &clock,
        audit.clone(),
        &mut registry,
        stop_all_rx.clone(),
    )?;
    let admin = crate::admin::serve(
        config.admin,
        admin_state(registry, &identity, &clock),
        stop_all_rx.clone(),
    )
    .await
    .map_err(|source| ProxyError::Bind {
        what: "admin",
        addr: config.admin,
        source,
    })?;
    warn_of_footguns(&config);
    // Bound before anything serves, so the inbound side knows every port of its own.
    let inbound_l = match &config.inbound {
        Some(i) => Some(bind("inbound", i.listen).await?),
        None => None,
    };
    let outbound_l = match config.outbound {
        Some((listen, _)) => Some(bind("outbound", listen).await?),
        None => None,
    };
    let mut listener_ls = Vec::new();
    for lc in &config.listeners {
        listener_ls.push(bind("listener", lc.listen).await?);
    }
    let own_ports = [
        Some(admin),
        inbound_l.as_ref().map(|l| l.1),
        outbound_l.as_ref().map(|l| l.1),
    ]
    .into_iter()
    .flatten()
    .chain(listener_ls.iter().map(|l| l.1))
    .map(|a| a.port())
    .collect();
    let live = authz
        .as_ref()
        .map_or_else(live::LiveConns::new, |a| a.live());
    tokio::spawn(
        live::Sweeper {
            live: live.clone(),
            identity: identity.clone(),
            authz: authz.clone(),
            audit: audit.clone(),
            service: authz
                .as_ref()
                .map_or_else(|| identity.id().to_string(), |a| a.service.clone()),
            region: config.region.clone(),
            clock: clock.clone(),
            every: config.identity.refresh,
        }
        .run(stop_all_rx.clone()),
    );
    let shared = Arc::new(Shared {
        identity: identity.clone(),
        metrics: metrics.clone(),
        tracker: Arc::new(Tracker::default()),
        server_tls: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        client_verifier,
        server_verifiers,
        clock: clock.clone(),
        client_tls,
        next_id: AtomicU64::new(1),
        authz: authz.clone(),
        sessions: sessions.clone(),
        draining: stop_accepting_rx.clone(),
        live: live.clone(),
        own_ports,
        session_gate: session::limits::SessionGate::new(
            &config
                .inbound
                .as_ref()
                .map(|i| i.sessions)
                .unwrap_or_default(),
        ),
        config,
    });
    tokio::spawn(watch_rotations(
        identity.clone(),
        metrics.clone(),
        stop_all_rx.clone(),
    ));

    let inbound = match inbound_l {
        Some((l, addr)) => {
            tokio::spawn(inbound::serve(
                l,
                shared.clone(),
                stop_accepting_rx.clone(),
                stop_all_rx.clone(),
            ));
            Some(addr)
        }
        None => None,
    };
    let outbound = match outbound_l {
        Some((l, addr)) => {
            tokio::spawn(outbound::serve_transparent(
                l,
                shared.clone(),
                stop_accepting_rx.clone(),
                stop_all_rx.clone(),
            ));
            Some(addr)
        }
        None => None,
    };
    let mut listeners = Vec::new();
    for (n, (l, addr)) in listener_ls.into_iter().enumerate() {
        tokio::spawn(outbound::serve_explicit(
            l,
            n,
            shared.clone(),
            stop_accepting_rx.clone(),
            stop_all_rx.clone(),
        ));
        listeners.push(addr);
    }
    tracing::info!(id = %identity.id(), %admin, ?inbound, ?outbound, ?listeners, "sidecar listening");
    Ok(Bound {
        admin,
        inbound,
        outbound,
        listeners,
        identity,
        metrics,
        authz,
        sessions,
        live,
        tracker: shared.tracker.clone(),
        stop_accepting,
        stop_all,
    })
}

/// The session pool (see [`crate::proxy::session::pool`]): sessions to other regions' sidecars ride
/// the paths to this region's gateways (opened here when a service is in another region; with
/// `prewarm`, the sessions to every remote address are opened now), and with `pooling` those to
/// this region's sidecars are direct TCP connections. `None` when neither applies.
fn sessions(
    config: &SidecarConfig,
    identity: &Arc<Identity>,
    server_verifiers: &[Arc<mesh::MeshServerVerifier>],
    clock: &Clock,
    audit: Arc<crate::audit::AuditLog>,
    registry: &mut Registry,
    stop: watch::Receiver<bool>,
) -> Result<Option<Arc<session::pool::SessionPool>>, ProxyError> {
    use session::pool;
    if config.tunnel.is_none() && !config.pooling {
        return Ok(None);
    }
    let gateways = match &config.tunnel {
        Some(tunnel) => Some(gateway_paths(
            config, tunnel, identity, clock, audit, registry, &stop,
        )?),
        None => None,
    };
    let mut per_service = Vec::new();
    for (s, v) in config.services.iter().zip(server_verifiers) {
        per_service.push(if s.region.is_some() || config.pooling {
            // Always a full handshake: a resumed session would carry the certificates of
            // the original one, and a session must be retired by the certificates it
            // really runs on (see `SessionPool`). Sessions are long-lived, and in TLS 1.3
            // resumption saves no round trip, so it costs only CPU, once per session.
            let mut c = mesh::client_config(v.clone(), identity.resolver.clone(), false, clock)?;
            c.alpn_protocols = vec![session::SESSION_ALPN.to_vec()];
            Some(pool::ServiceTls {
                connector: tokio_rustls::TlsConnector::from(Arc::new(c)),
                verifier: v.clone(),
            })
        } else {
            None
        });
    }
    let pool = pool::SessionPool::new(
        gateways,
        per_service,
        identity.clone(),
        clock.clone(),
        pool::Timeouts {
            handshake: config.handshake_timeout,
            idle: config.pool_idle_timeout,
        },
    );
    if config.tunnel.as_ref().is_some_and(|t| t.prewarm) {
        let targets = config
            .services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.region.is_some())
            .flat_map(|(i, s)| {
                s.addresses.iter().map(move |a| session::pool::Target {
                    service: i,
                    name: s.name.clone(),
                    region: s.region.clone(),
                    addr: *a,
                })
            })
            .collect();
        tokio::spawn(pool.clone().prewarm(targets, stop));
    }
    Ok(Some(pool))
}

/// The QUIC paths to this region's gateways.
fn gateway_paths(
    config: &SidecarConfig,
    tunnel: &config::TunnelSide,
    identity: &Arc<Identity>,
    clock: &Clock,
    audit: Arc<crate::audit::AuditLog>,
    registry: &mut Registry,
    stop: &watch::Receiver<bool>,
) -> Result<Arc<crate::tunnel::paths::Paths>, ProxyError> {
    use crate::tunnel::{self, paths};
    // Validated: a sidecar with services in other regions names its own region.
    let Some(region) = config.region.clone() else {
        return Err(ProxyError::Identity(
            "a [tunnel] needs the sidecar's own `region`".into(),
        ));
    };
    let client = tunnel::gateway_client(identity, &region, tunnel.timing, clock)
        .map_err(ProxyError::Identity)?;
    let bind: SocketAddr = if tunnel.gateways.iter().all(SocketAddr::is_ipv4) {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|source| ProxyError::Bind {
        what: "tunnel (QUIC)",
        addr: bind,
        source,
    })?;
    let metrics = tunnel::metrics::TunnelMetrics::default();
    metrics.register(registry);
    Ok(paths::Paths::start(
        paths::PathsConfig {
            endpoint,
            client,
            region,
            addrs: tunnel.gateways.clone(),
            metrics,
            audit,
            identity: identity.clone(),
            clock: clock.clone(),
            refresh: config.identity.refresh,
        },
        stop.clone(),
    ))
}

fn admin_state(
    registry: Registry,
    identity: &Arc<Identity>,
    clock: &Clock,
) -> Arc<crate::admin::AdminState> {
    let ready_id = identity.clone();
    let info_id = identity.clone();
    let clock = clock.clone();
    Arc::new(crate::admin::AdminState {
        registry,
        ready: Box::new(move || ready_id.ready()),
        json: vec![(
            "/identity",
            Box::new(move || match info_id.current() {
                None => serde_json::json!({"spiffe_id": info_id.id().to_string(), "ready": false}),
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
        )],
    })
}

async fn watch_rotations(
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

/// Accepts until told to stop; hands each connection to `handle`.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop_accepting: watch::Receiver<bool>,
    stop_all: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<Shared>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop_accepting.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let guard = shared.tracker.enter();
        let fut = handle(tcp, peer, shared.clone());
        let mut stop = stop_all.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                _ = fut => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// The original destination of a redirected connection, `None` when it was not redirected.
pub(crate) fn original_dst(tcp: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .ok()?
    .as_socket()?;
    (orig != local).then_some(orig)
}
