//! `trustline gateway`: joins regions. It accepts QUIC connections from this region's sidecars
//! and from other regions' gateways, keeps warm paths to every peer region, and forwards each
//! stream after checking its header against the region-level policy. It never terminates the
//! workloads' mTLS: it reads the stream header and then only copies bytes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::config::GatewayConfig;
use super::header::StreamHeader;
use super::metrics::{PathLabels, Refused, TunnelEvent, TunnelMetrics};
use super::paths::{PathStream, Paths, PathsConfig};
use super::quic::{quic_io, reset, reset_code, QuicIo};
use super::{code, gateway_id, TunnelPeer, HEADER_TIMEOUT};
use crate::audit::AuditLog;
use crate::clock::Clock;
use crate::limits::{client_key, Full, Gate, LogEvery, Permit};
use crate::region::Region;
use crate::svid::{self, Identity};
use crate::tls::mesh;

/// How long a leaving stream waits for a path to the other region: shorter than the sidecar's
/// own [`super::PATH_WAIT`], so the sidecar hears the refusal rather than timing out.
const REMOTE_PATH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
}

impl Bound {
    /// Closes every connection and stops.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway shutting down");
        self.endpoint.wait_idle().await;
    }
}

/// Starts the identity task, binds the QUIC endpoint and the admin listener, connects to the
/// peers and serves. Returns once bound.
pub async fn build(config: GatewayConfig, clock: Clock) -> Result<Bound, String> {
    let (stop, stop_rx) = watch::channel(false);
    let identity = svid::start(config.identity.clone(), clock.clone(), stop_rx.clone())
        .map_err(|e| e.to_string())?;
    let audit = Arc::new(match &config.audit_log {
        Some(p) => AuditLog::open(p).map_err(|e| format!("audit log {}: {e}", p.display()))?,
        None => AuditLog::disabled(),
    });
    // Any SVID of the trust domain may connect; the role is decided from its ID and chain.
    let server_tls = mesh::server_config(
        Arc::new(mesh::SpiffeClientVerifier::new(
            identity.trust(),
            identity.peer_checks(),
        )),
        identity.resolver.clone(),
        false,
        &clock,
    )
    .map_err(|e| e.to_string())?;
    let server = super::quic_server(server_tls, config.timing)?;
    let endpoint = quinn::Endpoint::server(server, config.listen)
        .map_err(|e| format!("binding QUIC on {}: {e}", config.listen))?;
    let listen = endpoint
        .local_addr()
        .map_err(|e| format!("QUIC socket: {e}"))?;
    let metrics = TunnelMetrics::default();
    let mut peers = HashMap::new();
    for p in &config.peers {
        let paths = Paths::start(
            PathsConfig {
                endpoint: endpoint.clone(),
                client: super::gateway_client(&identity, &p.region, config.timing, &clock)?,
                region: p.region.clone(),
                addrs: p.addresses.clone(),
                metrics: metrics.clone(),
                audit: audit.clone(),
                identity: identity.clone(),
                clock: clock.clone(),
                refresh: config.identity.refresh,
            },
            stop_rx.clone(),
        );
        peers.insert(p.region.clone(), paths);
    }
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    identity.register(&mut registry);
    let admin = crate::admin::serve(
        config.admin,
        admin_state(registry, &identity, &peers),
        stop_rx.clone(),
    )
    .await
    .map_err(|e| format!("binding admin on {}: {e}", config.admin))?;
    let config_limits = config.limits;
    let gw = Arc::new(Gateway {
        config,
        peers: peers.clone(),
        metrics: metrics.clone(),
        audit,
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
        endpoint,
        stop,
    })
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
                        })
                    })
                    .collect();
                serde_json::json!({ "paths": list })
            }),
        )],
    })
}

