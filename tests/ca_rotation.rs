//! Rotation of the CA's own keys (`trustline ca rotate`): the checks of a `--next` intermediate,
//! the previous intermediate trusted for renewals until its last SVID expired and then retired,
//! roots published before use and withdrawn after, the state across a restart, the audit log,
//! and a whole cycle (intermediate, then root) under traffic between two sidecars.
//!
//! Real CA servers, real certificates from `ca init`, real sockets and TLS 1.3. The checks of
//! time (expiry, publish wait, retirement) run on a manual clock moved by the test; the cycle
//! with sidecars runs on one injected clock shared by the CA and both sidecars, following real
//! time, because the sidecars renew on timers (3 s SVIDs: each step takes seconds).
// Tests start their manual clocks at the OS time (clippy.toml bans reading it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;
use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use trustline::ca::admin::{self, AdminRequest, AdminResponse};
use trustline::ca::authority::{self, Authority, LeafUsage};
use trustline::ca::config::{CaServeConfig, CaServeFile, MIN_SVID_TTL};
use trustline::ca::server::Bound;
use trustline::clock::Clock;
use trustline::identity::{certs_from_pem, inspect_cert, Bundle, Svid};
use trustline::svid::ca_client::CaClient;

const YEAR: Duration = Duration::from_secs(365 * 86400);
const HOUR: Duration = Duration::from_secs(3600);

/// The CA's configuration as `ca serve` resolves its flags (so fields added later default).
fn config(pki: &Pki, svid_ttl: Duration, data: &str) -> CaServeConfig {
    let flags = CaServeFile {
        ca: Some(pki.region.clone()),
        data: Some(pki.dir.path().join(data)),
        listen: Some("127.0.0.1:0".into()),
        svid_ttl: Some(format!("{}s", svid_ttl.as_secs())),
        metrics_listen: Some("off".into()),
        rate_limit: Some(0),
        ..Default::default()
    };
    CaServeConfig::resolve(flags, None).expect("CA config")
}

async fn serve(pki: &Pki, svid_ttl: Duration, clock: &Clock) -> Bound {
    serve_on(pki, svid_ttl, clock, "data").await
}

/// [`serve`] with its own data directory (a restart of the CA over the same CA directory:
/// the rotation state is there, the ledger of the first server stays open meanwhile).
async fn serve_on(pki: &Pki, svid_ttl: Duration, clock: &Clock, data: &str) -> Bound {
    trustline::ca::server::build(config(pki, svid_ttl, data), clock.clone())
        .await
        .expect("CA starts")
}

/// A CA of region `eu` over a fresh PKI, on a manual clock.
struct Rig {
    pki: Pki,
    bound: Bound,
    clock: Clock,
}

impl Rig {
    async fn new(svid_ttl: Duration) -> Rig {
        let pki = Pki::new(TD);
        let clock = Clock::manual(SystemTime::now());
        let bound = serve(&pki, svid_ttl, &clock).await;
        Rig { pki, bound, clock }
    }

