//! Fixtures for in-process mesh tests: a PKI and a CA server in a temporary directory, sidecars
//! built in code on 127.0.0.1:0, an echo app, and direct TLS 1.3 clients for crafted
//! certificates. Everything runs on the system clock: certificate validity is real time.
#![allow(dead_code)] // each test file uses a different part

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use rcgen::{Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trustline::ca::admin::{self, AdminRequest};
use trustline::ca::authority::{self, Authority, LeafUsage};
use trustline::ca::config::CaServeConfig;
use trustline::clock::Clock;
use trustline::crypto::TLS13_ONLY;
use trustline::identity::{
    certs_from_pem, parse_trust_domain, Bundle, Serial, SpiffeId, Svid, TrustDomain,
};
use trustline::proxy::config::SidecarConfig;
use trustline::svid::ca_client::CaClient;
use trustline::tls::{mesh::MESH_ALPN, ExpectedPeer, SpiffeServerVerifier};

/// The mesh's trust domain.
pub const TD: &str = "mesh.test";

/// Longest any single wait in these tests may take.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// `spiffe://TD/ns/shop/sa/NAME`.
pub fn id_in(td: &str, name: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://{td}/ns/shop/sa/{name}")).expect("valid SPIFFE ID")
}

/// A workload ID of the mesh's trust domain.
pub fn id(name: &str) -> SpiffeId {
    id_in(TD, name)
}

/// A certificate chain (leaf first) and its key, as a client presents them.
pub struct Cred {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl From<&Svid> for Cred {
    fn from(s: &Svid) -> Self {
        Cred {
            chain: s.chain.clone(),
            key: s.key.clone_key(),
        }
    }
}

/// A root and a regional intermediate ("eu") of one trust domain, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub td: TrustDomain,
    pub root: PathBuf,
    pub region: PathBuf,
}

impl Pki {
    pub fn new(td: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let td = parse_trust_domain(td).expect("trust domain");
        let root = dir.path().join("root");
        let region = dir.path().join("eu");
        let year = Duration::from_secs(365 * 86400);
        authority::init_root(&td, &root, year, false).expect("root CA");
        authority::init_intermediate(&root, "eu", &region, year, false).expect("intermediate CA");
        Pki {
            dir,
            td,
            root,
            region,
        }
    }

    /// The root certificates.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(self.root.join("bundle.pem")).expect("bundle.pem");
        certs_from_pem(&pem, "bundle.pem").expect("roots")
    }

    /// The trust bundle of this PKI alone.
    pub fn bundle(&self) -> Bundle {
        Bundle::new(self.td.clone(), self.roots()).expect("bundle")
    }

    /// The bundle the CA publishes (its roots plus any added by [`start_ca_with`]).
    pub fn published_bundle(&self) -> Bundle {
        let pem = std::fs::read(self.region.join("bundle.pem")).expect("bundle.pem");
        Bundle::from_pem(self.td.clone(), &pem, "bundle.pem").expect("bundle")
    }

    /// The test's own copy of the issuing intermediate (reads the CA files).
    pub fn authority(&self) -> Authority {
        Authority::load(&self.region).expect("intermediate loads")
    }

    /// The intermediate as an rcgen issuer, and its certificate, for crafting odd leaves.
    pub fn issuer(&self) -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
        let cert_pem = std::fs::read_to_string(self.region.join("ca.crt")).expect("ca.crt");
        let key_pem = std::fs::read_to_string(self.region.join("ca.key")).expect("ca.key");
        let key = KeyPair::from_pem(&key_pem).expect("CA key");
        let cert = certs_from_pem(cert_pem.as_bytes(), "ca.crt").expect("CA cert")[0].clone();
        (
            Issuer::from_ca_cert_pem(&cert_pem, key).expect("issuer"),
            cert,
        )
    }

    /// A leaf from the CA's own template (one URI SAN), signed as if the time were `now`.
    pub fn leaf(&self, id: &SpiffeId, now: std::time::SystemTime, ttl: Duration) -> Cred {
        let ca = self.authority();
        let key = KeyPair::generate().expect("key");
        let issued = ca
            .sign_leaf(id, &key, ttl, now, LeafUsage::Svid)
            .expect("leaf signed");
        Cred {
            chain: ca.chain_for(&issued.leaf),
            key: pkcs8(&key),
        }
    }
}

