//! `trustline ca serve`: binds the HTTPS API, the admin socket and the metrics listener, and keeps
//! the server's own certificate fresh.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use super::api::{self, CaState, Peer, RateLimiter};
use super::authority::{Authority, AuthorityError, LeafUsage};
use super::config::{CaLimits, CaServeConfig};
use super::ledger::Ledger;
use super::limits::ConnLimits;
use super::metrics::CaMetrics;
use crate::audit::AuditLog;
use crate::clock::{unix_secs, Clock};
use crate::crypto::{provider, TLS13_ONLY};
use crate::identity::{inspect_cert, SpiffeId};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the newest server certificate to every handshake.
#[derive(Debug)]
struct ServerCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A running CA server: its real addresses and a shutdown handle.
pub struct Bound {
    /// The HTTPS API address.
    pub api: SocketAddr,
    /// The metrics listener, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The admin Unix socket.
    pub admin_socket: PathBuf,
    /// Shared state (tests read the ledger through it).
    pub state: Arc<CaState>,
    peer_refresh: Duration,
    shutdown: watch::Sender<bool>,
}

impl Bound {
    /// Stops accepting and ends the background tasks.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Follows exactly these peer CAs from now on (`peers` in the config does this at start;
    /// a lab whose CAs listen on port 0 learns their addresses only once they are bound).
    /// Entries are `https://HOST:PORT` or `REGION=https://HOST:PORT`
    /// ([`super::config::PeerSpec`]); one naming this CA's own region is refused.
    pub fn set_peers(&self, urls: &[String]) -> Result<(), String> {
        let specs = super::config::parse_peers(urls)?;
        let clients = super::peers::clients(
            &specs,
            &self.state.authority.bundle,
            &self.state.clock,
            self.state.authority.region.as_ref(),
        )?;
        super::peers::Peers::follow(
            &self.state,
            clients,
            self.peer_refresh,
            self.shutdown.subscribe(),
        );
        Ok(())
    }

    /// Waits until shutdown is requested.
    pub async fn closed(&self) {
        let mut rx = self.shutdown.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The errors `build` can report; all are fatal at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading CA from {dir}: {source}")]
    Authority {
        dir: PathBuf,
        source: AuthorityError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger: {0}")]
    Ledger(#[from] super::ledger::LedgerError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("peer CAs: {0}")]
    Peers(String),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the CA, opens the ledger, binds every listener and starts serving. Returns once all
/// sockets are bound, so callers (and tests on port 0) can use the real addresses at once.
pub async fn build(config: CaServeConfig, clock: Clock) -> Result<Bound, ServeError> {
    let authority = Authority::load(&config.ca_dir).map_err(|source| ServeError::Authority {
        dir: config.ca_dir.clone(),
        source,
    })?;
    std::fs::create_dir_all(&config.data_dir).map_err(io("creating data dir", &config.data_dir))?;
    set_mode(&config.data_dir, 0o700).map_err(io("securing data dir", &config.data_dir))?;
    let ledger = Ledger::open(&config.data_dir.join("ledger.redb"))?;
    let audit_path = config
        .audit_log
        .clone()
        .unwrap_or_else(|| config.data_dir.join("audit.log"));
    let audit = AuditLog::open(&audit_path).map_err(io("opening audit log", &audit_path))?;
    let mut registry = Registry::default();
    let metrics = CaMetrics::new(&mut registry);
    let limits = config.limits;
    let conn_limits = Arc::new(ConnLimits::new(
        limits.max_connections,
        limits.max_connections_per_client,
        &mut registry,
    ));
    metrics.set_expiry("issuing", unix_secs(authority.not_after));

    let server_id = SpiffeId::new(format!("spiffe://{}/trustline/ca", authority.trust_domain))
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(config.san.iter().cloned());
    let (first, ttl) = server_cert(&authority, &server_id, &names, &clock, config.svid_ttl)
        .map_err(ServeError::Tls)?;
    metrics.set_expiry("server", unix_secs(first.1));
    let resolver = Arc::new(ServerCert(ArcSwap::from_pointee(first.0)));
    let tls = Arc::new(server_tls(&authority, resolver.clone(), &clock)?);

    let state = Arc::new(CaState {
        authority,
        ledger,
        audit,
        metrics,
        clock: clock.clone(),
        svid_ttl: config.svid_ttl,
        rate: RateLimiter::new(config.rate_limit),
        read_rate: RateLimiter::new(
            config
                .rate_limit
                .saturating_mul(super::limits::READ_RATE_FACTOR),
        ),
        revoked_cache: Default::default(),
        peers: Arc::new(super::peers::Peers::default()),
        body_timeout: limits.body_timeout,
    });
    let (shutdown, shutdown_rx) = watch::channel(false);

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            what: "API",
            addr: config.listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        what: "API",
        addr: config.listen,
        source,
    })?;
    let admin_socket = config.data_dir.join("admin.sock");
    super::admin::serve(&admin_socket, state.clone(), shutdown_rx.clone())
        .map_err(io("binding admin socket", &admin_socket))?;
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let admin_state = Arc::new(crate::admin::AdminState {
                registry,
                ready: Box::new(|| Ok(())),
                json: vec![("/peers", {
                    let peers = state.peers.clone();
                    Box::new(move || peers.status_json())
                })],
            });
            Some(
                crate::admin::serve(addr, admin_state, shutdown_rx.clone())
                    .await
                    .map_err(|source| ServeError::Bind {
                        what: "metrics",
                        addr,
                        source,
                    })?,
            )
        }
        None => None,
    };