    /// Moves the clock, then waits until the CA serves with a certificate valid at the new
    /// time (its server certificate is renewed by the wall clock, checked every second).
    async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        let client = self.client(self.all_roots());
        eventually_async("the CA serves a currently valid certificate", || {
            let client = client.clone();
            async move { client.fetch_bundle_pem().await.is_ok() }
        })
        .await;
    }

    fn path(&self, name: &str) -> PathBuf {
        self.pki.dir.path().join(name)
    }

    async fn admin(&self, req: AdminRequest) -> AdminResponse {
        admin::call(&self.bound.admin_socket, &req)
            .await
            .expect("admin socket answers")
    }

    /// `ca rotate --next DIR`: the refusal's text, or `None` when it was accepted.
    async fn next(&self, dir: &Path) -> Option<String> {
        let r = self
            .admin(AdminRequest::RotateNext {
                dir: dir.to_path_buf(),
            })
            .await;
        (!r.ok).then(|| r.error.expect("a refusal says why"))
    }

    async fn add_root(&self, bundle: &Path, wait: Duration) -> AdminResponse {
        self.admin(AdminRequest::AddRoot {
            path: bundle.to_path_buf(),
            wait_secs: wait.as_secs(),
        })
        .await
    }

    fn client(&self, roots: Vec<CertificateDer<'static>>) -> CaClient {
        let bundle = Bundle::new(self.pki.td.clone(), roots).unwrap();
        CaClient::new(
            &format!("https://{}", self.bound.api),
            bundle,
            self.clock.clone(),
        )
        .unwrap()
    }

    /// An SVID issued with a join token: the chain the CA answers with.
    async fn issue(&self, name: &str) -> Svid {
        let token = admin::token(&self.bound.admin_socket, &id(name).to_string(), 900)
            .await
            .expect("token");
        self.client(self.all_roots())
            .issue_with_token(&id(name), &token)
            .await
            .expect("issuance")
    }

    /// Every root a test may have made (so the client trusts whichever the CA uses).
    fn all_roots(&self) -> Vec<CertificateDer<'static>> {
        let mut roots = self.pki.roots();
        let second = self.path("root2").join("bundle.pem");
        if let Ok(pem) = std::fs::read(second) {
            roots.extend(certs_from_pem(&pem, "root2").unwrap());
        }
        roots
    }

    fn active_cert(&self) -> CertificateDer<'static> {
        self.bound.state.authority.active().cert.clone()
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.pki.dir.path().join("data/audit.log")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// The audit lines of `event`.
    fn audited(&self, event: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|l| l["event"] == event)
            .collect()
    }
}

fn cert_of(dir: &Path) -> CertificateDer<'static> {
    let pem = std::fs::read(dir.join("ca.crt")).unwrap();
    certs_from_pem(&pem, "ca.crt").unwrap().remove(0)
}

/// A leaf for `name` signed with `ca` as if it were `now`, as an SVID to renew with.
fn leaf_of(ca: &Authority, name: &str, now: SystemTime, ttl: Duration) -> Svid {
    let key = KeyPair::generate().unwrap();
    let issued = ca
        .sign_leaf(&id(name), &key, ttl, now, LeafUsage::Svid)
        .unwrap();
    let chain = ca.chain_for(&issued.leaf);
    Svid {
        info: inspect_cert(&chain[0]).unwrap(),
        chain,
        key: pkcs8(&key),
    }
}

/// Asserts a refused `--next`: the text names what is wrong, the CA still signs with the
/// intermediate it had, and the refusal is in the audit log.
async fn assert_refused(rig: &Rig, dir: &Path, says: &str) {
    let before = rig.active_cert();
    let why = rig
        .next(dir)
        .await
        .unwrap_or_else(|| panic!("--next {} was accepted", dir.display()));
    assert!(why.contains(says), "refusal {why:?} does not say {says:?}");
    assert!(
        why.contains(&dir.display().to_string()),
        "refusal {why:?} does not name the directory"
    );
    assert_eq!(rig.active_cert(), before, "the active intermediate changed");
    let svid = rig.issue("web").await;
    assert_eq!(svid.chain[1], before, "the CA no longer issues as before");
    let refused = rig.audited("rotate_next");
    assert!(
        refused
            .iter()
            .any(|l| l["outcome"] == "error" && l["reason"].as_str().unwrap().contains(says)),
        "no audited refusal: {refused:?}"
    );
}

#[tokio::test]
async fn a_next_intermediate_of_another_region_is_refused_and_the_ca_keeps_issuing() {
    let rig = Rig::new(HOUR).await;
    let us = rig.path("us");
    authority::init_intermediate(&rig.pki.root, "us", &us, YEAR, false).unwrap();
    assert_refused(&rig, &us, "region us, this CA's is eu").await;
    // The same through the CLI: a failed exit with the CA's reason; `--status` unchanged. (The
    // CLI blocks, and the CA serves on this test's runtime: it runs on a blocking thread.)
    let data = rig.pki.dir.path().join("data");
    let cli = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            trustline(&args)
        })
    };
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let rotate = ["ca", "rotate", "--data"].map(String::from).to_vec();
    let next = [rotate.clone(), vec![arg(&data), "--next".into(), arg(&us)]].concat();
    let (ok, text) = cli(next).await.unwrap();
    assert!(!ok && text.contains("region us, this CA's is eu"), "{text}");
    let status = [rotate, vec![arg(&data), "--status".into()]].concat();
    let (ok, text) = cli(status).await.unwrap();
    let serial = rig.bound.state.authority.status().active_serial;
    assert!(
        ok && text.contains(&format!("active intermediate: {serial}")),
        "{text}"
    );
    assert!(!text.contains("previous intermediate"), "{text}");
}

