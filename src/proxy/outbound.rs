//! The outbound side: transparent (iptables) and explicit listeners, mTLS 1.3 client.
//!
//! Each `[[service]]` is resolved once into an [`OutboundService`]: its addresses, its expected
//! identities and the TLS clients that check them. A direct mTLS connection is registered in
//! [`super::live::LiveConns`] with the server's certificate and closed when that certificate is
//! revoked or expires. Pooled sessions are retired by the session pool on the same facts (see
//! [`crate::proxy::session::pool`]).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use super::config::{self, SidecarConfig, UnknownDestination};
use super::live::{PeerCert, Registration};
use super::metrics::Dir;
use super::session::pool::{self, ServiceTls, SessionPool, Target};
use super::session::SESSION_ALPN;
use super::{accept_loop, original_dst, Common, ProxyError};
use crate::clock::Clock;
use crate::copy::splice;
use crate::refusal::Refusal;
use crate::region::{Region, ServiceName};
use crate::svid::Identity;
use crate::tls::mesh::{self, failure_reason, MeshServerVerifier};
use crate::tls::ExpectedPeer;

const DIR: &str = "outbound";

/// One `[[service]]`, resolved: where it is, who it must be (in its verifier), and the TLS
/// clients that check it.
pub(crate) struct OutboundService {
    pub name: ServiceName,
    /// Another region's service (reached through the local gateways), or `None` for local.
    pub region: Option<Region>,
    pub addresses: Vec<SocketAddr>,
    /// The TLS server name sent (the service's name; the verifier ignores it).
    pub server_name: ServerName<'static>,
    /// The client of direct connections (the service's expected identities).
    pub connector: TlsConnector,
    /// The verifier of both clients (it holds the identities the service must present),
    /// re-run on resumed sessions.
    pub verifier: Arc<MeshServerVerifier>,
    /// The client of sessions (session ALPN, no resumption), when connections to this service
    /// ride the session pool.
    pub session_tls: Option<ServiceTls>,
}

impl OutboundService {
    /// Resolves `s`; `pooled`: its connections ride sessions.
    fn build(
        s: &config::Service,
        pooled: bool,
        resumption: bool,
        identity: &Identity,
        clock: &Clock,
    ) -> Result<Self, rustls::Error> {
        let verifier = Arc::new(MeshServerVerifier::new(
            identity.trust(),
            ExpectedPeer::AnyOf(s.spiffe_ids.clone()),
            identity.peer_checks(),
        ));
        let direct = mesh::client_config(
            verifier.clone(),
            identity.resolver.clone(),
            resumption,
            clock,
        )?;
        let session_tls = if pooled {
            // Always a full handshake: a resumed session would carry the certificates of the
            // original one, and a session must be retired by the certificates it really runs
            // on (see `SessionPool`). Sessions are long-lived, and in TLS 1.3 resumption saves
            // no round trip, so it costs only CPU, once per session.
            let mut c =
                mesh::client_config(verifier.clone(), identity.resolver.clone(), false, clock)?;
            c.alpn_protocols = vec![SESSION_ALPN.to_vec()];
            Some(ServiceTls {
                connector: TlsConnector::from(Arc::new(c)),
                verifier: verifier.clone(),
            })
        } else {
            None
        };
        Ok(OutboundService {
            name: s.name.clone(),
            region: s.region.clone(),
            addresses: s.addresses.clone(),
            server_name: server_name(&s.name),
            connector: TlsConnector::from(Arc::new(direct)),
            verifier,
            session_tls,
        })
    }
}

fn server_name(service: &str) -> ServerName<'static> {
    ServerName::try_from(service.to_string())
        .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("valid name"))
}

/// The outbound side's state.
pub(crate) struct Outbound {
    pub common: Arc<Common>,
    /// The services, in config order.
    pub services: Vec<Arc<OutboundService>>,
    /// Warm sessions to other sidecars (`pooling`, or a service in another region).
    pub pool: Option<Arc<SessionPool>>,
    /// What the transparent listener does with a destination no service names.
    unknown: UnknownDestination,
}

