//! SPIFFE Federation between two trust domains, each with its own root and CA serving a bundle
//! endpoint: sidecars of each call the other's over mTLS; a federated root never vouches for an
//! ID of ours or of a third trust domain; the https_spiffe check of the bundle endpoint; root
//! rotation picked up by refresh; an unreachable endpoint keeps the last good bundle; and the
//! document rules (sequence, CA roots, size) against a served https_web endpoint.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

fn now() -> SystemTime {
    Clock::system().now()
}

use common::*;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustline::ca::admin::{self, AdminRequest};
use trustline::ca::bundle_endpoint::{BundleEndpointConfig, BundleEndpointProfile};
use trustline::ca::config::CaServeConfig;
use trustline::clock::Clock;
use trustline::federation::{
    Endpoint, FederatedDomain, Federation, FederationError, FetchError, Profile,
};
use trustline::identity::{chain_to_pem, ids::ca_id, parse_trust_domain, Bundle, TrustDomain};
use trustline::proxy::config::SidecarConfig;

const OTHER: &str = "other.test";
const HOUR: Duration = Duration::from_secs(3600);

/// A CA of trust domain `td` (its own root) serving its bundle endpoint (https_spiffe).
async fn start_td(td: &str) -> Ca {
    let pki = Pki::new(td);
    std::fs::write(pki.region.join("bundle.pem"), chain_to_pem(&pki.roots())).expect("bundle");
    let config = CaServeConfig {
        ca_dir: pki.region.clone(),
        data_dir: pki.dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl: HOUR,
        san: vec![],
        metrics_listen: None,
        audit_log: None,
        bundle_endpoint: Some(BundleEndpointConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            profile: BundleEndpointProfile::HttpsSpiffe,
        }),
        rate_limit: 0,
        peers: Default::default(),
        limits: Default::default(),
        ledger: None,
        ledger_options: Default::default(),
        jwt_ttl: Duration::from_secs(300),
        agents: Vec::new(),
        file: None,
    };
    let bound = trustline::ca::server::build(config, Clock::system())
        .await
        .expect("CA starts");
    Ca { pki, bound }
}

fn endpoint_of(ca: &Ca) -> SocketAddr {
    ca.bound.bundle_endpoint.expect("bundle endpoint")
}

/// `[[federation]]` with `with`'s trust domain, from its bundle endpoint, refreshed every 200 ms.
fn federation_with(with: &Ca) -> String {
    format!(
        "[[federation]]\ntrust_domain = \"{td}\"\nbundle_endpoint = \"https://{addr}\"\n\
         endpoint_spiffe_id = \"{id}\"\nbundle = {bundle:?}\nrefresh = \"200ms\"\n\n",
        td = with.pki.td,
        addr = endpoint_of(with),
        id = ca_id(&with.pki.td),
        bundle = with.pki.root.join("bundle.pem"),
    )
}

/// Workload `name` of `ca`'s trust domain: its sidecar config with `sections`.
async fn sidecar(ca: &Ca, name: &str, sections: &str) -> SidecarConfig {
    let me = id_in(ca.pki.td.as_str(), name);
    let token_file = ca.pki.dir.path().join(format!("{name}.token"));
    std::fs::write(&token_file, ca.token(&me).await).expect("token file");
    let toml = format!(
        r#"trust_domain = "{td}"
spiffe_id = "{me}"
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
        td = ca.pki.td,
        bundle = ca.pki.region.join("bundle.pem"),
        url = ca.url(),
    );
    let file = ca.pki.dir.path().join(format!("{name}.toml"));
    std::fs::write(&file, toml).expect("sidecar config");
    SidecarConfig::load(&file).unwrap_or_else(|e| panic!("sidecar config: {e}"))
}

/// The inbound section protecting `app` with a policy file that admits exactly `from`.
fn policy_inbound(ca: &Ca, app: SocketAddr, from: &trustline::identity::SpiffeId) -> String {
    let policy = ca.pki.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[service.api]\n\n[[service.api.rule]]\nname = \"federated-web\"\naction = \"allow\"\nfrom = [\"{from}\"]\n"
        ),
    )
    .expect("policy");
    format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy:?}\nservice = \"api\"\n\n"
    )
}

/// Trust domain `ca`'s roots held by `fed` now.
fn held(fed: &Federation, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
    fed.bundle(td).expect("federated").roots
}

