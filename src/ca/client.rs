//! The workload side of issuance: make a key in memory and a CSR, call the CA, and accept the
//! returned chain only after verifying it against the bundle and checking the SPIFFE ID.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::clock::Clock;
use crate::identity::{certs_from_pem, Bundle, IdentityError, SpiffeId, Svid};
use crate::tls::{provider, ExpectedPeer, SpiffeServerVerifier, TLS13_ONLY};

/// Longest a TCP connect to the CA may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the TLS handshake with the CA may take.
pub const TLS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one request may take, from sending it to the last byte of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on CA connections: a peer that vanished (a host lost mid-request, a
/// middlebox that dropped the flow) is noticed by the kernel, not only by the timeouts.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Largest answer read from the CA (a revocation list of ~50,000 serials).
const MAX_ANSWER: usize = 4 << 20;

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CA URL {0:?} must look like https://HOST:PORT")]
    Url(String),
    #[error("connecting to the CA at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with the CA: {0}")]
    Tls(String),
    #[error("HTTP with the CA: {0}")]
    Http(String),
    #[error("the CA at {addr} did not {what} within {after:?}")]
    Timeout {
        addr: String,
        what: &'static str,
        after: Duration,
    },
    #[error("CA refused ({status}): {error}: {detail}")]
    Refused {
        status: StatusCode,
        error: String,
        detail: String,
    },
    #[error("CA returned an unusable chain: {0}")]
    BadChain(#[from] IdentityError),
    #[error("CA returned an SVID for {got}, expected {expected}")]
    WrongId { got: String, expected: String },
    #[error("making the key or CSR: {0}")]
    Csr(String),
}

/// A client of one CA.
#[derive(Clone)]
pub struct CaClient {
    addr: String,
    host: String,
    server_name: ServerName<'static>,
    bundle: Bundle,
    clock: Clock,
}

/// A fresh key pair and the PEM CSR naming `id` as its only SAN.
pub fn make_csr(id: &SpiffeId) -> Result<(KeyPair, String), ClientError> {
    let key = KeyPair::generate().map_err(|e| ClientError::Csr(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(id.to_string().try_into().map_err(
            |e: rcgen::Error| ClientError::Csr(e.to_string()),
        )?)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ClientError::Csr(e.to_string()))?;
    let pem = csr.pem().map_err(|e| ClientError::Csr(e.to_string()))?;
    Ok((key, pem))
}

impl CaClient {
    /// A client for the CA at `url` (`https://HOST:PORT`), trusting `bundle`.
    pub fn new(url: &str, bundle: Bundle, clock: Clock) -> Result<Self, ClientError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| ClientError::Url(url.into()))?
            .trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| ClientError::Url(url.into()))?;
        port.parse::<u16>()
            .map_err(|_| ClientError::Url(url.into()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| ClientError::Url(url.into()))?;
        Ok(CaClient {
            addr: rest.to_string(),
            host,
            server_name,
            bundle,
            clock,
        })
    }

    /// The TLS client config: TLS 1.3, the CA server must be `spiffe://TD/trustline/ca`.
    pub fn tls_config(
        &self,
        client_svid: Option<&Svid>,
    ) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let ca_id = SpiffeId::new(format!(
            "spiffe://{}/trustline/ca",
            self.bundle.trust_domain
        ))
        .map_err(|e| ClientError::Tls(e.to_string()))?;
        let verifier =
            SpiffeServerVerifier::new(self.bundle.store(), ExpectedPeer::AnyOf(vec![ca_id]));
        let builder =
            rustls::ClientConfig::builder_with_details(provider(), Arc::new(self.clock.clone()))
                .with_protocol_versions(TLS13_ONLY)
                .map_err(|e| ClientError::Tls(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier));
        let mut cfg = match client_svid {
            Some(svid) => builder
                .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
                .map_err(|e| ClientError::Tls(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Opens a keep-alive HTTPS connection, presenting `client_svid` if given.
    pub async fn connect(&self, client_svid: Option<&Svid>) -> Result<CaConnection, ClientError> {
        self.connect_with(self.tls_config(client_svid)?).await
    }

    /// Opens a keep-alive HTTPS connection with a prepared TLS config. Connect and handshake
    /// each have a deadline ([`CONNECT_TIMEOUT`], [`TLS_TIMEOUT`]), and so has every request
    /// on the connection ([`REQUEST_TIMEOUT`]): a CA that accepts and never answers cannot hold
    /// renewal or the revocation refresh.
    pub async fn connect_with(
        &self,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<CaConnection, ClientError> {
        let timeout = |what, after| ClientError::Timeout {
            addr: self.addr.clone(),
            what,
            after,
        };
        let connect = tokio::net::TcpStream::connect(&self.addr);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| timeout("accept the connection", CONNECT_TIMEOUT))?
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let handshake =
            tokio_rustls::TlsConnector::from(tls).connect(self.server_name.clone(), tcp);
        let tls = tokio::time::timeout(TLS_TIMEOUT, handshake)
            .await
            .map_err(|_| timeout("finish the TLS handshake", TLS_TIMEOUT))?
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(CaConnection {
            sender,
            host: self.host.clone(),
            addr: self.addr.clone(),
        })
    }

    /// First issuance: a new key, a CSR for `id`, authorised by a join token.
    pub async fn issue_with_token(&self, id: &SpiffeId, token: &str) -> Result<Svid, ClientError> {
        let mut conn = self.connect(None).await?;
        self.request(&mut conn, id, Some(token)).await
    }

    /// Renewal: a new key, authorised by the current SVID over mTLS.
    pub async fn renew(&self, current: &Svid) -> Result<Svid, ClientError> {
        let mut conn = self.connect(Some(current)).await?;
        self.request(&mut conn, current.id(), None).await
    }

    /// Makes a key and CSR for `id`, sends it on `conn` and verifies the answer.
    pub async fn request(
        &self,
        conn: &mut CaConnection,
        id: &SpiffeId,
        token: Option<&str>,
    ) -> Result<Svid, ClientError> {
        let (key, csr) = make_csr(id)?;
        let (status, body) = conn.post_csr(&csr, token).await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &body));
        }
        let chain = certs_from_pem(&body, "CA response")?;
        let info = self.bundle.verify_svid_chain(&chain, self.clock.now())?;
        if &info.id != id {
            return Err(ClientError::WrongId {
                got: info.id.to_string(),
                expected: id.to_string(),
            });
        }
        Ok(Svid {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            info,
        })
    }

    /// Fetches the PEM trust bundle.
    pub async fn fetch_bundle_pem(&self) -> Result<Bytes, ClientError> {
        let mut conn = self.connect(None).await?;
        let (status, body) = conn.get("/v1/bundle", None).await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &body));
        }
        Ok(body)
    }
}

fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    ClientError::Refused {
        status,
        error: v["error"].as_str().unwrap_or("unknown").to_string(),
        detail: v["detail"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
    }
}

/// One keep-alive HTTPS connection to the CA.
pub struct CaConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    addr: String,
}

impl CaConnection {
    /// `POST /v1/svid` with a PEM CSR, optionally with a bearer token; the raw answer.
    pub async fn post_csr(
        &mut self,
        csr_pem: &str,
        token: Option<&str>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/v1/svid")
            .header(HOST, &self.host)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/pkcs10"));
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(csr_pem.to_string())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.send(req).await
    }

    /// `GET path`, with an optional `Accept` header.
    pub async fn get(
        &mut self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(HOST, &self.host);
        if let Some(a) = accept {
            req = req.header(hyper::header::ACCEPT, a);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.send(req).await
    }

    /// Sends any request on this connection; the whole exchange must finish within
    /// [`REQUEST_TIMEOUT`].
    pub async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                addr: self.addr.clone(),
                what: "answer the request",
                after: REQUEST_TIMEOUT,
            })?
    }
}

impl CaClient {
    /// `GET path` on a new connection without a client certificate; a non-2xx answer is a
    /// refusal and a body over `max_body` bytes an error (peer CAs read each other's lists
    /// with it, so a peer cannot make us buffer without bound). Callers bound the time.
    pub async fn get_limited(&self, path: &str, max_body: usize) -> Result<Bytes, ClientError> {
        let mut conn = self.connect(None).await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(HOST, &conn.host)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        conn.sender
            .ready()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = conn
            .sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| ClientError::Http(format!("reading {path}: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(refusal(status, &body));
        }
        Ok(body)
    }
}