impl Outbound {
    /// Resolves the services and opens the session pool (over `gateways`, this region's, when
    /// a service is in another region; with `prewarm`, the sessions to every remote address
    /// are opened now).
    pub(super) fn build(
        config: &SidecarConfig,
        common: Arc<Common>,
        gateways: Option<Arc<crate::tunnel::paths::Paths>>,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, ProxyError> {
        // Sessions to other regions' sidecars ride the paths to this region's gateways, and
        // with `pooling` those to this region's sidecars are direct TCP connections.
        let pooling = config.tunnel.is_some() || config.pooling;
        let services = config
            .services
            .iter()
            .map(|s| {
                let pooled = pooling && (s.region.is_some() || config.pooling);
                OutboundService::build(
                    s,
                    pooled,
                    config.resumption,
                    &common.identity,
                    &common.clock,
                )
                .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pool = pooling.then(|| {
            SessionPool::new(
                gateways,
                common.identity.clone(),
                common.clock.clone(),
                pool::Timeouts {
                    handshake: config.handshake_timeout,
                    idle: config.pool_idle_timeout,
                },
            )
        });
        if let Some(pool) = pool
            .as_ref()
            .filter(|_| config.tunnel.as_ref().is_some_and(|t| t.prewarm))
        {
            let targets = services
                .iter()
                .filter(|s| s.region.is_some())
                .flat_map(|s| {
                    s.addresses.iter().map(|a| Target {
                        service: s.clone(),
                        addr: *a,
                    })
                })
                .collect();
            tokio::spawn(pool.clone().prewarm(targets, stop));
        }
        Ok(Outbound {
            common,
            services,
            pool,
            unknown: config.outbound.map_or(UnknownDestination::Refuse, |o| o.1),
        })
    }
}

/// The QUIC paths to this region's gateways, for sessions to other regions.
pub(super) fn gateway_paths(
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
        return Err(ProxyError::NoRegion);
    };
    let client = tunnel::gateway_client(identity, &region, tunnel.timing, clock)
        .map_err(|e| ProxyError::Identity(e.into()))?;
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

/// Serves the transparent listener: each connection goes to the service at its original
/// destination.
pub(super) async fn serve_transparent(listener: TcpListener, out: Arc<Outbound>) {
    let common = out.common.clone();
    accept_loop(listener, common, move |tcp, peer| {
        let id = out.common.next_id();
        let span = tracing::info_span!("conn", id, dir = DIR, %peer);
        let out = out.clone();
        async move { out.transparent(tcp).await }.instrument(span)
    })
    .await
}

/// Serves an explicit listener: each connection goes to `service` at `addr`.
pub(super) async fn serve_explicit(
    listener: TcpListener,
    out: Arc<Outbound>,
    service: Arc<OutboundService>,
    addr: SocketAddr,
) {
    let common = out.common.clone();
    accept_loop(listener, common, move |tcp, peer| {
        let id = out.common.next_id();
        let span = tracing::info_span!("conn", id, dir = DIR, %peer, service = %service.name);
        let (out, service) = (out.clone(), service.clone());
        async move { out.to_service(tcp, &service, addr).await }.instrument(span)
    })
    .await
}

impl Outbound {
    async fn transparent(&self, tcp: TcpStream) {
        let m = &self.common.metrics;
        let Some(orig) = original_dst(&tcp) else {
            let reason = Refusal::NotRedirected;
            m.fail(DIR, reason);
            tracing::warn!(
                reason = reason.label(),
                "outbound connection has no original destination"
            );
            return;
        };
        match self.services.iter().find(|s| s.addresses.contains(&orig)) {
            Some(service) => self.to_service(tcp, service, orig).await,
            None if self.unknown == UnknownDestination::Passthrough => {
                Box::pin(self.passthrough(tcp, orig)).await
            }
            None => {
                let reason = Refusal::UnknownDestination;
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), destination = %orig, "refused: not a known service");
            }
        }
    }

    async fn passthrough(&self, mut tcp: TcpStream, orig: SocketAddr) {
        tracing::warn!(destination = %orig, "unknown destination passed through in PLAIN TEXT (outbound.unknown_destination = \"passthrough\")");
        let m = &self.common.metrics;
        let dir = Dir {
            direction: "passthrough",
        };
        match TcpStream::connect(orig).await {
            Ok(mut up) => {
                m.opened.get_or_create(&dir).inc();
                let _ = splice(&mut tcp, &mut up).await;
                m.closed.get_or_create(&dir).inc();
            }
            Err(e) => {
                m.fail(dir.direction, Refusal::UpstreamUnreachable);
                tracing::warn!(error = %e, "passthrough destination unreachable");
            }
        }
    }

    async fn to_service(&self, app: TcpStream, svc: &Arc<OutboundService>, addr: SocketAddr) {
        let m = &self.common.metrics;
        if let Err(why) = self.common.identity.ready() {
            m.fail(DIR, Refusal::NotReady);
            tracing::warn!(reason = Refusal::NotReady.label(), detail = %why, "outbound connection refused");
            return;
        }
        match self.pool.as_ref().filter(|_| svc.session_tls.is_some()) {
            Some(pool) => {
                let target = Target {
                    service: svc.clone(),
                    addr,
                };
                // Boxed: the session path (HTTP/2 client) would otherwise size every
                // connection's task.
                Box::pin(self.on_session(app, &target, pool)).await
            }
            None => self.direct(app, svc, addr).await,
        }
    }

    /// A connection of its own to the service: TCP, then mTLS, then the splice.
    async fn direct(&self, mut app: TcpStream, svc: &OutboundService, addr: SocketAddr) {
        let m = &self.common.metrics;
        let Some(mut tls) = self.connect(svc, addr).await else {
            return;
        };
        tracing::debug!(service = %svc.name, %addr, "outbound mTLS established");
        // The verifier accepted the chain, so its leaf parses; read back its serial and expiry.
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        let Some(info) = leaf.and_then(|c| crate::identity::inspect_cert(c).ok()) else {
            m.fail(DIR, Refusal::NoServerCertificate);
            return;
        };
        let peer = Arc::new(PeerCert { info, region: None });
        let reg = self
            .common
            .live
            .register(DIR, PeerCert::shared(peer), addr.port(), None);
        carry(&mut app, &mut tls, Some(reg), m).await;
    }

    /// TCP and the mTLS handshake to `svc` at `addr` within the handshake timeout, a resumed
    /// session re-checked; `None` when it failed (counted and logged).
    async fn connect(
        &self,
        svc: &OutboundService,
        addr: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        let m = &self.common.metrics;
        let started = Instant::now();
        let up = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                let reason = Refusal::UpstreamUnreachable;
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), %addr, error = %e, "cannot reach the service");
                return None;
            }
        };
        let _ = up.set_nodelay(true);
        // Boxed: the handshake's state is freed once done instead of sizing the connection's task.
        let connect = Box::pin(svc.connector.connect(svc.server_name.clone(), up));
        let tls = match tokio::time::timeout(self.common.handshake_timeout, connect).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), detail = %e, service = %svc.name, %addr, "outbound handshake failed");
                return None;
            }
            Err(_) => {
                let reason = Refusal::HandshakeTimeout;
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), %addr, "outbound handshake timed out");
                return None;
            }
        };
        if let Err(e) =
            mesh::recheck_resumed_server(tls.get_ref().1, &svc.verifier, &self.common.clock)
        {
            let reason = mesh::tls_reason(&e);
            m.fail(DIR, reason);
            tracing::warn!(reason = reason.label(), detail = %e, "resumed session refused: the server's certificate no longer passes");
            return None;
        }
        m.handshake
            .get_or_create(&Dir { direction: DIR })
            .observe(started.elapsed().as_secs_f64());
        Some(tls)
    }

    /// A new stream on the warm session to the destination sidecar: directly in our region
    /// (`pooling`), through the local gateways for another region (see [`crate::tunnel`]).
    async fn on_session(&self, mut app: TcpStream, target: &Target, pool: &Arc<SessionPool>) {
        let m = &self.common.metrics;
        let region = target.region_label();
        let mut stream = match pool.connect(target).await {
            Ok(s) => s,
            Err(f) => {
                m.fail(DIR, f.reason);
                tracing::warn!(reason = f.reason.label(), detail = %f.detail, service = %target.name(), region, addr = %target.addr, "connection over a session failed");
                return;
            }
        };
        tracing::debug!(service = %target.name(), region, addr = %target.addr, "stream opened on the session");
        carry(&mut app, &mut stream, None, m).await;
    }
}

/// Splices an established outbound connection, with its metrics, until it ends or a sweep
/// closes it (`reg`).
async fn carry<P>(
    app: &mut TcpStream,
    peer: &mut P,
    reg: Option<Registration>,
    m: &super::metrics::ProxyMetrics,
) where
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    m.opened.get_or_create(&Dir { direction: DIR }).inc();
    let closed = async {
        match reg {
            Some(mut r) => r.closed().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = splice(app, peer) => r,
        reason = closed => {
            m.closed_live(DIR, reason);
            m.closed.get_or_create(&Dir { direction: DIR }).inc();
            return;
        }
    };
    m.closed.get_or_create(&Dir { direction: DIR }).inc();
    match result {
        Ok((to_peer, from_peer)) => m.count_bytes(DIR, to_peer, from_peer),
        Err(e) => tracing::debug!(error = %e, "outbound connection ended with an error"),
    }
}
