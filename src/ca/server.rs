//! `trustline ca serve`: binds the HTTPS API, the admin socket and the metrics listener, keeps
//! the server's own certificate fresh (`server_cert.rs`), and drains on shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use super::agents::AgentRegistry;
use super::api::{self, CaState, Peer, RateLimiter};
use super::config::{CaLimits, CaServeConfig};
pub use super::error::ServeError;
use super::error::{ClientCertError, PeerConfigError};
use super::ledger::postgres::schema::Owner;
use super::limits::ConnLimits;
use super::metrics::CaMetrics;
use super::rotation::CaKeys;
use super::server_cert::{server_tls, ServerCert};
use super::tasks::{Stopper, Tasks};
use crate::audit::AuditLog;
use crate::clock::{unix_secs, Clock};
use crate::identity::{inspect_cert, CertInfo};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an open connection gets to finish its request once shutdown is asked.
const CONN_GRACE: Duration = Duration::from_secs(5);
/// How long [`Bound::drain`] should wait, by default: a connection's grace.
pub const DRAIN_TIMEOUT: Duration = CONN_GRACE;

/// A running CA server: its real addresses and a shutdown handle.
pub struct Bound {
    /// The HTTPS API address.
    pub api: SocketAddr,
    /// The metrics listener, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The SPIFFE bundle endpoint, if served.
    pub bundle_endpoint: Option<SocketAddr>,
    /// The admin Unix socket.
    pub admin_socket: PathBuf,
    /// Shared state (tests read the ledger through it).
    pub state: Arc<CaState>,
    peer_refresh: Duration,
    stopper: Stopper,
}

impl Bound {
    /// Stops accepting and asks the background tasks to end; returns at once.
    pub fn shutdown(&self) {
        self.stopper.shutdown();
    }

    /// Stops accepting, lets the requests in flight (API and admin) finish and the background
    /// tasks end, waiting up to `deadline`, then cuts what is left. Returns how many tasks were
    /// still running at the deadline (0 when everything finished in time).
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.stopper.drain(deadline).await
    }

    /// The server's tasks running now (connections, loops).
    pub fn active_tasks(&self) -> usize {
        self.stopper.active()
    }

    /// Follows exactly these peer CAs from now on (`peers` in the config does this at start;
    /// a lab whose CAs listen on port 0 learns their addresses only once they are bound).
    /// Entries are `https://HOST:PORT` or `REGION=https://HOST:PORT`
    /// ([`super::config::PeerSpec`]); one naming this CA's own region is refused.
    pub fn set_peers(&self, urls: &[String]) -> Result<(), PeerConfigError> {
        let specs = super::config::parse_peers(urls)?;
        let clients = super::peers::clients(
            &specs,
            &self.state.authority.trust(),
            &self.state.clock,
            self.state.authority.region.as_ref(),
        )?;
        super::peers::Peers::follow(
            &self.state,
            clients,
            self.peer_refresh,
            self.stopper.tasks(),
        );
        Ok(())
    }

    /// Waits until shutdown is requested.
    pub async fn closed(&self) {
        let mut rx = self.stopper.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn bind_err(what: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| ServeError::Bind { what, addr, source }
}

/// Loads the CA, opens the ledger, binds every listener and starts serving. Returns once all
/// sockets are bound, so callers (and tests on port 0) can use the real addresses at once.
pub async fn build(config: CaServeConfig, clock: Clock) -> Result<Bound, ServeError> {
    let mut registry = Registry::default();
    let (state, resolver) = open_state(&config, &clock, &mut registry).await?;
    let conn_limits = Arc::new(ConnLimits::new(
        config.limits.max_connections,
        config.limits.max_connections_per_client,
        &mut registry,
    ));
    let tls = Arc::new(server_tls(&state.authority, resolver.clone(), &clock)?);
    let stopper = Stopper::new();
    let tasks = stopper.tasks();
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(bind_err("API", config.listen))?;
    let api_addr = listener
        .local_addr()
        .map_err(bind_err("API", config.listen))?;
    let admin_socket = config.data_dir.join("admin.sock");
    super::admin::serve(&admin_socket, state.clone(), tasks)
        .map_err(io("binding admin socket", &admin_socket))?;
    let metrics_addr = serve_metrics(&config, &state, registry, tasks).await?;
    tasks.spawn(
        resolver
            .clone()
            .renew(state.clone(), tasks.shutdown.clone()),
    );
    tasks.spawn(prune_loop(state.clone(), tasks.shutdown.clone()));
    tasks.spawn(super::rotation::retire_loop(
        state.clone(),
        RETIRE_CHECK,
        tasks.shutdown.clone(),
    ));
    let listen = Arc::new(Listen {
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
        caps: conn_limits,
        limits: config.limits,
        tasks: tasks.clone(),
    });
    tasks.spawn(accept_loop(listener, listen, state.clone()));
    let bundle_endpoint = match &config.bundle_endpoint {
        Some(be) => Some(
            super::bundle_endpoint::serve(
                be,
                state.clone(),
                resolver,
                config.limits,
                tasks,
                &clock,
            )
            .await?,
        ),
        None => None,
    };
    tracing::info!(api = %api_addr, admin = %admin_socket.display(), metrics = ?metrics_addr,
        trust_domain = %state.authority.trust_domain, region = ?state.authority.region, "CA serving");
    let bound = Bound {
        api: api_addr,
        metrics: metrics_addr,
        bundle_endpoint,
        admin_socket,
        state,
        peer_refresh: config.peers.refresh,
        stopper,
    };
    if !config.peers.urls.is_empty() {
        bound.set_peers(&config.peers.urls)?;
        tracing::info!(peers = ?config.peers.urls, every = ?config.peers.refresh, "following peer CAs' revocations");
    }
    Ok(bound)
}

/// Loads the CA, prepares the data directory, opens the ledger and the audit log, and issues
/// the server's first certificate.
async fn open_state(
    config: &CaServeConfig,
    clock: &Clock,
    registry: &mut Registry,
) -> Result<(Arc<CaState>, Arc<ServerCert>), ServeError> {
    let authority =
        CaKeys::open(&config.ca_dir, config.svid_ttl).map_err(|source| ServeError::Keys {
            dir: config.ca_dir.clone(),
            source,
        })?;
    let agents = AgentRegistry::from_file(
        config.agents.clone(),
        &authority.trust_domain,
        config.file.as_deref(),
    )?;
    let jwt = super::jwt::JwtKeys::open(
        &config.ca_dir,
        authority.region.clone(),
        config.jwt_ttl,
        clock.unix(),
    )?;
    let data = &config.data_dir;
    std::fs::create_dir_all(data).map_err(io("creating data dir", data))?;
    set_mode(data, 0o700).map_err(io("securing data dir", data))?;
    let owner = Owner {
        trust_domain: authority.trust_domain.as_str(),
        region: authority.region.as_deref().unwrap_or(""),
    };
    let url = config.ledger_url();
    let ledger = url.open(&owner, config.ledger_options.clone()).await?;
    tracing::info!(ledger = %url, "ledger open");
    let audit_path = config
        .audit_log
        .clone()
        .unwrap_or_else(|| data.join("audit.log"));
    let audit = AuditLog::open(&audit_path).map_err(io("opening audit log", &audit_path))?;
    let metrics = CaMetrics::new(registry);
    metrics.set_expiry("issuing", unix_secs(authority.active().not_after));
    let (resolver, not_after) =
        ServerCert::first(&authority.active(), &config.san, clock, config.svid_ttl)?;
    metrics.set_expiry("server", unix_secs(not_after));
    let rate = config.rate_limit;
    let state = Arc::new(CaState {
        authority,
        ledger,
        audit,
        metrics,
        clock: clock.clone(),
        svid_ttl: config.svid_ttl,
        rate: RateLimiter::new(rate),
        read_rate: RateLimiter::new(rate.saturating_mul(super::limits::READ_RATE_FACTOR)),
        revoked_cache: Default::default(),
        peers: Arc::new(super::peers::Peers::default()),
        body_timeout: config.limits.body_timeout,
        agents,
        jwt_ttl: config.jwt_ttl,
        jwt,
    });
    Ok((state, resolver))
}

/// Serves `/metrics` (and the peers' state on `/peers`), if configured.
async fn serve_metrics(
    config: &CaServeConfig,
    state: &Arc<CaState>,
    registry: Registry,
    tasks: &Tasks,
) -> Result<Option<SocketAddr>, ServeError> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    let peers = state.peers.clone();
    let admin_state = Arc::new(crate::admin::AdminState {
        registry,
        ready: Box::new(|| Ok(())),
        json: vec![("/peers", Box::new(move || peers.status_json()))],
    });
    crate::admin::serve(addr, admin_state, tasks.shutdown.clone())
        .await
        .map(Some)
        .map_err(bind_err("metrics", addr))
}

