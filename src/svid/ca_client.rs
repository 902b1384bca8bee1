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
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::clock::Clock;
use crate::crypto::{provider, TLS13_ONLY};
use crate::identity::{certs_from_pem, region_of_chain, Bundle, IdentityError, SpiffeId, Svid};
use crate::region::Region;
use crate::tls::{ExpectedPeer, SpiffeServerVerifier};

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
    /// When set, the bundle in force there replaces `bundle` at each connection (a sidecar's
    /// refreshed trust, a CA's published roots), so a root added by a CA rotation is trusted
    /// for the CA's own certificate and the chains it returns.
    trust: Option<Arc<crate::tls::mesh::Trust>>,
    clock: Clock,
    region: CaRegion,
}

/// Which regional CA must have issued the CA server's certificate (read with
/// [`region_of_chain`] on the verified chain, inside the handshake).
///
/// Every regional CA's server certificate names the same `spiffe://TD/trustline/ca`, so the
/// SPIFFE ID alone lets whoever holds one region's CA server key stand in for any region's CA.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CaRegion {
    /// Any CA of the trust domain (a client that does not know its CA's region).
    #[default]
    Any,
    /// Exactly this region's CA: the client knows which region's CA it talks to.
    Is(Region),
    /// Any CA but this region's: a peer CA seen from a CA of this region (a peer issued by our
    /// own region's CA is ourselves or an impersonation).
    Not(Region),
}

/// A CA server certificate issued by the wrong region's CA (see [`CaRegion::check`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WrongCaRegion {
    /// Not issued by `want`'s CA; `found` is the issuing region, `None` when not a regional CA.
    #[error(
        "the CA's certificate was issued by {}'s CA; expected region {want}'s CA \
         (another region's CA cannot stand in for this one)",
        shown(found.as_deref())
    )]
    NotExpected { want: Region, found: Option<String> },
    /// A peer CA whose certificate our own region's CA issued.
    #[error(
        "the peer CA's certificate was issued by region {own}'s CA, this CA's own \
         region: a peer must be another region's CA (this is ourselves or an impersonation)"
    )]
    OwnRegion { own: Region },
}

/// How an issuing region shows in [`WrongCaRegion::NotExpected`].
fn shown(found: Option<&str>) -> String {
    found.map_or_else(
        || "no region (not issued by a regional CA)".to_string(),
        |r| format!("region {r}"),
    )
}

impl CaRegion {
    /// Whether a server certificate issued by `found`'s CA (`None`: not by a regional CA) is
    /// acceptable; the refusal says what was expected and what was found.
    pub fn check(&self, found: Option<&str>) -> Result<(), WrongCaRegion> {
        match self {
            CaRegion::Any => Ok(()),
            CaRegion::Is(want) if found == Some(want.as_str()) => Ok(()),
            CaRegion::Is(want) => Err(WrongCaRegion::NotExpected {
                want: want.clone(),
                found: found.map(str::to_string),
            }),
            CaRegion::Not(own) if found == Some(own.as_str()) => {
                Err(WrongCaRegion::OwnRegion { own: own.clone() })
            }
            CaRegion::Not(_) => Ok(()),
        }
    }
}

/// The CA server check: the SPIFFE verifier (chain, `spiffe://TD/trustline/ca`), then the
/// region of the CA that issued the server's certificate, so a CA of the wrong region fails
/// the handshake itself.
#[derive(Debug)]
struct CaServerVerifier {
    spiffe: SpiffeServerVerifier,
    region: CaRegion,
}