#[tokio::test]
async fn a_next_intermediate_of_another_trust_domain_is_refused() {
    let rig = Rig::new(HOUR).await;
    let other = Pki::new("other.test");
    assert_refused(&rig, &other.region, "trust domain other.test").await;
}

#[tokio::test]
async fn a_next_intermediate_not_signed_by_a_published_root_is_refused() {
    let rig = Rig::new(HOUR).await;
    let root2 = rig.path("root2");
    authority::init_root(&rig.pki.td, &root2, YEAR, false).unwrap();
    let next = rig.path("eu-2");
    authority::init_intermediate(&root2, "eu", &next, YEAR, false).unwrap();
    assert_refused(&rig, &next, "not signed by any root this CA publishes").await;
}

#[tokio::test]
async fn an_expired_next_intermediate_is_refused() {
    let rig = Rig::new(Duration::from_secs(600)).await;
    let next = rig.path("eu-short");
    authority::init_intermediate(&rig.pki.root, "eu", &next, HOUR, false).unwrap();
    rig.advance(2 * HOUR).await;
    assert_refused(&rig, &next, "the intermediate expired at").await;
}

#[tokio::test]
async fn a_next_intermediate_whose_key_does_not_match_is_refused() {
    let rig = Rig::new(HOUR).await;
    let next = rig.path("eu-2");
    let other = rig.path("eu-3");
    authority::init_intermediate(&rig.pki.root, "eu", &next, YEAR, false).unwrap();
    authority::init_intermediate(&rig.pki.root, "eu", &other, YEAR, false).unwrap();
    std::fs::copy(other.join("ca.key"), next.join("ca.key")).unwrap();
    assert_refused(&rig, &next, "key does not match").await;
}

#[tokio::test]
async fn a_next_intermediate_that_may_sign_cas_below_it_is_refused() {
    // A "regional CA" without pathLenConstraint 0, made by hand and signed by the real root.
    let rig = Rig::new(HOUR).await;
    let next = rig.path("eu-unconstrained");
    std::fs::create_dir_all(&next).unwrap();
    let root_pem = std::fs::read_to_string(rig.pki.root.join("ca.crt")).unwrap();
    let root_key =
        KeyPair::from_pem(&std::fs::read_to_string(rig.pki.root.join("ca.key")).unwrap()).unwrap();
    let root = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{TD}/trustline/region/eu")
            .try_into()
            .unwrap(),
    )];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &root).unwrap();
    std::fs::write(next.join("ca.key"), key.serialize_pem()).unwrap();
    std::fs::write(next.join("ca.crt"), cert.pem()).unwrap();
    std::fs::write(next.join("chain.pem"), format!("{}{root_pem}", cert.pem())).unwrap();
    std::fs::write(next.join("bundle.pem"), &root_pem).unwrap();
    assert_refused(&rig, &next, "pathLenConstraint 0").await;
}

#[tokio::test]
async fn a_next_intermediate_of_a_new_root_waits_until_the_root_was_published_for_its_wait() {
    let rig = Rig::new(HOUR).await;
    let root2 = rig.path("root2");
    authority::init_root(&rig.pki.td, &root2, YEAR, false).unwrap();
    let next = rig.path("eu-2");
    authority::init_intermediate(&root2, "eu", &next, YEAR, false).unwrap();
    let added = rig
        .add_root(&root2.join("bundle.pem"), Duration::from_secs(300))
        .await;
    assert!(added.ok, "{:?}", added.error);
    assert_eq!(added.sequence, Some(2));
    // Published at once, old and new root side by side, with a new sequence.
    let published = rig.bound.state.authority.published();
    assert_eq!(published.roots.len(), 2);
    assert!(published.roots.contains(&cert_of(&root2)));

    rig.advance(Duration::from_secs(299)).await;
    assert_refused(&rig, &next, "may be activated from").await;
    rig.advance(Duration::from_secs(1)).await;
    assert_eq!(rig.next(&next).await, None, "refused after the wait");
    assert_eq!(rig.active_cert(), cert_of(&next));
    let svid = rig.issue("web").await;
    assert_eq!(
        svid.chain[1],
        cert_of(&next),
        "the chain is the new intermediate's"
    );
    assert_eq!(rig.audited("add_root")[0]["outcome"], "ok");
}

