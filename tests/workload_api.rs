//! The `workload-api` identity source against a fake SPIFFE agent (tests/support) on a Unix
//! socket, serving SVIDs issued by a real trustline CA; the peer sidecar gets its SVID from that
//! CA directly. Real sockets, real TLS 1.3, system clock.

// Certificates for the peers under test are minted against the wall clock the sidecars run on
// (`Clock::system()`), so this file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;
mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use rustls::pki_types::ServerName;
use support::{response, Agent, Offer};
use tokio::net::TcpStream;
use trustline::identity::{inspect_cert, Serial, SpiffeId};
use trustline::proxy::config::SidecarConfig;
use trustline::proxy::Bound;

const HOUR: Duration = Duration::from_secs(3600);

/// The config of workload `name`'s sidecar taking its SVID from the agent at `socket`.
fn agent_fed_config(ca: &Ca, name: &str, socket: &Path, sections: &str) -> SidecarConfig {
    let identity = format!(
        "source = \"workload-api\"\nsocket = \"unix://{}\"",
        socket.display()
    );
    ca.config_file(name, &ca.pki.root.join("bundle.pem"), &identity, sections)
}

/// The agent's answer for one SVID with the CA's roots as its bundle.
fn only(ca: &Ca, svid: &Cred) -> support::pb::X509svidResponse {
    let roots = ca.pki.roots();
    response(&[offer(svid, &roots)])
}

fn offer<'a>(
    svid: &'a Cred,
    bundle: &'a [rustls::pki_types::CertificateDer<'static>],
) -> Offer<'a> {
    Offer {
        chain: &svid.chain,
        key: svid.key.secret_der(),
        bundle,
    }
}

