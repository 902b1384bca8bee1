//! The outbound side: transparent (iptables) and explicit listeners, mTLS 1.3 client.
//!
//! A direct mTLS connection is registered in [`super::live::LiveConns`] with the server's
//! certificate and closed when that certificate is revoked or expires. Pooled sessions are
//! retired by the session pool on the same facts (see [`crate::proxy::session::pool`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use super::config::UnknownDestination;
use super::live::{PeerCert, Registration};
use super::metrics::{Dir, Flow};
use super::{accept_loop, original_dst, Shared};
use crate::copy::splice;
use crate::tls::mesh::{self, failure_reason};

const DIR: &str = "outbound";

pub(super) async fn serve_transparent(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop_accepting: watch::Receiver<bool>,
    stop_all: watch::Receiver<bool>,
) {
    accept_loop(
        listener,
        shared,
        stop_accepting,
        stop_all,
        |tcp, peer, shared| {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("conn", id, dir = DIR, %peer);
            async move { transparent(tcp, shared).await }.instrument(span)
        },
    )
    .await
}

pub(super) async fn serve_explicit(
    listener: TcpListener,
    index: usize,
    shared: Arc<Shared>,
    stop_accepting: watch::Receiver<bool>,
    stop_all: watch::Receiver<bool>,
) {
    accept_loop(listener, shared, stop_accepting, stop_all, move |tcp, peer, shared| {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let l = shared.config.listeners[index].clone();
        let span = tracing::info_span!("conn", id, dir = DIR, %peer, service = %shared.config.services[l.service].name);
        async move { to_service(tcp, l.service, l.address, shared).await }.instrument(span)
    })
    .await
}

async fn transparent(tcp: TcpStream, shared: Arc<Shared>) {
    let m = &shared.metrics;
    let Some(orig) = original_dst(&tcp) else {
        m.fail(DIR, "not_redirected");
        tracing::warn!(
            reason = "not_redirected",
            "outbound connection has no original destination"
        );
        return;
    };
    match shared
        .config
        .services
        .iter()
        .position(|s| s.addresses.contains(&orig))
    {
        Some(service) => to_service(tcp, service, orig, shared).await,
        None => match shared.config.outbound.map(|o| o.1) {
            Some(UnknownDestination::Passthrough) => Box::pin(passthrough(tcp, orig, shared)).await,
            _ => {
                m.fail(DIR, "unknown_destination");
                tracing::warn!(reason = "unknown_destination", destination = %orig, "refused: not a known service");
            }
        },
    }
}

async fn passthrough(mut tcp: TcpStream, orig: SocketAddr, shared: Arc<Shared>) {
    tracing::warn!(destination = %orig, "unknown destination passed through in PLAIN TEXT (outbound.unknown_destination = \"passthrough\")");
    let m = &shared.metrics;
    match TcpStream::connect(orig).await {
        Ok(mut up) => {
            m.opened
                .get_or_create(&Dir {
                    direction: "passthrough",
                })
                .inc();
            let _ = splice(&mut tcp, &mut up).await;
            m.closed
                .get_or_create(&Dir {
                    direction: "passthrough",
                })
                .inc();
        }
        Err(e) => {
            m.fail("passthrough", "upstream_unreachable");
            tracing::warn!(error = %e, "passthrough destination unreachable");
        }
    }
}

fn server_name(service: &str) -> ServerName<'static> {
    ServerName::try_from(service.to_string())
        .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("valid name"))
}

async fn to_service(mut app: TcpStream, service: usize, addr: SocketAddr, shared: Arc<Shared>) {
    let m = &shared.metrics;
    if let Err(why) = shared.identity.ready() {
        m.fail(DIR, "not_ready");
        tracing::warn!(reason = "not_ready", detail = %why, "outbound connection refused");
        return;
    }
    let svc = &shared.config.services[service];
    if let Some(pool) = shared.sessions.as_ref().filter(|p| p.serves(service)) {
        let target = crate::proxy::session::pool::Target {
            service,
            name: svc.name.clone(),
            region: svc.region.clone(),
            addr,
        };
        // Boxed: the session path (HTTP/2 client) would otherwise size every connection's task.
        return Box::pin(on_session(app, &target, pool, &shared)).await;
    }
    let started = Instant::now();
    let up = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            m.fail(DIR, "upstream_unreachable");
            tracing::warn!(reason = "upstream_unreachable", %addr, error = %e, "cannot reach the service");
            return;
        }
    };
    let _ = up.set_nodelay(true);
    // Boxed: the handshake's state is freed once done instead of sizing the connection's task.
    let connect = Box::pin(shared.client_tls[service].connect(server_name(&svc.name), up));
    let mut tls = match tokio::time::timeout(shared.config.handshake_timeout, connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            m.fail(DIR, reason);
            tracing::warn!(reason, detail = %e, service = %svc.name, %addr, "outbound handshake failed");
            return;
        }
        Err(_) => {
            m.fail(DIR, "handshake_timeout");
            tracing::warn!(reason = "handshake_timeout", %addr, "outbound handshake timed out");
            return;
        }
    };
    if let Err(e) = mesh::recheck_resumed_server(
        tls.get_ref().1,
        &shared.server_verifiers[service],
        &shared.clock,
    ) {
        let reason = mesh::tls_reason(&e);
        m.fail(DIR, reason);
        tracing::warn!(reason, detail = %e, "resumed session refused: the server's certificate no longer passes");
        return;
    }
    m.handshake
        .get_or_create(&Dir { direction: DIR })
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(service = %svc.name, %addr, "outbound mTLS established");
    // The verifier accepted the chain, so its leaf parses; read back its serial and expiry.
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let Some(info) = leaf.and_then(|c| crate::identity::inspect_cert(c).ok()) else {
        m.fail(DIR, "no_server_certificate");
        return;
    };
    let peer = Arc::new(PeerCert { info, region: None });
    let reg = shared.live.register(DIR, peer, addr.port(), None);
    carry(&mut app, &mut tls, Some(reg), m).await;
}

/// A new stream on the warm session to the destination sidecar: directly in our region
/// (`pooling`), through the local gateways for another region (see [`crate::tunnel`]).
async fn on_session(
    mut app: TcpStream,
    target: &crate::proxy::session::pool::Target,
    pool: &Arc<crate::proxy::session::pool::SessionPool>,
    shared: &Shared,
) {
    let m = &shared.metrics;
    let mut stream = match pool.connect(target).await {
        Ok(s) => s,
        Err(f) => {
            m.fail(DIR, f.reason);
            tracing::warn!(reason = f.reason, detail = %f.detail, service = %target.name, region = target.region.as_deref().unwrap_or("(ours)"), addr = %target.addr, "connection over a session failed");
            return;
        }
    };
    tracing::debug!(service = %target.name, region = target.region.as_deref().unwrap_or("(ours)"), addr = %target.addr, "stream opened on the session");
    carry(&mut app, &mut stream, None, m).await;
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
    if let Err(e) = &result {
        tracing::debug!(error = %e, "outbound connection ended with an error");
    }
    if let Ok((to_peer, from_peer)) = result {
        m.bytes
            .get_or_create(&Flow {
                direction: DIR,
                flow: "to_peer",
            })
            .inc_by(to_peer);
        m.bytes
            .get_or_create(&Flow {
                direction: DIR,
                flow: "from_peer",
            })
            .inc_by(from_peer);
    }
}