async fn accept_loop(gw: Arc<Gateway>, endpoint: quinn::Endpoint, mut stop: watch::Receiver<bool>) {
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
                    Full::Total => "connection_cap",
                    Full::PerKey => "connection_cap_ip",
                };
                refuse_over_quota(&gw, remote, None, reason, "too many QUIC connections");
                incoming.refuse();
                continue;
            }
        };
        let gw = gw.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _place = place;
            match incoming.await {
                Ok(conn) => serve_conn(gw, conn, stop).await,
                Err(e) => tracing::debug!(%remote, error = %e, "tunnel handshake failed"),
            }
        });
    }
}

/// Counts a quota refusal, and logs and audits it at most once a second (with how many were
/// held back since the last line).
fn refuse_over_quota(
    gw: &Gateway,
    remote: SocketAddr,
    peer_id: Option<&str>,
    reason: &'static str,
    what: &str,
) {
    let family = if reason == "stream_quota" {
        &gw.metrics.refused
    } else {
        &gw.metrics.refused_connections
    };
    family.get_or_create(&Refused { reason }).inc();
    if let Some(held_back) = gw.quotas.log.allow() {
        tracing::warn!(%remote, peer_id, reason, held_back, "{what}: refused");
        let detail = format!("{reason}: {what} ({held_back} more refused since the last event)");
        let mut ev = TunnelEvent::new("quota_refused", remote, None, detail);
        ev.peer_id = peer_id.map(str::to_string);
        gw.audit.record(&ev);
    }
}

/// Decides the role of an accepted connection, or closes it.
fn role_of(gw: &Gateway, conn: &quinn::Connection) -> Result<Role, String> {
    let peer = TunnelPeer::of(conn)?;
    let own = &gw.config.region;
    if let Some(r) = peer.gateway_of() {
        if own == r {
            return Err(format!("{} is a gateway of this same region", peer.id));
        }
        return Ok(Role::Gateway {
            region: r.to_string(),
        });
    }
    if peer.issued_in.as_deref() != Some(own.as_str()) {
        return Err(format!(
            "{} (certificate of region {:?}) is not a workload of region {own}",
            peer.id, peer.issued_in
        ));
    }
    Ok(Role::Workload {
        id: peer.id.to_string(),
    })
}

async fn serve_conn(gw: Arc<Gateway>, conn: quinn::Connection, mut stop: watch::Receiver<bool>) {
    let remote = conn.remote_address();
    let role = match role_of(&gw, &conn) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(%remote, %why, "tunnel connection refused");
            gw.metrics
                .refused
                .get_or_create(&Refused { reason: "bad_peer" })
                .inc();
            let ev = TunnelEvent::new("tunnel_refused", remote, None, why.clone());
            gw.audit.record(&ev);
            conn.close(quinn::VarInt::from_u32(code::REFUSED), why.as_bytes());
            return;
        }
    };
    let labels = match &role {
        Role::Gateway { region } => {
            let mut ev = TunnelEvent::new("tunnel_up", remote, Some(region), "accepted");
            ev.peer_id = Some(gateway_id(gw.identity.id().trust_domain(), region).to_string());
            gw.audit.record(&ev);
            tracing::info!(%remote, %region, "gateway of another region connected");
            // Labelled by the peer's identity, never its ip:port: every reconnection would add
            // new series.
            Some(PathLabels {
                peer: gateway_id(gw.identity.id().trust_domain(), region).to_string(),
                region: region.clone(),
            })
        }
        Role::Workload { id } => {
            tracing::debug!(%remote, %id, "sidecar connected");
            None
        }
    };
    // A workload's key for its quotas, shared by its streams (no allocation per stream).
    let workload: Option<Arc<str>> = match &role {
        Role::Workload { id } => Some(Arc::from(id.as_str())),
        Role::Gateway { .. } => None,
    };
    let _conn_place = match &workload {
        Some(id) => match gw.quotas.conns_by_id.enter(id.clone()) {
            Ok(p) => Some(p),
            Err(_) => {
                refuse_over_quota(
                    &gw,
                    remote,
                    Some(id),
                    "connection_quota",
                    "too many connections of one workload",
                );
                conn.close(quinn::VarInt::from_u32(code::REFUSED), b"connection quota");
                return;
            }
        },
        None => None,
    };
    // Several gateways of a region share the label set: the gauge counts their connections.
    if let Some(l) = &labels {
        gw.metrics.up.get_or_create(l).inc();
    }
    // The peer's certificate is re-checked while the connection lasts: on every change of the
    // revocation list, at its expiry, and at least every refresh interval.
    let peer_cert = super::peer_chain(&conn)
        .first()
        .and_then(|c| crate::identity::inspect_cert(c).ok());
    let mut revocations = gw.identity.revocations();
    let recheck = tokio::time::sleep(next_recheck(&gw, peer_cert.as_ref()));
    tokio::pin!(recheck);
    loop {
        let lapsed = tokio::select! {
            _ = &mut recheck => true,
            r = revocations.changed() => r.is_ok(),
            s = conn.accept_bi() => match s {
                Ok(bi) => {
                    accept_stream(&gw, bi, &role, workload.as_ref(), remote, &labels);
                    continue;
                }
                Err(e) => {
                    if let Role::Gateway { region } = &role {
                        let ev = TunnelEvent::new("tunnel_down", remote, Some(region), e.to_string());
                        gw.audit.record(&ev);
                        tracing::warn!(%remote, %region, error = %e, "gateway of another region disconnected");
                    }
                    break;
                }
            },
            _ = stop.changed() => break,
        };
        if lapsed {
            if let Some(reason) = peer_cert_lapsed(&gw, peer_cert.as_ref()) {
                close_lapsed(&gw, &conn, &role, reason);
                break;
            }
            recheck
                .as_mut()
                .reset(tokio::time::Instant::now() + next_recheck(&gw, peer_cert.as_ref()));
        }
    }
    if let Some(l) = &labels {
        gw.metrics.up.get_or_create(l).dec();
    }
}