#[tokio::test]
async fn two_trust_domains_call_each_other_and_neither_root_vouches_beyond_its_own() {
    let a = start_td(TD).await;
    let b = start_td(OTHER).await;
    let (app_a, app_b) = (echo_app().await, echo_app().await);
    // api of A admits B's web by a policy rule; api of B admits A's web by its allow list.
    let b_web_id = id_in(OTHER, "web");
    let api_a = sidecar(
        &a,
        "api",
        &(policy_inbound(&a, app_a, &b_web_id) + &federation_with(&b)),
    )
    .await;
    let api_a = start_ready(api_a).await;
    let api_b = sidecar(
        &b,
        "api",
        &(inbound(app_b, &[id_in(TD, "web")]) + &federation_with(&a)),
    )
    .await;
    let api_b = start_ready(api_b).await;
    let to_b = listener("api", api_b.inbound.unwrap(), &[id_in(OTHER, "api")]);
    let web_a = start_ready(sidecar(&a, "web", &(to_b + &federation_with(&b))).await).await;
    let to_a = listener("api", api_a.inbound.unwrap(), &[id_in(TD, "api")]);
    let web_b = start_ready(sidecar(&b, "web", &(to_a + &federation_with(&a))).await).await;

    assert_eq!(
        call(web_a.listeners[0], b"a to b").await.unwrap(),
        b"a to b",
        "mesh.test web -> other.test api"
    );
    assert_eq!(
        call(web_b.listeners[0], b"b to a").await.unwrap(),
        b"b to a",
        "other.test web -> mesh.test api (admitted by a policy rule naming the federated ID)"
    );

    // The federated CA signs leaves with IDs of ours and of a third trust domain: refused, while
    // its own ID passes (the control). Presented straight to A's api.
    let inbound_a = api_a.inbound.unwrap();
    let a_api = id_in(TD, "api");
    let try_as = |cred: Cred| client_config(&a.pki.bundle(), &a_api, Some(cred));
    let own = b.pki.leaf(&b_web_id, now(), HOUR);
    assert_eq!(probe(inbound_a, try_as(own)).await, b"ping", "control");
    let rogue = b.pki.leaf(&id_in(TD, "web"), now(), HOUR);
    assert!(
        probe(inbound_a, try_as(rogue)).await.is_empty(),
        "a federated root vouched for an ID of our trust domain"
    );
    let third = b.pki.leaf(&id_in("third.test", "web"), now(), HOUR);
    assert!(
        probe(inbound_a, try_as(third)).await.is_empty(),
        "a federated root vouched for a third trust domain's ID"
    );
    // And outbound: a server of the federated domain presenting an ID of ours is refused too.
    let trust = api_a.identity.trust();
    let roots_for_rogue = trust.roots_for(&b.pki.leaf(&a_api, now(), HOUR).chain[0]);
    assert!(
        roots_for_rogue
            .roots
            .iter()
            .all(|r| !b.pki.bundle().store().roots.contains(r)),
        "an ID of ours is checked against our roots only"
    );

    // Both intermediates are named "eu": a federated peer's chain claims no region of ours.
    let b_leaf = b.pki.leaf(&b_web_id, now(), HOUR);
    assert_eq!(
        trustline::identity::region_of_chain(&b_leaf.chain).as_deref(),
        Some("eu")
    );
    assert_eq!(
        trustline::identity::peer_region(&b_leaf.chain, &a.pki.td),
        None
    );
    let a_leaf = a.pki.leaf(&id_in(TD, "web"), now(), HOUR);
    assert_eq!(
        trustline::identity::peer_region(&a_leaf.chain, &a.pki.td).as_deref(),
        Some("eu")
    );

    // A root added to B's bundle is picked up by A's sidecars at the next refresh.
    let other_td = parse_trust_domain(OTHER).unwrap();
    let fed = &api_a.federation;
    eventually("A fetched B's bundle", || {
        fed.bundle(&other_td).is_some_and(|f| f.fetches > 0)
    })
    .await;
    // B's JWT keys came with its roots, without the region B labels them with.
    let jwt = fed.bundle(&other_td).unwrap().jwt;
    assert!(!jwt.is_empty(), "B's bundle document carries its JWT key");
    assert!(jwt.keys().all(|k| k.region().is_none()));
    // ... and are what A's api validates B's JWT-SVIDs with (its policies' `jwt` rules).
    eventually("A's api holds B's JWT keys", || {
        api_a
            .identity
            .jwt_bundles()
            .get(&other_td)
            .is_some_and(|held| held.keys().all(|k| jwt.get(k.kid()).is_some()) && !held.is_empty())
    })
    .await;
    let root2 = b.pki.dir.path().join("root-2");
    trustline::ca::authority::init_root(&b.pki.td, &root2, HOUR, false).expect("second root");
    let added = admin::call(
        &b.bound.admin_socket,
        &AdminRequest::AddRoot {
            path: root2.join("bundle.pem"),
            wait_secs: 1,
        },
    )
    .await
    .expect("admin socket");
    assert!(added.ok, "add root refused: {:?}", added.error);
    let new_root = trustline::identity::certs_from_pem(
        &std::fs::read(root2.join("bundle.pem")).unwrap(),
        "root-2",
    )
    .unwrap()[0]
        .clone();
    eventually("A holds B's new root", || {
        held(fed, &other_td).contains(&new_root)
            && trust
                .federated_bundle(&other_td)
                .is_some_and(|bundle| bundle.roots.contains(&new_root))
    })
    .await;

    let (status, body) = http_get(api_a.admin, "/federation").await;
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["federation"][0]["trust_domain"], OTHER);
    assert_eq!(state["federation"][0]["roots"], 2, "{state}");

    // B's CA goes away: A keeps B's last bundle, and calls still go through.
    let before = held(fed, &other_td);
    b.bound.shutdown();
    eventually("a failed fetch is recorded", || {
        fed.bundle(&other_td)
            .is_some_and(|f| f.last_error.is_some())
    })
    .await;
    assert_eq!(held(fed, &other_td), before, "the last good bundle is kept");
    assert!(trust.federated_bundle(&other_td).is_some());
    assert_eq!(
        call(web_b.listeners[0], b"still").await.unwrap(),
        b"still",
        "federated calls go on with the last bundle"
    );
}

