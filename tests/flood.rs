//! Load and floods at every listener (issue 14, "Abuse and load"): many concurrent connections
//! through a sidecar pair, slow and half-open clients closed by their timeouts, malformed input
//! refused and counted, while legitimate clients keep being served. Real sockets on 127.0.0.1,
//! real TLS 1.3, certificates from our CA. The figures (10,000 connections, RSS, latency under a
//! flood) come from `benches/flood.rs` with real processes; these tests check the behaviour.

// Certificates for the peers under test are minted against the wall clock the sidecars run on
// (`Clock::system()`), so this file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use trustline::clock::Clock;
use trustline::svid::ca_client::CaClient;

/// How long a test gives a server to close what its timeouts say it must close.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

/// Waits until the server closes `s` (EOF or an error on read); how long it took. Panics after
/// `bound`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    bound: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after {bound:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue, // the server's flight, an alert or an error answer
        }
    }
}

/// The value of one metric series (exact name with labels) on a plain HTTP listener, 0 if absent.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let (status, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The sum of every series of `family` (a metric name) on a plain HTTP listener.
async fn metric_sum(admin: SocketAddr, family: &str) -> u64 {
    let (_, text) = http_get(admin, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(family))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// One real TLS 1.3 ClientHello, as a mesh client would send it.
fn client_hello() -> Vec<u8> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![trustline::tls::mesh::MESH_ALPN.to_vec()];
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("api").unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A CA with the default limits and a metrics listener.
async fn ca_with_metrics() -> Ca {
    let pki = Pki::new(TD);
    let config = trustline::ca::config::CaServeConfig {
        ca_dir: pki.region.clone(),
        data_dir: pki.dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl: Duration::from_secs(3600),
        san: vec![],
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        audit_log: None,
        bundle_endpoint: None,
        rate_limit: 0,
        limits: Default::default(),
        ledger: None,
        ledger_options: Default::default(),
        jwt_ttl: std::time::Duration::from_secs(300),
        agents: Vec::new(),
        file: None,
        peers: Default::default(),
    };
    let bound = trustline::ca::server::build(config, Clock::system())
        .await
        .expect("CA starts");
    Ca { pki, bound }
}

/// Sidecar B (`api`, inbound to an echo app allowing `web`, with `inbound_extra` after its
/// `[inbound]` table) and sidecar A (`web`, an explicit listener to B), both ready.
async fn pair_with_inbound(ca: &Ca, inbound_extra: &str) -> Pair {
    let app = echo_app().await;
    let b_sections = format!("{}{inbound_extra}\n", inbound(app, &[id("web")]));
    let b = start_ready(ca.sidecar_config("api", &b_sections).await).await;
    let to_b = listener("api", b.inbound.expect("inbound"), &[id("api")]);
    let a = start_ready(ca.sidecar_config("web", &to_b).await).await;
    Pair { a, b, app }
}

/// `n` connections to `entry` opened `parallel` at a time, each with one round trip, all held
/// open together; then each does a second round trip. Panics naming the first failure.
async fn hold_concurrent(entry: SocketAddr, n: usize, parallel: usize) -> Vec<TcpStream> {
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await.unwrap();
            let msg = format!("conn {i:06}");
            let mut s = TcpStream::connect(entry)
                .await
                .map_err(|e| format!("{i}: {e}"))?;
            match round_trip(&mut s, msg.as_bytes()).await {
                Ok(b) if b == msg.as_bytes() => Ok(s),
                Ok(b) => Err(format!("{i}: echoed {b:?}")),
                Err(e) => Err(format!("{i}: {e}")),
            }
        }));
    }
    let mut open = Vec::with_capacity(n);
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => open.push(s),
            Err(e) => panic!("a connection was not served: {e}"),
        }
    }
    for (i, s) in open.iter_mut().enumerate() {
        let msg = format!("again {i:06}");
        let back = round_trip(s, msg.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("held connection {i}: {e}"));
        assert_eq!(back, msg.as_bytes());
    }
    open
}

