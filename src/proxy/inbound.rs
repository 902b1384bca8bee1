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
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use super::authz::{Authz, Caller};
use super::config::{SessionLimits, SidecarConfig};
use super::http::Peer;
use super::live::{Decided, PeerCert, Registration, SharedPeer};
use super::metrics::Dir;
use super::session::limits::SessionGate;
use super::session::SESSION_ALPN;
use super::{accept_loop, original_dst, Common, ProxyError};
use crate::clock::Clock;
use crate::copy::splice;
use crate::identity::{inspect_cert, peer_region, SpiffeId};
use crate::refusal::Refusal;
use crate::svid::Identity;
use crate::tls::mesh::{self, failure_reason, SpiffeClientVerifier};

pub(super) const DIR: &str = "inbound";

/// Who may connect: the allow list or the policy.
pub(crate) enum Admission {
    /// `inbound.allow`: these callers, on any declared port (default deny).
    AllowList(Vec<SpiffeId>),
    /// `inbound.policy`: decided per connection, stream or request.
    Policy(Arc<Authz>),
}

/// Where admitted connections go: `ports` for redirected ones, `address` for the others.
#[derive(Clone, Debug)]
pub(crate) struct Apps {
    /// The app ports a redirected connection may reach on 127.0.0.1 (`inbound.ports`).
    pub ports: Vec<u16>,
    /// Where connections that were not redirected go (`inbound.app_address`).
    pub address: Option<SocketAddr>,
}

impl Apps {
    /// Where a connection goes: `orig` (the redirected destination) must be a declared app port
    /// and not one of the sidecar's own listener ports (`own`); a connection that was not
    /// redirected goes to the app address. The error is the refusal reason.
    pub fn target(&self, orig: Option<SocketAddr>, own: &[u16]) -> Result<SocketAddr, Refusal> {
        match orig {
            Some(o) if self.ports.contains(&o.port()) && !own.contains(&o.port()) => {
                Ok(SocketAddr::from(([127, 0, 0, 1], o.port())))
            }
            Some(_) => Err(Refusal::UndeclaredPort),
            None => self.address.ok_or(Refusal::NoAppAddress),
        }
    }
}

/// The inbound side's state.
pub(crate) struct Inbound {
    pub common: Arc<Common>,
    acceptor: tokio_rustls::TlsAcceptor,
    /// The verifier of callers, re-run on resumed sessions.
    pub(super) client_verifier: Arc<SpiffeClientVerifier>,
    admission: Admission,
    apps: Apps,
    /// Caps of the multiplexed sessions other sidecars open to this one.
    pub sessions: SessionLimits,
    pub session_gate: SessionGate,
}

/// Loads `inbound.policy` if there is one (a bad file refuses to start), registers its metrics
/// and watches the file until `stop`.
pub(super) fn load_policy(
    config: &SidecarConfig,
    audit: &Arc<crate::audit::AuditLog>,
    clock: &Clock,
    registry: &mut Registry,
    stop: &watch::Receiver<bool>,
) -> Result<Option<Arc<Authz>>, ProxyError> {
    let Some(inbound) = &config.inbound else {
        return Ok(None);
    };
    let Some((path, service)) = inbound.policy.clone() else {
        return Ok(None);
    };
    let a = Authz::load(
        path,
        service,
        config.region.clone(),
        audit.clone(),
        clock.clone(),
        inbound.anomaly.clone(),
    )?;
    a.metrics.register(registry);
    let span = tracing::info_span!("policy_watch", service = %a.service);
    tokio::spawn(
        a.clone()
            .watch(inbound.reload_interval, stop.clone())
            .instrument(span),
    );
    Ok(Some(a))
}