/// Serves one stream of a tunnel connection, or resets it when `workload` is over its quota.
fn accept_stream(
    gw: &Arc<Gateway>,
    bi: (quinn::SendStream, quinn::RecvStream),
    role: &Role,
    workload: Option<&Arc<str>>,
    remote: SocketAddr,
    labels: &Option<PathLabels>,
) {
    let place = match stream_place(gw, workload) {
        Ok(p) => p,
        Err(id) => {
            let why = "too many open streams of one workload";
            refuse_over_quota(gw, remote, Some(id), "stream_quota", why);
            reset(&mut quic_io(bi), code::REFUSED);
            return;
        }
    };
    let (gw, role, labels) = (gw.clone(), role.clone(), labels.clone());
    tokio::spawn(async move {
        let _place = place;
        let io = quic_io(bi);
        handle_stream(&gw, role, io, remote, labels).await;
    });
}

/// A place for one more stream of `workload` (none needed for a peer gateway's streams), or the
/// workload that is at its quota.
fn stream_place<'a>(
    gw: &Gateway,
    workload: Option<&'a Arc<str>>,
) -> Result<Option<Permit<Arc<str>>>, &'a str> {
    match workload {
        None => Ok(None),
        Some(id) => gw
            .quotas
            .streams_by_id
            .enter(id.clone())
            .map(Some)
            .map_err(|_| id.as_ref()),
    }
}

/// Until the next re-check of a connection's peer certificate: the refresh interval, or its
/// expiry if that is sooner.
fn next_recheck(gw: &Gateway, cert: Option<&crate::identity::CertInfo>) -> std::time::Duration {
    let every = gw.config.identity.refresh;
    let Some(c) = cert else { return every };
    let left = c
        .not_after
        .duration_since(gw.clock.now())
        .unwrap_or_default();
    every.min(left + std::time::Duration::from_millis(1))
}

/// Why a connection's peer certificate no longer passes (`revoked`, `expired_certificate`).
fn peer_cert_lapsed(
    gw: &Gateway,
    cert: Option<&crate::identity::CertInfo>,
) -> Option<&'static str> {
    let Some(c) = cert else {
        return Some("no_certificate");
    };
    if gw.identity.revoked.load().contains(&c.serial) {
        Some("revoked")
    } else if gw.clock.now() >= c.not_after {
        Some("expired_certificate")
    } else {
        None
    }
}