/// Regression: with pooling (the default) every connection to one destination was a stream on
/// one session, and h2 queues a stream over the destination's `max_concurrent_streams` without
/// bound: the connection after the limit hung, with no error and no metric. Now a full session
/// is retired (its streams go on) and another is dialled.
#[tokio::test]
async fn a_pair_carries_more_concurrent_connections_than_one_session_has_streams() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let pair = pair_with_inbound(&ca, "[inbound.sessions]\nmax_streams = 4\n").await;
    // The first session learns B's limit from its SETTINGS (until then h2 assumes 100).
    assert_eq!(call(pair.entry(), b"warm").await.unwrap(), b"warm");
    let open = hold_concurrent(pair.entry(), 13, 13).await;
    let sessions = pair.a.sessions.as_ref().expect("pooling");
    let established = sessions
        .established
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        established >= 4,
        "{established} sessions carried 13 concurrent streams of at most 4 each"
    );
    drop(open);
    assert!(failed_series(pair.a.admin).await.is_empty());
    assert!(failed_series(pair.b.admin).await.is_empty());
}

async fn concurrent_through_a_pair(n: usize) {
    // Four descriptors a connection in this one process: client, A's accepted, B's to the app,
    // the app's accepted (the A-to-B sessions carry many each).
    let limit = trustline::limits::raise_nofile_limit().expect("setrlimit");
    let need = 4 * n as u64 + 512;
    assert!(
        limit.now.is_none_or(|l| l >= need),
        "RLIMIT_NOFILE {:?} (hard {:?}) is below the {need} descriptors this test needs",
        limit.now,
        limit.hard
    );
    let ca = start_ca(Duration::from_secs(3600)).await;
    let pair = ca.pair().await;
    let open = hold_concurrent(pair.entry(), n, 128).await;
    assert_eq!(open.len(), n);
    assert_eq!(pair.a.active_connections(), n, "A holds every connection");
    drop(open);
    assert!(failed_series(pair.a.admin).await.is_empty());
    assert!(failed_series(pair.b.admin).await.is_empty());
}

/// Twice a session's default stream limit (1000), with the defaults: all served, no failure.
#[tokio::test]
async fn two_thousand_concurrent_connections_through_a_pair_are_all_served() {
    concurrent_through_a_pair(2_000).await;
}

/// The issue's 10,000 in one process: needs ~41,000 descriptors, above this machine's hard
/// limit of 20,000 (the bench runs each process under its own limit). Run where the hard limit
/// allows: `cargo test --release --test flood -- --ignored ten_thousand` (~1 min).
#[tokio::test]
#[ignore = "needs RLIMIT_NOFILE >= 41,000 in one process; benches/flood.rs measures 10,000 across processes"]
async fn ten_thousand_concurrent_connections_through_a_pair_are_all_served() {
    concurrent_through_a_pair(10_000).await;
}

