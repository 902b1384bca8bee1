//! Bounded under abuse: every listener closes what it should not keep (idle, dripping, over a
//! cap), every client gives up on a peer that never answers, and while one client floods, the
//! others keep being served. Real sockets on 127.0.0.1, real TLS 1.3, certificates from our CA.

// Certificates for the peers under test are minted against the wall clock the sidecars run on
// (`Clock::system()`), so this file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trustline::ca::config::{CaLimits, CaServeConfig};
use trustline::clock::Clock;
use trustline::svid::ca_client::CaClient;

/// How long a test gives a server to close what its limits say it must close.
const CLOSE_BOUND: Duration = Duration::from_secs(15);

/// A CA with `limits` and a metrics listener.
async fn start_ca_limited(limits: CaLimits) -> Ca {
    let pki = Pki::new(TD);
    let config = CaServeConfig {
        ca_dir: pki.region.clone(),
        data_dir: pki.dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl: Duration::from_secs(3600),
        san: vec![],
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        audit_log: None,
        bundle_endpoint: None,
        rate_limit: 0,
        limits,
        ledger: None,
        ledger_options: Default::default(),
        peers: Default::default(),
        jwt_ttl: Duration::from_secs(300),
        agents: Vec::new(),
        file: None,
    };
    let bound = trustline::ca::server::build(config, Clock::system())
        .await
        .expect("CA starts");
    Ca { pki, bound }
}

/// A TLS 1.3 connection to the CA without a client certificate, handshake done.
async fn anonymous_tls(ca: &Ca) -> tokio_rustls::client::TlsStream<TcpStream> {
    let client = CaClient::new(&ca.url(), ca.pki.bundle(), Clock::system()).unwrap();
    let tcp = TcpStream::connect(ca.bound.api).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(client.tls_config(None).unwrap())
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the CA")
}

/// Waits until the server closes `s` (EOF or an error on read); panics after `bound`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, bound: Duration, what: &str) {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after {bound:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue, // an error answer before the close
        }
    }
}