/// A key pair as rustls takes it.
pub fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A running CA server over a [`Pki`].
pub struct Ca {
    pub pki: Pki,
    pub bound: trustline::ca::server::Bound,
}

/// Starts a CA issuing SVIDs that live `svid_ttl`, without rate limit.
pub async fn start_ca(svid_ttl: Duration) -> Ca {
    start_ca_with(svid_ttl, &[]).await
}

/// [`start_ca`] whose published bundle (the one sidecars refresh to) also holds `extra_roots`.
pub async fn start_ca_with(svid_ttl: Duration, extra_roots: &[&Pki]) -> Ca {
    start_ca_tuned(svid_ttl, extra_roots, |_| {}).await
}

/// [`start_ca_with`], with `tune` changing the configuration first (agent registrations, the
/// JWT lifetime, ...).
pub async fn start_ca_tuned(
    svid_ttl: Duration,
    extra_roots: &[&Pki],
    tune: impl FnOnce(&mut CaServeConfig),
) -> Ca {
    start_ca_in(TD, svid_ttl, extra_roots, tune).await
}

/// [`start_ca_tuned`] for trust domain `td` (its own root).
pub async fn start_ca_in(
    td: &str,
    svid_ttl: Duration,
    extra_roots: &[&Pki],
    tune: impl FnOnce(&mut CaServeConfig),
) -> Ca {
    let pki = Pki::new(td);
    let mut roots = pki.roots();
    for other in extra_roots {
        roots.extend(other.roots());
    }
    let bundle = trustline::identity::chain_to_pem(&roots);
    std::fs::write(pki.region.join("bundle.pem"), bundle).expect("CA bundle");
    let config = CaServeConfig {
        ca_dir: pki.region.clone(),
        data_dir: pki.dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl,
        san: vec![],
        metrics_listen: None,
        audit_log: None,
        bundle_endpoint: None,
        rate_limit: 0,
        peers: Default::default(),
        limits: Default::default(),
        ledger: None,
        ledger_options: Default::default(),
        jwt_ttl: std::time::Duration::from_secs(300),
        agents: Vec::new(),
        file: None,
    };
    let mut config = config;
    tune(&mut config);
    let bound = trustline::ca::server::build(config, Clock::system())
        .await
        .expect("CA starts");
    Ca { pki, bound }
}

impl Ca {
    pub fn url(&self) -> String {
        format!("https://{}", self.bound.api)
    }

    /// A single-use join token for `id`.
    pub async fn token(&self, id: &SpiffeId) -> String {
        admin::token(&self.bound.admin_socket, &id.to_string(), 900)
            .await
            .unwrap_or_else(|e| panic!("no token: {e}"))
    }

    /// A client of the running CA trusting its roots.
    pub fn client(&self) -> CaClient {
        CaClient::new(&self.url(), self.pki.bundle(), Clock::system()).expect("CA client")
    }

    /// An SVID issued by the running CA (so it is in the ledger and can be revoked).
    pub async fn issue(&self, id: &SpiffeId) -> Svid {
        let client = self.client();
        client
            .issue_with_token(id, &self.token(id).await)
            .await
            .expect("issuance")
    }

    /// Revokes a serial through the admin socket.
    pub async fn revoke(&self, serial: &Serial) {
        let r = admin::call(
            &self.bound.admin_socket,
            &AdminRequest::Revoke {
                serial: serial.to_string(),
            },
        )
        .await
        .expect("admin socket");
        assert!(r.ok, "revocation refused: {:?}", r.error);
    }