#[tokio::test]
async fn a_root_is_refused_unless_it_is_a_valid_self_signed_root_of_our_trust_domain() {
    let rig = Rig::new(HOUR).await;
    let other = Pki::new("other.test");
    let r = rig
        .add_root(&other.root.join("bundle.pem"), Duration::from_secs(60))
        .await;
    assert!(r
        .error
        .unwrap()
        .contains("this CA's trust domain is spiffe://mesh.test"));
    // An intermediate is not a root.
    let r = rig
        .add_root(&rig.pki.region.join("ca.crt"), Duration::from_secs(60))
        .await;
    assert!(r.error.unwrap().contains("not a self-signed root"));
    // The root already published.
    let r = rig
        .add_root(&rig.pki.root.join("bundle.pem"), Duration::from_secs(60))
        .await;
    assert!(r.error.unwrap().contains("already published"));
    // A wait below the floor.
    let root2 = rig.path("root2");
    authority::init_root(&rig.pki.td, &root2, YEAR, false).unwrap();
    let r = rig
        .add_root(&root2.join("bundle.pem"), Duration::ZERO)
        .await;
    assert!(r.error.unwrap().contains("outside"));
    assert_eq!(rig.bound.state.authority.published().roots.len(), 1);
    assert_eq!(rig.audited("add_root").len(), 4);
}

/// The previous intermediate authenticates renewals until one SVID lifetime plus the skew
/// margin after the activation, then it is retired: a leaf it signed (a kept or stolen key)
/// is refused in the handshake, it is gone from memory and from the CA directory.
#[tokio::test]
async fn after_retirement_the_previous_intermediate_no_longer_authenticates_renewals() {
    let rig = Rig::new(HOUR).await;
    let old = Authority::load(&rig.pki.region).unwrap();
    let next = rig.path("eu-2");
    authority::init_intermediate(&rig.pki.root, "eu", &next, YEAR, false).unwrap();
    let before = rig.issue("web").await;
    assert_eq!(rig.next(&next).await, None);
    assert!(rig.pki.region.join("previous/ca.crt").exists());
    assert!(
        !rig.pki.region.join("previous/ca.key").exists(),
        "the old key is not kept"
    );

    // A leaf of the previous intermediate renews, and gets the new intermediate's chain.
    let client = rig.client(rig.pki.roots());
    let renewed = client.renew(&before).await.expect("renewal of an old leaf");
    assert_eq!(renewed.chain[1], cert_of(&next));
    // A second rotation waits for the retirement.
    let again = rig.path("eu-3");
    authority::init_intermediate(&rig.pki.root, "eu", &again, YEAR, false).unwrap();
    assert_refused(&rig, &again, "is still trusted for renewals until").await;

    // Just before the retirement time, a leaf the old key signs now still renews ...
    let retire = HOUR + trustline::identity::BACKDATE;
    rig.advance(retire - Duration::from_secs(2)).await;
    let late = leaf_of(&old, "web", rig.clock.now(), HOUR);
    client
        .renew(&late)
        .await
        .expect("an old-intermediate leaf before the retirement");
    // ... and after it, the same leaf (still valid) is refused.
    rig.advance(Duration::from_secs(2)).await;
    eventually("the previous intermediate is retired", || {
        rig.bound.state.authority.current().previous.is_none()
    })
    .await;
    let refused = client.renew(&late).await;
    assert!(refused.is_err(), "a retired intermediate's leaf renewed");
    assert!(!rig.pki.region.join("previous").exists());
    // The new intermediate's leaves renew as before.
    let fresh = rig.issue("web").await;
    assert_eq!(fresh.chain[1], cert_of(&next));
    client.renew(&fresh).await.expect("renewal of a new leaf");
    let retired = rig.audited("retire_intermediate");
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert_eq!(retired[0]["client"], "ca");
    // And now the next rotation is accepted.
    assert_eq!(rig.next(&again).await, None);
}