/// The value of one metric series (exact name with labels) on an admin listener, 0 if absent.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let (status, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn idle_and_dripping_ca_connections_are_closed_while_issuance_goes_on() {
    let ca = start_ca_limited(CaLimits {
        header_read_timeout: Duration::from_secs(1),
        ..CaLimits::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(anonymous_tls(&ca).await);
    }
    // One client drips a request line, a byte at a time, never finishing its headers.
    let mut drip = anonymous_tls(&ca).await;
    let dripping = Arc::new(AtomicBool::new(true));
    let still = dripping.clone();
    let dripper = tokio::spawn(async move {
        for b in b"GET /v1/bundle HTTP/1.1\r\nHost: ca\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if !still.load(Ordering::Relaxed) || drip.write_all(&[*b]).await.is_err() {
                return drip;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        unreachable!()
    });
    // Everyone else keeps being served during the flood.
    let svid = ca.issue(&id("web")).await;
    assert_eq!(svid.id(), &id("web"));
    for (n, s) in idle.iter_mut().enumerate() {
        closed_within(s, CLOSE_BOUND, &format!("idle connection {n}")).await;
    }
    let started = Instant::now();
    let mut drip = loop {
        if dripper.is_finished() {
            break dripper.await.unwrap();
        }
        assert!(
            started.elapsed() < CLOSE_BOUND,
            "the dripping connection is still open after {CLOSE_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    dripping.store(false, Ordering::Relaxed);
    closed_within(&mut drip, CLOSE_BOUND, "the dripping connection").await;
    let metrics = ca.bound.metrics.expect("metrics listener");
    let timeouts = metric(
        metrics,
        "trustline_ca_connections_refused_total{reason=\"header_timeout\"}",
    )
    .await;
    assert!(timeouts >= 21, "{timeouts} header timeouts counted");
}

#[tokio::test]
async fn the_ca_refuses_connections_over_its_per_client_cap_with_a_metric() {
    let ca = start_ca_limited(CaLimits {
        max_connections_per_client: 4,
        ..CaLimits::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(anonymous_tls(&ca).await);
    }
    // The fifth from the same address is closed at once, before any TLS.
    let mut fifth = TcpStream::connect(ca.bound.api).await.unwrap();
    closed_within(&mut fifth, CLOSE_BOUND, "the fifth connection").await;
    let metrics = ca.bound.metrics.expect("metrics listener");
    let series = "trustline_ca_connections_refused_total{reason=\"max_connections_per_client\"}";
    assert_eq!(metric(metrics, series).await, 1);
    // A place freed is a place for the next client.
    drop(held.pop());
    eventually_async("a freed place admits a renewal", || async {
        let client = CaClient::new(&ca.url(), ca.pki.bundle(), Clock::system()).unwrap();
        client
            .issue_with_token(&id("web"), &ca.token(&id("web")).await)
            .await
            .is_ok()
    })
    .await;
}

/// A TCP front for the CA: it accepts and holds every connection without a byte back until
/// [`Front::open`], then forwards new connections to the CA (the held ones stay stuck).
struct Front {
    addr: SocketAddr,
    forward: Arc<AtomicBool>,
}

impl Front {
    async fn start(ca: SocketAddr) -> Front {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let forward = Arc::new(AtomicBool::new(false));
        let fwd = forward.clone();
        tokio::spawn(async move {
            let mut stuck = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                if !fwd.load(Ordering::Relaxed) {
                    stuck.push(s);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(ca).await {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    }
                });
            }
        });
        Front { addr, forward }
    }

    fn open(&self) {
        self.forward.store(true, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_ca_that_accepts_and_never_answers_does_not_freeze_renewal_or_revocation_refresh() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let front = Front::start(ca.bound.api).await;
    let token_file = ca.pki.dir.path().join("web.token");
    std::fs::write(&token_file, ca.token(&id("web")).await).unwrap();
    let identity = format!(
        "source = \"ca\"\nca_url = \"https://{}\"\ntoken_file = {token_file:?}\nrefresh_interval = \"200ms\"",
        front.addr
    );
    let app = echo_app().await;
    let cfg = ca.config_file(
        "web",
        &ca.pki.region.join("bundle.pem"),
        &identity,
        &inbound(app, &[]),
    );
    let sidecar = start(cfg).await;
    // Both the first issuance and the first revocation fetch are now stuck on the front.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sidecar.identity.ready().is_err());
    front.open();
    let bound = Duration::from_secs(40);
    let started = Instant::now();
    while sidecar.identity.ready().is_err() {
        assert!(
            started.elapsed() < bound,
            "no SVID {bound:?} after the CA became reachable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = ca.issue(&id("db")).await;
    ca.revoke(&other.info.serial).await;
    while !sidecar.identity.revoked.load().contains(&other.info.serial) {
        assert!(
            started.elapsed() < bound,
            "the revocation list did not refresh within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refreshed = metric(
        sidecar.admin,
        "trustline_revocation_list_refreshed_timestamp_seconds",
    )
    .await;
    assert!(refreshed > 1_700_000_000, "refresh time {refreshed}");
}

/// A raw multiplexed session to a sidecar's inbound as `cred`: the HTTP/2 client half, and the
/// task driving the connection (it ends when the sidecar closes the session).
async fn raw_session(
    ca: &Ca,
    inbound: SocketAddr,
    cred: Cred,
) -> Result<
    (
        h2::client::SendRequest<bytes::Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ),
    String,
> {
    let cfg = client_config(&ca.pki.bundle(), &id("api"), Some(cred));
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![trustline::proxy::session::SESSION_ALPN.to_vec()];
    let tcp = TcpStream::connect(inbound)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("api").unwrap(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (send, conn) = tokio::time::timeout(PATIENCE, h2::client::handshake(tls))
        .await
        .map_err(|_| "no HTTP/2 settings".to_string())?
        .map_err(|e| format!("HTTP/2: {e}"))?;
    let driver = tokio::spawn(conn);
    // The first stream proves the session is served (a refused session is closed at once).
    let mut probe = send.clone().ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("127.0.0.1:1")
        .body(())
        .unwrap();
    let (resp, mut stream) = probe.send_request(req, false).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(PATIENCE, resp)
        .await
        .map_err(|_| "no answer to a stream".to_string())?
        .map_err(|e| format!("stream: {e}"))?;
    stream.send_reset(h2::Reason::CANCEL);
    if resp.status() != 200 && resp.status() != 403 {
        return Err(format!("answered {}", resp.status()));
    }
    Ok((send, driver))
}

/// A sidecar `api` whose inbound (to an echo app) allows `web` and `db`, with
/// `[inbound.sessions]` settings `sessions`.
async fn api_with_sessions(ca: &Ca, sessions: &str) -> trustline::proxy::Bound {
    let app = echo_app().await;
    let section = format!(
        "{}[inbound.sessions]\n{sessions}\n\n",
        inbound(app, &[id("web"), id("db")])
    );
    start_ready(ca.sidecar_config("api", &section).await).await
}

/// A sidecar `api` under a policy that admits `db` only in a one-minute window two hours from
/// now: `db` gets a session (some stream could be admitted), and every stream of it now is
/// denied.
async fn api_admitting_db_later(ca: &Ca, sessions: &str) -> trustline::proxy::Bound {
    let app = echo_app().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start = (now / 60 + 120) * 60;
    let hhmm = |s: u64| format!("{:02}:{:02}", s % 86400 / 3600, s % 3600 / 60);
    let policy = ca.pki.dir.path().join("api-policy.toml");
    let rules = format!(
        "[service.api]\n\n[[service.api.rule]]\nname = \"db-later\"\naction = \"allow\"\n\
         from = [\"{db}\"]\nhours = [\"Mon-Sun {a}-{b} UTC\"]\n",
        db = id("db"),
        a = hhmm(start),
        b = hhmm(start + 60),
    );
    std::fs::write(&policy, rules).unwrap();
    let section = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy:?}\n\
         service = \"api\"\n\n[inbound.sessions]\n{sessions}\n\n"
    );
    start_ready(ca.sidecar_config("api", &section).await).await
}

#[tokio::test]
async fn sessions_from_one_caller_beyond_its_cap_are_refused_and_others_still_get_one() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let api = api_with_sessions(&ca, "max_per_caller = 2").await;
    let inbound = api.inbound.unwrap();
    let web = ca.issue(&id("web")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            raw_session(&ca, inbound, Cred::from(&web))
                .await
                .expect("a session within the cap"),
        );
    }
    let third = raw_session(&ca, inbound, Cred::from(&web)).await;
    assert!(third.is_err(), "a third session of one caller was served");
    assert_eq!(api.metrics.failures("inbound", "session_cap_caller"), 1);
    // Another caller is not held to web's cap.
    let db = ca.issue(&id("db")).await;
    raw_session(&ca, inbound, Cred::from(&db))
        .await
        .expect("another caller's session");
    // A session closed frees its place.
    drop(held.pop());
    eventually_async("a freed place admits a new session", || async {
        raw_session(&ca, inbound, Cred::from(&web)).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn an_idle_session_is_closed() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let api = api_with_sessions(&ca, "idle_timeout = \"1s\"").await;
    let web = ca.issue(&id("web")).await;
    let (send, driver) = raw_session(&ca, api.inbound.unwrap(), Cred::from(&web))
        .await
        .expect("a session");
    let ended = tokio::time::timeout(CLOSE_BOUND, driver).await;
    assert!(
        ended.is_ok(),
        "an idle session is still open after {CLOSE_BOUND:?}"
    );
    drop(send);
}

#[tokio::test]
async fn a_reset_flood_ends_that_session_and_other_callers_keep_working() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let pair = ca.pair().await;
    let inbound = pair.b.inbound.unwrap();
    let web = ca.issue(&id("web")).await;
    let (send, mut driver) = raw_session(&ca, inbound, Cred::from(&web))
        .await
        .expect("a session");
    // Each stream is admitted (the app is connected for it), then reset at once.
    let mut sent = 0;
    let flood = async {
        loop {
            let Ok(mut s) = send.clone().ready().await else {
                return;
            };
            let req = hyper::Request::builder()
                .method(hyper::Method::CONNECT)
                .uri(pair.app.to_string())
                .body(())
                .unwrap();
            let Ok((resp, mut stream)) = s.send_request(req, false) else {
                return;
            };
            let _ = resp.await;
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
            assert!(sent < 5000, "the session took {sent} reset streams");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("the flooded session ended");
    let ended = tokio::time::timeout(CLOSE_BOUND, &mut driver).await;
    assert!(ended.is_ok(), "the flooded session is still open");
    assert_eq!(pair.b.metrics.failures("inbound", "session_reset_flood"), 1);
    // Everyone else keeps being served, the flooder's own identity included (new session).
    assert_eq!(
        call(pair.entry(), b"still here").await.unwrap(),
        b"still here"
    );
}

#[tokio::test]
async fn a_caller_denied_stream_after_stream_has_its_session_closed_after_a_budget() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let api = api_admitting_db_later(&ca, "max_denied_streams = 8").await;
    let db = ca.issue(&id("db")).await; // admitted by the policy, but not at this hour
    let (send, mut driver) = raw_session(&ca, api.inbound.unwrap(), Cred::from(&db))
        .await
        .expect("a session");
    let mut denied = 1; // the probe stream of raw_session
    let flood = async {
        while let Ok(mut s) = send.clone().ready().await {
            let req = hyper::Request::builder()
                .method(hyper::Method::CONNECT)
                .uri("127.0.0.1:1")
                .body(())
                .unwrap();
            let Ok((resp, _stream)) = s.send_request(req, false) else {
                return;
            };
            match resp.await {
                Ok(r) if r.status() == 403 => denied += 1,
                _ => return,
            }
            assert!(denied < 1000, "{denied} streams denied on one session");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the session ended");
    assert!(
        denied <= 8,
        "{denied} denials (and audit and log lines) on one session"
    );
    assert!(tokio::time::timeout(CLOSE_BOUND, &mut driver).await.is_ok());
    assert_eq!(api.metrics.failures("inbound", "session_denied_budget"), 1);
}

#[tokio::test]
async fn an_oversized_header_list_on_a_session_stream_is_not_served() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let api = api_with_sessions(&ca, "").await;
    let web = ca.issue(&id("web")).await;
    let (send, _driver) = raw_session(&ca, api.inbound.unwrap(), Cred::from(&web))
        .await
        .expect("a session");
    let mut s = send.ready().await.expect("session ready");
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("127.0.0.1:1")
        .header("x-pad", "a".repeat(64 << 10))
        .body(())
        .unwrap();
    let served = match s.send_request(req, false) {
        Err(_) => false, // the client already knows the sidecar's limit
        Ok((resp, _stream)) => match tokio::time::timeout(PATIENCE, resp).await {
            Ok(Ok(r)) => matches!(r.status().as_u16(), 200 | 403),
            Ok(Err(_)) => false,
            Err(_) => panic!("no answer to an oversized header list"),
        },
    };
    assert!(!served, "a 64 KiB header list was decided on");
}

#[tokio::test]
async fn an_admin_connection_that_sends_nothing_is_closed() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let api = start_ready(ca.sidecar_config("api", &inbound(app, &[])).await).await;
    let mut idle = TcpStream::connect(api.admin).await.unwrap();
    closed_within(
        &mut idle,
        Duration::from_secs(30),
        "an idle admin connection",
    )
    .await;
    // The listener still answers.
    assert_eq!(http_get(api.admin, "/healthz").await.0, 200);
}
