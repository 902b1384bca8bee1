//! Time to first response byte of a new application connection across a 150 ms RTT link
//! (userspace WAN relay, 75 ms each way), for:
//!
//! - trustline **warm**: the caller's sidecar already holds a session to the destination
//!   sidecar (by default sessions are pre-opened; here the first call opens it); the new
//!   connection is a new stream.
//! - trustline **cold**: no session yet (it is dropped before each sample); the gateways'
//!   QUIC tunnels are up, as they always are. The session's mTLS handshake is paid once.
//! - plain **TCP + TLS 1.3** (rustls, same relay, TCP handshake emulated): the baseline.
//!
//! Each sample: connect to the local entry point, write 4 bytes, wait for the first byte of
//! the echo. Run: `cargo bench --bench cross_region_ttfb` (about 30 s).

// Benchmarks measure wall time and drive blocking clients outside tokio: the OS clock and
// thread sleeps are what they are for (clippy.toml bans them elsewhere).
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trustline::lab::{Lab, LabOptions, TD};
use trustline::wan::WanSpec;

#[path = "../tests/common/mod.rs"]
mod common;
use common::echo_app;

const ONE_WAY: Duration = Duration::from_millis(75);
const WARM: usize = 30;
const COLD: usize = 15;
const PLAIN: usize = 15;

/// First byte of the answer to 4 bytes, on any stream.
async fn first_byte<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("first byte");
}

async fn through_sidecar(entry: SocketAddr) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(entry).await.expect("connect");
    s.set_nodelay(true).unwrap();
    first_byte(&mut s).await;
    t.elapsed()
}

/// A TLS 1.3 echo server (rustls, our provider) behind a TCP WAN relay; returns the relay's
/// address and the client config.
async fn plain_tls() -> (
    SocketAddr,
    Arc<rustls::ClientConfig>,
    trustline::wan::RelayHandle,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let server = rustls::ServerConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let _ = tls.flush().await;
                    }
                }
            });
        }
    });
    let relay = trustline::wan::spawn_tcp(
        "127.0.0.1:0".parse().unwrap(),
        addr,
        WanSpec {
            delay: ONE_WAY,
            udp_loss: 0.0,
            seed: 1,
        },
    )
    .await
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (relay.local_addr(), Arc::new(client), relay)
}

async fn through_plain_tls(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Duration {
    let t = Instant::now();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS");
    first_byte(&mut tls).await;
    t.elapsed()
}

struct Row {
    name: &'static str,
    samples: Vec<Duration>,
}

fn report(rows: &mut [Row], rtt: Duration) {
    println!(
        "\n{:<34} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "new connection, first byte", "n", "median", "p90", "min", "median/RTT"
    );
    for r in rows.iter_mut() {
        r.samples.sort();
        let q = |f: f64| r.samples[((r.samples.len() - 1) as f64 * f).round() as usize];
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "{:<34} {:>7} {:>9} {:>9} {:>9} {:>9.2}",
            r.name,
            r.samples.len(),
            ms(q(0.5)),
            ms(q(0.9)),
            ms(r.samples[0]),
            q(0.5).as_secs_f64() / rtt.as_secs_f64()
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("cross_region_ttfb: bench");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut lab = Lab::new(
            dir.path(),
            LabOptions {
                one_way_delay: ONE_WAY,
                gateways: 1,
                ..Default::default()
            },
        )
        .await
        .expect("lab");
        let app = echo_app().await;
        let api = lab
            .sidecar(
                "b",
                "api",
                &format!(
                    "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\nallow = [\"spiffe://{TD}/ns/shop/sa/web\"]\n"
                ),
            )
            .await
            .unwrap();
        let api_addr = api.inbound.unwrap();
        lab.start_gateways(
            "b",
            &format!(
                "[[expose]]\nservice = \"api\"\naddresses = [\"{api_addr}\"]\n\n\
                 [[rule]]\nname = \"a-to-api\"\nfrom = [\"a\"]\nto = [\"b\"]\nservices = [\"api\"]\n"
            ),
        )
        .await
        .unwrap();
        lab.start_gateways(
            "a",
            "[[rule]]\nname = \"out\"\nfrom = [\"a\"]\nto = [\"b\"]\nservices = [\"*\"]\n",
        )
        .await
        .unwrap();
        lab.wait_paths_up().await.unwrap();
        let web = lab
            .sidecar(
                "a",
                "web",
                // `prewarm = false` continues the lab's [tunnel] table: no session is re-opened
                // behind the benchmark's back, so a dropped session makes the next one cold.
                &format!(
                    "prewarm = false\n\n[[service]]\nname = \"api\"\nregion = \"b\"\naddresses = [\"{api_addr}\"]\n\
                     spiffe_ids = [\"spiffe://{TD}/ns/shop/sa/api\"]\n\n\
                     [[listener]]\nlisten = \"127.0.0.1:0\"\nservice = \"api\"\n"
                ),
            )
            .await
            .unwrap();
        let entry = web.listeners[0];
        let pool = web.sessions.clone().unwrap();
        // Let the RTT estimate of the WAN path settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let gw_rtt = lab.region("a").gateways[0].as_ref().unwrap().peers["b"]
            .pick()
            .map(|(_, c)| c.rtt())
            .unwrap_or_default();
        let _ = through_sidecar(entry).await; // the first session (and TLS session tickets)
        let mut warm = Row {
            name: "trustline warm (session open)",
            samples: vec![],
        };
        for _ in 0..WARM {
            warm.samples.push(through_sidecar(entry).await);
        }
        let mut cold = Row {
            name: "trustline cold (new session)",
            samples: vec![],
        };
        for _ in 0..COLD {
            pool.forget_all();
            tokio::time::sleep(Duration::from_millis(50)).await;
            cold.samples.push(through_sidecar(entry).await);
        }
        let (plain_addr, plain_cfg, _relay) = plain_tls().await;
        let mut plain = Row {
            name: "plain TCP + TLS 1.3 (same relay)",
            samples: vec![],
        };
        for _ in 0..PLAIN {
            plain
                .samples
                .push(through_plain_tls(plain_addr, plain_cfg.clone()).await);
        }
        let rtt = ONE_WAY * 2;
        println!(
            "WAN: {} ms RTT emulated (relay {} ms each way); QUIC's own RTT estimate of the gateway path: {:.1} ms",
            rtt.as_millis(),
            ONE_WAY.as_millis(),
            gw_rtt.as_secs_f64() * 1e3
        );
        report(&mut [warm, cold, plain], rtt);
        println!("\ngoal: warm <= 1.1 RTT, cold <= 2.1 RTT");
    });
}