/// A restart after a rotation comes back with the new intermediate active, the previous one
/// trusted until the same time, and the root records and bundle sequence kept.
#[tokio::test]
async fn a_rotation_survives_a_restart() {
    let rig = Rig::new(HOUR).await;
    let old = Authority::load(&rig.pki.region).unwrap();
    let root2 = rig.path("root2");
    authority::init_root(&rig.pki.td, &root2, YEAR, false).unwrap();
    let next = rig.path("eu-2");
    authority::init_intermediate(&rig.pki.root, "eu", &next, YEAR, false).unwrap();
    assert!(rig.add_root(&root2.join("bundle.pem"), HOUR).await.ok);
    assert_eq!(rig.next(&next).await, None);
    let status = rig.bound.state.authority.status();
    rig.bound.drain(Duration::from_secs(5)).await;

    let bound = serve_on(&rig.pki, HOUR, &rig.clock, "data2").await;
    let again = bound.state.authority.status();
    assert_eq!(again.active_serial, status.active_serial);
    assert_eq!(again.previous_serial, status.previous_serial);
    assert_eq!(again.previous_retire_at, status.previous_retire_at);
    assert_eq!(again.sequence, 2);
    assert_eq!(again.roots.len(), 2);
    assert_eq!(
        again.roots[1].usable_from, status.roots[1].usable_from,
        "the publish wait is kept"
    );
    let client = CaClient::new(
        &format!("https://{}", bound.api),
        rig.pki.bundle(),
        rig.clock.clone(),
    )
    .unwrap();
    let late = leaf_of(&old, "web", rig.clock.now(), HOUR);
    let renewed = client.renew(&late).await.expect("previous still trusted");
    assert_eq!(renewed.chain[1], cert_of(&next));
    bound.drain(Duration::from_secs(5)).await;

    // Restarted after the retirement time: no previous intermediate at all.
    rig.clock.advance(2 * HOUR);
    let bound = serve_on(&rig.pki, HOUR, &rig.clock, "data3").await;
    eventually("the previous intermediate is retired", || {
        bound.state.authority.current().previous.is_none()
    })
    .await;
    let late = leaf_of(&old, "web", rig.clock.now(), HOUR);
    let client = CaClient::new(
        &format!("https://{}", bound.api),
        rig.pki.bundle(),
        rig.clock.clone(),
    )
    .unwrap();
    assert!(client.renew(&late).await.is_err());
}