/// How often the CA checks whether the previous intermediate's last SVID has expired.
const RETIRE_CHECK: Duration = Duration::from_secs(1);

/// How often expired revocations are dropped from memory.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Keeps the in-memory revocation map to what can still be presented.
async fn prune_loop(state: Arc<CaState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let pruned = state.ledger.prune(state.clock.unix());
        if pruned > 0 {
            tracing::debug!(pruned, "expired revocations dropped from memory");
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// What the API listener serves connections with.
struct Listen {
    acceptor: tokio_rustls::TlsAcceptor,
    caps: Arc<ConnLimits>,
    limits: CaLimits,
    tasks: Tasks,
}

async fn accept_loop(listener: TcpListener, listen: Arc<Listen>, state: Arc<CaState>) {
    let mut shutdown = listen.tasks.shutdown.clone();
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Over a cap, the connection is closed before any TLS work is spent on it.
        let Some(permit) = listen.caps.admit(addr.ip()) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let conn = listen.clone();
        let span = tracing::info_span!("ca_conn", client = %addr);
        listen.tasks.spawn(
            async move {
                let _permit = permit;
                serve_conn(&conn, tcp, addr, state).await
            }
            .instrument(span),
        );
    }
}

async fn serve_conn(
    listen: &Listen,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    state: Arc<CaState>,
) {
    let caps = &listen.caps;
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, listen.acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            caps.count("handshake_failed");
            tracing::info!(error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            caps.count("handshake_timeout");
            tracing::info!("TLS handshake timed out");
            return;
        }
    };
    let svid = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(client_svid);
    let peer = Arc::new(Peer { addr, svid });
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(api::handle(&state, &peer, req).await) }
    });
    // Without a timer hyper silently ignores `header_read_timeout`. The timeout also runs
    // between requests of a keep-alive connection, so it bounds an idle connection too.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(listen.limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let mut shutdown = listen.tasks.shutdown.clone();
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            if e.is_timeout() {
                caps.count("header_timeout");
            }
            tracing::debug!(error = %e, "connection ended with error")
        },
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CONN_GRACE, conn).await;
        }
    }
}

/// The facts of a client certificate rustls verified, if it can be an SVID.
fn client_svid(leaf: &rustls::pki_types::CertificateDer<'_>) -> Result<CertInfo, ClientCertError> {
    let info = inspect_cert(leaf)?;
    if info.is_ca {
        return Err(ClientCertError::IsCa);
    }
    Ok(info)
}