impl ServerCertVerifier for CaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok =
            self.spiffe
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if self.region != CaRegion::Any {
            // The chain is exactly its verified path (verify_path), so the certificate after
            // the leaf is the one that signed it.
            let mut chain = vec![end_entity.clone()];
            chain.extend(intermediates.iter().cloned());
            let found = region_of_chain(&chain);
            self.region.check(found.as_deref()).map_err(|e| {
                crate::tls::mesh::reject(crate::refusal::Refusal::WrongRegion, e.to_string())
            })?;
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.spiffe.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.spiffe.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.spiffe.supported_verify_schemes()
    }
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
            trust: None,
            clock,
            region: CaRegion::Any,
        })
    }

    /// Requires the CA server's certificate to be issued by `region`'s CA (checked in the TLS
    /// handshake): a client that knows which region's CA it talks to sets it, so another
    /// region's CA (one compromised CA key) cannot stand in for it.
    pub fn expect_region(self, region: Region) -> Self {
        self.with_region(CaRegion::Is(region))
    }

    /// Sets the region rule for the CA server's certificate ([`CaRegion`]).
    pub fn with_region(mut self, region: CaRegion) -> Self {
        self.region = region;
        self
    }

    /// Trusts `trust`'s bundle as it is at each connection instead of the fixed one.
    pub fn with_trust(mut self, trust: Arc<crate::tls::mesh::Trust>) -> Self {
        self.trust = Some(trust);
        self
    }

    /// The bundle trusted now.
    fn bundle(&self) -> Bundle {
        match &self.trust {
            Some(t) => (*t.bundle()).clone(),
            None => self.bundle.clone(),
        }
    }

    /// The region rule this client enforces.
    pub fn region(&self) -> &CaRegion {
        &self.region
    }

    /// The TLS client config: TLS 1.3, the CA server must be `spiffe://TD/trustline/ca`, issued
    /// by the region's CA that [`CaClient::region`] asks for.
    pub fn tls_config(
        &self,
        client_svid: Option<&Svid>,
    ) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let bundle = self.bundle();
        let ca_id = crate::identity::ids::ca_id(&bundle.trust_domain);
        let verifier = CaServerVerifier {
            spiffe: SpiffeServerVerifier::new(bundle.store(), ExpectedPeer::AnyOf(vec![ca_id])),
            region: self.region.clone(),
        };
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
        let server_region = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(region_of_chain);
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
            server_region,
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
        let info = crate::tls::verify_svid_chain(&self.bundle(), &chain, self.clock.now())?;
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

    /// A workload's SVID obtained by a host agent: a fresh key made here and a CSR for `id`,
    /// sent with the agent's own SVID as client certificate (the CA's `[[agent]]` registration
    /// of the agent must allow `id`).
    pub async fn issue_for(&self, agent: &Svid, id: &SpiffeId) -> Result<Svid, ClientError> {
        let mut conn = self.connect(Some(agent)).await?;
        self.request(&mut conn, id, None).await
    }

    /// A JWT-SVID for `id` with `audience`, asked for with `caller`'s SVID (its own ID, or a
    /// host agent's for a workload it is registered for). The token and its `exp` (Unix
    /// seconds), as the CA answered: callers validate it before handing it out.
    pub async fn fetch_jwt(
        &self,
        caller: &Svid,
        id: &SpiffeId,
        audience: &[String],
    ) -> Result<(String, u64), ClientError> {
        let mut conn = self.connect(Some(caller)).await?;
        let body = serde_json::json!({"spiffe_id": id.to_string(), "audience": audience});
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/jwt")
            .header(HOST, &conn.host)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let (status, body) = conn.send(req).await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &body));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            token: String,
            expires_at: u64,
        }
        let a: Answer = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Http(format!("the CA's JWT answer: {e}")))?;
        Ok((a.token, a.expires_at))
    }

    /// The SPIFFE bundle document (`GET /v1/bundle`, JSON): the roots and every region's JWT
    /// keys, optionally asked with a client certificate.
    pub async fn fetch_bundle_json(&self, client: Option<&Svid>) -> Result<Bytes, ClientError> {
        let mut conn = self.connect(client).await?;
        let (status, body) = conn.get("/v1/bundle", Some("application/json")).await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &body));
        }
        Ok(body)
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
    server_region: Option<Region>,
}

impl CaConnection {
    /// The region of the CA that issued the server's certificate (verified in the handshake);
    /// `None` when a root issued it.
    pub fn server_region(&self) -> Option<&Region> {
        self.server_region.as_ref()
    }

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
        Ok(self.get_limited_from(path, max_body).await?.0)
    }

    /// [`CaClient::get_limited`], with the region of the CA that issued the server's
    /// certificate ([`CaConnection::server_region`]).
    pub async fn get_limited_from(
        &self,
        path: &str,
        max_body: usize,
    ) -> Result<(Bytes, Option<Region>), ClientError> {
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
        Ok((body, conn.server_region))
    }
}

#[cfg(test)]
mod tests {
    use super::CaRegion;

    #[test]
    fn the_region_rule_names_what_it_expected_and_what_it_found() {
        assert!(CaRegion::Any.check(None).is_ok());
        let a = CaRegion::Is(crate::region::Region::new("a").unwrap());
        assert!(a.check(Some("a")).is_ok());
        let e = a.check(Some("b")).unwrap_err().to_string();
        assert!(
            e.contains("region b's CA") && e.contains("expected region a's"),
            "{e}"
        );
        assert!(a
            .check(None)
            .unwrap_err()
            .to_string()
            .contains("not issued by a regional CA"));
        let not_a = CaRegion::Not(crate::region::Region::new("a").unwrap());
        assert_eq!(
            e,
            "the CA's certificate was issued by region b's CA; expected region a's CA \
             (another region's CA cannot stand in for this one)"
        );
        assert_eq!(
            a.check(None).unwrap_err().to_string(),
            "the CA's certificate was issued by no region (not issued by a regional CA)'s CA; \
             expected region a's CA (another region's CA cannot stand in for this one)"
        );
        assert!(not_a.check(Some("b")).is_ok());
        assert!(not_a
            .check(Some("a"))
            .unwrap_err()
            .to_string()
            .contains("own region"));
        assert_eq!(
            not_a.check(Some("a")).unwrap_err().to_string(),
            "the peer CA's certificate was issued by region a's CA, this CA's own region: a peer \
             must be another region's CA (this is ourselves or an impersonation)"
        );
    }
}