    /// The config of workload `name`'s sidecar: a fresh join token in `DIR/NAME.token`, a
    /// 200 ms revocation and bundle refresh, admin on 127.0.0.1:0, and `sections` (see
    /// [`inbound`] and [`listener`]). Written as a file and loaded like `trustline sidecar`
    /// does, so the fixture only names settings users can set.
    pub async fn sidecar_config(&self, name: &str, sections: &str) -> SidecarConfig {
        let token_file = self.pki.dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, self.token(&id(name)).await).expect("token file");
        let identity = format!(
            "source = \"ca\"\nca_url = \"{url}\"\ntoken_file = {token_file:?}\nrefresh_interval = \"200ms\"",
            url = self.url(),
        );
        self.config_file(
            name,
            &self.pki.region.join("bundle.pem"),
            &identity,
            sections,
        )
    }

    /// Writes and loads the config of workload `name`'s sidecar: trusting `bundle`, `identity` as
    /// the body of its `[identity]` table, then `sections`.
    pub fn config_file(
        &self,
        name: &str,
        bundle: &std::path::Path,
        identity: &str,
        sections: &str,
    ) -> SidecarConfig {
        let toml = format!(
            r#"trust_domain = "{td}"
spiffe_id = "{id}"
bundle = {bundle:?}
drain_timeout = "1s"
handshake_timeout = "5s"

[identity]
{identity}

[admin]
listen = "127.0.0.1:0"

{sections}"#,
            td = self.pki.td,
            id = id(name),
        );
        let file = self.pki.dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, toml).expect("sidecar config");
        SidecarConfig::load(&file).unwrap_or_else(|e| panic!("sidecar config: {e}"))
    }

    /// Sidecar B (`api`, inbound to an echo app, allows `web`) and sidecar A (`web`, an explicit
    /// listener to B expecting `a_expects`), both ready, reusing connections as `reuse` says.
    pub async fn pair_with(&self, a_expects: SpiffeId, reuse: Reuse) -> Pair {
        let app = echo_app().await;
        let mut b = self
            .sidecar_config("api", &inbound(app, &[id("web")]))
            .await;
        reuse.apply(&mut b);
        let b = start_ready(b).await;
        let to_b = listener("api", b.inbound.expect("inbound"), &[a_expects]);
        let mut a = self.sidecar_config("web", &to_b).await;
        reuse.apply(&mut a);
        let a = start_ready(a).await;
        Pair { a, b, app }
    }

    /// [`Ca::pair_with`] where A expects B's real identity, with the defaults (pooled sessions).
    pub async fn pair(&self) -> Pair {
        self.pair_with(id("api"), Reuse::Pooled).await
    }
}

/// How A reaches B for each new application connection.
#[derive(Clone, Copy, Debug)]
pub enum Reuse {
    /// The default: a stream on A's warm session to B.
    Pooled,
    /// A TLS connection each, resumed from a ticket when possible (`pooling = false`).
    Resumption,
    /// A full mutual handshake each (`pooling = false`, `resumption = false`).
    Nothing,
}

impl Reuse {
    pub fn apply(self, c: &mut SidecarConfig) {
        c.pooling = matches!(self, Reuse::Pooled);
        c.resumption = !matches!(self, Reuse::Nothing);
    }
}

/// A calls B through A's explicit listener; B forwards to the echo app.
pub struct Pair {
    pub a: trustline::proxy::Bound,
    pub b: trustline::proxy::Bound,
    pub app: SocketAddr,
}

impl Pair {
    /// A's plain-text listener: the entrance of the A → B path.
    pub fn entry(&self) -> SocketAddr {
        self.a.listeners[0]
    }
}

fn quoted(ids: &[SpiffeId]) -> String {
    let ids: Vec<String> = ids.iter().map(|i| format!("{:?}", i.to_string())).collect();
    format!("[{}]", ids.join(", "))
}

/// Config section: an inbound side on 127.0.0.1:0 forwarding to `app`, allowing `allow`.
pub fn inbound(app: SocketAddr, allow: &[SpiffeId]) -> String {
    format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\nallow = {}\n\n",
        quoted(allow)
    )
}