/// At the inbound: TCP connections that never send, a ClientHello dripped a byte a second, and
/// ClientHellos followed by silence are each closed by `handshake_timeout` (default 10 s; 5 s in
/// the fixture), counted, and calls through the pair go on meanwhile.
#[tokio::test]
async fn slow_and_half_open_handshakes_at_the_inbound_are_closed_by_the_handshake_timeout() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let pair = ca.pair().await;
    let inbound = pair.b.inbound.unwrap();
    let hello = client_hello();
    let mut silent = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(inbound).await.unwrap());
        let mut s = TcpStream::connect(inbound).await.unwrap();
        s.write_all(&hello).await.unwrap();
        stalled.push(s);
    }
    let mut drip = TcpStream::connect(inbound).await.unwrap();
    let dripper = tokio::spawn(async move {
        for b in hello.iter() {
            if drip.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        drip
    });
    // Everyone else keeps being served during the flood.
    for i in 0..10 {
        let msg = format!("legit {i}");
        assert_eq!(
            call(pair.entry(), msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
    }
    let bound = CLOSE_BOUND;
    for s in silent.iter_mut() {
        closed_within(s, bound, "a silent connection").await;
    }
    for s in stalled.iter_mut() {
        closed_within(s, bound, "a stalled handshake").await;
    }
    let started = Instant::now();
    while !dripper.is_finished() {
        assert!(
            started.elapsed() < bound,
            "the dripped ClientHello is still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let timeouts = pair.b.metrics.failures("inbound", "handshake_timeout");
    assert!(timeouts >= 101, "{timeouts} handshake timeouts counted");
    assert_eq!(call(pair.entry(), b"after").await.unwrap(), b"after");
}

/// Garbage instead of TLS at the inbound, the CA API and the admin listener: refused, counted
/// where the listener counts refusals, and legitimate clients served meanwhile.
#[tokio::test]
async fn garbage_instead_of_tls_is_refused_and_counted_while_others_are_served() {
    let ca = ca_with_metrics().await;
    let pair = ca.pair().await;
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\xff\xff\x01\x00\xff\xfb garbage in a record header that lies",
        &[0u8; 600],
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
    ];
    let ca_api = ca.bound.api;
    let inbound = pair.b.inbound.unwrap();
    for round in 0..25 {
        for g in garbage {
            for addr in [inbound, ca_api] {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let _ = s.write_all(g).await;
                closed_within(&mut s, CLOSE_BOUND, &format!("garbage {round} at {addr}")).await;
            }
            let mut s = TcpStream::connect(pair.b.admin).await.unwrap();
            let _ = s.write_all(g).await;
            let _ = s.write_all(b"\r\n\r\n").await;
            closed_within(&mut s, CLOSE_BOUND, "garbage at the admin listener").await;
        }
        if round % 5 == 0 {
            let msg = format!("legit {round}");
            assert_eq!(
                call(pair.entry(), msg.as_bytes()).await.unwrap(),
                msg.as_bytes()
            );
            assert_eq!(ca.issue(&id("db")).await.id(), &id("db"));
        }
    }
    let inbound_refused = metric_sum(pair.b.admin, "trustline_connections_failed").await;
    assert!(
        inbound_refused >= 100,
        "{inbound_refused} refusals counted at the inbound: {:?}",
        failed_series(pair.b.admin).await
    );
    let metrics = ca.bound.metrics.expect("metrics listener");
    let ca_refused = metric(
        metrics,
        "trustline_ca_connections_refused_total{reason=\"handshake_failed\"}",
    )
    .await;
    assert!(
        ca_refused >= 100,
        "{ca_refused} refused handshakes counted at the CA"
    );
    assert_eq!(http_get(pair.b.admin, "/healthz").await.0, 200);
    assert_eq!(call(pair.entry(), b"after").await.unwrap(), b"after");
}

/// Bad CSRs at rate (16 at a time, 400 in all, over renewal mTLS so no token is spent): each
/// answered 400 and counted, and issuance for others goes on.
#[tokio::test]
async fn bad_csrs_at_rate_are_answered_400_and_counted_while_issuance_goes_on() {
    let ca = ca_with_metrics().await;
    let web = Arc::new(ca.issue(&id("web")).await);
    let url = ca.url();
    let bundle = ca.pki.bundle();
    let bodies: Vec<Vec<u8>> = vec![
        b"not a CSR".to_vec(),
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_vec(),
        vec![0x30; 4000],
        vec![b'A'; 64 << 10], // over the 16 KiB body cap
    ];
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..400 {
        let (gate, web, url, bundle) = (gate.clone(), web.clone(), url.clone(), bundle.clone());
        let body = bodies[i % bodies.len()].clone();
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await.unwrap();
            bad_csr(&url, bundle, &web, body).await
        }));
    }
    // Legitimate issuance during the flood.
    for n in 0..5 {
        let who = id(&format!("legit-{n}"));
        assert_eq!(ca.issue(&who).await.id(), &who);
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    let refused: u64 = statuses
        .iter()
        .filter(|(s, _)| **s == 400 || **s == 413)
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(refused, 400, "answers to bad CSRs: {statuses:?}");
    let metrics = ca.bound.metrics.expect("metrics listener");
    let counted = metric_sum(
        metrics,
        "trustline_ca_svid_requests_total{outcome=\"bad_request\"}",
    )
    .await
        + metric_sum(
            metrics,
            "trustline_ca_svid_requests_total{outcome=\"too_large\"}",
        )
        .await;
    assert_eq!(counted, 400, "{:?}", http_get(metrics, "/metrics").await.1);
}

/// POSTs `body` as a CSR over mTLS with `svid`; the HTTP status.
async fn bad_csr(
    url: &str,
    bundle: trustline::identity::Bundle,
    svid: &trustline::identity::Svid,
    body: Vec<u8>,
) -> u16 {
    let client = CaClient::new(url, bundle, Clock::system()).unwrap();
    let tls = client.tls_config(Some(svid)).unwrap();
    let addr: SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS to the CA");
    let head = format!(
        "POST /v1/svid HTTP/1.1\r\nHost: ca\r\nContent-Type: application/pkcs10\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&body).await; // the CA may answer 413 and close before the end
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut answer)).await;
    std::str::from_utf8(answer.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// How many requests B's policy refused as `bad-request` (before any rule could decide).
fn bad_requests(b: &trustline::proxy::Bound) -> u64 {
    b.authz
        .as_ref()
        .expect("policy configured")
        .metrics
        .decisions
        .get_or_create(&trustline::proxy::authz::RuleLabels {
            rule: trustline::policy::path::REFUSED.into(),
            outcome: "deny",
            mode: "enforced",
        })
        .get()
}

/// Regression: bytes hyper cannot parse as a request on an HTTP port were answered 400 by hyper
/// and counted nowhere (logged at debug only). Now they count as `bad-request` like a bad path,
/// and the port keeps serving.
#[tokio::test]
async fn unparseable_http_on_an_l7_port_is_answered_400_and_counted() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let policy = ca.pki.dir.path().join("api-policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[service.api]\nhttp_ports = [{port}]\n\n[[service.api.rule]]\nname = \"web\"\n\
             action = \"allow\"\nfrom = [\"{web}\"]\n",
            port = app.port(),
            web = id("web"),
        ),
    )
    .unwrap();
    let b = start_ready(
        ca.sidecar_config(
            "api",
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy:?}\n\
                 service = \"api\"\n\n"
            ),
        )
        .await,
    )
    .await;
    let to_b = listener("api", b.inbound.unwrap(), &[id("api")]);
    let a = start_ready(ca.sidecar_config("web", &to_b).await).await;
    let bad: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/9.9\r\nHost: api\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: api\r\nBad Header Line\r\n\r\n",
        b"\x00\x01\x02\x03 binary\r\n\r\n",
    ];
    for (i, req) in bad.iter().enumerate() {
        let mut s = TcpStream::connect(a.listeners[0]).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, s.read_to_end(&mut answer))
            .await
            .expect("an answer and a close")
            .ok();
        let head = String::from_utf8_lossy(&answer);
        assert!(head.starts_with("HTTP/1.1 400"), "request {i}: {head:?}");
    }
    eventually("every unparseable request is counted", || {
        bad_requests(&b) == bad.len() as u64
    })
    .await;
    // A good request still goes through (the echo app answers nothing HTTP, so a timeout or a
    // 502 is an answer from the app side: what matters is that it was not refused).
    let mut s = TcpStream::connect(a.listeners[0]).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    assert_eq!(
        bad_requests(&b),
        bad.len() as u64,
        "a good request was refused"
    );
}

