//! `trustline gateway`: joins regions. It accepts QUIC connections from this region's sidecars
//! and from other regions' gateways, keeps warm paths to every peer region, and forwards each
//! stream after checking its header against the region-level policy. It never terminates the
//! workloads' mTLS: it reads the stream header and then only copies bytes.
//!
//! This file builds the gateway and accepts connections; [`conn`] serves one tunnel connection
//! (its peer's role, quotas, certificate re-checks), [`streams`] one stream (header, policy,
//! forwarding).

mod conn;
mod streams;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::Instrument;

use super::config::GatewayConfig;
use super::metrics::{Refused, TunnelMetrics};
use super::paths::{Paths, PathsConfig};
use super::Error;
use crate::audit::tunnel::TunnelEvent;
use crate::audit::AuditLog;
use crate::clock::Clock;
use crate::limits::{client_key, Full, Gate, LogEvery};
use crate::refusal::Refusal;
use crate::region::Region;
use crate::svid::{self, Identity};
use crate::tls::mesh;

/// Who is at the other end of an accepted connection.
#[derive(Clone, Debug)]
enum Role {
    /// A sidecar of this region: its streams leave for other regions.
    Workload { id: String },
    /// Another region's gateway: its streams end here.
    Gateway { region: String },
}

struct Gateway {
    config: GatewayConfig,
    peers: HashMap<Region, Arc<Paths>>,
    metrics: TunnelMetrics,
    audit: Arc<AuditLog>,
    identity: Arc<Identity>,
    quotas: Quotas,
    clock: Clock,
}

impl Gateway {
    /// The region an event about `role`'s connection is filed under: a peer gateway's, or ours
    /// for a workload.
    fn region_of<'a>(&'a self, role: &'a Role) -> &'a str {
        match role {
            Role::Gateway { region } => region.as_str(),
            Role::Workload { .. } => self.config.region.as_str(),
        }
    }
}

/// The per-peer quotas of [`super::config::GatewayLimits`], as gates.
struct Quotas {
    /// QUIC connections (handshakes included), in total and per client address.
    by_ip: Gate<IpAddr>,
    /// Connections of each workload ID.
    conns_by_id: Gate<Arc<str>>,
    /// Open streams of each workload ID, over all its connections.
    streams_by_id: Gate<Arc<str>>,
    /// Quota refusals are logged and audited at most once a second (with how many were held
    /// back): a workload at its quota could otherwise write a line per stream it tries.
    log: LogEvery,
}

impl Quotas {
    fn new(l: &super::config::GatewayLimits) -> Self {
        Quotas {
            by_ip: Gate::new(l.max_connections, l.max_connections_per_ip),
            conns_by_id: Gate::new(l.max_connections, l.max_connections_per_id),
            streams_by_id: Gate::new(usize::MAX, l.max_streams_per_id),
            log: LogEvery::new(Duration::from_secs(1)),
        }
    }
}

/// A running gateway.
pub struct Bound {
    /// The QUIC (UDP) address.
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub identity: Arc<Identity>,
    pub metrics: TunnelMetrics,
    /// Paths to each peer region.
    pub peers: HashMap<Region, Arc<Paths>>,
    /// The decision audit log ([`Bound::shutdown`] flushes it).
    pub audit: Arc<AuditLog>,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
}

impl Bound {
    /// Closes every connection and stops, and writes out the audit log's queue.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway shutting down");
        self.endpoint.wait_idle().await;
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
    }
}