/// Closes a tunnel connection (and its streams) whose peer certificate lapsed, audited.
fn close_lapsed(gw: &Gateway, conn: &quinn::Connection, role: &Role, reason: &'static str) {
    let remote = conn.remote_address();
    let region = match role {
        Role::Gateway { region } => region.as_str(),
        Role::Workload { .. } => gw.config.region.as_str(),
    };
    tracing::warn!(%remote, reason, "closing a tunnel connection: its peer's certificate no longer passes");
    gw.metrics.refused.get_or_create(&Refused { reason }).inc();
    let mut ev = TunnelEvent::new("tunnel_closed", remote, Some(region), reason);
    if let Role::Workload { id } = role {
        ev.peer_id = Some(id.clone());
    }
    gw.audit.record(&ev);
    conn.close(quinn::VarInt::from_u32(code::REFUSED), reason.as_bytes());
}

/// Why a stream is refused: the QUIC error code sent back, a metric label, the deciding gateway
/// rule when there is one, and the details.
struct Refusal {
    code: u32,
    reason: &'static str,
    rule: Option<String>,
    detail: String,
}

fn refusal(code: u32, reason: &'static str, rule: Option<&str>, detail: String) -> Refusal {
    Refusal {
        code,
        reason,
        rule: rule.map(str::to_string),
        detail,
    }
}

/// Refuses one stream (the tunnel stays up), with an audit event and a metric.
fn refuse(
    gw: &Gateway,
    mut io: QuicIo,
    remote: SocketAddr,
    role: &Role,
    header: Option<&StreamHeader>,
    r: Refusal,
) {
    let region = match role {
        Role::Gateway { region } => region.as_str(),
        Role::Workload { .. } => gw.config.region.as_str(),
    };
    let Refusal {
        code,
        reason,
        rule,
        detail,
    } = r;
    tracing::warn!(%remote, reason, %detail, "stream refused");
    gw.metrics.refused.get_or_create(&Refused { reason }).inc();
    let mut ev = TunnelEvent::new(
        "stream_refused",
        remote,
        Some(region),
        format!("{reason}: {detail}"),
    );
    if let Role::Workload { id } = role {
        ev.peer_id = Some(id.clone());
    }
    if let Some(h) = header {
        ev.destination_region = Some(h.region.to_string());
        ev.destination_service = Some(h.service.to_string());
        ev.destination_address = Some(h.addr.to_string());
    }
    ev.rule = rule;
    gw.audit.record(&ev);
    reset(&mut io, code);
}

async fn handle_stream(
    gw: &Gateway,
    role: Role,
    mut io: QuicIo,
    remote: SocketAddr,
    labels: Option<PathLabels>,
) {
    let header =
        match tokio::time::timeout(HEADER_TIMEOUT, StreamHeader::read(io.reader_mut())).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let r = refusal(code::BAD_HEADER, "bad_header", None, e.to_string());
                return refuse(gw, io, remote, &role, None, r);
            }
            Err(_) => {
                let r = refusal(
                    code::BAD_HEADER,
                    "header_timeout",
                    None,
                    format!("no header within {HEADER_TIMEOUT:?}"),
                );
                return refuse(gw, io, remote, &role, None, r);
            }
        };
    let carried = match &role {
        Role::Gateway { region } => arriving(gw, region, &header, &mut io, labels.as_ref()).await,
        Role::Workload { id } => leaving(gw, id, &header, &mut io).await,
    };
    if let Err(r) = carried {
        refuse(gw, io, remote, &role, Some(&header), r);
    }
}