/// A crash after an activation's commit (its `incoming/` complete) and before its files were
/// moved: the next start finishes moving them.
#[tokio::test]
async fn an_activation_interrupted_after_its_commit_is_finished_at_start() {
    let pki = Pki::new(TD);
    let next = pki.dir.path().join("eu-2");
    authority::init_intermediate(&pki.root, "eu", &next, YEAR, false).unwrap();
    let incoming = pki.region.join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    for f in ["ca.key", "ca.crt", "chain.pem"] {
        std::fs::copy(next.join(f), incoming.join(f)).unwrap();
    }
    let clock = Clock::manual(SystemTime::now());
    let bound = serve(&pki, HOUR, &clock).await;
    assert_eq!(bound.state.authority.active().cert, cert_of(&next));
    assert!(!incoming.exists());
    // Half-written staging (no commit) is dropped, and the active intermediate stays.
    let tmp = pki.region.join("incoming.tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("ca.crt"), "junk").unwrap();
    bound.drain(Duration::from_secs(5)).await;
    let bound = serve_on(&pki, HOUR, &clock, "data2").await;
    assert_eq!(bound.state.authority.active().cert, cert_of(&next));
    assert!(!tmp.exists());
}

/// A root is withdrawn only once no intermediate of this CA (active or previous) chains to
/// it, never the last one; then `/v1/bundle` serves the new root alone with a new sequence.
#[tokio::test]
async fn a_root_is_withdrawn_only_once_no_intermediate_of_the_ca_chains_to_it() {
    let rig = Rig::new(HOUR).await;
    let root1 = rig.pki.root.join("bundle.pem");
    let root2 = rig.path("root2");
    authority::init_root(&rig.pki.td, &root2, YEAR, false).unwrap();
    let next = rig.path("eu-2");
    authority::init_intermediate(&root2, "eu", &next, YEAR, false).unwrap();
    let retire = |path: &Path| AdminRequest::RetireRoot {
        path: path.to_path_buf(),
    };

    let r = rig.admin(retire(&root1)).await;
    assert!(r.error.unwrap().contains("the active intermediate"));
    assert!(
        rig.add_root(&root2.join("bundle.pem"), Duration::from_secs(60))
            .await
            .ok
    );
    rig.advance(Duration::from_secs(60)).await;
    assert_eq!(rig.next(&next).await, None);
    let r = rig.admin(retire(&root1)).await;
    assert!(r.error.unwrap().contains("the previous intermediate"));
    rig.advance(HOUR + trustline::identity::BACKDATE).await;
    eventually("the previous intermediate is retired", || {
        rig.bound.state.authority.current().previous.is_none()
    })
    .await;
    let r = rig.admin(retire(&root1)).await;
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(r.sequence, Some(3));
    let r = rig.admin(retire(&root2.join("bundle.pem"))).await;
    assert!(r.error.unwrap().contains("the active intermediate"));

    // Served: the new root alone, in PEM and in the SPIFFE bundle with the new sequence.
    let published = rig.bound.state.authority.published();
    assert_eq!(published.roots, vec![cert_of(&root2)]);
    let client = rig.client(vec![cert_of(&root2)]);
    let pem = client.fetch_bundle_pem().await.unwrap();
    assert_eq!(
        certs_from_pem(&pem, "bundle").unwrap(),
        vec![cert_of(&root2)]
    );
    let on_disk = std::fs::read(rig.pki.region.join("bundle.pem")).unwrap();
    assert_eq!(
        certs_from_pem(&on_disk, "bundle.pem").unwrap(),
        vec![cert_of(&root2)]
    );
    let retired = rig.audited("retire_root");
    let outcomes: Vec<_> = retired.iter().map(|l| l["outcome"].clone()).collect();
    assert_eq!(outcomes, ["error", "error", "ok", "error"]);
}

/// `GET /v1/bundle` with `Accept: application/json`: every published root and the sequence.
async fn spiffe_bundle(addr: std::net::SocketAddr, roots: &Bundle) -> serde_json::Value {
    use http_body_util::{BodyExt, Empty};
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut cfg = (*client_config(
        roots,
        &trustline::identity::ids::ca_id(&roots.trust_domain),
        None,
    ))
    .clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/v1/bundle")
        .header("host", "localhost")
        .header("accept", "application/json")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let body = send.send_request(req).await.unwrap().into_body();
    serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The whole cycle under traffic.

/// Sidecar `name` of region `eu` trusting `bundle` (the first root alone, as installed), with
/// `sections`; renewing at the earliest point of the window, refreshing every 200 ms.
async fn sidecar(ca: &Ca, clock: &Clock, name: &str, sections: &str) -> trustline::proxy::Bound {
    let dir = ca.pki.dir.path();
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, ca.token(&id(name)).await).unwrap();
    let toml = format!(
        r#"trust_domain = "{TD}"
spiffe_id = "{id}"
region = "eu"
bundle = {bundle:?}
drain_timeout = "1s"
handshake_timeout = "5s"

[identity]
source = "ca"
ca_url = "{url}"
token_file = {token_file:?}
refresh_interval = "200ms"

[admin]
listen = "127.0.0.1:0"

{sections}"#,
        id = id(name),
        bundle = ca.pki.root.join("bundle.pem"),
        url = ca.url(),
    );
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml).unwrap();
    let mut cfg = trustline::proxy::config::SidecarConfig::load(&file).unwrap();
    cfg.identity.jitter = trustline::svid::Jitter::At(0.0);
    let bound = trustline::proxy::build(cfg, clock.clone()).await.unwrap();
    eventually("the sidecar holds an SVID", || {
        bound.identity.ready().is_ok()
    })
    .await;
    bound
}

