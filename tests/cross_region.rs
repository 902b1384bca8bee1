//! Two regions on loopback, each with its own CA and gateways, joined through a WAN relay: a
//! cross-region call keeps the caller's identity end to end, gateways enforce their region
//! policy per stream, a bad stream header closes only its stream, a lost gateway fails over,
//! and a region keeps issuing and serving with the other region's CA (and the root) gone.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::{call, echo_app, eventually, eventually_async, PATIENCE};
use tokio::io::AsyncReadExt;
use trustline::lab::{Lab, LabOptions, TD};
use trustline::region::{Region, ServiceName};
use trustline::tunnel::code;

const ONE_WAY: Duration = Duration::from_millis(5);

fn region(name: &str) -> Region {
    Region::new(name).unwrap()
}

fn wid(name: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{name}")
}

async fn lab(options: LabOptions) -> (tempfile::TempDir, Lab) {
    let dir = tempfile::tempdir().expect("temp dir");
    let lab = Lab::new(
        dir.path(),
        LabOptions {
            one_way_delay: ONE_WAY,
            ..options
        },
    )
    .await
    .expect("lab");
    (dir, lab)
}

/// `api` of region b: an echo app behind a sidecar whose policy admits `web` from region a only.
async fn api_in_b(lab: &Lab) -> trustline::proxy::Bound {
    let app = echo_app().await;
    let policy = lab.dir.join("api-policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[service.api]\n\n[[service.api.rule]]\nname = \"web-from-a\"\naction = \"allow\"\n\
             from = [\"{}\"]\nregions = [\"a\"]\n",
            wid("web")
        ),
    )
    .unwrap();
    lab.sidecar(
        "b",
        "api",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy:?}\nservice = \"api\"\n"
        ),
    )
    .await
    .expect("api sidecar")
}

/// Gateway sections: b exposes `api` and admits region a to it; a lets anything leave for b.
fn gateway_sections(api: SocketAddr) -> (String, String) {
    (
        "[[rule]]\nname = \"a-out\"\nfrom = [\"a\"]\nto = [\"b\"]\nservices = [\"*\"]\n".into(),
        format!(
            "[[expose]]\nservice = \"api\"\naddresses = [\"{api}\"]\n\n\
             [[expose]]\nservice = \"secret\"\naddresses = [\"{SECRET}\"]\n\n\
             [[rule]]\nname = \"a-to-api\"\nfrom = [\"a\"]\nto = [\"b\"]\nservices = [\"api\"]\n"
        ),
    )
}

/// Where `secret` claims to be: exposed by gateway b, but no rule lets region a reach it.
const SECRET: &str = "127.0.0.1:9";

/// A caller in region a with explicit listeners to `api` (listener 0) and `secret` (1).
async fn caller_in_a(lab: &Lab, name: &str, api: SocketAddr) -> trustline::proxy::Bound {
    let mut s = String::new();
    for (svc, addr) in [("api", api.to_string()), ("secret", SECRET.to_string())] {
        s += &format!(
            "[[service]]\nname = \"{svc}\"\nregion = \"b\"\naddresses = [\"{addr}\"]\nspiffe_ids = [\"{}\"]\n\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\nservice = \"{svc}\"\n\n",
            wid("api")
        );
    }
    lab.sidecar("a", name, &s).await.expect("caller sidecar")
}

async fn setup(gateways: usize) -> (tempfile::TempDir, Lab, trustline::proxy::Bound) {
    setup_with(gateways, Duration::from_secs(3600)).await
}

async fn setup_with(
    gateways: usize,
    svid_ttl: Duration,
) -> (tempfile::TempDir, Lab, trustline::proxy::Bound) {
    setup_lab(LabOptions {
        gateways,
        svid_ttl,
        ..Default::default()
    })
    .await
}

async fn setup_lab(options: LabOptions) -> (tempfile::TempDir, Lab, trustline::proxy::Bound) {
    let (dir, mut lab) = lab(options).await;
    let api = api_in_b(&lab).await;
    let (a, b) = gateway_sections(api.inbound.unwrap());
    lab.start_gateways("b", &b).await.expect("gateways b");
    lab.start_gateways("a", &a).await.expect("gateways a");
    lab.wait_paths_up().await.expect("paths up");
    (dir, lab, api)
}

/// The mesh's trust bundle, as the lab wrote it.
fn lab_bundle(lab: &Lab) -> trustline::identity::Bundle {
    trustline::identity::Bundle::from_pem(
        lab.td.clone(),
        &std::fs::read(lab.bundle()).unwrap(),
        "bundle",
    )
    .unwrap()
}

/// A CA client for `region`'s CA, trusting `bundle`.
fn ca_client(
    lab: &Lab,
    region: &str,
    bundle: trustline::identity::Bundle,
) -> trustline::svid::ca_client::CaClient {
    trustline::svid::ca_client::CaClient::new(
        &format!("https://{}", lab.region(region).ca.api),
        bundle,
        trustline::clock::Clock::system(),
    )
    .unwrap()
}

fn audit(lab: &Lab, name: &str) -> String {
    std::fs::read_to_string(lab.dir.join(format!("{name}-audit.log"))).unwrap_or_default()
}