/// The first whole second of Unix time at or after `t`.
fn next_whole_second(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn serial(c: &Cred) -> Serial {
    inspect_cert(&c.chain[0]).expect("leaf").serial
}

/// An SVID for `name` issued by the running CA (join token, CSR, ledger) like any workload's.
async fn issued(ca: &Ca, name: &str) -> Cred {
    Cred::from(&ca.issue(&id(name)).await)
}

/// The serial of the certificate `b`'s inbound presents on a new (full) handshake.
async fn served_serial(ca: &Ca, b: &Bound, as_id: &SpiffeId) -> Serial {
    let web = ca.pki.leaf(&id("web"), SystemTime::now(), HOUR);
    let cfg = client_config(&ca.pki.bundle(), as_id, Some(web));
    let tcp = TcpStream::connect(b.inbound.unwrap()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("api").unwrap(), tcp)
        .await
        .expect("handshake with the agent-fed sidecar");
    let leaf = &tls.get_ref().1.peer_certificates().expect("server cert")[0];
    inspect_cert(leaf).expect("leaf").serial
}

async fn identity_json(b: &Bound) -> serde_json::Value {
    let (status, body) = http_get(b.admin, "/identity").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// Sidecar B (`api`, fed by the agent, inbound to an echo app allowing `web`) and sidecar A
/// (`web`, CA-fed, an explicit listener to B).
async fn agent_fed_pair(ca: &Ca, socket: &Path) -> Pair {
    let app = echo_app().await;
    let b = start_ready(agent_fed_config(
        ca,
        "api",
        socket,
        &inbound(app, &[id("web")]),
    ))
    .await;
    let to_b = listener("api", b.inbound.expect("inbound"), &[id("api")]);
    let mut a = ca.sidecar_config("web", &to_b).await;
    a.resumption = false; // every new connection is a full handshake with B's newest SVID
    let a = start_ready(a).await;
    Pair { a, b, app }
}

#[tokio::test]
async fn an_agent_fed_sidecar_carries_a_call_end_to_end_with_a_ca_fed_one() {
    let ca = start_ca(HOUR).await;
    let socket = ca.pki.dir.path().join("agent.sock");
    let svid = issued(&ca, "api").await;
    let agent = Agent::start(&socket, Some(only(&ca, &svid)));
    let p = agent_fed_pair(&ca, &socket).await;
    assert_eq!(call(p.entry(), b"hello").await.unwrap(), b"hello");
    let v = identity_json(&p.b).await;
    assert_eq!(v["spiffe_id"], id("api").to_string());
    assert_eq!(v["serial"], serial(&svid).to_string());
    assert_eq!(v["ready"], true);
    assert!(failed_series(p.a.admin).await.is_empty());
    assert!(failed_series(p.b.admin).await.is_empty());
    // The sidecar asked like a SPIFFE client must (the agent refuses calls without the
    // `workload.spiffe.io` metadata) and was attested as this process's user.
    let log = agent.log();
    assert_eq!(log.refused, 0);
    assert!(!log.accepted_uids.is_empty());
    use std::os::unix::fs::MetadataExt as _;
    let me = std::fs::metadata(ca.pki.dir.path()).unwrap().uid();
    assert!(log.accepted_uids.iter().all(|u| *u == me), "{log:?}");
}

#[tokio::test]
async fn an_svid_pushed_by_the_agent_serves_new_connections_and_open_ones_stay() {
    let ca = start_ca(HOUR).await;
    let socket = ca.pki.dir.path().join("agent.sock");
    let first = issued(&ca, "api").await;
    let agent = Agent::start(&socket, Some(only(&ca, &first)));
    let p = agent_fed_pair(&ca, &socket).await;
    let mut open = TcpStream::connect(p.entry()).await.unwrap();
    assert_eq!(round_trip(&mut open, b"before").await.unwrap(), b"before");
    assert_eq!(served_serial(&ca, &p.b, &id("api")).await, serial(&first));
    let rotations = *p.b.identity.rotations().borrow();

    let second = issued(&ca, "api").await;
    agent.push(only(&ca, &second));
    let want = serial(&second).to_string();
    eventually_async("/identity shows the pushed SVID", || async {
        identity_json(&p.b).await["serial"] == want.as_str()
    })
    .await;
    assert_eq!(*p.b.identity.rotations().borrow(), rotations + 1);
    assert_eq!(served_serial(&ca, &p.b, &id("api")).await, serial(&second));
    assert_eq!(call(p.entry(), b"new conn").await.unwrap(), b"new conn");
    // The connection opened on the first SVID was not dropped by the rotation.
    assert_eq!(round_trip(&mut open, b"after").await.unwrap(), b"after");
    // The same SVID sent again is not a rotation.
    agent.push(only(&ca, &second));
    let sent = agent.log().sent;
    eventually("the agent streamed the repeat", || agent.log().sent > sent).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*p.b.identity.rotations().borrow(), rotations + 1);
}

#[tokio::test]
async fn with_the_agent_gone_the_svid_keeps_serving_until_expiry_then_the_agent_is_found_again() {
    let ca = start_ca(HOUR).await;
    let socket = ca.pki.dir.path().join("agent.sock");
    let first = ca.pki.leaf(&id("api"), SystemTime::now(), HOUR);
    let agent = Agent::start(&socket, Some(only(&ca, &first)));
    let p = agent_fed_pair(&ca, &socket).await;
    // Once the pair is up, the agent gives a short SVID, so its lifetime does not depend on how
    // long the setup took. It ends on a whole second (X.509 times are whole seconds) at least
    // 1.1 s away.
    let now = SystemTime::now();
    let not_after = next_whole_second(now + Duration::from_millis(1100));
    let short = ca
        .pki
        .leaf(&id("api"), now, not_after.duration_since(now).unwrap());
    let mut rotations = p.b.identity.rotations();
    rotations.borrow_and_update();
    agent.push(only(&ca, &short));
    tokio::time::timeout(PATIENCE, rotations.changed())
        .await
        .expect("the short SVID arrives")
        .unwrap();
    assert_eq!(
        p.b.identity.current().map(|s| s.info.serial.clone()),
        Some(serial(&short))
    );
    assert_eq!(p.b.identity.current().unwrap().info.not_after, not_after);
    // The agent goes 1 s before the SVID expires: time for the checks below, and the agent is
    // back before the sidecar's second reconnection attempt (0.5 s + 1 s after the loss).
    tokio::time::sleep(
        (not_after - Duration::from_secs(1))
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    agent.stop().await;
    assert!(!socket.exists());

    // Agent gone: the SVID it gave keeps serving.
    assert_eq!(call(p.entry(), b"agent gone").await.unwrap(), b"agent gone");
    assert_eq!(http_get(p.b.admin, "/readyz").await.0, 200);

    // At its expiry it is withdrawn: not ready, and a new call gets nothing (fail closed).
    eventually("the SVID is withdrawn at expiry", || {
        p.b.identity.current().is_none()
    })
    .await;
    assert_eq!(http_get(p.b.admin, "/readyz").await.0, 503);
    assert!(
        call(p.entry(), b"expired").await.is_err(),
        "a call went through"
    );
    let web = ca.pki.leaf(&id("web"), SystemTime::now(), HOUR);
    let refused = probe(
        p.b.inbound.unwrap(),
        client_config(&ca.pki.bundle(), &id("api"), Some(web)),
    )
    .await;
    assert!(
        refused.is_empty(),
        "an SVID-less sidecar let a caller through"
    );

    // An agent back on the same socket is found again (reconnection with backoff).
    let fresh = issued(&ca, "api").await;
    let _agent = Agent::start(&socket, Some(only(&ca, &fresh)));
    eventually("the sidecar reconnects and is ready", || {
        p.b.identity.ready().is_ok()
    })
    .await;
    assert_eq!(call(p.entry(), b"back").await.unwrap(), b"back");
    assert_eq!(served_serial(&ca, &p.b, &id("api")).await, serial(&fresh));
}

#[tokio::test]
async fn an_svid_for_another_spiffe_id_is_refused() {
    let ca = start_ca(HOUR).await;
    let socket = ca.pki.dir.path().join("agent.sock");
    // A valid SVID of the same CA and trust domain, for somebody else.
    let other = issued(&ca, "intruder").await;
    let agent = Agent::start(&socket, Some(only(&ca, &other)));
    let app = echo_app().await;
    let b = start(agent_fed_config(
        &ca,
        "api",
        &socket,
        &inbound(app, &[id("web")]),
    ))
    .await;
    eventually("the agent streamed the other ID's SVID", || {
        agent.log().sent >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        b.identity.current().is_none(),
        "took an SVID for another ID"
    );
    assert_eq!(http_get(b.admin, "/readyz").await.0, 503);
    assert_eq!(identity_json(&b).await["ready"], false);

    // Several SVIDs, ours not the default (first): ours is picked.
    let ours = issued(&ca, "api").await;
    let roots = ca.pki.roots();
    agent.push(response(&[offer(&other, &roots), offer(&ours, &roots)]));
    eventually("the sidecar picks its own SVID", || {
        b.identity.ready().is_ok()
    })
    .await;
    let v = identity_json(&b).await;
    assert_eq!(v["spiffe_id"], id("api").to_string());
    assert_eq!(v["serial"], serial(&ours).to_string());

    // Then only somebody else's again: refused, ours keeps serving.
    agent.push(only(&ca, &other));
    let sent = agent.log().sent;
    eventually("the agent streamed it", || agent.log().sent > sent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(identity_json(&b).await["serial"], serial(&ours).to_string());
    assert_eq!(served_serial(&ca, &b, &id("api")).await, serial(&ours));
}

/// The agent's bundle for our trust domain is trusted beside the configured roots: a caller
/// whose chain goes to a root only the agent publishes gets in.
#[tokio::test]
async fn the_agents_bundle_is_trusted_beside_the_configured_roots() {
    let ca = start_ca(HOUR).await;
    let socket = ca.pki.dir.path().join("agent.sock");
    let twin = Pki::new(TD);
    let svid = issued(&ca, "api").await;
    let mut roots = ca.pki.roots();
    roots.extend(twin.roots());
    let agent = Agent::start(&socket, Some(response(&[offer(&svid, &roots)])));
    let app = echo_app().await;
    let b = start_ready(agent_fed_config(
        &ca,
        "api",
        &socket,
        &inbound(app, &[id("web")]),
    ))
    .await;
    assert_eq!(b.identity.bundle().roots.len(), 2);
    let cred = twin.leaf(&id("web"), SystemTime::now(), HOUR);
    let got = probe(
        b.inbound.unwrap(),
        client_config(&ca.pki.bundle(), &id("api"), Some(cred)),
    );
    assert_eq!(got.await, b"ping");
    drop(agent);
}

fn config_error(dir: &Path, identity: &str) -> Result<SidecarConfig, String> {
    let pki = Pki::new(TD);
    let file = dir.join("spire.toml");
    std::fs::write(
        &file,
        format!(
            "trust_domain = \"{TD}\"\nspiffe_id = \"{}\"\nbundle = {:?}\n\n[identity]\n{identity}\n\n\
             [inbound]\nlisten = \"127.0.0.1:0\"\n",
            id("api"),
            pki.root.join("bundle.pem"),
        ),
    )
    .unwrap();
    SidecarConfig::load(&file).map_err(|e| e.to_string())
}

/// The only test here that reads `SPIFFE_ENDPOINT_SOCKET` (the others name their socket), so
/// changing it does not race with them.
#[test]
fn the_socket_comes_from_the_file_or_the_environment_and_is_otherwise_a_clear_error() {
    use spiffe::transport::Endpoint;
    use trustline::svid::IdentitySource;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = |c: SidecarConfig| match c.identity.source {
        IdentitySource::WorkloadApi { endpoint } => endpoint,
        other => panic!("source {other:?}"),
    };
    std::env::remove_var("SPIFFE_ENDPOINT_SOCKET");
    let err = config_error(dir.path(), "source = \"workload-api\"").unwrap_err();
    assert!(
        err.contains("spire.toml")
            && err.contains("identity.socket")
            && err.contains("SPIFFE_ENDPOINT_SOCKET"),
        "{err}"
    );

    std::env::set_var("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/from-env.sock");
    let c = config_error(dir.path(), "source = \"workload-api\"").unwrap();
    assert_eq!(
        endpoint(c),
        Endpoint::Unix("/run/spire/from-env.sock".into())
    );
    // The file wins over the environment; a plain path is relative to the file.
    let c = config_error(
        dir.path(),
        "source = \"workload-api\"\nsocket = \"agent.sock\"",
    )
    .unwrap();
    assert_eq!(endpoint(c), Endpoint::Unix(dir.path().join("agent.sock")));
    std::env::remove_var("SPIFFE_ENDPOINT_SOCKET");

    let c = config_error(
        dir.path(),
        "source = \"workload-api\"\nsocket = \"unix:///run/spire/agent.sock\"",
    )
    .unwrap();
    assert_eq!(endpoint(c), Endpoint::Unix("/run/spire/agent.sock".into()));
    for bad in ["http://agent", "unix:relative.sock", "tcp://127.0.0.1:8081"] {
        let err = config_error(
            dir.path(),
            &format!("source = \"workload-api\"\nsocket = \"{bad}\""),
        )
        .unwrap_err();
        assert!(
            err.contains("spire.toml") && err.contains("identity.socket") && err.contains(bad),
            "{err}"
        );
    }
}