fn domain(
    td: &str,
    endpoint: SocketAddr,
    profile: Profile,
    bootstrap: Vec<CertificateDer<'static>>,
) -> FederatedDomain {
    FederatedDomain {
        trust_domain: parse_trust_domain(td).unwrap(),
        endpoint: Endpoint::parse(&format!("https://{endpoint}")).unwrap(),
        profile,
        bootstrap,
        refresh: None,
    }
}

#[tokio::test]
async fn the_https_spiffe_endpoint_must_be_exactly_the_named_id_under_the_current_bundle() {
    let b = start_td(OTHER).await;
    let td = b.pki.td.clone();
    let fetch = |id: &str, bootstrap: Vec<CertificateDer<'static>>| {
        let d = domain(
            OTHER,
            endpoint_of(&b),
            Profile::HttpsSpiffe {
                endpoint_id: trustline::identity::parse_id(id).unwrap(),
            },
            bootstrap,
        );
        let td = td.clone();
        async move {
            let f = Federation::new(vec![d], None, Clock::system()).unwrap();
            f.refresh(&td).await.map(|_| f)
        }
    };
    let good = fetch("spiffe://other.test/trustline/ca", b.pki.roots())
        .await
        .expect("the right ID under the right roots");
    assert_eq!(held(&good, &td), b.pki.published_bundle().roots);
    let wrong = fetch("spiffe://other.test/ns/shop/sa/impostor", b.pki.roots()).await;
    assert!(
        matches!(
            &wrong,
            Err(FederationError::Fetch {
                source: FetchError::Handshake(_),
                ..
            })
        ),
        "a wrong endpoint_spiffe_id was accepted: {wrong:?}"
    );
    let rogue = Pki::new(OTHER);
    let untrusted = fetch("spiffe://other.test/trustline/ca", rogue.roots()).await;
    assert!(
        matches!(
            &untrusted,
            Err(FederationError::Fetch {
                source: FetchError::Handshake(_),
                ..
            })
        ),
        "an endpoint not under the held bundle was accepted: {untrusted:?}"
    );
}

/// An https_web bundle endpoint serving whatever `body` holds, with a certificate for
/// `localhost` under a test web root.
struct WebEndpoint {
    addr: SocketAddr,
    web_root: CertificateDer<'static>,
    body: Arc<Mutex<Vec<u8>>>,
}

async fn web_endpoint() -> WebEndpoint {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut rp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = rp.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(rp, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], pkcs8(&key))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(Mutex::new(Vec::new()));
    let served = body.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let body = served.lock().unwrap().clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&body).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    WebEndpoint {
        addr,
        web_root: root.der().clone(),
        body,
    }
}

