//! The inbound side: mTLS 1.3 server, SPIFFE checks (in the verifier), then the policy (or the
//! simple allow list), then the app; per request on the policy's HTTP ports.
//!
//! A redirected connection goes to `127.0.0.1:<the port the caller dialled>` only when that
//! port is declared in `inbound.ports` and is none of the sidecar's own listeners; anything
//! else is refused as `undeclared_port`, so a caller cannot reach a loopback-only service of
//! the pod or make the sidecar call out on its behalf through an explicit `[[listener]]`.
//!
//! Every admitted connection, session and session stream is registered in
//! [`super::live::LiveConns`] and closed when its caller's certificate is revoked or expires, or
//! (L4 under a policy) when the policy no longer allows it. On HTTP ports each request is
//! decided when it starts; a request in flight when its rule's time window ends runs to its end.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use super::authz::Caller;
use super::config::Inbound;
use super::http::Peer;
use super::live::{Decided, PeerCert, Registration};
use super::metrics::{Dir, Flow};
use super::{accept_loop, original_dst, Shared};
use crate::copy::splice;
use crate::identity::{inspect_cert, region_of_chain};
use crate::tls::mesh::{self, failure_reason};

pub(super) const DIR: &str = "inbound";

pub(super) async fn serve(
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
            async move { handle(tcp, shared).await }.instrument(span)
        },
    )
    .await
}

async fn handle(tcp: TcpStream, shared: Arc<Shared>) {
    let m = &shared.metrics;
    if let Err(why) = shared.identity.ready() {
        m.fail(DIR, "not_ready");
        tracing::warn!(reason = "not_ready", detail = %why, "inbound connection refused");
        return;
    }
    let inbound = shared.config.inbound.as_ref().expect("inbound configured");
    let orig = original_dst(&tcp);
    let target = match app_target(orig, inbound, &shared.own_ports) {
        Ok(t) => t,
        Err(reason) => {
            m.fail(DIR, reason);
            tracing::warn!(reason, original_destination = ?orig, declared = ?inbound.ports, "inbound connection refused: not a declared app port (inbound.ports), or no inbound.app_address");
            return;
        }
    };
    let started = Instant::now();
    // The handshake's state is boxed so that it is freed once done, instead of sizing the task
    // of every connection for its whole life.
    let handshake = tokio::time::timeout(
        shared.config.handshake_timeout,
        Box::pin(shared.server_tls.accept(tcp)),
    )
    .await;
    // Boxed: the stream is handed down by value (session, policy, splice), and each hand-over
    // would otherwise add a copy of the whole TLS state to the connection's task.
    let tls = match handshake {
        Ok(Ok(t)) => Box::new(t),
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            m.fail(DIR, reason);
            tracing::warn!(reason, detail = %e, "inbound handshake refused");
            return;
        }
        Err(_) => {
            m.fail(DIR, "handshake_timeout");
            tracing::warn!(reason = "handshake_timeout", "inbound handshake timed out");
            return;
        }
    };
    if let Err(e) =
        mesh::recheck_resumed_client(tls.get_ref().1, &shared.client_verifier, &shared.clock)
    {
        let reason = mesh::tls_reason(&e);
        m.fail(DIR, reason);
        tracing::warn!(reason, detail = %e, "resumed session refused: the peer's certificate no longer passes");
        return;
    }
    m.handshake
        .get_or_create(&Dir { direction: DIR })
        .observe(started.elapsed().as_secs_f64());
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    // The verifier already required one valid SPIFFE URI SAN; read it back for the decision.
    let Some(info) = chain.first().and_then(|c| inspect_cert(c).ok()) else {
        m.fail(DIR, "no_client_certificate");
        return;
    };
    let caller = Arc::new(PeerCert {
        region: region_of_chain(chain),
        info,
    });
    if tls.get_ref().1.alpn_protocol() == Some(crate::proxy::session::SESSION_ALPN) {
        if !could_admit(&caller, target.port(), &shared) {
            refuse_session(&caller, target.port(), &shared);
            return;
        }
        // Boxed here and below: a connection's task is as large as its largest path, and the
        // HTTP/2 and HTTP/1 servers would otherwise make every plain connection pay for them.
        Box::pin(super::session::server::serve_session(
            tls, caller, target, shared,
        ))
        .await;
        return;
    }
    if let Some((verdict, reg)) = admit(&caller, target.port(), &shared) {
        carry(tls, verdict, reg, target, &shared).await;
    }
}