impl Inbound {
    /// The inbound side of `config`: its TLS server, admission (`authz`, else the allow list),
    /// app ports and session caps.
    pub(super) fn build(
        config: &SidecarConfig,
        inbound: &super::config::Inbound,
        authz: Option<Arc<Authz>>,
        common: Arc<Common>,
    ) -> Result<Self, ProxyError> {
        let identity: &Identity = &common.identity;
        let client_verifier = Arc::new(SpiffeClientVerifier::new(
            identity.trust(),
            identity.peer_checks(),
        ));
        let mut server = mesh::server_config(
            client_verifier.clone(),
            identity.resolver.clone(),
            config.resumption,
            &common.clock,
        )?;
        // Sidecars open multiplexed sessions (see `crate::proxy::session`).
        server.alpn_protocols.push(SESSION_ALPN.to_vec());
        Ok(Inbound {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            client_verifier,
            admission: match authz {
                Some(a) => Admission::Policy(a),
                None => Admission::AllowList(inbound.allow.clone()),
            },
            apps: Apps {
                ports: inbound.ports.clone(),
                address: inbound.app_address,
            },
            sessions: inbound.sessions,
            session_gate: SessionGate::new(&inbound.sessions),
            common,
        })
    }
}

/// Serves the inbound listener.
pub(super) async fn serve(listener: TcpListener, inbound: Arc<Inbound>) {
    let common = inbound.common.clone();
    accept_loop(listener, common, move |tcp, peer| {
        let id = inbound.common.next_id();
        let span = tracing::info_span!("conn", id, dir = DIR, %peer);
        let inbound = inbound.clone();
        async move { inbound.handle(tcp).await }.instrument(span)
    })
    .await
}