    tokio::spawn(renew_server_cert(
        state.clone(),
        resolver,
        server_id,
        names,
        ttl,
        shutdown_rx.clone(),
    ));
    tokio::spawn(prune_loop(state.clone(), shutdown_rx.clone()));
    let listen = Listen {
        tls,
        caps: conn_limits,
        limits,
    };
    tokio::spawn(accept_loop(listener, listen, state.clone(), shutdown_rx));
    tracing::info!(api = %api_addr, admin = %admin_socket.display(), metrics = ?metrics_addr,
        trust_domain = %state.authority.trust_domain, region = ?state.authority.region, "CA serving");
    let bound = Bound {
        api: api_addr,
        metrics: metrics_addr,
        admin_socket,
        state,
        peer_refresh: config.peers.refresh,
        shutdown,
    };
    if !config.peers.urls.is_empty() {
        bound
            .set_peers(&config.peers.urls)
            .map_err(ServeError::Peers)?;
        tracing::info!(peers = ?config.peers.urls, every = ?config.peers.refresh, "following peer CAs' revocations");
    }
    Ok(bound)
}

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

/// Issues the server's own certificate: a fresh in-memory key each time, serverAuth only, so it
/// can never be used as a client SVID.
#[allow(clippy::type_complexity)]
fn server_cert(
    authority: &Authority,
    id: &SpiffeId,
    names: &[String],
    clock: &Clock,
    svid_ttl: Duration,
) -> Result<((CertifiedKey, std::time::SystemTime), Duration), String> {
    let ttl = svid_ttl.min(Duration::from_secs(24 * 3600));
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let issued = authority
        .sign_leaf(id, &key, ttl, clock.now(), LeafUsage::Server { names })
        .map_err(|e| e.to_string())?;
    let chain = authority.chain_for(&issued.leaf);
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let ck = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| e.to_string())?;
    Ok(((ck, issued.not_after), ttl))
}

fn server_tls(
    authority: &Authority,
    resolver: Arc<ServerCert>,
    clock: &Clock,
) -> Result<rustls::ServerConfig, ServeError> {
    // Renewal is only for SVIDs this CA issued, so the client-auth anchor is the CA's own
    // certificate, not the whole root bundle. Client certificates are optional at the TLS
    // layer (first issuance uses a join token); the handler requires one or the other.
    let mut roots = RootCertStore::empty();
    roots
        .add(authority.cert.clone())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_details(provider(), Arc::new(clock.clone()))
        .with_protocol_versions(TLS13_ONLY)
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

async fn renew_server_cert(
    state: Arc<CaState>,
    resolver: Arc<ServerCert>,
    id: SpiffeId,
    names: Vec<String>,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wait = ttl / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        match server_cert(&state.authority, &id, &names, &state.clock, state.svid_ttl) {
            Ok(((ck, not_after), ttl)) => {
                resolver.0.store(Arc::new(ck));
                state.metrics.set_expiry("server", unix_secs(not_after));
                tracing::info!(not_after = %crate::clock::rfc3339(not_after), "renewed the CA server certificate");
                wait = ttl / 2;
            }
            Err(e) => {
                tracing::error!(error = %e, "renewing the CA server certificate failed; retrying");
                wait = Duration::from_secs(10);
            }
        }
    }
}

/// What the API listener serves connections with.
struct Listen {
    tls: Arc<rustls::ServerConfig>,
    caps: Arc<ConnLimits>,
    limits: CaLimits,
}

async fn accept_loop(
    listener: TcpListener,
    listen: Listen,
    state: Arc<CaState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(listen.tls);
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
        let acceptor = acceptor.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        let caps = listen.caps.clone();
        let limits = listen.limits;
        let span = tracing::info_span!("ca_conn", client = %addr);
        tokio::spawn(
            async move {
                let _permit = permit;
                serve_conn(acceptor, tcp, addr, state, &caps, limits, shutdown).await
            }
            .instrument(span),
        );
    }
}

async fn serve_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    state: Arc<CaState>,
    caps: &ConnLimits,
    limits: CaLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
        .map(|leaf| {
            inspect_cert(leaf).map_err(|e| e.to_string()).and_then(|i| {
                if i.is_ca {
                    Err("a CA certificate is not an SVID".to_string())
                } else {
                    Ok(i)
                }
            })
        });
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
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            if e.is_timeout() {
                caps.count("header_timeout");
            }
            tracing::debug!(error = %e, "connection ended with error")
        },
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