/// Starts the identity task, binds the QUIC endpoint and the admin listener, connects to the
/// peers and serves. Returns once bound.
pub async fn build(config: GatewayConfig, clock: Clock) -> Result<Bound, Error> {
    let (stop, stop_rx) = watch::channel(false);
    let identity = svid::start(config.identity.clone(), clock.clone(), stop_rx.clone())
        .map_err(|e| Error::Identity(e.to_string()))?;
    let federation = crate::federation::Federation::new(
        config.federation.clone(),
        Some(identity.trust()),
        clock.clone(),
    )
    .map_err(|e| Error::Identity(format!("federation: {e}")))?;
    federation.spawn(stop_rx.clone());
    let audit = open_audit(&config)?;
    let (endpoint, listen) = bind_quic(&config, &identity, &clock)?;
    let metrics = TunnelMetrics::default();
    let peers = start_paths(
        &config, &endpoint, &identity, &metrics, &audit, &clock, &stop_rx,
    )?;
    let admin = serve_admin(&config, &identity, &metrics, &peers, &stop_rx).await?;
    let config_limits = config.limits;
    let gw = Arc::new(Gateway {
        config,
        peers: peers.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        identity: identity.clone(),
        quotas: Quotas::new(&config_limits),
        clock: clock.clone(),
    });
    tokio::spawn(accept_loop(gw.clone(), endpoint.clone(), stop_rx));
    tracing::info!(region = %gw.config.region, %listen, %admin, peers = gw.peers.len(), "gateway listening");
    Ok(Bound {
        listen,
        admin,
        identity,
        metrics,
        peers,
        audit,
        endpoint,
        stop,
    })
}

/// The decision audit log, or a disabled one when `audit_log` is unset.
fn open_audit(config: &GatewayConfig) -> Result<Arc<AuditLog>, Error> {
    Ok(Arc::new(match &config.audit_log {
        Some(p) => AuditLog::open(p).map_err(|error| Error::AuditLog {
            path: p.clone(),
            error,
        })?,
        None => AuditLog::disabled(),
    }))
}

/// Binds the QUIC endpoint on `listen`; returns it with its real address.
fn bind_quic(
    config: &GatewayConfig,
    identity: &Identity,
    clock: &Clock,
) -> Result<(quinn::Endpoint, SocketAddr), Error> {
    // Any SVID of the trust domain may connect; the role is decided from its ID and chain.
    let server_tls = mesh::server_config(
        Arc::new(mesh::SpiffeClientVerifier::new(
            identity.trust(),
            identity.peer_checks(),
        )),
        identity.resolver.clone(),
        false,
        clock,
    )
    .map_err(Error::Tls)?;
    let server = super::quic_server(server_tls, config.timing)?;
    let endpoint = quinn::Endpoint::server(server, config.listen).map_err(|error| Error::Bind {
        what: "QUIC",
        addr: config.listen,
        error,
    })?;
    let listen = endpoint.local_addr().map_err(Error::LocalAddr)?;
    Ok((endpoint, listen))
}

/// Serves the admin listener (metrics of the tunnel and the identity, `/paths`); returns its
/// real address.
async fn serve_admin(
    config: &GatewayConfig,
    identity: &Arc<Identity>,
    metrics: &TunnelMetrics,
    peers: &HashMap<Region, Arc<Paths>>,
    stop: &watch::Receiver<bool>,
) -> Result<SocketAddr, Error> {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    identity.register(&mut registry);
    crate::admin::serve(
        config.admin,
        admin_state(registry, identity, peers),
        stop.clone(),
    )
    .await
    .map_err(|error| Error::Bind {
        what: "admin",
        addr: config.admin,
        error,
    })
}

/// Starts the warm paths to the gateways of every peer region.
fn start_paths(
    config: &GatewayConfig,
    endpoint: &quinn::Endpoint,
    identity: &Arc<Identity>,
    metrics: &TunnelMetrics,
    audit: &Arc<AuditLog>,
    clock: &Clock,
    stop: &watch::Receiver<bool>,
) -> Result<HashMap<Region, Arc<Paths>>, Error> {
    let mut peers = HashMap::new();
    for p in &config.peers {
        let paths = Paths::start(
            PathsConfig {
                endpoint: endpoint.clone(),
                client: super::gateway_client(identity, &p.region, config.timing, clock)?,
                region: p.region.clone(),
                addrs: p.addresses.clone(),
                metrics: metrics.clone(),
                audit: audit.clone(),
                identity: identity.clone(),
                clock: clock.clone(),
                refresh: config.identity.refresh,
            },
            stop.clone(),
        );
        peers.insert(p.region.clone(), paths);
    }
    Ok(peers)
}