/// A stream from another region's gateway (`from`): this region, allowed, exposed, reachable;
/// then its bytes go to the destination address.
async fn arriving(
    gw: &Gateway,
    from: &str,
    header: &StreamHeader,
    io: &mut QuicIo,
    labels: Option<&PathLabels>,
) -> Result<(), Refusal> {
    let own = gw.config.region.as_str();
    if header.region != own {
        let detail = format!("stream for region {} reached region {own}", header.region);
        return Err(refusal(code::NO_ROUTE, "wrong_region", None, detail));
    }
    let (allowed, rule) = gw.config.policy.decide(from, own, &header.service);
    if !allowed {
        let detail = format!("region {from} may not reach {}", header.service);
        return Err(refusal(code::REFUSED, "policy_denied", Some(&rule), detail));
    }
    let exposed = gw
        .config
        .exposed
        .iter()
        .find(|e| e.service == header.service)
        .is_some_and(|e| e.addresses.contains(&header.addr));
    if !exposed {
        let detail = format!(
            "{} at {} is not exposed by this gateway",
            header.service, header.addr
        );
        return Err(refusal(code::REFUSED, "not_exposed", Some(&rule), detail));
    }
    let connect = TcpStream::connect(header.addr);
    let mut tcp = match tokio::time::timeout(gw.config.connect_timeout, connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let detail = format!("{}: {e}", header.addr);
            return Err(refusal(
                code::UNREACHABLE,
                "unreachable",
                Some(&rule),
                detail,
            ));
        }
        Err(_) => {
            let detail = format!("{}: connect timed out", header.addr);
            return Err(refusal(
                code::UNREACHABLE,
                "unreachable",
                Some(&rule),
                detail,
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    tracing::debug!(%from, service = %header.service, addr = %header.addr, %rule, "stream in");
    match crate::copy::splice(&mut tcp, io).await {
        Ok((to_tunnel, from_tunnel)) => {
            if let Some(l) = labels {
                gw.metrics.count_bytes(l, to_tunnel, from_tunnel);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "inbound stream broke");
            reset(io, code::BROKEN);
        }
    }
    Ok(())
}

/// A stream from a sidecar of this region (`id`): another region, allowed, a path up; then it
/// rides a new stream on the best path to that region.
async fn leaving(
    gw: &Gateway,
    id: &str,
    header: &StreamHeader,
    io: &mut QuicIo,
) -> Result<(), Refusal> {
    let own = gw.config.region.as_str();
    if header.region == own {
        let detail = "same region: the sidecar connects directly".to_string();
        return Err(refusal(code::NO_ROUTE, "same_region", None, detail));
    }
    let (allowed, rule) = gw
        .config
        .policy
        .decide(own, &header.region, &header.service);
    if !allowed {
        let detail = format!(
            "{id} may not leave for {} in {}",
            header.service, header.region
        );
        return Err(refusal(code::REFUSED, "policy_denied", Some(&rule), detail));
    }
    let Some(paths) = gw.peers.get(&header.region) else {
        let detail = format!("no [[peer]] for region {}", header.region);
        return Err(refusal(code::NO_ROUTE, "no_route", Some(&rule), detail));
    };
    let out = paths
        .open(REMOTE_PATH_WAIT)
        .await
        .map_err(|e| refusal(code::NO_ROUTE, "no_path", Some(&rule), e))?;
    // A header that parsed encodes again to the same bytes (see the header's tests).
    let bytes = header.encode();
    let PathStream { io: mut up, load } = out;
    if let Err(e) = up.writer_mut().write_all(&bytes).await {
        let detail = format!("forwarding the header: {e}");
        return Err(refusal(code::BROKEN, "path_lost", Some(&rule), detail));
    }
    tracing::debug!(%id, region = %header.region, service = %header.service, path = %load.path.addr, "stream out");
    match crate::copy::splice(io, &mut up).await {
        Ok((tx, rx)) => load.count(tx, rx),
        Err(e) => {
            // Carry the far side's reset code back to the sidecar.
            let c = reset_code(&e).unwrap_or(code::BROKEN);
            tracing::debug!(error = %e, code = c, "outbound stream broke");
            reset(io, c);
            reset(&mut up, code::BROKEN);
        }
    }
    Ok(())
}