/// Whether the allow list or the policy could admit some stream of `caller` to `port`: a
/// session (all of whose streams go to one port) is refused up front to a caller every stream
/// of which would be denied.
fn could_admit(caller: &PeerCert, port: u16, shared: &Shared) -> bool {
    let Some(authz) = &shared.authz else {
        let inbound = shared.config.inbound.as_ref().expect("inbound configured");
        return inbound.allow.contains(&caller.info.id);
    };
    let (peer, serial) = (caller.info.id.to_string(), caller.info.serial.to_string());
    authz.could_admit(&Caller {
        peer: &peer,
        serial: &serial,
        region: caller.region.as_deref(),
        port,
    })
}

/// Refuses a session no stream of which could be admitted, decided, counted and audited like
/// a refused connection (the deciding rule named), so the audit trail shows the caller.
fn refuse_session(caller: &Arc<PeerCert>, port: u16, shared: &Shared) {
    let Some(authz) = &shared.authz else {
        // The allow list refuses it, logs and counts it.
        let _ = admit(caller, port, shared);
        return;
    };
    let (peer, serial) = (caller.info.id.to_string(), caller.info.serial.to_string());
    let c = Caller {
        peer: &peer,
        serial: &serial,
        region: caller.region.as_deref(),
        port,
    };
    let (_, rule) = authz.decide(&c, None, true);
    shared.metrics.fail(DIR, "policy_denied");
    tracing::warn!(reason = "policy_denied", %rule, peer_id = %peer, peer_region = ?c.region, serial = %serial, port, "inbound session refused: no rule admits this caller to this port at any time");
}

/// Where a connection goes: `orig` (the redirected destination) must be a declared app port
/// (`inbound.ports`) and not one of the sidecar's own listener ports (`own`); a connection
/// that was not redirected goes to `inbound.app_address`. The error is the refusal reason.
pub(crate) fn app_target(
    orig: Option<SocketAddr>,
    inbound: &Inbound,
    own: &[u16],
) -> Result<SocketAddr, &'static str> {
    match orig {
        Some(o) if inbound.ports.contains(&o.port()) && !own.contains(&o.port()) => {
            Ok(SocketAddr::from(([127, 0, 0, 1], o.port())))
        }
        Some(_) => Err("undeclared_port"),
        None => inbound.app_address.ok_or("no_app_address"),
    }
}

/// What an admitted connection does next.
pub(super) enum Verdict {
    /// Splice to the app.
    Forward,
    /// Decide each HTTP request.
    Http(Arc<super::authz::Authz>, Peer),
}

/// The allow list or the policy on one connection or session stream, and its registration as
/// a live connection; `None` when denied (logged and counted here).
pub(super) fn admit(
    caller: &Arc<PeerCert>,
    port: u16,
    shared: &Shared,
) -> Option<(Verdict, Registration)> {
    let m = &shared.metrics;
    let info = &caller.info;
    let region = &caller.region;
    let Some(authz) = shared.authz.clone() else {
        let inbound = shared.config.inbound.as_ref().expect("inbound configured");
        if !inbound.allow.contains(&info.id) {
            m.fail(DIR, "not_allowed");
            tracing::warn!(reason = "not_allowed", peer_id = %info.id, peer_region = ?region, serial = %info.serial, "inbound connection denied by allow list (default deny)");
            return None;
        }
        tracing::debug!(peer_id = %info.id, peer_region = ?region, serial = %info.serial, port, "inbound connection allowed");
        let reg = shared.live.register(DIR, caller.clone(), port, None);
        return Some((Verdict::Forward, reg));
    };
    let peer = Peer {
        id: info.id.to_string(),
        serial: info.serial.to_string(),
        region: region.clone(),
        port,
    };
    let admission = authz.admit(
        &Caller {
            peer: &peer.id,
            serial: &peer.serial,
            region: peer.region.as_deref(),
            port: peer.port,
        },
        info.not_after,
    );
    if !admission.allowed {
        m.fail(DIR, "policy_denied");
        tracing::warn!(reason = "policy_denied", rule = %admission.rule, peer_id = %peer.id, peer_region = ?peer.region, serial = %peer.serial, port = peer.port, "inbound connection denied by policy");
        return None;
    }
    tracing::debug!(peer_id = %peer.id, peer_region = ?peer.region, serial = %peer.serial, rule = %admission.rule, port, "inbound connection allowed");
    if authz.is_http_port(port) {
        // Requests are decided one by one; the connection is re-checked for its certificate.
        let reg = shared.live.register(DIR, caller.clone(), port, None);
        Some((Verdict::Http(authz, peer), reg))
    } else {
        let decided = Decided {
            generation: admission.generation,
            rule: admission.rule,
        };
        let reg = shared
            .live
            .register(DIR, caller.clone(), port, Some(decided));
        Some((Verdict::Forward, reg))
    }
}