/// A UDP relay in front of `to` that forwards the client's first `pass` datagrams and nothing
/// after, in either direction: a QUIC client that goes silent mid-handshake.
async fn silent_after(to: SocketAddr, pass: usize) -> SocketAddr {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut sent = 0;
        while let Ok((n, _)) = front.recv_from(&mut buf).await {
            if sent < pass {
                let _ = back.send_to(&buf[..n], to).await;
                sent += 1;
            }
        }
    });
    addr
}

/// The QUIC client config of a workload of region a (its SVID passes the gateway's client
/// certificate check).
async fn tunnel_client(lab: &trustline::lab::Lab) -> quinn::ClientConfig {
    use trustline::tls::{ExpectedPeer, SpiffeServerVerifier};
    let name = format!("spiffe://{}/ns/shop/sa/probe", trustline::lab::TD);
    let id = trustline::identity::parse_workload_id(&name).unwrap();
    let pem = std::fs::read(lab.bundle()).unwrap();
    let bundle = trustline::identity::Bundle::from_pem(lab.td.clone(), &pem, "bundle").unwrap();
    let client = CaClient::new(
        &format!("https://{}", lab.region("a").ca.api),
        bundle.clone(),
        Clock::system(),
    )
    .unwrap();
    let svid = client
        .issue_with_token(&id, &lab.token("a", &name).await.unwrap())
        .await
        .unwrap();
    let verifier = SpiffeServerVerifier::new(
        bundle.store(),
        ExpectedPeer::AnyOf(vec![trustline::tunnel::gateway_id(&lab.td, "a")]),
    );
    let tls = rustls::ClientConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
        .unwrap();
    trustline::tunnel::quic_client(tls, Default::default()).unwrap()
}