/// Config sections: service `name` at `addr` (who must be one of `ids`) and an explicit
/// listener on 127.0.0.1:0 to it.
pub fn listener(name: &str, addr: SocketAddr, ids: &[SpiffeId]) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\naddresses = [\"{addr}\"]\nspiffe_ids = {}\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nservice = \"{name}\"\n\n",
        quoted(ids)
    )
}

/// Builds a sidecar on the system clock.
pub async fn start(cfg: SidecarConfig) -> trustline::proxy::Bound {
    trustline::proxy::build(cfg, Clock::system())
        .await
        .expect("sidecar starts")
}

/// Builds a sidecar and waits until it holds an SVID.
pub async fn start_ready(cfg: SidecarConfig) -> trustline::proxy::Bound {
    let bound = start(cfg).await;
    eventually("the sidecar holds an SVID", || {
        bound.identity.ready().is_ok()
    })
    .await;
    bound
}

/// Polls `cond` every 10 ms until it holds; panics after [`PATIENCE`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`eventually`] for an async condition.
pub async fn eventually_async<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + PATIENCE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An app that echoes every byte back until the caller closes.
pub async fn echo_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Writes `msg` and reads the same number of bytes back (within [`PATIENCE`]).
pub async fn round_trip<S>(s: &mut S, msg: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(buf)
}

/// One request on a new plain-text connection to `addr`; the echoed bytes.
pub async fn call(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    round_trip(&mut s, msg).await
}

/// A TLS 1.3 mesh client that accepts the server only as `server`, presenting `cred` if given.
pub fn client_config(
    roots: &Bundle,
    server: &SpiffeId,
    cred: Option<Cred>,
) -> Arc<rustls::ClientConfig> {
    let verifier =
        SpiffeServerVerifier::new(roots.store(), ExpectedPeer::AnyOf(vec![server.clone()]));
    let builder = rustls::ClientConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(TLS13_ONLY)
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match cred {
        Some(c) => builder
            .with_client_auth_cert(c.chain, c.key)
            .expect("certificate and key match"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Arc::new(cfg)
}

/// Connects to a sidecar's inbound with `cfg`, sends `ping` and returns what came back: `ping`
/// when the app was reached, nothing when the connection was refused at any point.
pub async fn probe(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    let connect =
        tokio_rustls::TlsConnector::from(cfg).connect(ServerName::try_from("api").unwrap(), tcp);
    let Ok(mut tls) = tokio::time::timeout(PATIENCE, connect)
        .await
        .expect("handshake neither finished nor failed")
    else {
        return Vec::new();
    };
    match round_trip(&mut tls, b"ping").await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => panic!("connection left hanging"),
        Err(_) => Vec::new(),
    }
}

/// `GET path` on a plain HTTP admin listener: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("admin connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("admin request");
    let mut text = String::new();
    tokio::time::timeout(PATIENCE, s.read_to_string(&mut text))
        .await
        .expect("admin answers")
        .expect("admin answer");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Every non-zero `trustline_connections_failed` series of a sidecar, from its `/metrics`.
pub async fn failed_series(admin: SocketAddr) -> Vec<String> {
    let (status, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with("trustline_connections_failed"))
        .filter(|l| l.rsplit(' ').next() != Some("0"))
        .map(str::to_string)
        .collect()
}

/// Runs the `trustline` binary in the repository root (so `config/...` paths work), returning
/// whether it succeeded and its stdout and stderr together.
pub fn trustline(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trustline"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run trustline");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A home-made, self-signed CA certificate claiming `spiffe://TD/trustline/region/REGION`: what
/// a workload would append to its real chain to pass for a workload of another region.
pub fn fake_region_ca(td: &TrustDomain, region: &str) -> CertificateDer<'static> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyUsagePurpose, SanType};
    let uri = format!("spiffe://{td}/trustline/region/{region}");
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("URI SAN"))];
    let key = KeyPair::generate().expect("key");
    p.self_signed(&key).expect("fake CA").der().clone()
}
