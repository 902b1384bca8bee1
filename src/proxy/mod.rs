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
mod bind;
pub mod config;
mod http;
mod inbound;
mod jwt;
pub mod live;
pub mod metrics;
mod outbound;
pub mod redirect;
pub mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::clock::Clock;
use crate::drain::Tracker;
use crate::svid::Identity;
use config::SidecarConfig;
use inbound::Inbound;
use metrics::ProxyMetrics;
use outbound::Outbound;

/// An error a mechanism reports without a type of its own (its text is the message).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener (or the tunnel's UDP socket) could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A rustls configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The identity task, or the tunnel client built on the identity, could not start.
    #[error("identity: {0}")]
    Identity(BoxError),
    /// A `[tunnel]` without the sidecar's own `region` (the config validation refuses this).
    #[error("identity: a [tunnel] needs the sidecar's own `region`")]
    NoRegion,
    /// The policy file could not be loaded.
    #[error("policy: {0}")]
    Policy(authz::AuthzError),
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The `[[federation]]` bundles could not be set up.
    #[error("federation: {0}")]
    Federation(#[from] crate::federation::FederationError),
}

// Not a `source`: the message already carries it, and `{:#}` would print it twice.
impl From<authz::AuthzError> for ProxyError {
    fn from(e: authz::AuthzError) -> Self {
        ProxyError::Policy(e)
    }
}

/// What both sides share.
pub(crate) struct Common {
    pub identity: Arc<Identity>,
    pub metrics: ProxyMetrics,
    pub clock: Clock,
    /// Live connections, re-checked by the sweeper.
    pub live: Arc<live::LiveConns>,
    /// Connections in flight, for the drain.
    pub tracker: Arc<Tracker>,
    /// Turns true when the sidecar drains: listeners stop accepting, inbound sessions refuse
    /// new streams (GOAWAY).
    pub draining: watch::Receiver<bool>,
    /// Turns true when the remaining connections are cut.
    pub stopped: watch::Receiver<bool>,
    /// Ports of the sidecar's own listeners (admin, inbound, outbound, explicit): never an app
    /// port, whatever `inbound.ports` says.
    pub own_ports: Vec<u16>,
    /// How long a TLS handshake (and an HTTP request head) may take.
    pub handshake_timeout: Duration,
    next_id: AtomicU64,
}

impl Common {
    /// A new connection id (for its span).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
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
    /// The decision audit log ([`Bound::drain`] flushes it).
    pub audit: Arc<crate::audit::AuditLog>,
    /// The `[[federation]]` trust domains' bundles (empty without).
    pub federation: Arc<crate::federation::Federation>,
    tracker: Arc<Tracker>,
    stop_accepting: watch::Sender<bool>,
    stop_all: watch::Sender<bool>,
}

impl Bound {
    /// Stops accepting, waits for open connections to finish up to `deadline`, then stops the
    /// remaining tasks (open connections are closed), and writes out the audit log's queue.
    /// Returns the connections cut off.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let _ = self.stop_accepting.send(true);
        let _ = tokio::time::timeout(deadline, self.tracker.idle()).await;
        let left = self.tracker.active();
        let _ = self.stop_all.send(true);
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
        left
    }

    /// Connections in flight.
    pub fn active_connections(&self) -> usize {
        self.tracker.active()
    }
}

/// Starts the identity task, binds every listener and serves. Returns once bound.
pub async fn build(config: SidecarConfig, clock: Clock) -> Result<Bound, ProxyError> {
    let (stop_all, stopped) = watch::channel(false);
    let (stop_accepting, draining) = watch::channel(false);
    let setup = bind::Setup::new(&config, &clock, &stopped).await?;
    bind::warn_of_footguns(&config);
    // Bound before anything serves, so the inbound side knows every port of its own.
    let listeners = bind::Listeners::bind(&config).await?;
    let identity = setup.identity.clone();
    let live = setup.sweep(&config, &clock, &stopped);
    let audit = setup.audit.clone();
    let common = Arc::new(Common {
        identity: identity.clone(),
        metrics: setup.metrics.clone(),
        clock,
        live: live.clone(),
        tracker: Arc::new(Tracker::default()),
        draining,
        stopped: stopped.clone(),
        own_ports: listeners.own_ports(setup.admin),
        handshake_timeout: config.handshake_timeout,
        next_id: AtomicU64::new(1),
    });
    let (authz, gateways) = (setup.authz, setup.gateways);
    let outbound = Outbound::build(&config, common.clone(), gateways, stopped.clone())?;
    let outbound = Arc::new(outbound);
    let inbound = match &config.inbound {
        Some(i) => Some(Inbound::build(&config, i, authz.clone(), common.clone())?),
        None => None,
    };
    let span = tracing::info_span!("rotations");
    let rotations = bind::watch_rotations(identity.clone(), setup.metrics.clone(), stopped);
    tokio::spawn(rotations.instrument(span));
    let sessions = outbound.pool.clone();
    let admin = setup.admin;
    let (inbound, outbound, listeners) = listeners.serve(&config, inbound.map(Arc::new), outbound);
    tracing::info!(id = %identity.id(), %admin, ?inbound, ?outbound, ?listeners, "sidecar listening");
    Ok(Bound {
        admin,
        inbound,
        outbound,
        listeners,
        identity,
        metrics: setup.metrics,
        authz,
        sessions,
        live,
        audit,
        federation: setup.federation,
        tracker: common.tracker.clone(),
        stop_accepting,
        stop_all,
    })
}

/// Accepts until the sidecar drains; hands each connection to `handle` and runs it until it
/// ends or the sidecar stops.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, common: Arc<Common>, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stop_accepting = common.draining.clone();
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
        let guard = common.tracker.enter();
        let fut = handle(tcp, peer);
        let mut stop = common.stopped.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_errors_say_what_they_said_and_once() {
        let e = ProxyError::from(authz::AuthzError::NoService {
            path: "/etc/p.toml".into(),
            service: "api".into(),
        });
        let text = "policy: /etc/p.toml: no [service.api] in the policy file";
        assert_eq!(e.to_string(), text);
        // `main` prints the chain (`{:#}`): the cause is not repeated after the message.
        assert_eq!(format!("{:#}", anyhow::Error::from(e)), text);
        let e = ProxyError::Identity("no SVID yet".into());
        assert_eq!(e.to_string(), "identity: no SVID yet");
        assert_eq!(
            ProxyError::NoRegion.to_string(),
            "identity: a [tunnel] needs the sidecar's own `region`"
        );
    }
}