async fn tunnel_connect(
    cfg: quinn::ClientConfig,
    via: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.connect_with(cfg, via, "gateway").unwrap().await
}

fn counted(
    family: &prometheus_client::metrics::family::Family<
        trustline::tunnel::metrics::Refused,
        prometheus_client::metrics::counter::Counter,
    >,
    reason: &'static str,
) -> u64 {
    family
        .get_or_create(&trustline::tunnel::metrics::Refused { reason })
        .get()
}

/// At a gateway's QUIC listener: handshakes that go silent after the client's first flight are
/// dropped by the idle timeout (1.5 s) and, a regression, now counted in
/// `trustline_tunnel_failed_handshakes{reason="handshake_timeout"}` (they were logged at debug
/// only); a stream opened with a partial header is reset after `HEADER_TIMEOUT` (5 s) and
/// counted; garbage datagrams are dropped by QUIC; a tunnel client is served meanwhile.
#[tokio::test]
async fn half_open_quic_and_silent_streams_at_a_gateway_are_closed_by_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = trustline::lab::Lab::new(
        dir.path(),
        trustline::lab::LabOptions {
            one_way_delay: Duration::from_millis(5),
            gateways: 1,
            ..Default::default()
        },
    )
    .await
    .expect("lab");
    lab.start_gateways(
        "a",
        "[[rule]]\nname = \"a-out\"\nfrom = [\"a\"]\nto = [\"b\"]\nservices = [\"*\"]\n",
    )
    .await
    .expect("gateway a");
    let gw_addr = lab.region("a").gateway_addrs[0];
    // Garbage datagrams: QUIC drops what does not parse, without state.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let mut d = vec![0xc3u8; 1200];
        d[1..5].copy_from_slice(&i.to_be_bytes());
        junk.send_to(&d, gw_addr).unwrap();
    }
    // Ten clients that send their Initial and go silent.
    let cfg = tunnel_client(&lab).await;
    let mut half_open = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let via = silent_after(gw_addr, 1).await;
        half_open.spawn(tunnel_connect(cfg.clone(), via));
    }
    // A legitimate client is served, and a stream with a partial header is reset in time.
    let conn = tunnel_connect(cfg, gw_addr).await.expect("a real client");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"TL").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    match tokio::time::timeout(CLOSE_BOUND, recv.read(&mut buf)).await {
        Ok(Err(quinn::ReadError::Reset(code))) => {
            assert_eq!(
                code.into_inner(),
                trustline::tunnel::code::BAD_HEADER as u64
            )
        }
        other => panic!("expected a reset of the silent stream, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "reset before the header timeout"
    );
    assert!(
        conn.close_reason().is_none(),
        "the tunnel connection stays open"
    );
    let ended = tokio::time::timeout(CLOSE_BOUND, half_open.join_all())
        .await
        .expect("half-open handshakes end");
    assert!(ended.iter().all(Result::is_err));
    let gw = lab.region("a").gateways[0].as_ref().unwrap();
    eventually("the half-open handshakes are counted", || {
        counted(&gw.metrics.failed_handshakes, "handshake_timeout") >= 10
    })
    .await;
    assert_eq!(counted(&gw.metrics.refused, "header_timeout"), 1);
}