#[tokio::test]
async fn https_web_documents_must_not_go_back_name_ca_roots_and_stay_small() {
    let web = web_endpoint().await;
    let td = parse_trust_domain(OTHER).unwrap();
    let mut d = domain(
        OTHER,
        web.addr,
        Profile::HttpsWeb {
            web_roots: vec![web.web_root.clone()],
        },
        vec![],
    );
    d.endpoint = Endpoint::parse(&format!("https://localhost:{}", web.addr.port())).unwrap();
    let ours = Pki::new(TD);
    let trust = trustline::tls::mesh::Trust::new(ours.bundle()).unwrap();
    let fed = Federation::new(vec![d], Some(trust.clone()), Clock::system()).unwrap();
    let mut changes = fed.changes();
    let serve = |roots: &[CertificateDer<'static>], seq: u64| {
        let bundle = Bundle::new(td.clone(), roots.to_vec()).unwrap();
        let doc = trustline::ca::bundle_json::spiffe_bundle_at(&bundle, seq, 600);
        *web.body.lock().unwrap() = doc.to_string().into_bytes();
    };
    let (p1, p2) = (Pki::new(OTHER), Pki::new(OTHER));
    serve(&p1.roots(), 5);
    let wait = fed.refresh(&td).await.expect("first fetch");
    assert_eq!(
        wait,
        Duration::from_secs(600),
        "the document's refresh hint"
    );
    assert_eq!(held(&fed, &td), p1.roots());
    assert_eq!(trust.federated_bundle(&td).unwrap().roots, p1.roots());
    assert!(changes.has_changed().unwrap(), "a change is announced");
    changes.borrow_and_update();

    // A lower sequence is refused, and the bundle held stays.
    serve(&p2.roots(), 4);
    let back = fed.refresh(&td).await;
    assert!(
        matches!(
            back,
            Err(FederationError::SequenceWentBack {
                got: 4,
                held: 5,
                ..
            })
        ),
        "{back:?}"
    );
    assert_eq!(held(&fed, &td), p1.roots());
    // A leaf among the roots, or no roots at all: refused.
    let leaf = p1.leaf(&id_in(OTHER, "x"), now(), HOUR).chain[0].clone();
    serve(&[p2.roots()[0].clone(), leaf], 6);
    assert!(fed.refresh(&td).await.is_err(), "a non-CA root was taken");
    serve(&[], 6);
    assert!(
        fed.refresh(&td).await.is_err(),
        "a document naming no roots was taken"
    );
    // Over 1 MiB: refused.
    *web.body.lock().unwrap() = vec![b' '; 1024 * 1024 + 10];
    let big = fed.refresh(&td).await;
    assert!(
        matches!(
            big,
            Err(FederationError::Fetch {
                source: FetchError::Body(_),
                ..
            })
        ),
        "{big:?}"
    );
    assert_eq!(
        held(&fed, &td),
        p1.roots(),
        "every refusal kept the last good bundle"
    );
    assert!(
        !changes.has_changed().unwrap(),
        "no change announced for refusals"
    );
    // The next good one is taken.
    serve(&p2.roots(), 6);
    fed.refresh(&td).await.expect("a higher sequence");
    assert_eq!(trust.federated_bundle(&td).unwrap().roots, p2.roots());

    // A host name the certificate does not carry: refused by the WebPKI check.
    let mut wrong_name = domain(
        OTHER,
        web.addr,
        Profile::HttpsWeb {
            web_roots: vec![web.web_root.clone()],
        },
        vec![],
    );
    wrong_name.endpoint =
        Endpoint::parse(&format!("https://127.0.0.1:{}", web.addr.port())).unwrap();
    let f = Federation::new(vec![wrong_name], None, Clock::system()).unwrap();
    assert!(
        matches!(
            f.refresh(&td).await,
            Err(FederationError::Fetch {
                source: FetchError::Handshake(_),
                ..
            })
        ),
        "a certificate for another name was accepted"
    );
}

