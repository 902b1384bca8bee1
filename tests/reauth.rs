//! Re-authentication of a live session (`POST /.trustline/reauth`), from a raw session client
//! against a real sidecar: real sockets on 127.0.0.1, real TLS 1.3, certificates from our CA.
//! A good proof moves the session's limit to the new certificate (so its streams outlive the
//! first one); a forged one is refused, counted under its reason, and the session is then cut
//! at the old certificate's expiry; revocation still cuts at once.

// Certificates for the peers under test are minted against the wall clock the sidecars run on
// (`Clock::system()`), so this file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use trustline::proxy::session::reauth::{self, Exporter, Proof, Role, REAUTH_URI};
use trustline::proxy::Bound;

/// The lifetime of the certificate a test session is opened with.
const SHORT: Duration = Duration::from_secs(4);
const HOUR: Duration = Duration::from_secs(3600);

/// A raw session to `inbound` as `cred`: its HTTP/2 handle and its TLS exporter value.
async fn session(
    ca: &Ca,
    inbound: SocketAddr,
    cred: Cred,
) -> (h2::client::SendRequest<Bytes>, Exporter) {
    let mut cfg = (*client_config(&ca.pki.bundle(), &id("api"), Some(cred))).clone();
    cfg.alpn_protocols = vec![trustline::proxy::session::SESSION_ALPN.to_vec()];
    let tcp = TcpStream::connect(inbound).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("api").unwrap(), tcp)
        .await
        .expect("TLS");
    let exporter = reauth::exporter(tls.get_ref().1).expect("exporter");
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2");
    tokio::spawn(conn);
    (send, exporter)
}

/// A `CONNECT` stream through the session to the echo app, checked with one round trip.
async fn open_stream(
    send: &h2::client::SendRequest<Bytes>,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let mut s = send.clone().ready().await.expect("ready");
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("127.0.0.1:1")
        .body(())
        .unwrap();
    let (resp, mut out) = s.send_request(req, false).expect("stream");
    let resp = tokio::time::timeout(PATIENCE, resp)
        .await
        .expect("answer")
        .expect("stream answered");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    assert!(echoes(&mut out, &mut body, "first").await, "no echo");
    (out, body)
}

/// Whether `msg` comes back on the stream.
async fn echoes(out: &mut h2::SendStream<Bytes>, body: &mut h2::RecvStream, msg: &str) -> bool {
    if out.send_data(Bytes::from(msg.to_string()), false).is_err() {
        return false;
    }
    let mut got = Vec::new();
    while got.len() < msg.len() {
        match tokio::time::timeout(PATIENCE, body.data()).await {
            Ok(Some(Ok(d))) => {
                let _ = body.flow_control().release_capacity(d.len());
                got.extend_from_slice(&d);
            }
            Ok(_) => return false,
            Err(_) => panic!("the stream was left hanging"),
        }
    }
    got == msg.as_bytes()
}

/// Sends `body` as a re-authentication; the status and the answer's body.
async fn reauthenticate(send: &h2::client::SendRequest<Bytes>, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut s = send.clone().ready().await.expect("ready");
    let req = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(REAUTH_URI)
        .body(())
        .unwrap();
    let (resp, mut out) = s.send_request(req, false).expect("stream");
    // A body over the limit may be refused before all of it is sent.
    let _ = out.send_data(Bytes::from(body), true);
    let resp = tokio::time::timeout(PATIENCE, resp)
        .await
        .expect("answer")
        .expect("answered");
    let status = resp.status().as_u16();
    let mut got = Vec::new();
    let mut b = resp.into_body();
    while let Some(Ok(d)) = b.data().await {
        got.extend_from_slice(&d);
    }
    (status, got)
}

/// `cred` as the signing key rustls holds.
fn key(cred: &Cred) -> CertifiedKey {
    CertifiedKey::from_der(
        cred.chain.clone(),
        cred.key.clone_key(),
        &trustline::crypto::provider(),
    )
    .expect("key matches")
}

fn proof(cred: &Cred, exporter: &Exporter) -> Proof {
    reauth::sign(&key(cred), Role::Client, exporter).expect("signed")
}

/// Sidecar `api` with an inbound to an echo app that allows `web`.
async fn api(ca: &Ca) -> Bound {
    let cfg = ca
        .sidecar_config("api", &inbound(echo_app().await, &[id("web")]))
        .await;
    start_ready(cfg).await
}

