//! One GET of a bundle endpoint: TCP, TLS 1.3 with the profile's server check, HTTP/1.1, a
//! bounded body, all within one deadline.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::header::{ACCEPT, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::RootCertStore;

use super::config::{Endpoint, Profile};
use super::doc::MAX_DOCUMENT;
use super::FetchError;
use crate::clock::Clock;
use crate::crypto::{provider, TLS13_ONLY};
use crate::identity::Bundle;
use crate::tls::{ExpectedPeer, SpiffeServerVerifier};

/// Longest one fetch may take, connection to last byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS client config of one fetch: for `https_spiffe`, the server's SVID must chain to
/// `current` (the trust domain's bundle in force) and be exactly the endpoint's SPIFFE ID; for
/// `https_web`, a WebPKI certificate for the host name, chaining to the configured roots.
pub fn tls_config(
    profile: &Profile,
    current: &Bundle,
    clock: &Clock,
) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    let builder = rustls::ClientConfig::builder_with_details(provider(), Arc::new(clock.clone()))
        .with_protocol_versions(TLS13_ONLY)
        .map_err(FetchError::Tls)?;
    let mut cfg = match profile {
        Profile::HttpsSpiffe { endpoint_id } => {
            let verifier = SpiffeServerVerifier::new(
                current.store(),
                ExpectedPeer::AnyOf(vec![endpoint_id.clone()]),
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        Profile::HttpsWeb { web_roots } => {
            let mut roots = RootCertStore::empty();
            let (_, unusable) = roots.add_parsable_certificates(web_roots.iter().cloned());
            if roots.is_empty() {
                return Err(FetchError::NoWebRoots { unusable });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Each fetch authenticates the server in full.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// GETs the document at `endpoint`; the body is at most [`MAX_DOCUMENT`] bytes, and the whole
/// exchange ends within [`FETCH_TIMEOUT`].
pub async fn get(endpoint: &Endpoint, tls: Arc<rustls::ClientConfig>) -> Result<Bytes, FetchError> {
    tokio::time::timeout(FETCH_TIMEOUT, get_unbounded(endpoint, tls))
        .await
        .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))?
}

async fn get_unbounded(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Bytes, FetchError> {
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(FetchError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(endpoint.host.clone())
        .map_err(|e| FetchError::Http(format!("{:?} as a TLS server name: {e}", endpoint.host)))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Handshake(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    // Ends when `sender` is dropped (and within the caller's deadline, since it is dropped then).
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(endpoint.path.as_str())
        .header(HOST, endpoint.authority.as_str())
        .header(ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| FetchError::Body(e.to_string()))?;
        Ok(body.to_bytes())
    }
    .await;
    drop(sender);
    conn.abort();
    result
}