impl Inbound {
    async fn handle(self: Arc<Self>, tcp: TcpStream) {
        let m = &self.common.metrics;
        if let Err(why) = self.common.identity.ready() {
            m.fail(DIR, Refusal::NotReady);
            tracing::warn!(reason = Refusal::NotReady.label(), detail = %why, "inbound connection refused");
            return;
        }
        let orig = original_dst(&tcp);
        let target = match self.apps.target(orig, &self.common.own_ports) {
            Ok(t) => t,
            Err(reason) => {
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), original_destination = ?orig, declared = ?self.apps.ports, "inbound connection refused: not a declared app port (inbound.ports), or no inbound.app_address");
                return;
            }
        };
        let Some(tls) = self.handshake(tcp).await else {
            return;
        };
        let Some(caller) = self.caller(&tls) else {
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(SESSION_ALPN) {
            if !self.could_admit(&caller, target.port()) {
                self.refuse_session(&caller, target.port());
                return;
            }
            // Boxed here and below: a connection's task is as large as its largest path, and the
            // HTTP/2 and HTTP/1 servers would otherwise make every plain connection pay for them.
            let exporter = super::session::reauth::exporter(tls.get_ref().1);
            Box::pin(super::session::server::serve_session(
                tls,
                caller,
                exporter,
                target,
                self.clone(),
            ))
            .await;
            return;
        }
        if let Some((verdict, reg)) = self.admit(&PeerCert::shared(caller), target.port()) {
            self.carry(tls, verdict, reg, target).await;
        }
    }

    /// The TLS handshake within the handshake timeout, a resumed session re-checked; `None`
    /// when refused (counted and logged).
    async fn handshake(&self, tcp: TcpStream) -> Option<Box<TlsStream<TcpStream>>> {
        let m = &self.common.metrics;
        let started = Instant::now();
        // The handshake's state is boxed so that it is freed once done, instead of sizing the
        // task of every connection for its whole life.
        let handshake = tokio::time::timeout(
            self.common.handshake_timeout,
            Box::pin(self.acceptor.accept(tcp)),
        )
        .await;
        // Boxed: the stream is handed down by value (session, policy, splice), and each
        // hand-over would otherwise add a copy of the whole TLS state to the connection's task.
        let tls = match handshake {
            Ok(Ok(t)) => Box::new(t),
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), detail = %e, "inbound handshake refused");
                return None;
            }
            Err(_) => {
                let reason = Refusal::HandshakeTimeout;
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), "inbound handshake timed out");
                return None;
            }
        };
        let conn = tls.get_ref().1;
        if let Err(e) =
            mesh::recheck_resumed_client(conn, &self.client_verifier, &self.common.clock)
        {
            let reason = mesh::tls_reason(&e);
            m.fail(DIR, reason);
            tracing::warn!(reason = reason.label(), detail = %e, "resumed session refused: the peer's certificate no longer passes");
            return None;
        }
        m.handshake
            .get_or_create(&Dir { direction: DIR })
            .observe(started.elapsed().as_secs_f64());
        Some(tls)
    }

    /// The caller's certificate facts and region. The verifier already required one valid
    /// SPIFFE URI SAN; this reads it back for the decision.
    fn caller(&self, tls: &TlsStream<TcpStream>) -> Option<Arc<PeerCert>> {
        let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let Some(info) = chain.first().and_then(|c| inspect_cert(c).ok()) else {
            self.common.metrics.fail(DIR, Refusal::NoClientCertificate);
            return None;
        };
        Some(Arc::new(PeerCert {
            region: peer_region(chain, self.common.identity.id().trust_domain()),
            info,
        }))
    }

    /// Whether the allow list or the policy could admit some stream of `caller` to `port`: a
    /// session (all of whose streams go to one port) is refused up front to a caller every
    /// stream of which would be denied.
    fn could_admit(&self, caller: &PeerCert, port: u16) -> bool {
        match &self.admission {
            Admission::AllowList(allow) => allow.contains(&caller.info.id),
            Admission::Policy(authz) => {
                let (peer, serial) = (caller.info.id.to_string(), caller.info.serial.to_string());
                authz.could_admit(&Caller {
                    peer: &peer,
                    serial: &serial,
                    region: caller.region.as_deref(),
                    port,
                })
            }
        }
    }

    /// Refuses a session no stream of which could be admitted, decided, counted and audited
    /// like a refused connection (the deciding rule named), so the audit trail shows the caller.
    fn refuse_session(&self, caller: &Arc<PeerCert>, port: u16) {
        let Admission::Policy(authz) = &self.admission else {
            // The allow list refuses it, logs and counts it.
            let _ = self.admit(&PeerCert::shared(caller.clone()), port);
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
        let reason = Refusal::PolicyDenied;
        self.common.metrics.fail(DIR, reason);
        tracing::warn!(reason = reason.label(), %rule, peer_id = %peer, peer_region = ?c.region, serial = %serial, port, "inbound session refused: no rule admits this caller to this port at any time");
    }

    /// The allow list or the policy on one connection or session stream, and its registration
    /// as a live connection; `None` when denied (logged and counted here).
    pub(super) fn admit(&self, caller: &SharedPeer, port: u16) -> Option<(Verdict, Registration)> {
        match &self.admission {
            Admission::AllowList(allow) => self.admit_listed(allow, caller, port),
            Admission::Policy(authz) => self.admit_by_policy(authz, caller, port),
        }
    }

    fn admit_listed(
        &self,
        allow: &[SpiffeId],
        caller: &SharedPeer,
        port: u16,
    ) -> Option<(Verdict, Registration)> {
        let cert = caller.load();
        let (info, region) = (&cert.info, &cert.region);
        if !allow.contains(&info.id) {
            let reason = Refusal::NotAllowed;
            self.common.metrics.fail(DIR, reason);
            tracing::warn!(reason = reason.label(), peer_id = %info.id, peer_region = ?region, serial = %info.serial, "inbound connection denied by allow list (default deny)");
            return None;
        }
        tracing::debug!(peer_id = %info.id, peer_region = ?region, serial = %info.serial, port, "inbound connection allowed");
        let reg = self.common.live.register(DIR, caller.clone(), port, None);
        Some((Verdict::Forward, reg))
    }

    fn admit_by_policy(
        &self,
        authz: &Arc<Authz>,
        caller: &SharedPeer,
        port: u16,
    ) -> Option<(Verdict, Registration)> {
        let cert = caller.load();
        let info = &cert.info;
        let peer = Peer {
            id: info.id.to_string(),
            serial: info.serial.to_string(),
            region: cert.region.clone(),
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
            let reason = Refusal::PolicyDenied;
            self.common.metrics.fail(DIR, reason);
            tracing::warn!(reason = reason.label(), rule = %admission.rule, peer_id = %peer.id, peer_region = ?peer.region, serial = %peer.serial, port = peer.port, "inbound connection denied by policy");
            return None;
        }
        tracing::debug!(peer_id = %peer.id, peer_region = ?peer.region, serial = %peer.serial, rule = %admission.rule, port, "inbound connection allowed");
        let live = &self.common.live;
        if authz.is_http_port(port) {
            // Requests are decided one by one; the connection is re-checked for its certificate.
            let reg = live.register(DIR, caller.clone(), port, None);
            Some((Verdict::Http(authz.clone(), peer), reg))
        } else {
            let decided = Decided {
                generation: admission.generation,
                rule: admission.rule,
            };
            let reg = live.register(DIR, caller.clone(), port, Some(decided));
            Some((Verdict::Forward, reg))
        }
    }

    /// Carries an admitted connection or stream to the app, until it ends or a sweep closes it.
    pub(super) async fn carry<S>(
        &self,
        io: S,
        verdict: Verdict,
        mut reg: Registration,
        target: SocketAddr,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        match verdict {
            Verdict::Http(authz, peer) => {
                let m = &self.common.metrics;
                m.opened.get_or_create(&Dir { direction: DIR }).inc();
                let head = self.common.handshake_timeout;
                tokio::select! {
                    _ = Box::pin(super::http::serve(io, authz, peer, target, head)) => {}
                    reason = reg.closed() => m.closed_live(DIR, reason),
                }
                m.closed.get_or_create(&Dir { direction: DIR }).inc();
            }
            Verdict::Forward => self.forward(io, target, reg).await,
        }
    }

    /// Connects the app and splices, until either side is done or a sweep closes it.
    async fn forward<S>(&self, mut tls: S, target: SocketAddr, mut reg: Registration)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let m = &self.common.metrics;
        let mut app = match TcpStream::connect(target).await {
            Ok(a) => a,
            Err(e) => {
                let reason = Refusal::AppUnreachable;
                m.fail(DIR, reason);
                tracing::warn!(reason = reason.label(), %target, error = %e, "cannot reach the app");
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
                m.count_bytes(DIR, to_peer, from_peer);
                tracing::debug!(to_peer, from_peer, "inbound connection closed");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "inbound connection ended with error"),
            Err(reason) => m.closed_live(DIR, reason),
        }
    }
}