/// Waits until the stream is closed by the sidecar, within `bound`.
async fn cut_within(
    out: &mut h2::SendStream<Bytes>,
    body: &mut h2::RecvStream,
    bound: Duration,
) -> Duration {
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while echoes(out, body, &format!("ping {n}")).await {
        assert!(
            started.elapsed() < bound,
            "the stream still carries traffic after {bound:?}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn a_reauthenticated_session_outlives_its_first_certificate_until_revoked() {
    let ca = start_ca(HOUR).await;
    let b = api(&ca).await;
    let first = ca.pki.leaf(&id("web"), SystemTime::now(), SHORT);
    let (send, exporter) = session(&ca, b.inbound.unwrap(), first).await;
    let (mut out, mut body) = open_stream(&send).await;
    let renewed = ca.issue(&id("web")).await;
    let cred = Cred::from(&renewed);
    let (status, answer) = reauthenticate(&send, proof(&cred, &exporter).encode()).await;
    assert_eq!(status, 200, "a good proof was refused");
    // The sidecar proves its own SVID for this session, as a server.
    let theirs = Proof::decode(&answer).expect("the sidecar's proof");
    let region = trustline::identity::region_of_chain(&theirs.chain);
    theirs
        .accept(
            Role::Server,
            &exporter,
            &id("api"),
            region.as_ref(),
            &ca.pki.td,
        )
        .expect("the sidecar's proof verifies");
    assert!(
        theirs.check_signature(Role::Client, &exporter).is_err(),
        "a server's proof passes as a client's"
    );
    // Past the first certificate's expiry (and B's sweep at it), the stream still carries.
    tokio::time::sleep(SHORT + Duration::from_millis(1500)).await;
    assert!(
        echoes(&mut out, &mut body, "after the first expiry").await,
        "the re-authenticated session was cut at its first certificate's expiry"
    );
    assert_eq!(
        b.metrics
            .closed_live_count("inbound", "expired_certificate"),
        0
    );
    // Revoking the certificate it now rests on cuts it at once.
    ca.revoke(&renewed.info.serial).await;
    cut_within(&mut out, &mut body, PATIENCE).await;
    // The session, and its stream unless the session's end dropped it first.
    eventually("B closed the session as revoked", || {
        b.metrics.closed_live_count("inbound", "revoked") >= 1
    })
    .await;
}

#[tokio::test]
async fn a_forged_reauthentication_is_refused_and_the_session_ends_at_its_old_expiry() {
    let ca = start_ca(HOUR).await;
    let b = api(&ca).await;
    let first = ca.pki.leaf(&id("web"), SystemTime::now(), SHORT);
    let (send, exporter) = session(&ca, b.inbound.unwrap(), first).await;
    let (mut out, mut body) = open_stream(&send).await;
    let svid = ca.issue(&id("web")).await;
    let renewed = Cred::from(&svid);
    let refused = |reason: &'static str| b.metrics.failures("inbound", reason);
    let expect = |status: u16, reason: &'static str, before: u64, got: (u16, Vec<u8>)| {
        assert_eq!(got.0, status, "{reason}: answered {}", got.0);
        assert_eq!(refused(reason), before + 1, "{reason} not counted");
    };

    // Another ID of the same trust domain, properly signed.
    let db = Cred::from(&ca.issue(&id("db")).await);
    let before = refused("unexpected_identity");
    let got = reauthenticate(&send, proof(&db, &exporter).encode()).await;
    expect(403, "unexpected_identity", before, got);

    // web's new chain, signed with another key.
    let other = ca.pki.leaf(&id("web"), SystemTime::now(), HOUR);
    let mut p = proof(&other, &exporter);
    p.chain = renewed.chain.clone();
    let before = refused("bad_signature");
    let got = reauthenticate(&send, p.encode()).await;
    expect(403, "bad_signature", before, got);

    // A proof made for another session of the same caller (a replay).
    let (_send2, exporter2) = session(&ca, b.inbound.unwrap(), Cred::from(&svid)).await;
    assert_ne!(exporter, exporter2);
    let before = refused("bad_signature");
    let got = reauthenticate(&send, proof(&renewed, &exporter2).encode()).await;
    expect(403, "bad_signature", before, got);

    // The same ID from a CA of another PKI (`trustline ca init` again): not trusted.
    let twin = Pki::new(TD).leaf(&id("web"), SystemTime::now(), HOUR);
    let got = reauthenticate(&send, proof(&twin, &exporter).encode()).await;
    assert_eq!(got.0, 403, "a chain of another CA was accepted");

    // More than the largest proof.
    let before = refused("reauth_malformed");
    let got = reauthenticate(&send, vec![0u8; 40 << 10]).await;
    expect(400, "reauth_malformed", before, got);

    // None of it moved the limit: the stream ends at the first certificate's expiry.
    cut_within(&mut out, &mut body, SHORT + PATIENCE).await;
    // The session, and its stream unless the session's end dropped it first.
    eventually("B closed the session at the old expiry", || {
        b.metrics
            .closed_live_count("inbound", "expired_certificate")
            >= 1
    })
    .await;
}

/// What a forging destination answers to a re-authentication, given the session's exporter.
type Forge = dyn Fn(&Exporter) -> Vec<u8> + Send + Sync;

/// A destination that is not a sidecar: it holds `cert` (for the handshake) and answers every
/// re-authentication with `forge(exporter)`; `CONNECT` streams are echoed.
async fn forging_destination(
    cert: Cred,
    forge: impl Fn(&Exporter) -> Vec<u8> + Send + Sync + 'static,
) -> SocketAddr {
    let mut cfg = rustls::ServerConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(trustline::crypto::TLS13_ONLY)
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)
        .expect("certificate and key match");
    cfg.alpn_protocols = vec![trustline::proxy::session::SESSION_ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let forge = Arc::new(forge);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, forge) = (acceptor.clone(), forge.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let exporter = reauth::exporter(tls.get_ref().1).expect("exporter");
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let ok = hyper::Response::builder().status(200).body(()).unwrap();
                    let Ok(mut send) = respond.send_response(ok, false) else {
                        continue;
                    };
                    if req.method() == hyper::Method::POST {
                        let _ = send.send_data(Bytes::from(forge(&exporter)), true);
                        continue;
                    }
                    let mut body = req.into_body();
                    tokio::spawn(async move {
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                            if send.send_data(d, false).is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
    });
    addr
}

/// The calling side refuses a destination's proof of another ID, or one made for another
/// session, and then closes its session, streams and all, at the destination's old expiry.
#[tokio::test]
async fn a_caller_refuses_a_forged_proof_from_the_destination_and_ends_at_its_old_expiry() {
    let ca = start_ca(HOUR).await;
    for forgery in ["another ID", "another session"] {
        let db = Cred::from(&ca.issue(&id("db")).await);
        let api = Cred::from(&ca.issue(&id("api")).await);
        let forge: Box<Forge> = match forgery {
            "another ID" => Box::new(move |e| server_proof(&db, e)),
            _ => Box::new(move |_| server_proof(&api, &[7; 32])),
        };
        let first = ca.pki.leaf(&id("api"), SystemTime::now(), SHORT);
        let dest = forging_destination(first, forge).await;
        let a = start_ready(
            ca.sidecar_config("web", &listener("api", dest, &[id("api")]))
                .await,
        )
        .await;
        let mut conn = TcpStream::connect(a.listeners[0]).await.unwrap();
        assert_eq!(round_trip(&mut conn, b"hello").await.unwrap(), b"hello");
        let pool = a.sessions.as_ref().expect("A pools");
        eventually(&format!("A refused the proof of {forgery}"), || {
            pool.reauth
                .refused
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        })
        .await;
        assert_eq!(
            pool.reauth
                .renewed
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        // Still carried until the destination's first certificate expires, then cut.
        let started = tokio::time::Instant::now();
        while round_trip(&mut conn, b"ping")
            .await
            .is_ok_and(|b| b == b"ping")
        {
            assert!(
                started.elapsed() < SHORT + PATIENCE,
                "{forgery}: the session outlived the destination's certificate"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            pool.closed_for_peer
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "{forgery}"
        );
    }
}

fn server_proof(cred: &Cred, exporter: &Exporter) -> Vec<u8> {
    reauth::sign(&key(cred), Role::Server, exporter)
        .expect("signed")
        .encode()
}
