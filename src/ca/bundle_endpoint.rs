//! The SPIFFE bundle endpoint (SPIFFE Federation spec, section 4): this trust domain's bundle
//! document, served to any `GET` on its own listener, so other trust domains can federate with
//! this one (`ca serve --bundle-endpoint ADDR`).
//!
//! Two profiles: `https_spiffe` (the default) serves the CA's own server certificate, whose
//! SPIFFE ID `spiffe://TD/trustline/ca` federated consumers name as `endpoint_spiffe_id`;
//! `https_web` serves a WebPKI certificate and key from PEM files, for consumers that check a
//! DNS name. No client authentication: the document is public. Connections are capped and timed
//! out as on the API listener, and the per-client read rate of the API applies.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tracing::Instrument;

use super::api::CaState;
use super::config::CaLimits;
use super::error::ServeError;
use super::limits::ConnLimits;
use super::server_cert::ServerCert;
use super::tasks::Tasks;
use crate::clock::Clock;
use crate::crypto::{provider, TLS13_ONLY};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an open connection gets to finish once shutdown is asked.
const CONN_GRACE: Duration = Duration::from_secs(5);

/// How the bundle endpoint authenticates itself to consumers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleEndpointProfile {
    /// The CA's server SVID (`spiffe://TD/trustline/ca`).
    HttpsSpiffe,
    /// A WebPKI certificate chain and its key, PEM files.
    HttpsWeb { cert: PathBuf, key: PathBuf },
}

/// `bundle_endpoint = "ADDR"` and its profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    pub listen: SocketAddr,
    pub profile: BundleEndpointProfile,
}

/// Binds and serves the bundle endpoint; gives its address.
pub(super) async fn serve(
    config: &BundleEndpointConfig,
    state: Arc<CaState>,
    server_cert: Arc<ServerCert>,
    limits: CaLimits,
    tasks: &Tasks,
    clock: &Clock,
) -> Result<SocketAddr, ServeError> {
    let tls = Arc::new(tls_config(&config.profile, server_cert, clock)?);
    let bind_err = |source| ServeError::Bind {
        what: "bundle endpoint",
        addr: config.listen,
        source,
    };
    let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    // Its own caps (not shared with the API: a flood here leaves renewals alone); the counters
    // are not exported, the API's names being taken.
    let caps = Arc::new(ConnLimits::new(
        limits.max_connections,
        limits.max_connections_per_client,
        &mut prometheus_client::registry::Registry::default(),
    ));
    let listen = Arc::new(Listen {
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
        caps,
        limits,
        tasks: tasks.clone(),
        state,
    });
    tasks.spawn(accept_loop(listener, listen));
    tracing::info!(bundle_endpoint = %addr, profile = ?config.profile, "serving the SPIFFE bundle endpoint");
    Ok(addr)
}

fn tls_config(
    profile: &BundleEndpointProfile,
    server_cert: Arc<ServerCert>,
    clock: &Clock,
) -> Result<rustls::ServerConfig, ServeError> {
    let builder = rustls::ServerConfig::builder_with_details(provider(), Arc::new(clock.clone()))
        .with_protocol_versions(TLS13_ONLY)?
        .with_no_client_auth();
    let mut cfg = match profile {
        BundleEndpointProfile::HttpsSpiffe => builder.with_cert_resolver(server_cert),
        BundleEndpointProfile::HttpsWeb { cert, key } => {
            let (chain, key) = web_cert(cert, key)?;
            builder.with_single_cert(chain, key)?
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Reads the `https_web` certificate chain and key.
fn web_cert(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServeError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| ServeError::Io {
            what,
            path,
            source: e,
        }
    };
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let pem = std::fs::read(cert).map_err(io("reading bundle_endpoint_cert", cert))?;
    let chain = crate::identity::certs_from_pem(&pem, &cert.display().to_string())
        .map_err(|e| io("reading bundle_endpoint_cert", cert)(invalid(&e)))?;
    let pem = std::fs::read(key).map_err(io("reading bundle_endpoint_key", key))?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| io("reading bundle_endpoint_key", key)(invalid(&e)))?;
    Ok((chain, key_der))
}

struct Listen {
    acceptor: tokio_rustls::TlsAcceptor,
    caps: Arc<ConnLimits>,
    limits: CaLimits,
    tasks: Tasks,
    state: Arc<CaState>,
}

async fn accept_loop(listener: TcpListener, listen: Arc<Listen>) {
    let mut shutdown = listen.tasks.shutdown.clone();
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(permit) = listen.caps.admit(addr.ip()) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = listen.clone();
        let span = tracing::info_span!("bundle_endpoint_conn", client = %addr);
        listen.tasks.spawn(
            async move {
                let _permit = permit;
                serve_conn(&conn, tcp, addr).await
            }
            .instrument(span),
        );
    }
}

async fn serve_conn(listen: &Listen, tcp: tokio::net::TcpStream, addr: SocketAddr) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, listen.acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            listen.caps.count("handshake_failed");
            tracing::debug!(error = %e, "bundle endpoint: TLS handshake failed");
            return;
        }
        Err(_) => {
            listen.caps.count("handshake_timeout");
            return;
        }
    };
    let state = listen.state.clone();
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, addr, &req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(listen.limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let mut shutdown = listen.tasks.shutdown.clone();
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(error = %e, "bundle endpoint: connection ended with error")
        },
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CONN_GRACE, conn).await;
        }
    }
}

/// Any path: `GET` gives the bundle document; other methods are refused.
fn handle<B>(state: &CaState, addr: SocketAddr, req: &Request<B>) -> Response<Full<Bytes>> {
    let respond = |status, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    };
    if req.method() != Method::GET {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed","detail":"the bundle endpoint answers GET only"}"#
                .into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET"),
        );
        return r;
    }
    if !state.read_rate.allow(addr.ip()) {
        return respond(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":"rate_limited","detail":"too many requests from this address"}"#.into(),
        );
    }
    respond(StatusCode::OK, document(state))
}

/// The SPIFFE bundle document, as `GET /v1/bundle` serves it with `Accept: application/json`:
/// the published roots, this region's JWT keys and every peer region's.
fn document(state: &CaState) -> String {
    super::api::bundle_document(state, false).to_string()
}