/// What an admitted connection does next.
pub(super) enum Verdict {
    /// Splice to the app.
    Forward,
    /// Decide each HTTP request.
    Http(Arc<Authz>, Peer),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apps(ports: Vec<u16>, address: Option<SocketAddr>) -> Apps {
        Apps { ports, address }
    }

    fn to(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([10, 0, 0, 7], port)))
    }

    /// F10: a redirected connection reaches 127.0.0.1 only on a declared app port.
    #[test]
    fn redirected_connections_reach_declared_app_ports_only() {
        let own = [15006, 15001, 15020, 7001];
        let i = apps(vec![8080, 9090], None);
        let local = |p: u16| Ok(SocketAddr::from(([127, 0, 0, 1], p)));
        let undeclared = Err(Refusal::UndeclaredPort);
        assert_eq!(i.target(to(8080), &own), local(8080));
        assert_eq!(i.target(to(9090), &own), local(9090));
        // A loopback-only debug port of the pod, and an explicit listener of the sidecar.
        assert_eq!(i.target(to(6060), &own), undeclared);
        assert_eq!(i.target(to(7001), &own), undeclared);
        // Nothing declared: nothing is reached.
        let none = apps(vec![], None);
        assert_eq!(none.target(to(8080), &own), undeclared);
        // Declared by mistake and also a port of the sidecar (bound on port 0, say): refused.
        let clash = apps(vec![7001], None);
        assert_eq!(clash.target(to(7001), &own), undeclared);
        assert_eq!(Refusal::UndeclaredPort.label(), "undeclared_port");
    }

    #[test]
    fn connections_that_were_not_redirected_go_to_the_app_address() {
        let app: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(apps(vec![], Some(app)).target(None, &[]), Ok(app));
        assert_eq!(
            apps(vec![8080], None).target(None, &[]),
            Err(Refusal::NoAppAddress)
        );
        assert_eq!(Refusal::NoAppAddress.label(), "no_app_address");
    }
}