/// The intermediate that signed a sidecar's current SVID.
fn issuer_of(b: &trustline::proxy::Bound) -> CertificateDer<'static> {
    b.identity.current().expect("an SVID").chain[1].clone()
}

/// Calls through the pair until stopped: new connections and one long-lived connection per
/// worker; every request that does not come back echoed is a failure, and so is a long-lived
/// connection cut.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(entry: std::net::SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for w in 0..2 {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            workers.push(tokio::spawn(async move {
                let mut live = TcpStream::connect(entry).await.expect("connect");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("worker {w} request {n}");
                    let fresh = call(entry, msg.as_bytes()).await;
                    let kept = round_trip(&mut live, msg.as_bytes()).await;
                    for (what, got) in [("new", fresh), ("long-lived", kept)] {
                        match got {
                            Ok(b) if b == msg.as_bytes() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures
                                .lock()
                                .unwrap()
                                .push(format!("{what} {msg}: {other:?}")),
                        }
                    }
                    if !failures.lock().unwrap().is_empty() {
                        return;
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        Traffic {
            stop,
            ok,
            failures,
            workers,
        }
    }

    fn failed(&self) -> bool {
        !self.failures.lock().unwrap().is_empty()
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// Waits for `cond` while traffic flows (at most a minute); fails at once on a failed request.
async fn during(traffic: &Traffic, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            !traffic.failed(),
            "a request failed while waiting until {what}: {:?}",
            traffic.failures.lock().unwrap()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prepare, activate and retire an intermediate, then a root, while two sidecars (region `eu`,
/// trusting only the first root as installed) call each other over mTLS without a failed
/// request: each sidecar's SVID moves to the new intermediate, then to the intermediate of the
/// new root, which both had fetched before it signed anything; after the retirements the old
/// intermediate and the old root are gone from the CA, and the sidecars no longer accept a
/// leaf chaining to the old root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_intermediate_and_root_cycle_under_traffic_fails_no_request() {
    let svid_ttl = MIN_SVID_TTL + Duration::from_secs(1);
    let clock = Clock::following_tokio();
    let pki = Pki::new(TD);
    let old = Authority::load(&pki.region).unwrap();
    let dir = pki.dir.path().to_path_buf();
    let (next1, root2, next2) = (dir.join("eu-1b"), dir.join("root2"), dir.join("eu-2"));
    authority::init_intermediate(&pki.root, "eu", &next1, YEAR, false).unwrap();
    authority::init_root(&pki.td, &root2, YEAR, false).unwrap();
    authority::init_intermediate(&root2, "eu", &next2, YEAR, false).unwrap();
    let bound = serve(&pki, svid_ttl, &clock).await;
    let ca = Ca { pki, bound };
    let keys = &ca.bound.state.authority;
    let admin_call = |req| {
        let socket = ca.bound.admin_socket.clone();
        async move { admin::call(&socket, &req).await.unwrap() }
    };

    let app = echo_app().await;
    let b = sidecar(&ca, &clock, "api", &inbound(app, &[id("web")])).await;
    let to_b = listener("api", b.inbound.unwrap(), &[id("api")]);
    let a = sidecar(&ca, &clock, "web", &to_b).await;
    let traffic = Traffic::start(a.listeners[0]);
    let (ra, rb) = (&a, &b);
    let both_on = |cert: &CertificateDer<'static>| {
        let cert = cert.clone();
        move || issuer_of(ra) == cert && issuer_of(rb) == cert
    };

    // 1. The intermediate: activate the next one (same root), the sidecars renew onto it, the
    //    previous one retires after its last SVID expired.
    let r = admin_call(AdminRequest::RotateNext { dir: next1.clone() }).await;
    assert!(r.ok, "{:?}", r.error);
    during(
        &traffic,
        "both sidecars renewed onto the next intermediate",
        both_on(&cert_of(&next1)),
    )
    .await;
    during(&traffic, "the first intermediate is retired", || {
        keys.current().previous.is_none()
    })
    .await;
    let renewal = CaClient::new(&ca.url(), ca.pki.bundle(), clock.clone()).unwrap();
    let stolen = leaf_of(&old, "web", clock.now(), HOUR);
    assert!(
        renewal.renew(&stolen).await.is_err(),
        "the retired intermediate still authenticates"
    );

    // 2. The root: publish the new one; both sidecars trust it before anything it signed is used.
    let r = admin_call(AdminRequest::AddRoot {
        path: root2.join("bundle.pem"),
        wait_secs: 1,
    })
    .await;
    assert!(r.ok, "{:?}", r.error);
    let new_root = cert_of(&root2);
    during(&traffic, "both sidecars trust the new root", || {
        [&a, &b]
            .iter()
            .all(|s| s.identity.bundle().roots.contains(&new_root))
    })
    .await;
    let usable = keys.status().roots[1].usable_from.clone();
    let usable = humantime::parse_rfc3339(&usable).unwrap();
    during(&traffic, "the publish wait is over", || {
        clock.now() >= usable
    })
    .await;
    let r = admin_call(AdminRequest::RotateNext { dir: next2.clone() }).await;
    assert!(r.ok, "{:?}", r.error);
    during(
        &traffic,
        "both sidecars renewed onto the new root's intermediate",
        both_on(&cert_of(&next2)),
    )
    .await;
    during(
        &traffic,
        "the first root's last intermediate is retired",
        || keys.current().previous.is_none(),
    )
    .await;

    // A leaf chaining to the old root (the first intermediate's key, kept) is still accepted by
    // B while the old root is published ...
    let two_roots = Bundle::new(
        ca.pki.td.clone(),
        vec![ca.pki.roots()[0].clone(), new_root.clone()],
    )
    .unwrap();
    let old_chain = leaf_of(&old, "web", clock.now(), HOUR);
    let to_b_as = |svid: &Svid| client_config(&two_roots, &id("api"), Some(Cred::from(svid)));
    assert_eq!(
        probe(b.inbound.unwrap(), to_b_as(&old_chain)).await,
        b"ping"
    );
    // ... and refused once it is withdrawn: the CA serves the new root alone, the sidecars
    // drop the old one though it is in their configured bundle.
    let r = admin_call(AdminRequest::RetireRoot {
        path: ca.pki.root.join("bundle.pem"),
    })
    .await;
    assert!(r.ok, "{:?}", r.error);
    let old_root = ca.pki.roots()[0].clone();
    during(&traffic, "both sidecars dropped the old root", || {
        [&a, &b]
            .iter()
            .all(|s| !s.identity.bundle().roots.contains(&old_root))
    })
    .await;
    assert_eq!(probe(b.inbound.unwrap(), to_b_as(&old_chain)).await, b"");
    assert_eq!(
        failed_series(b.admin).await.len(),
        1,
        "B counts the refusal of that probe"
    );
    let doc = spiffe_bundle(ca.bound.api, &two_roots).await;
    assert_eq!(doc["spiffe_sequence"], 3);
    let x509_keys = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .count();
    assert_eq!(x509_keys, 1, "the old root is withdrawn: {doc}");

    // Traffic still flows on the new root alone.
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    during(&traffic, "one more second of traffic", || {
        tokio::time::Instant::now() >= until
    })
    .await;
    let (ok, failures) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
    assert!(
        failed_series(a.admin).await.is_empty(),
        "{:?}",
        failed_series(a.admin).await
    );
    let b_failed = failed_series(b.admin).await;
    assert!(
        b_failed.len() == 1 && b_failed[0].ends_with(" 1"),
        "B failed more than the probe: {b_failed:?}"
    );
    eprintln!("{ok} requests, 0 failed, across an intermediate and a root rotation");
    let audit: Vec<String> = std::fs::read_to_string(ca.pki.dir.path().join("data/audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| {
            l["event"].as_str().is_some_and(|e| {
                e.contains("root") || e.starts_with("rotate") || e.starts_with("retire")
            })
        })
        .map(|l| {
            format!(
                "{} {}",
                l["event"].as_str().unwrap(),
                l["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        audit,
        [
            "rotate_next ok",
            "retire_intermediate ok",
            "add_root ok",
            "rotate_next ok",
            "retire_intermediate ok",
            "retire_root ok"
        ]
    );
}