/// Carries an admitted connection or stream to the app, until it ends or a sweep closes it.
pub(super) async fn carry<S>(
    io: S,
    verdict: Verdict,
    mut reg: Registration,
    target: SocketAddr,
    shared: &Shared,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match verdict {
        Verdict::Http(authz, peer) => {
            let m = &shared.metrics;
            m.opened.get_or_create(&Dir { direction: DIR }).inc();
            let head = shared.config.handshake_timeout;
            tokio::select! {
                _ = Box::pin(super::http::serve(io, authz, peer, target, head)) => {}
                reason = reg.closed() => m.closed_live(DIR, reason),
            }
            m.closed.get_or_create(&Dir { direction: DIR }).inc();
        }
        Verdict::Forward => forward(io, target, reg, shared).await,
    }
}

/// Connects the app and splices, until either side is done or a sweep closes it.
async fn forward<S>(mut tls: S, target: SocketAddr, mut reg: Registration, shared: &Shared)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let m = &shared.metrics;
    let mut app = match TcpStream::connect(target).await {
        Ok(a) => a,
        Err(e) => {
            m.fail(DIR, "app_unreachable");
            tracing::warn!(reason = "app_unreachable", %target, error = %e, "cannot reach the app");
            return;
        }
    };
    let _ = app.set_nodelay(true);
    m.opened.get_or_create(&Dir { direction: DIR }).inc();
    let result = tokio::select! {
        r = splice(&mut app, &mut tls) => Ok(r),
        reason = reg.closed() => Err(reason),
    };
    m.closed.get_or_create(&Dir { direction: DIR }).inc();
    match result {
        Ok(Ok((to_peer, from_peer))) => {
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
            tracing::debug!(to_peer, from_peer, "inbound connection closed");
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "inbound connection ended with error"),
        Err(reason) => m.closed_live(DIR, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn inbound(ports: Vec<u16>, app_address: Option<SocketAddr>) -> Inbound {
        Inbound {
            listen: "0.0.0.0:15006".parse().unwrap(),
            allow: vec![],
            app_address,
            ports,
            policy: None,
            reload_interval: Duration::from_secs(2),
            anomaly: Default::default(),
            sessions: Default::default(),
        }
    }

    fn to(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([10, 0, 0, 7], port)))
    }

    /// F10: a redirected connection reaches 127.0.0.1 only on a declared app port.
    #[test]
    fn redirected_connections_reach_declared_app_ports_only() {
        let own = [15006, 15001, 15020, 7001];
        let i = inbound(vec![8080, 9090], None);
        let local = |p: u16| Ok(SocketAddr::from(([127, 0, 0, 1], p)));
        assert_eq!(app_target(to(8080), &i, &own), local(8080));
        assert_eq!(app_target(to(9090), &i, &own), local(9090));
        // A loopback-only debug port of the pod, and an explicit listener of the sidecar.
        assert_eq!(app_target(to(6060), &i, &own), Err("undeclared_port"));
        assert_eq!(app_target(to(7001), &i, &own), Err("undeclared_port"));
        // Nothing declared: nothing is reached.
        let none = inbound(vec![], None);
        assert_eq!(app_target(to(8080), &none, &own), Err("undeclared_port"));
        // Declared by mistake and also a port of the sidecar (bound on port 0, say): refused.
        let clash = inbound(vec![7001], None);
        assert_eq!(app_target(to(7001), &clash, &own), Err("undeclared_port"));
    }

    #[test]
    fn connections_that_were_not_redirected_go_to_the_app_address() {
        let app: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(app_target(None, &inbound(vec![], Some(app)), &[]), Ok(app));
        assert_eq!(
            app_target(None, &inbound(vec![8080], None), &[]),
            Err("no_app_address")
        );
    }
}