#[tokio::test]
async fn the_ca_serves_https_web_with_its_own_certificate_and_the_configs_say_what_is_missing() {
    use trustline::ca::config::CaServeFile;
    // A WebPKI-style certificate for localhost, under a web root.
    let dir = tempfile::tempdir().unwrap();
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut rp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let web_root = rp.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(rp, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("web.crt"), dir.path().join("web.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let pki = Pki::new(OTHER);
    std::fs::write(pki.region.join("bundle.pem"), chain_to_pem(&pki.roots())).unwrap();
    let flags = |profile: Option<&str>, with_files: bool| CaServeFile {
        ca: Some(pki.region.clone()),
        data: Some(pki.dir.path().join("data")),
        listen: Some("127.0.0.1:0".into()),
        metrics_listen: Some("off".into()),
        rate_limit: Some(0),
        bundle_endpoint: Some("127.0.0.1:0".into()),
        bundle_endpoint_profile: profile.map(str::to_string),
        bundle_endpoint_cert: with_files.then(|| cert_file.clone()),
        bundle_endpoint_key: with_files.then(|| key_file.clone()),
        ..Default::default()
    };
    let config = CaServeConfig::resolve(flags(None, false), None).unwrap();
    assert_eq!(
        config.bundle_endpoint.unwrap().profile,
        BundleEndpointProfile::HttpsSpiffe,
        "the default profile"
    );
    let no_files = CaServeConfig::resolve(flags(Some("https_web"), false), None);
    assert!(no_files
        .unwrap_err()
        .to_string()
        .contains("bundle_endpoint_cert"));
    let unknown = CaServeConfig::resolve(flags(Some("https"), false), None);
    assert!(unknown.unwrap_err().to_string().contains("https_spiffe"));
    let spiffe_with_files = CaServeConfig::resolve(flags(Some("https_spiffe"), true), None);
    assert!(
        spiffe_with_files.is_err(),
        "cert and key are for https_web only"
    );

    let config = CaServeConfig::resolve(flags(Some("https_web"), true), None).unwrap();
    let bound = trustline::ca::server::build(config, Clock::system())
        .await
        .expect("CA starts");
    let addr = bound.bundle_endpoint.unwrap();
    let d = FederatedDomain {
        trust_domain: pki.td.clone(),
        endpoint: Endpoint::parse(&format!("https://localhost:{}", addr.port())).unwrap(),
        profile: Profile::HttpsWeb {
            web_roots: vec![web_root.der().clone()],
        },
        bootstrap: vec![],
        refresh: None,
    };
    let fed = Federation::new(vec![d], None, Clock::system()).unwrap();
    fed.refresh(&pki.td).await.expect("fetched over https_web");
    assert_eq!(held(&fed, &pki.td), pki.roots());
    bound.shutdown();

    // The sidecar config: federated IDs may be named, others not; https_spiffe needs its
    // initial bundle and endpoint ID.
    let a = start_td(TD).await;
    let fed_section = federation_with(&a).replace(TD, OTHER).replace(
        &format!("{:?}", a.pki.root.join("bundle.pem")),
        &format!("{:?}", pki.root.join("bundle.pem")),
    );
    let app = echo_app().await;
    let named = |who: &str| inbound(app, &[trustline::identity::parse_id(who).unwrap()]);
    let load = |sections: String| {
        let file = a.pki.dir.path().join("check.toml");
        let toml = format!(
            "trust_domain = \"{TD}\"\nspiffe_id = \"{}\"\nbundle = {:?}\n[identity]\nsource = \"ca\"\nca_url = \"https://127.0.0.1:1\"\ntoken_file = \"t\"\n\n{sections}",
            id_in(TD, "api"),
            a.pki.root.join("bundle.pem")
        );
        std::fs::write(&file, toml).unwrap();
        SidecarConfig::load(&file)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    load(named("spiffe://other.test/ns/shop/sa/web") + &fed_section).expect("a federated ID");
    let unknown = load(named("spiffe://third.test/ns/shop/sa/web") + &fed_section);
    assert!(unknown.unwrap_err().contains("nor in a [[federation]] one"));
    let unfederated = load(named("spiffe://other.test/ns/shop/sa/web"));
    assert!(unfederated.is_err(), "an ID of a domain not federated");
    let no_bundle = load(
        named("spiffe://mesh.test/ns/shop/sa/web")
            + &fed_section.replace("bundle = ", "# bundle = "),
    );
    assert!(no_bundle.unwrap_err().contains("federation[0].bundle"));
    let no_id = load(
        named("spiffe://mesh.test/ns/shop/sa/web")
            + &fed_section.replace("endpoint_spiffe_id = ", "# endpoint_spiffe_id = "),
    );
    assert!(no_id.unwrap_err().contains("endpoint_spiffe_id"));
    let own = load(named("spiffe://mesh.test/ns/shop/sa/web") + &federation_with(&a));
    assert!(own.unwrap_err().contains("own trust domain"));
}