fn admin_state(
    registry: Registry,
    identity: &Arc<Identity>,
    peers: &HashMap<Region, Arc<Paths>>,
) -> Arc<crate::admin::AdminState> {
    let ready_id = identity.clone();
    let peers = peers.clone();
    Arc::new(crate::admin::AdminState {
        registry,
        ready: Box::new(move || ready_id.ready()),
        json: vec![(
            "/paths",
            Box::new(move || {
                let list: Vec<_> = peers
                    .values()
                    .flat_map(|p| p.all().iter())
                    .map(|p| {
                        let conn = p.connection();
                        serde_json::json!({
                            "region": p.labels.region,
                            "address": p.addr.to_string(),
                            "up": conn.is_some(),
                            "rtt_ms": conn.map(|c| c.rtt().as_secs_f64() * 1000.0),
                            "up_for_ms": p.up_for().map(|d| d.as_millis() as u64),
                        })
                    })
                    .collect();
                serde_json::json!({ "paths": list })
            }),
        )],
    })
}

async fn accept_loop(gw: Arc<Gateway>, endpoint: quinn::Endpoint, mut stop: watch::Receiver<bool>) {
    let mut ids = 0u64..;
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let remote = incoming.remote_address();
        // Before the handshake: one address cannot hold every connection slot.
        let place = match gw.quotas.by_ip.enter(client_key(remote.ip())) {
            Ok(p) => p,
            Err(full) => {
                let reason = match full {
                    Full::Total => Refusal::ConnectionCap,
                    Full::PerKey => Refusal::ConnectionCapIp,
                };
                refuse_over_quota(&gw, remote, None, reason, "too many QUIC connections");
                incoming.refuse();
                continue;
            }
        };
        let gw = gw.clone();
        let stop = stop.clone();
        // `peer` is recorded once the handshake says who it is.
        let span = tracing::info_span!("tunnel_conn", id = ids.next(), %remote, peer = tracing::field::Empty);
        let conn = async move {
            let _place = place;
            match incoming.await {
                Ok(conn) => conn::serve(gw, conn, stop).await,
                Err(e) => {
                    let reason = handshake_failure(&e);
                    gw.metrics
                        .failed_handshakes
                        .get_or_create(&Refused::from(reason))
                        .inc();
                    tracing::debug!(%remote, error = %e, reason = reason.label(), "tunnel handshake failed");
                }
            }
        };
        tokio::spawn(conn.instrument(span));
    }
}

/// Why a QUIC handshake failed, as a metric label: a peer that went silent (a half-open
/// handshake, closed by the idle timeout), a TLS alert about certificates, anything else.
fn handshake_failure(e: &quinn::ConnectionError) -> Refusal {
    use quinn::ConnectionError as E;
    let code = match e {
        E::TimedOut => return Refusal::HandshakeTimeout,
        E::Reset => return Refusal::Reset,
        E::TransportError(t) => t.code,
        E::ConnectionClosed(c) => c.error_code,
        _ => return Refusal::ProtocolError,
    };
    // QUIC carries a TLS alert as 0x100 + the alert's number (RFC 9001, 4.8).
    match u64::from(code).checked_sub(0x100) {
        Some(116) => Refusal::NoClientCertificate,
        Some(42..=49) => Refusal::BadCertificate,
        _ => Refusal::ProtocolError,
    }
}

/// Counts a quota refusal, and logs and audits it at most once a second (with how many were
/// held back since the last line).
fn refuse_over_quota(
    gw: &Gateway,
    remote: SocketAddr,
    peer_id: Option<&str>,
    reason: Refusal,
    what: &str,
) {
    let family = if reason == Refusal::StreamQuota {
        &gw.metrics.refused
    } else {
        &gw.metrics.refused_connections
    };
    family.get_or_create(&Refused::from(reason)).inc();
    if let Some(held_back) = gw.quotas.log.allow() {
        let reason = reason.label();
        tracing::warn!(%remote, peer_id, reason, held_back, "{what}: refused");
        let detail = format!("{reason}: {what} ({held_back} more refused since the last event)");
        let mut ev = TunnelEvent::new(&gw.clock, "quota_refused", remote, None, detail);
        ev.peer_id = peer_id.map(str::to_string);
        gw.audit.record(&ev);
    }
}