#[tokio::test]
async fn a_call_crosses_regions_with_the_callers_own_identity() {
    let (_d, lab, _api) = setup(1).await;
    let web = caller_in_a(&lab, "web", _api.inbound.unwrap()).await;
    for _ in 0..3 {
        assert_eq!(call(web.listeners[0], b"hello").await.unwrap(), b"hello");
    }
    let pool = web.sessions.as_ref().expect("sessions");
    assert_eq!(
        pool.established.load(Ordering::Relaxed),
        1,
        "three connections ride one warm session"
    );
    // The destination sidecar decided on the caller's own SPIFFE ID and region.
    _api.audit.flush();
    let log = audit(&lab, "api");
    let line = log
        .lines()
        .find(|l| l.contains("\"outcome\":\"allow\""))
        .unwrap_or_else(|| panic!("no allow in api's audit log: {log}"));
    assert!(
        line.contains(&format!("\"source_id\":\"{}\"", wid("web"))),
        "{line}"
    );
    assert!(line.contains("\"source_region\":\"a\""), "{line}");
    assert!(line.contains("\"rule\":\"web-from-a\""), "{line}");
    // The gateways carried it: tunnel metrics show streams and bytes on the a -> b path.
    let gw_a = lab.region("a").gateways[0].as_ref().unwrap();
    let (_, metrics) = common::http_get(gw_a.admin, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trustline_tunnel_streams_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("trustline_tunnel_rtt_seconds"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_destination_policy_still_sees_a_caller_it_refuses() {
    let (_d, lab, api) = setup(1).await;
    let batch = caller_in_a(&lab, "batch", api.inbound.unwrap()).await;
    let r = call(batch.listeners[0], b"hello").await;
    assert!(r.is_err(), "batch must be refused: {r:?}");
    eventually("the deny is audited", || {
        audit(&lab, "api").lines().any(|l| {
            l.contains("\"outcome\":\"deny\"")
                && l.contains(&wid("batch"))
                && l.contains("\"source_region\":\"a\"")
        })
    })
    .await;
}

#[tokio::test]
async fn the_gateway_refuses_a_service_its_region_policy_does_not_allow() {
    let (_d, lab, api) = setup(1).await;
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    // `secret` is exposed by gateway b but no rule admits region a to it.
    let r = call(web.listeners[1], b"hello").await;
    assert!(r.is_err(), "secret must be refused: {r:?}");
    eventually("gateway b audits the refusal with its rule", || {
        audit(&lab, "gateway-b0").lines().any(|l| {
            l.contains("\"event\":\"stream_refused\"")
                && l.contains("\"destination_service\":\"secret\"")
                && l.contains("\"rule\":\"default-deny\"")
        })
    })
    .await;
    // The tunnel and the session are still there for what is allowed.
    assert_eq!(call(web.listeners[0], b"again").await.unwrap(), b"again");
}

/// A raw QUIC client with a workload SVID of region a, connected to gateway a.
async fn raw_tunnel(lab: &Lab) -> quinn::Connection {
    raw_tunnel_from(lab, "a", "probe").await
}

/// A raw QUIC client holding an SVID for `name` from region `region`'s CA, connected to gateway
/// a.
async fn raw_tunnel_from(lab: &Lab, region: &str, name: &str) -> quinn::Connection {
    raw_tunnel_with(lab, region, name, |_| {})
        .await
        .expect("QUIC connection to gateway a")
}

/// [`raw_tunnel_from`] presenting the SVID's chain as `edit` leaves it.
async fn raw_tunnel_with(
    lab: &Lab,
    region: &str,
    name: &str,
    edit: impl FnOnce(&mut Vec<rustls::pki_types::CertificateDer<'static>>),
) -> Result<quinn::Connection, quinn::ConnectionError> {
    use trustline::crypto::TLS13_ONLY;
    use trustline::tls::{ExpectedPeer, SpiffeServerVerifier};
    let id = trustline::identity::parse_workload_id(&wid(name)).unwrap();
    let bundle = lab_bundle(lab);
    let client = ca_client(lab, region, bundle.clone());
    let mut svid = client
        .issue_with_token(&id, &lab.token(region, &wid(name)).await.unwrap())
        .await
        .unwrap();
    edit(&mut svid.chain);
    let verifier = SpiffeServerVerifier::new(
        bundle.store(),
        ExpectedPeer::AnyOf(vec![trustline::tunnel::gateway_id(&lab.td, "a")]),
    );
    let tls = rustls::ClientConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(TLS13_ONLY)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
        .unwrap();
    let cfg = trustline::tunnel::quic_client(tls, Default::default()).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.connect_with(cfg, lab.region("a").gateway_addrs[0], "gateway")
        .unwrap()
        .await
}

/// F14 at the gateway: a tunnel connection whose workload certificate is revoked is closed once
/// the gateway's revocation list has the serial, not only refused at the next handshake.
#[tokio::test]
async fn a_gateway_closes_the_tunnel_of_a_revoked_workload() {
    use trustline::ca::admin::{self, AdminRequest};
    let (_d, lab, _api) = setup(1).await;
    let mut serial = None;
    let conn = raw_tunnel_with(&lab, "a", "probe", |c| {
        serial = Some(trustline::identity::inspect_cert(&c[0]).unwrap().serial)
    })
    .await
    .expect("QUIC connection to gateway a");
    let r = admin::call(
        &lab.region("a").ca.admin_socket,
        &AdminRequest::Revoke {
            serial: serial.unwrap().to_string(),
        },
    )
    .await
    .expect("admin socket");
    assert!(r.ok, "revocation refused: {:?}", r.error);
    match tokio::time::timeout(PATIENCE, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code.into_inner(), code::REFUSED as u64);
            assert_eq!(String::from_utf8_lossy(&c.reason), "revoked");
        }
        other => panic!("expected the gateway to close the tunnel, got {other:?}"),
    }
    eventually("gateway a audits the closure", || {
        audit(&lab, "gateway-a0")
            .lines()
            .any(|l| l.contains("\"event\":\"tunnel_closed\"") && l.contains("revoked"))
    })
    .await;
}

async fn reset_code(conn: &quinn::Connection, bytes: &[u8]) -> u64 {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 16];
    match tokio::time::timeout(PATIENCE, recv.read(&mut buf)).await {
        Ok(Err(quinn::ReadError::Reset(code))) => code.into_inner(),
        other => panic!("expected the stream to be reset, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_stream_header_closes_only_its_stream() {
    use trustline::tunnel::header::StreamHeader;
    let (_d, lab, api) = setup(1).await;
    let conn = raw_tunnel(&lab).await;
    // Bad magic, an unknown version, an oversized body, a truncated body.
    assert_eq!(
        reset_code(&conn, b"XX\x01\x00\x05hello").await,
        code::BAD_HEADER as u64
    );
    assert_eq!(
        reset_code(&conn, b"TL\x07\x00\x05hello").await,
        code::BAD_HEADER as u64
    );
    assert_eq!(
        reset_code(&conn, b"TL\x01\x02\x58").await,
        code::BAD_HEADER as u64
    );
    let good = StreamHeader {
        region: region("b"),
        service: ServiceName::new("nope").unwrap(),
        addr: api.inbound.unwrap(),
    }
    .encode();
    let mut trailing = good.clone();
    trailing[4] += 1;
    trailing.push(0);
    assert_eq!(reset_code(&conn, &trailing).await, code::BAD_HEADER as u64);
    // A well-formed header for a service nobody exposes: refused at gateway b, and the code
    // travels back through gateway a.
    assert_eq!(reset_code(&conn, &good).await, code::REFUSED as u64);
    assert!(
        conn.close_reason().is_none(),
        "the tunnel connection is still open"
    );
    // The gateway still serves everyone else.
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    assert_eq!(call(web.listeners[0], b"still").await.unwrap(), b"still");
    let gw_a = lab.region("a").gateways[0].as_ref().unwrap();
    let (_, metrics) = common::http_get(gw_a.admin, "/metrics").await;
    assert!(
        metrics.contains("trustline_tunnel_refused_streams_total{reason=\"bad_header\"} 4"),
        "{metrics}"
    );
}

/// Calls until one succeeds; returns how long it took.
async fn until_a_call_works(entry: SocketAddr) -> Duration {
    let started = Instant::now();
    eventually_async("a call succeeds again", || async {
        matches!(call(entry, b"ping").await.as_deref(), Ok(b"ping"))
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn a_lost_gateway_fails_over_to_another() {
    let (_d, mut lab, api) = setup(2).await;
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    assert_eq!(call(web.listeners[0], b"warm").await.unwrap(), b"warm");
    // A gateway of the destination region goes away, then one of the caller's region.
    lab.stop_gateway("b", 0).await;
    let took = until_a_call_works(web.listeners[0]).await;
    eprintln!("failover after losing gateway b0: {took:?}");
    lab.stop_gateway("a", 0).await;
    let took = until_a_call_works(web.listeners[0]).await;
    eprintln!("failover after losing gateway a0: {took:?}");
    let gw_a1 = lab.region("a").gateways[1].as_ref().unwrap();
    eventually(
        "gateway a1 reports the lost path to b0 as a failover",
        || {
            audit(&lab, "gateway-a1")
                .lines()
                .any(|l| l.contains("\"event\":\"failover\""))
        },
    )
    .await;
    let pool = web.sessions.as_ref().unwrap();
    assert_eq!(
        pool.gateways().expect("gateways").up(),
        1,
        "the sidecar sees one local gateway left"
    );
    let (_, metrics) = common::http_get(gw_a1.admin, "/metrics").await;
    assert!(
        metrics.contains("trustline_tunnel_failovers_total 1"),
        "{metrics}"
    );
    // A restarted gateway is used again.
    lab.start_gateway("a", 0).await.unwrap();
    eventually("the sidecar reconnects to the restarted gateway", || {
        pool.gateways().expect("gateways").up() == 2
    })
    .await;
}

#[tokio::test]
async fn a_region_keeps_issuing_and_serving_without_the_root_and_the_other_ca() {
    let (_d, lab, api) = setup(1).await;
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    assert_eq!(call(web.listeners[0], b"before").await.unwrap(), b"before");
    // Region b's CA stops; the root's key is offline by design (no process uses it).
    lab.region("b").ca.shutdown();
    std::fs::rename(lab.root.join("ca.key"), lab.dir.join("root-key-offline")).unwrap();
    // Region a still issues: a new workload joins and serves a local caller.
    let app = echo_app().await;
    let local = lab
        .sidecar(
            "a",
            "ledger",
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\nallow = [\"{}\"]\n",
                wid("fresh")
            ),
        )
        .await
        .expect("a new workload of region a gets its SVID");
    let fresh = lab
        .sidecar(
            "a",
            "fresh",
            &format!(
                "[[service]]\nname = \"ledger\"\naddresses = [\"{}\"]\nspiffe_ids = [\"{}\"]\n\n\
                 [[listener]]\nlisten = \"127.0.0.1:0\"\nservice = \"ledger\"\n",
                local.inbound.unwrap(),
                wid("ledger")
            ),
        )
        .await
        .expect("another new workload of region a");
    assert_eq!(call(fresh.listeners[0], b"local").await.unwrap(), b"local");
    // And cross-region traffic on valid SVIDs goes on.
    assert_eq!(call(web.listeners[0], b"after").await.unwrap(), b"after");
    let mut s = tokio::net::TcpStream::connect(web.listeners[0])
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"x")
        .await
        .unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
}

#[tokio::test]
async fn sessions_follow_svid_rotation_and_expiry() {
    // SVIDs of 4 s: both sidecars renew at about 2 s, and the first SVIDs expire at 4 s. A
    // session authenticated with them must give way to a new one, or the destination refuses
    // its streams once the caller's certificate has expired.
    let (_d, lab, api) = setup_with(1, Duration::from_secs(4)).await;
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    // The tunnel paths (web → gateway a, gateway a → gateway b) are re-dialled on every
    // rotation, make-before-break, and gateways close a connection at its peer's expiry.
    let side_paths = web.sessions.as_ref().unwrap().gateways().unwrap().clone();
    let gw_a = lab.region("a").gateways[0].as_ref().unwrap();
    let gw_paths = gw_a.peers["b"].clone();
    eventually("web's path is up", || side_paths.up() > 0).await;
    let first_side = side_paths.all()[0].connection().expect("web's path up");
    let first_gw = gw_paths.all()[0].connection().expect("gateway a's path up");
    let mut side_conns = std::collections::HashSet::new();
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(9) {
        if let Some(c) = side_paths.all()[0].connection() {
            side_conns.insert(c.stable_id());
        }
        let r = call(web.listeners[0], b"tick").await;
        if r.is_err() {
            eprintln!("DEBUG web {:?}", common::failed_series(web.admin).await);
            eprintln!("DEBUG api {:?}", common::failed_series(api.admin).await);
            for f in ["gateway-a0", "gateway-b0"] {
                eprintln!("DEBUG {f}: {}", audit(&lab, f));
            }
        }
        assert_eq!(
            r.as_deref().ok(),
            Some(&b"tick"[..]),
            "call {calls} at {:?} failed: {r:?}",
            started.elapsed()
        );
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = web.sessions.as_ref().unwrap();
    let sessions = pool.established.load(Ordering::Relaxed);
    assert!(
        sessions >= 3,
        "{calls} calls over two SVID lifetimes rode only {sessions} session(s)"
    );
    api.audit.flush();
    assert!(
        !audit(&lab, "api").contains("expired_certificate"),
        "no stream was refused for an expired session certificate"
    );
    assert!(
        side_conns.len() >= 3,
        "web's path rode only {} connection(s) over two SVID lifetimes",
        side_conns.len()
    );
    let replaced = gw_a
        .metrics
        .replaced
        .get_or_create(&gw_paths.all()[0].labels)
        .get();
    assert!(
        replaced >= 2,
        "gateway a's path was replaced {replaced} time(s)"
    );
    for (who, c) in [("web", &first_side), ("gateway a", &first_gw)] {
        assert!(
            c.close_reason().is_some(),
            "{who}'s first tunnel connection outlived its certificates"
        );
    }
}

/// A gateway closes an accepted tunnel connection when the peer's certificate expires, not only
/// when it is revoked.
#[tokio::test]
async fn a_gateway_closes_a_tunnel_at_its_peers_certificate_expiry() {
    let (_d, lab, _api) = setup_with(1, Duration::from_secs(3)).await;
    let conn = raw_tunnel(&lab).await;
    match tokio::time::timeout(PATIENCE, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code.into_inner(), code::REFUSED as u64);
            assert_eq!(String::from_utf8_lossy(&c.reason), "expired_certificate");
        }
        other => panic!("expected the gateway to close the tunnel at expiry, got {other:?}"),
    }
    eventually("gateway a audits the closure", || {
        audit(&lab, "gateway-a0")
            .lines()
            .any(|l| l.contains("\"event\":\"tunnel_closed\"") && l.contains("expired_certificate"))
    })
    .await;
}

/// A dialled path re-checks the gateway it reached: when that gateway's certificate is revoked,
/// the path is closed at once (audited) and re-dialled, and comes back once the gateway holds a
/// good certificate again.
#[tokio::test]
async fn a_path_to_a_gateway_whose_certificate_is_revoked_is_dropped_and_redialled() {
    use trustline::ca::admin::{self, AdminRequest};
    let (_d, mut lab, _api) = setup(1).await;
    let gw_b = lab.region("b").gateways[0].as_ref().unwrap();
    let serial = gw_b.identity.current().unwrap().info.serial.clone();
    let paths = lab.region("a").gateways[0].as_ref().unwrap().peers["b"].clone();
    let before = paths.all()[0]
        .connection()
        .expect("gateway a's path to b up");
    let r = admin::call(
        &lab.region("b").ca.admin_socket,
        &AdminRequest::Revoke {
            serial: serial.to_string(),
        },
    )
    .await
    .expect("admin socket");
    assert!(r.ok, "revocation refused: {:?}", r.error);
    match tokio::time::timeout(PATIENCE, before.closed()).await {
        Ok(quinn::ConnectionError::LocallyClosed) => {}
        other => panic!("expected gateway a to close its path to b, got {other:?}"),
    }
    eventually("gateway a audits the closure", || {
        audit(&lab, "gateway-a0")
            .lines()
            .any(|l| l.contains("\"event\":\"tunnel_closed\"") && l.contains("revoked"))
    })
    .await;
    // Gateway b comes back with a new certificate: the path is dialled again.
    lab.stop_gateway("b", 0).await;
    lab.start_gateway("b", 0).await.expect("gateway b again");
    eventually("gateway a's path to b is up again", || {
        paths.all()[0]
            .connection()
            .is_some_and(|c| c.stable_id() != before.stable_id())
    })
    .await;
}

#[tokio::test]
async fn a_gateway_refuses_workloads_of_another_region() {
    let (_d, lab, _api) = setup(1).await;
    // A workload certified by region b's CA may not use region a's gateway as its way out.
    let conn = raw_tunnel_from(&lab, "b", "stranger").await;
    match tokio::time::timeout(PATIENCE, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code.into_inner(), code::REFUSED as u64);
            let why = String::from_utf8_lossy(&c.reason);
            assert!(why.contains("is not a workload of region a"), "{why}");
        }
        other => panic!("expected the gateway to close the connection, got {other:?}"),
    }
    eventually("gateway a audits the refused connection", || {
        audit(&lab, "gateway-a0")
            .lines()
            .any(|l| l.contains("\"event\":\"tunnel_refused\"") && l.contains(&wid("stranger")))
    })
    .await;
}

#[tokio::test]
async fn a_workload_cannot_pass_for_one_of_another_region_with_a_home_made_region_ca() {
    let (_d, lab, _api) = setup(1).await;
    // A workload of region b appends a self-made CA certificate claiming region a before its
    // real intermediate. The region is read from the verified path only, and a chain carrying
    // a certificate that path does not use is refused in the handshake.
    let fake = common::fake_region_ca(&lab.td, "a");
    let padded = raw_tunnel_with(&lab, "b", "stranger", |c| c.insert(1, fake)).await;
    let closed = match padded {
        Err(e) => e,
        Ok(conn) => tokio::time::timeout(PATIENCE, conn.closed())
            .await
            .expect("gateway a closes the connection"),
    };
    // A TLS alert from the handshake (QUIC's CRYPTO_ERROR range), not the application close
    // with which a verified peer is turned away after the handshake.
    let code = match &closed {
        quinn::ConnectionError::TransportError(e) => u64::from(e.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        other => panic!("expected the handshake to be refused, got {other:?}"),
    };
    assert!((0x100..0x200).contains(&code), "{closed:?}");
}

#[tokio::test]
async fn a_serial_revoked_in_one_region_is_refused_in_the_other() {
    // Sidecars refresh every second and the CAs pull each other every second: region b must
    // refuse within a few seconds (the bound is PATIENCE, 10 s).
    let (_d, lab, api) = setup_lab(LabOptions {
        refresh_interval: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    assert_eq!(call(web.listeners[0], b"before").await.unwrap(), b"before");
    // Region b's sidecar also admits web's SVID presented directly, without the gateways.
    let svid = web.identity.current().expect("web's SVID");
    let bundle = lab_bundle(&lab);
    let api_id = trustline::identity::parse_workload_id(&wid("api")).unwrap();
    let direct = || common::client_config(&bundle, &api_id, Some(common::Cred::from(&*svid)));
    assert_eq!(common::probe(api.inbound.unwrap(), direct()).await, b"ping");

    let r = trustline::ca::admin::call(
        &lab.region("a").ca.admin_socket,
        &trustline::ca::admin::AdminRequest::Revoke {
            serial: svid.info.serial.to_string(),
        },
    )
    .await
    .unwrap();
    assert!(r.ok, "{:?}", r.error);
    let started = Instant::now();
    eventually_async(
        "region b's sidecar refuses the SVID revoked in region a",
        || async {
            common::probe(api.inbound.unwrap(), direct())
                .await
                .is_empty()
        },
    )
    .await;
    eprintln!(
        "refused in region b {:?} after the revocation in a",
        started.elapsed()
    );
    // The refusal is counted as the handshake fails, which the caller may see first.
    eventually_async("api counts the refusal as revoked", || async {
        common::failed_series(api.admin)
            .await
            .iter()
            .any(|l| l.contains("reason=\"revoked\""))
    })
    .await;
    // The caller's own calls into region b fail too (whichever hop refuses first).
    eventually_async("web's calls into region b fail", || async {
        call(web.listeners[0], b"after").await.is_err()
    })
    .await;
    // CA b serves the serial with its own list, and says where it learned it.
    let client = ca_client(&lab, "b", bundle.clone());
    let body = client.get_limited("/v1/revoked", 1 << 20).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let serial = svid.info.serial.to_string();
    assert!(
        v["revoked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["serial"] == serial),
        "{v}"
    );
    // Where it learned it is for operators (the metrics listener's /peers), not in the answer.
    assert!(v.get("peers").is_none(), "{v}");
    let p = lab.region("b").ca.state.peers.status_json();
    assert_eq!(
        p["peers"][0]["url"],
        format!("https://{}", lab.region("a").ca.api),
        "{p}"
    );
    assert!(p["peers"][0]["error"].is_null(), "{p}");
    // ...but not in what it offers its own peers: only its own revocations travel.
    let body = client
        .get_limited("/v1/revoked?scope=local", 1 << 20)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["revoked"].as_array().unwrap().len(), 0, "{v}");
}

#[tokio::test]
async fn what_a_peer_ca_revokes_or_cuts_off_holds_here_also_while_it_is_down() {
    let (_d, lab) = lab(LabOptions {
        refresh_interval: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let bundle = lab_bundle(&lab);
    let ca = |region: &str| ca_client(&lab, region, bundle.clone());
    let id = trustline::identity::parse_workload_id(&wid("stolen")).unwrap();
    let svid = ca("a")
        .issue_with_token(&id, &lab.token("a", &wid("stolen")).await.unwrap())
        .await
        .unwrap();
    let r = trustline::ca::admin::call(
        &lab.region("a").ca.admin_socket,
        &trustline::ca::admin::AdminRequest::Revoke {
            serial: svid.info.serial.to_string(),
        },
    )
    .await
    .unwrap();
    assert!(r.ok, "{:?}", r.error);
    let listed = |v: &serde_json::Value| {
        v["revoked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["serial"] == svid.info.serial.to_string())
    };
    let b = ca("b");
    let get = || async {
        let body = b.get_limited("/v1/revoked", 1 << 20).await.unwrap();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    eventually_async("CA b learns the revocation", || async {
        listed(&get().await)
    })
    .await;
    // An identity cut off at CA a is cut off by CA b too: published, its SVIDs from CA b
    // listed, no renewal or issuance at CA b.
    let banned = wid("banned");
    let id_banned = trustline::identity::parse_workload_id(&banned).unwrap();
    let from_b = b
        .issue_with_token(&id_banned, &lab.token("b", &banned).await.unwrap())
        .await
        .unwrap();
    let token_b = lab.token("b", &banned).await.unwrap();
    let r = trustline::ca::admin::call(
        &lab.region("a").ca.admin_socket,
        &trustline::ca::admin::AdminRequest::RevokeId {
            spiffe_id: banned.clone(),
        },
    )
    .await
    .unwrap();
    assert!(r.ok, "{:?}", r.error);
    eventually_async("CA b publishes the cut-off ID", || async {
        get().await["spiffe_ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["spiffe_id"] == banned)
    })
    .await;
    let v = get().await;
    assert!(
        v["revoked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["serial"] == from_b.info.serial.to_string()),
        "CA b lists its own SVID of the cut-off ID: {v}"
    );
    let refused =
        |r: Result<trustline::identity::Svid, trustline::svid::ca_client::ClientError>| match r {
            Err(trustline::svid::ca_client::ClientError::Refused { status, error, .. }) => {
                (status.as_u16(), error)
            }
            other => panic!("CA b must refuse an ID cut off at CA a: {other:?}"),
        };
    // CA b revoked its SVID of the ID (a revoked certificate is refused before the ban is seen).
    assert_eq!(
        refused(b.renew(&from_b).await),
        (401, "unauthorized".into())
    );
    assert_eq!(
        refused(b.issue_with_token(&id_banned, &token_b).await),
        (403, "revoked".into())
    );
    // CA a goes away: CA b notices, keeps the serial and goes on serving.
    lab.region("a").ca.shutdown();
    eventually_async("CA b sees its peer down", || async {
        !lab.region("b").ca.state.peers.status_json()["peers"][0]["error"].is_null()
    })
    .await;
    let v = get().await;
    assert!(listed(&v), "the last good list is kept: {v}");
    // The metrics say how stale it is, for an alert.
    let m = &lab.region("b").ca.state.metrics;
    let peer = trustline::ca::metrics::PeerLabels {
        peer: format!("https://{}", lab.region("a").ca.api),
    };
    assert!(m.peer_fetched.get_or_create(&peer).get() > 0);
    assert!(m.peer_failures.get_or_create(&peer).get() > 0);
}

/// A peer CA's ban revokes this region's SVIDs of the ID for good: lifting it allows new
/// issuance, and a stolen SVID issued here does not come back.
#[tokio::test]
async fn a_peer_cas_lifted_ban_does_not_bring_back_this_regions_svids() {
    let (_d, lab) = lab(LabOptions {
        refresh_interval: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let b = ca_client(&lab, "b", lab_bundle(&lab));
    let get = |path: &'static str| {
        let b = &b;
        async move {
            let body = b.get_limited(path, 1 << 20).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        }
    };
    let banned = wid("lifted");
    let id = trustline::identity::parse_workload_id(&banned).unwrap();
    let stolen = b
        .issue_with_token(&id, &lab.token("b", &banned).await.unwrap())
        .await
        .unwrap();
    let serial = stolen.info.serial.to_string();
    let lists = |v: &serde_json::Value, key: &str, field: &str, want: &str| {
        v[key].as_array().unwrap().iter().any(|e| e[field] == want)
    };
    let socket = lab.region("a").ca.admin_socket.clone();
    let admin = |req| {
        let socket = socket.clone();
        async move {
            let r = trustline::ca::admin::call(&socket, &req).await.unwrap();
            assert!(r.ok, "{:?}", r.error);
        }
    };
    admin(trustline::ca::admin::AdminRequest::RevokeId {
        spiffe_id: banned.clone(),
    })
    .await;
    eventually_async("CA b lists its SVID of the ID CA a cut off", || async {
        lists(&get("/v1/revoked").await, "revoked", "serial", &serial)
    })
    .await;
    admin(trustline::ca::admin::AdminRequest::LiftId {
        spiffe_id: banned.clone(),
    })
    .await;
    eventually_async("CA b sees the ban lifted", || async {
        !lists(
            &get("/v1/revoked").await,
            "spiffe_ids",
            "spiffe_id",
            &banned,
        )
    })
    .await;
    let v = get("/v1/revoked").await;
    assert!(
        lists(&v, "revoked", "serial", &serial),
        "the SVID stays revoked: {v}"
    );
    let own = get("/v1/revoked?scope=local").await;
    assert!(
        lists(&own, "revoked", "serial", &serial),
        "CA b revoked it in its own ledger: {own}"
    );
    match b.renew(&stolen).await {
        Err(trustline::svid::ca_client::ClientError::Refused { status, .. }) => {
            assert_eq!(status.as_u16(), 401)
        }
        other => panic!("a revoked SVID must not renew: {other:?}"),
    }
    // The lift allows a new SVID for the ID.
    b.issue_with_token(&id, &lab.token("b", &banned).await.unwrap())
        .await
        .unwrap();
}

/// A TLS server (http/1.1) on 127.0.0.1 presenting `svid`: anything but a CA.
async fn tls_server_with(svid: &trustline::identity::Svid) -> SocketAddr {
    let mut cfg = rustls::ServerConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_peer_that_is_not_a_ca_is_not_believed() {
    let (_d, lab) = lab(LabOptions {
        refresh_interval: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let bundle = lab_bundle(&lab);
    let client = |region: &str| ca_client(&lab, region, bundle.clone());
    // A workload's certificate chains to the root, but it is not the CA's.
    let id = trustline::identity::parse_workload_id(&wid("impostor")).unwrap();
    let svid = client("b")
        .issue_with_token(&id, &lab.token("b", &wid("impostor")).await.unwrap())
        .await
        .unwrap();
    let impostor = format!("https://{}", tls_server_with(&svid).await);
    lab.region("a")
        .ca
        .set_peers(std::slice::from_ref(&impostor))
        .unwrap();
    let peer = || async { lab.region("a").ca.state.peers.status_json()["peers"][0].clone() };
    eventually_async("CA a refuses the impostor's certificate", || async {
        peer().await["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not the expected"))
    })
    .await;
    let p = peer().await;
    assert_eq!(p["url"], impostor, "{p}");
    assert!(p["fetched_at"].is_null(), "nothing was taken from it: {p}");
}

#[tokio::test]
async fn a_workload_over_its_stream_quota_is_refused_and_others_still_cross() {
    use trustline::tunnel::header::StreamHeader;
    let (_d, mut lab) = lab(LabOptions::default()).await;
    let api = api_in_b(&lab).await;
    let (a, b) = gateway_sections(api.inbound.unwrap());
    lab.start_gateways("b", &b).await.expect("gateways b");
    let a = format!("{a}\n[limits]\nmax_streams_per_id = 4\n");
    lab.start_gateways("a", &a).await.expect("gateways a");
    lab.wait_paths_up().await.expect("paths up");
    let conn = raw_tunnel(&lab).await;
    let good = StreamHeader {
        region: region("b"),
        service: ServiceName::new("api").unwrap(),
        addr: api.inbound.unwrap(),
    }
    .encode();
    // Four streams held open (each rides the tunnel to b's api sidecar)...
    let mut held = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&good).await.unwrap();
        held.push((send, recv));
    }
    // ...and the fifth of the same workload is refused at gateway a.
    assert_eq!(reset_code(&conn, &good).await, code::REFUSED as u64);
    let gw_a = lab.region("a").gateways[0].as_ref().unwrap();
    let (_, metrics) = common::http_get(gw_a.admin, "/metrics").await;
    assert!(
        metrics.contains("trustline_tunnel_refused_streams_total{reason=\"stream_quota\"} 1"),
        "{metrics}"
    );
    // Another workload of the region still crosses, within its usual wait.
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    assert_eq!(call(web.listeners[0], b"mine").await.unwrap(), b"mine");
    drop(held);
}

#[tokio::test]
async fn gateway_metrics_never_carry_a_peers_ephemeral_address() {
    let (_d, lab, _api) = setup(1).await;
    let gw_b = lab.region("b").gateways[0].as_ref().unwrap();
    let configured: Vec<String> = lab
        .region("a")
        .relayed_addrs
        .iter()
        .map(|a| a.to_string())
        .collect();
    let peer_labels = |metrics: &str| -> Vec<String> {
        metrics
            .lines()
            .filter(|l| l.starts_with("trustline_tunnel_"))
            .filter_map(|l| l.split("peer=\"").nth(1)?.split('"').next())
            .map(str::to_string)
            .collect()
    };
    // Gateway b counts the connection gateway a dialled once it has accepted it.
    eventually_async(
        "gateway a's accepted connection is labelled by its ID",
        || async {
            let (_, metrics) = common::http_get(gw_b.admin, "/metrics").await;
            peer_labels(&metrics)
                .iter()
                .any(|p| p.starts_with("spiffe://"))
        },
    )
    .await;
    let (_, metrics) = common::http_get(gw_b.admin, "/metrics").await;
    let peers = peer_labels(&metrics);
    for p in peers {
        if p.parse::<SocketAddr>().is_ok() {
            assert!(
                configured.contains(&p),
                "series labelled with {p}, not a configured peer"
            );
        }
    }
}

#[tokio::test]
async fn a_workload_over_its_connection_quota_is_refused_at_the_gateway() {
    let (_d, mut lab) = lab(LabOptions::default()).await;
    let api = api_in_b(&lab).await;
    let (a, b) = gateway_sections(api.inbound.unwrap());
    lab.start_gateways("b", &b).await.expect("gateways b");
    let a = format!("{a}\n[limits]\nmax_connections_per_id = 1\n");
    lab.start_gateways("a", &a).await.expect("gateways a");
    lab.wait_paths_up().await.expect("paths up");
    let first = raw_tunnel(&lab).await;
    let second = raw_tunnel(&lab).await;
    let closed = tokio::time::timeout(PATIENCE, second.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code.into_inner() == code::REFUSED as u64),
        "the second connection of one workload: {closed:?}"
    );
    assert!(first.close_reason().is_none(), "the first one stays up");
    let gw_a = lab.region("a").gateways[0].as_ref().unwrap();
    let (_, metrics) = common::http_get(gw_a.admin, "/metrics").await;
    assert!(
        metrics
            .contains("trustline_tunnel_refused_connections_total{reason=\"connection_quota\"} 1"),
        "{metrics}"
    );
    // Other workloads have their own quota.
    let web = caller_in_a(&lab, "web", api.inbound.unwrap()).await;
    assert_eq!(call(web.listeners[0], b"mine").await.unwrap(), b"mine");
}

/// A stand-in for region b's gateway on its fixed address: a real gateway-b certificate from
/// b's CA, but it grants no stream credit at all, as a tunnel whose streams are all taken.
async fn gateway_b_without_stream_credit(lab: &Lab) -> quinn::Endpoint {
    use trustline::crypto::TLS13_ONLY;
    let id = trustline::tunnel::gateway_id(&lab.td, "b");
    let bundle = lab_bundle(lab);
    let client = ca_client(lab, "b", bundle);
    let token = lab.token("b", &id.to_string()).await.unwrap();
    let svid = client.issue_with_token(&id, &token).await.unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(TLS13_ONLY)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())
        .unwrap();
    let mut cfg = trustline::tunnel::quic_server(tls, Default::default()).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    cfg.transport_config(Arc::new(transport));
    let ep = quinn::Endpoint::server(cfg, lab.region("b").gateway_addrs[0]).unwrap();
    let accepting = ep.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = accepting.accept().await {
            if let Ok(c) = incoming.await {
                held.push(c);
            }
        }
    });
    ep
}

#[tokio::test]
async fn a_path_without_stream_credit_refuses_within_the_wait_instead_of_hanging() {
    use trustline::tunnel::header::StreamHeader;
    let (_d, mut lab) = lab(LabOptions::default()).await;
    let _fake_b = gateway_b_without_stream_credit(&lab).await;
    let (a, _) = gateway_sections("127.0.0.1:9".parse().unwrap());
    lab.start_gateways("a", &a).await.expect("gateways a");
    let gw_a = lab.region("a").gateways[0].as_ref().unwrap();
    eventually("gateway a's path to b is up", || gw_a.peers["b"].up() > 0).await;
    let conn = raw_tunnel(&lab).await;
    let header = StreamHeader {
        region: region("b"),
        service: ServiceName::new("api").unwrap(),
        addr: "127.0.0.1:9".parse().unwrap(),
    }
    .encode();
    // Gateway a's wait for a path is 2 s; the refusal must come back well within PATIENCE.
    assert_eq!(reset_code(&conn, &header).await, code::NO_ROUTE as u64);
    let (_, metrics) = common::http_get(gw_a.admin, "/metrics").await;
    assert!(
        metrics.contains("trustline_tunnel_open_timeouts_total 1"),
        "{metrics}"
    );
}

/// Every regional CA's server certificate names `spiffe://TD/trustline/ca`, so without the
/// region check whoever holds one region's CA key can serve another region's sidecars a forged
/// bundle and an empty revocation list.
#[tokio::test]
async fn a_ca_of_another_region_cannot_stand_in_for_ours() {
    use trustline::svid::ca_client::CaClient;
    use trustline::svid::IdentitySource;
    let (_d, lab) = lab(LabOptions::default()).await;
    let b_url = format!("https://{}", lab.region("b").ca.api);
    let client =
        CaClient::new(&b_url, lab_bundle(&lab), trustline::clock::Clock::system()).unwrap();
    // Region b's own clients reach it.
    let ca_b = client.clone().expect_region(region("b"));
    ca_b.fetch_bundle_pem()
        .await
        .expect("CA b is region b's CA");
    // A client of region a pointed at CA b is refused in the handshake, saying why.
    let for_a = client.expect_region(region("a"));
    let e = for_a.fetch_bundle_pem().await.unwrap_err();
    assert!(
        matches!(e, trustline::svid::ca_client::ClientError::Tls(_)),
        "refused in TLS: {e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("issued by region b's CA") && msg.contains("expected region a's CA"),
        "{msg}"
    );
    let e = trustline::svid::fetch_revoked(&for_a)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected region a"), "{e}");
    // The roles pass their region on: a sidecar of region a that is sent to CA b gets neither
    // its bundle nor its revocation list there.
    let app = echo_app().await;
    let sections = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\nallow = [\"{}\"]\n",
        wid("x")
    );
    let mut cfg = lab.sidecar_config("a", "web", &sections).await.unwrap();
    match &mut cfg.identity.source {
        IdentitySource::Ca { url, region, .. } => {
            assert_eq!(region.as_deref(), Some("a"));
            *url = b_url;
        }
        other => panic!("a CA source: {other:?}"),
    }
    let sidecar = trustline::proxy::build(cfg, trustline::clock::Clock::system())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sidecar.identity.bundle_fetches(),
        0,
        "nothing taken from CA b"
    );
}

#[tokio::test]
async fn a_peer_of_our_own_region_is_refused() {
    let (_d, lab) = lab(LabOptions::default()).await;
    let a = &lab.region("a").ca;
    let own = format!("https://{}", a.api);
    let b_url = format!("https://{}", lab.region("b").ca.api);
    // A peer named as our own region's CA is refused at configuration.
    let e = a
        .set_peers(&[format!("a={b_url}")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("this CA's own region"), "{e}");
    let client = trustline::svid::ca_client::CaClient::new(
        &own,
        lab_bundle(&lab),
        trustline::clock::Clock::system(),
    )
    .unwrap()
    .expect_region(region("a"));
    let peer = || async {
        // The region-checked client still reaches its own CA.
        client.get_limited("/v1/revoked", 1 << 20).await.unwrap();
        a.state.peers.status_json()["peers"][0].clone()
    };
    // A peer whose certificate our own region's CA issued (here: ourselves) is not believed.
    a.set_peers(std::slice::from_ref(&own)).unwrap();
    eventually_async("CA a refuses a peer of its own region", || async {
        peer().await["error"]
            .as_str()
            .is_some_and(|e| e.contains("issued by region a's CA, this CA's own region"))
    })
    .await;
    assert!(peer().await["fetched_at"].is_null());
    // A peer named as region b's CA must be region b's.
    a.set_peers(&[format!("b={own}")]).unwrap();
    eventually_async("CA a refuses a peer that is not region b's CA", || async {
        peer().await["error"]
            .as_str()
            .is_some_and(|e| e.contains("expected region b's CA"))
    })
    .await;
    // The real one is followed, and its region is shown.
    a.set_peers(&[format!("b={b_url}")]).unwrap();
    eventually_async("CA a follows CA b", || async {
        let p = peer().await;
        p["error"].is_null() && p["region"] == "b"
    })
    .await;
}
