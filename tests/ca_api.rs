//! The CA's HTTPS API end to end: real sockets on 127.0.0.1, real TLS 1.3, real certificates,
//! a manual clock for token expiry.

// Certificates for the peers under test are minted against the wall clock the sidecars run on
// (`Clock::system()`), so this file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime};

use hyper::StatusCode;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use trustline::ca::admin::{self, AdminRequest};
use trustline::ca::authority::{self, LeafUsage};
use trustline::ca::config::CaServeConfig;
use trustline::ca::server::{build, Bound};
use trustline::clock::Clock;
use trustline::identity::{
    inspect_cert, parse_trust_domain, parse_workload_id, Bundle, SpiffeId, Svid,
};
use trustline::svid::ca_client::{make_csr, CaClient, ClientError};
use x509_parser::extensions::{GeneralName, ParsedExtension};

struct Ca {
    dir: tempfile::TempDir,
    bound: Bound,
    client: CaClient,
    clock: Clock,
}

impl Ca {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    async fn token(&self, id: &str) -> String {
        admin::token(&self.bound.admin_socket, id, 900)
            .await
            .unwrap_or_else(|e| panic!("no token: {e}"))
    }

    async fn issue(&self, id: &str) -> Svid {
        let t = self.token(id).await;
        self.client
            .issue_with_token(&parse_workload_id(id).unwrap(), &t)
            .await
            .expect("issuance")
    }

    /// Posts a raw body with an optional token; returns status and JSON error code.
    async fn post(
        &self,
        body: &str,
        token: Option<&str>,
        svid: Option<&Svid>,
    ) -> (StatusCode, String) {
        let mut conn = self.client.connect(svid).await.expect("connect");
        let (status, body) = conn.post_csr(body, token).await.expect("request");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        (status, v["error"].as_str().unwrap_or_default().to_string())
    }
}

const TD: &str = "api.test";
const WEB: &str = "spiffe://api.test/ns/shop/sa/web";
const DB: &str = "spiffe://api.test/ns/shop/sa/db";

async fn start_with(rate_limit: u32) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let region = dir.path().join("eu");
    let td = parse_trust_domain(TD).unwrap();
    authority::init_root(&td, &root, Duration::from_secs(86400 * 365), false).unwrap();
    authority::init_intermediate(&root, "eu", &region, Duration::from_secs(86400 * 30), false)
        .unwrap();
    let clock = Clock::manual(SystemTime::now());
    let config = CaServeConfig {
        ca_dir: region,
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl: Duration::from_secs(3600),
        san: vec![],
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        audit_log: None,
        bundle_endpoint: None,
        rate_limit,
        peers: Default::default(),
        limits: Default::default(),
        ledger: None,
        ledger_options: Default::default(),
        jwt_ttl: std::time::Duration::from_secs(300),
        agents: Vec::new(),
        file: None,
    };
    let bound = build(config, clock.clone()).await.expect("CA starts");
    let bundle = Bundle::from_pem(
        td,
        &std::fs::read(root.join("bundle.pem")).unwrap(),
        "bundle",
    )
    .unwrap();
    let client = CaClient::new(&format!("https://{}", bound.api), bundle, clock.clone()).unwrap();
    Ca {
        dir,
        bound,
        client,
        clock,
    }
}

async fn start() -> Ca {
    start_with(0).await
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> x509_parser::certificate::X509Certificate<'a> {
    x509_parser::parse_x509_certificate(der.as_ref()).unwrap().1
}

#[tokio::test]
async fn token_issues_an_svid_built_from_the_ca_template() {
    let ca = start().await;
    let svid = ca.issue(WEB).await;
    assert_eq!(
        svid.chain.len(),
        2,
        "leaf then the regional intermediate, no root"
    );
    assert_eq!(svid.chain[1], ca.bound.state.authority.active().cert);
    let leaf = parse(&svid.chain[0]);
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names, vec![GeneralName::URI(WEB)]);
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let mut has_ski = false;
    let mut has_aki = false;
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(_) => has_ski = true,
            ParsedExtension::AuthorityKeyIdentifier(_) => has_aki = true,
            _ => {}
        }
    }
    assert!(has_ski && has_aki);
    let serial = leaf.tbs_certificate.raw_serial();
    assert!(serial[0] & 0x80 == 0, "serial must be positive");
    assert!(
        serial.len() >= 9,
        "serial carries at least 64 bits of entropy"
    );
    let now = trustline::clock::unix_secs(ca.clock.now()) as i64;
    assert_eq!(
        leaf.validity().not_before.timestamp(),
        now - trustline::identity::BACKDATE.as_secs() as i64
    );
    assert_eq!(leaf.validity().not_after.timestamp(), now + 3600);
    // The ledger recorded it.
    let issued = ca.bound.state.ledger.issued().await.unwrap();
    assert!(issued
        .iter()
        .any(|(s, r)| *s == svid.info.serial && r.spiffe_id == WEB));
}

/// Leaf serials begin with the issuance time, so the ledger appends them in key order, and keep
/// 88 bits from the CSPRNG after it.
#[tokio::test]
async fn leaf_serials_increase_and_end_in_88_random_bits() {
    let ca = start().await;
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new(WEB).unwrap();
    let now = ca.clock.now();
    let serials: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let issued = ca
                .bound
                .state
                .authority
                .active()
                .sign_leaf(&id, &key, Duration::from_secs(600), now, LeafUsage::Svid)
                .unwrap();
            parse(&issued.leaf).tbs_certificate.raw_serial().to_vec()
        })
        .collect();
    let micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    for s in &serials {
        assert_eq!(s.len(), 19, "{s:02x?}");
        assert_eq!(
            s[0], 0x40,
            "positive, and apart from the older all-random serials"
        );
        let mut stamp = [0u8; 8];
        stamp[1..].copy_from_slice(&s[1..8]);
        assert!(
            u64::from_be_bytes(stamp) >= micros,
            "the issuance time leads"
        );
    }
    // The same clock reading, yet strictly increasing.
    assert!(serials.windows(2).all(|w| w[0] < w[1]));
    let tails: std::collections::HashSet<&[u8]> = serials.iter().map(|s| &s[8..]).collect();
    assert_eq!(
        tails.len(),
        serials.len(),
        "the random part differs every time"
    );
}

#[tokio::test]
async fn renewal_with_the_current_svid_over_mtls() {
    let ca = start().await;
    let first = ca.issue(WEB).await;
    let second = ca.client.renew(&first).await.expect("renewal");
    assert_eq!(second.id(), first.id());
    assert_ne!(second.info.serial, first.info.serial);
    // Renewal cannot change the identity: a CSR for another ID is refused.
    let (_, csr) = make_csr(&parse_workload_id(DB).unwrap()).unwrap();
    assert_eq!(
        ca.post(&csr, None, Some(&second)).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
}

#[tokio::test]
async fn a_token_works_once_even_under_concurrent_use() {
    let ca = start().await;
    let token = ca.token(WEB).await;
    let id = parse_workload_id(WEB).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = ca.client.clone();
        let (id, token) = (id.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            client.issue_with_token(&id, &token).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(ClientError::Refused { status, .. }) => {
                assert_eq!(status, StatusCode::UNAUTHORIZED)
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one request may spend the token");
    let (_, csr) = make_csr(&id).unwrap();
    assert_eq!(
        ca.post(&csr, Some(&token), None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_token_for_another_id_is_a_mismatch() {
    let ca = start().await;
    let token = ca.token(WEB).await;
    let (_, csr) = make_csr(&parse_workload_id(DB).unwrap()).unwrap();
    assert_eq!(
        ca.post(&csr, Some(&token), None).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
    // The token was not spent by the refused request.
    let (_, csr) = make_csr(&parse_workload_id(WEB).unwrap()).unwrap();
    assert_eq!(ca.post(&csr, Some(&token), None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let ca = start().await;
    let token = ca.token(WEB).await;
    ca.clock.advance(Duration::from_secs(901));
    let (_, csr) = make_csr(&parse_workload_id(WEB).unwrap()).unwrap();
    assert_eq!(
        ca.post(&csr, Some(&token), None).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
}

#[tokio::test]
async fn missing_or_unknown_authorisation_is_refused() {
    let ca = start().await;
    let (_, csr) = make_csr(&parse_workload_id(WEB).unwrap()).unwrap();
    assert_eq!(ca.post(&csr, None, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        ca.post(&csr, Some("tlj_nope"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

fn pem_csr(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
}

#[tokio::test]
async fn malformed_and_badly_signed_csrs_are_refused_and_the_server_goes_on() {
    let ca = start().await;
    let token = ca.token(WEB).await;
    for body in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert_eq!(
            ca.post(body, Some(&token), None).await.0,
            StatusCode::BAD_REQUEST,
            "{body:?}"
        );
    }
    let (_, csr) = make_csr(&parse_workload_id(WEB).unwrap()).unwrap();
    use rustls::pki_types::pem::PemObject;
    let mut der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x55; // inside the signature
    let (status, _) = ca.post(&pem_csr(&der), Some(&token), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Nothing was spent; the same token still works with a good CSR.
    assert_eq!(ca.post(&csr, Some(&token), None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn csr_requests_for_ca_true_and_extra_sans_are_ignored() {
    let ca = start().await;
    let token = ca.token(WEB).await;
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![
        SanType::URI(WEB.try_into().unwrap()),
        SanType::DnsName("evil.example".try_into().unwrap()),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let mut conn = ca.client.connect(None).await.unwrap();
    let (status, body) = conn.post_csr(&csr, Some(&token)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let chain = trustline::identity::certs_from_pem(&body, "answer").unwrap();
    let leaf = parse(&chain[0]);
    assert!(!leaf.is_ca());
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names, vec![GeneralName::URI(WEB)]);
    assert!(!leaf.key_usage().unwrap().unwrap().value.key_cert_sign());
}

#[tokio::test]
async fn key_types_p256_p384_ed25519_accepted_rsa_refused() {
    let ca = start().await;
    let id = parse_workload_id(WEB).unwrap();
    for (alg, ok) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, true),
        (&rcgen::PKCS_ECDSA_P384_SHA384, true),
        (&rcgen::PKCS_ED25519, true),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let csr = csr_with(&key, &id);
        let token = ca.token(WEB).await;
        assert_eq!(
            ca.post(&csr, Some(&token), None).await.0 == StatusCode::OK,
            ok,
            "{alg:?}"
        );
    }
    let rsa = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let token = ca.token(WEB).await;
    assert_eq!(
        ca.post(&csr_with(&rsa, &id), Some(&token), None).await.0,
        StatusCode::BAD_REQUEST
    );
}

fn csr_with(key: &KeyPair, id: &SpiffeId) -> String {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    p.serialize_request(key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn an_oversized_body_gets_413() {
    let ca = start().await;
    let token = ca.token(WEB).await;
    let big = "A".repeat(17 * 1024);
    assert_eq!(
        ca.post(&big, Some(&token), None).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into())
    );
}

#[tokio::test]
async fn a_revoked_svid_cannot_renew_and_is_listed() {
    let ca = start().await;
    let svid = ca.issue(WEB).await;
    let r = admin::call(
        &ca.bound.admin_socket,
        &AdminRequest::Revoke {
            serial: svid.info.serial.to_string(),
        },
    )
    .await
    .unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(r.sequence, Some(1));
    let (_, csr) = make_csr(svid.id()).unwrap();
    assert_eq!(
        ca.post(&csr, None, Some(&svid)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let mut conn = ca.client.connect(None).await.unwrap();
    let (status, body) = conn.get("/v1/revoked", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["sequence"], 1);
    assert_eq!(v["revoked"][0]["serial"], svid.info.serial.to_string());
    // Unknown serials cannot be revoked.
    let r = admin::call(
        &ca.bound.admin_socket,
        &AdminRequest::Revoke {
            serial: "abcdef".into(),
        },
    )
    .await
    .unwrap();
    assert!(!r.ok && r.error.unwrap().contains("not issued"));
}

#[tokio::test]
async fn a_client_certificate_with_a_reserved_id_gets_403() {
    let ca = start().await;
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new(format!("spiffe://{TD}/trustline/region/elsewhere")).unwrap();
    let issued = ca
        .bound
        .state
        .authority
        .active()
        .sign_leaf(
            &id,
            &key,
            Duration::from_secs(600),
            ca.clock.now(),
            LeafUsage::Svid,
        )
        .unwrap();
    let chain = ca.bound.state.authority.active().chain_for(&issued.leaf);
    let svid = Svid {
        info: inspect_cert(&chain[0]).unwrap(),
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    };
    let (_, csr) = make_csr(&id).unwrap();
    assert_eq!(
        ca.post(&csr, None, Some(&svid)).await,
        (StatusCode::FORBIDDEN, "forbidden".into())
    );
}

#[tokio::test]
async fn an_svid_from_another_ca_cannot_renew() {
    let ca = start().await;
    let other = start().await;
    let foreign = other.issue(WEB).await;
    // In TLS 1.3 the server judges the client certificate after the client finished its side,
    // so the refusal shows as a failed connection or request, never as an answer.
    let (_, csr) = make_csr(foreign.id()).unwrap();
    let refused = match ca.client.connect(Some(&foreign)).await {
        Err(_) => true,
        Ok(mut conn) => conn.post_csr(&csr, None).await.is_err(),
    };
    assert!(
        refused,
        "a certificate from another CA must not get through TLS"
    );
    assert_eq!(ca.bound.state.ledger.issued().await.unwrap().len(), 0);
}

#[tokio::test]
async fn the_rate_limit_answers_429_per_client() {
    let ca = start_with(2).await; // 2/s, bursts of 4
    let (_, csr) = make_csr(&parse_workload_id(WEB).unwrap()).unwrap();
    let mut conn = ca.client.connect(None).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(conn.post_csr(&csr, Some("tlj_unknown")).await.unwrap().0);
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::UNAUTHORIZED)
            .count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        4
    );
    // Other endpoints keep answering.
    assert_eq!(
        conn.get("/v1/bundle", None).await.unwrap().0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bundle_as_pem_and_as_spiffe_jwks() {
    let ca = start().await;
    let pem = ca.client.fetch_bundle_pem().await.unwrap();
    assert_eq!(
        pem.as_ref(),
        std::fs::read(ca.root_dir().join("bundle.pem"))
            .unwrap()
            .as_slice()
    );
    let mut conn = ca.client.connect(None).await.unwrap();
    let (status, body) = conn
        .get("/v1/bundle", Some("application/json"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let key = &v["keys"][0];
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    use base64::Engine as _;
    let x5c = base64::engine::general_purpose::STANDARD
        .decode(key["x5c"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(x5c, ca.bound.state.authority.published().roots[0].as_ref());
    assert!(v["spiffe_refresh_hint"].as_u64().unwrap() > 0);
}

// openssl runs as a blocking child process, so the server needs its own worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_clients_are_refused() {
    let ca = start().await;
    let run = |flag: &str| {
        std::process::Command::new("openssl")
            .args(["s_client", flag, "-connect", &ca.bound.api.to_string()])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl must be installed (.ci/run installs it)")
    };
    let tls12 = run("-tls1_2");
    assert!(!tls12.status.success(), "TLS 1.2 handshake must fail");
    let tls13 = run("-tls1_3");
    let out = String::from_utf8_lossy(&tls13.stdout);
    assert!(out.contains("TLSv1.3"), "TLS 1.3 works: {out}");
}

#[tokio::test]
async fn audit_log_and_metrics_record_outcomes() {
    let ca = start().await;
    let svid = ca.issue(WEB).await;
    let (_, csr) = make_csr(svid.id()).unwrap();
    assert_eq!(ca.post(&csr, None, None).await.0, StatusCode::UNAUTHORIZED);
    // The audit writer runs on its own thread: everything recorded so far, out.
    ca.bound.state.audit.flush();
    let log = std::fs::read_to_string(ca.data().join("audit.log")).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let issue = events
        .iter()
        .find(|e| e["event"] == "issue")
        .expect("issue event");
    assert_eq!(issue["spiffe_id"], WEB);
    assert_eq!(issue["serial"], svid.info.serial.to_string());
    assert_eq!(issue["outcome"], "ok");
    let deny = events
        .iter()
        .find(|e| e["event"] == "deny")
        .expect("deny event");
    assert!(deny["reason"]
        .as_str()
        .unwrap()
        .contains("no authorisation"));
    assert!(events.iter().any(|e| e["event"] == "token"));

    let addr = ca.bound.metrics.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(
        text.contains("trustline_ca_svid_requests_total{outcome=\"issued\"} 1"),
        "{text}"
    );
    assert!(text.contains("trustline_ca_svid_requests_total{outcome=\"unauthorized\"} 1"));
    assert!(text.contains("trustline_ca_cert_expiry_timestamp_seconds{cert=\"issuing\"}"));
    assert!(text.contains("trustline_ca_svid_request_duration_seconds_bucket"));
    // The peers' state is for operators, on the metrics listener.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /peers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#"{"peers":[]}"#), "{text}");
}

#[tokio::test]
async fn tokens_for_foreign_or_reserved_ids_are_refused() {
    let ca = start().await;
    for id in [
        "spiffe://other.test/ns/a/sa/b",
        "spiffe://api.test/trustline/ca",
        "spiffe://api.test",
        "not-an-id",
        // Another region's gateway ID: only that region's CA may issue it.
        "spiffe://api.test/trustline/gateway/us-east",
        "spiffe://api.test/trustline/region/eu",
        "spiffe://api.test/trustline/anything-else",
    ] {
        let r = admin::call(
            &ca.bound.admin_socket,
            &AdminRequest::Token {
                spiffe_id: id.into(),
                ttl_secs: 60,
            },
        )
        .await
        .unwrap();
        assert!(!r.ok && r.token.is_none(), "{id} must be refused");
    }
    // This CA's own region's gateway ID is its to issue.
    assert!(!ca
        .token("spiffe://api.test/trustline/gateway/eu")
        .await
        .is_empty());
}

fn key_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_keys_are_0600_and_never_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let td = parse_trust_domain("init.test").unwrap();
    let root = dir.path().join("root");
    let paths = authority::init_root(&td, &root, Duration::from_secs(86400), false).unwrap();
    assert_eq!(key_mode(&paths.key), 0o600);
    let before = std::fs::read(&paths.key).unwrap();
    let err = authority::init_root(&td, &root, Duration::from_secs(86400), false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&paths.key).unwrap(), before);
    authority::init_root(&td, &root, Duration::from_secs(86400), true).unwrap();
    assert_ne!(std::fs::read(&paths.key).unwrap(), before);
    let inter = authority::init_intermediate(
        &root,
        "us-east",
        &dir.path().join("us"),
        Duration::from_secs(3600),
        false,
    )
    .unwrap();
    assert_eq!(key_mode(&inter.key), 0o600);
    let chain = trustline::identity::certs_from_pem(&std::fs::read(&inter.chain).unwrap(), "chain")
        .unwrap();
    assert_eq!(chain.len(), 2);
    let info = inspect_cert(&chain[0]).unwrap();
    assert_eq!(
        info.id.to_string(),
        "spiffe://init.test/trustline/region/us-east"
    );
    assert!(info.is_ca);
    // One rule for region names everywhere: what the tunnel headers and configs refuse, the
    // CA refuses too (it used to accept `_`, `.` and capitals).
    for bad in ["a/b", "eu_west", "EU", "eu.west", ""] {
        let made = authority::init_intermediate(
            &root,
            bad,
            &dir.path().join("bad"),
            Duration::from_secs(3600),
            false,
        );
        assert!(made.is_err(), "region {bad:?} must be refused");
        assert!(trustline::region::Region::new(bad).is_err());
    }
}

#[test]
fn a_regional_intermediate_may_not_sign_cas() {
    let dir = tempfile::tempdir().unwrap();
    let td = parse_trust_domain("init.test").unwrap();
    let root = dir.path().join("root");
    authority::init_root(&td, &root, Duration::from_secs(86400), false).unwrap();
    let inter = authority::init_intermediate(
        &root,
        "eu",
        &dir.path().join("eu"),
        Duration::from_secs(3600),
        false,
    )
    .unwrap();
    let pem = std::fs::read(&inter.cert).unwrap();
    let cert = trustline::identity::certs_from_pem(&pem, "ca.crt")
        .unwrap()
        .remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    let bc = parsed
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints")
        .value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
}

#[test]
fn config_file_errors_name_file_line_and_field() {
    use trustline::ca::config::CaServeFile;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ca.toml");
    std::fs::write(
        &file,
        "ca = \"/x\"\ndata = \"/y\"\nlisten_addr = \"1.2.3.4:5\"\n",
    )
    .unwrap();
    let err = CaServeConfig::resolve(CaServeFile::default(), Some(&file))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ca.toml:3") && err.contains("listen_addr"),
        "{err}"
    );

    let td = parse_trust_domain("cfg.test").unwrap();
    authority::init_root(
        &td,
        &dir.path().join("root"),
        Duration::from_secs(86400),
        false,
    )
    .unwrap();
    std::fs::write(
        &file,
        format!(
            "ca = {:?}\ndata = \"/y\"\nsvid_ttl = \"forever\"\n",
            dir.path().join("root")
        ),
    )
    .unwrap();
    let err = CaServeConfig::resolve(CaServeFile::default(), Some(&file))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ca.toml") && err.contains("svid_ttl") && err.contains("forever"),
        "{err}"
    );

    std::fs::write(
        &file,
        format!(
            "ca = {:?}\ndata = \"/y\"\nsvid_ttl = \"2h\"\nlisten = \"127.0.0.1:9\"\n",
            dir.path().join("root")
        ),
    )
    .unwrap();
    let ok = CaServeConfig::resolve(CaServeFile::default(), Some(&file)).unwrap();
    assert_eq!(ok.svid_ttl, Duration::from_secs(7200));
    // A flag wins over the file.
    let flags = CaServeFile {
        svid_ttl: Some("3h".into()),
        ..Default::default()
    };
    assert_eq!(
        CaServeConfig::resolve(flags, Some(&file)).unwrap().svid_ttl,
        Duration::from_secs(3 * 3600)
    );
    // The ledger: redb in DATA by default; a bad URL, refresh or pool is refused by name.
    assert_eq!(ok.ledger_url().to_string(), "redb:/y/ledger.redb");
    for (line, says) in [
        ("ledger = \"mysql://ca@db/x\"", "not a ledger URL"),
        (
            "ledger = \"postgres://ca:pw@db/x?sslmode=prefer\"",
            "falls back to plain text",
        ),
        ("ledger = \"redb:\"", "needs a file path"),
        ("ledger_refresh = \"10ms\"", "outside 100ms..60s"),
        ("ledger_pool = 0", "outside 1..=256"),
    ] {
        std::fs::write(
            &file,
            format!(
                "ca = {:?}\ndata = \"/y\"\n{line}\n",
                dir.path().join("root")
            ),
        )
        .unwrap();
        let err = CaServeConfig::resolve(CaServeFile::default(), Some(&file))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca.toml") && err.contains(says),
            "{line}: {err}"
        );
        assert!(!err.contains("pw"), "the password is never shown: {err}");
    }
    std::fs::write(
        &file,
        format!(
            "ca = {:?}\ndata = \"/y\"\nledger = \"postgres://ca:pw@localhost:5432/x\"\nledger_refresh = \"250ms\"\n",
            dir.path().join("root")
        ),
    )
    .unwrap();
    let pg = CaServeConfig::resolve(CaServeFile::default(), Some(&file)).unwrap();
    assert_eq!(
        pg.ledger_url().to_string(),
        "postgres://ca:***@localhost:5432/x"
    );
    assert_eq!(pg.ledger_options.refresh, Duration::from_millis(250));
}

impl Ca {
    async fn admin(&self, req: AdminRequest) -> admin::AdminResponse {
        admin::call(&self.bound.admin_socket, &req)
            .await
            .expect("admin socket")
    }

    /// `GET /v1/revoked` as JSON.
    async fn revoked(&self) -> serde_json::Value {
        let mut conn = self.client.connect(None).await.unwrap();
        let (status, body) = conn.get("/v1/revoked", None).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).unwrap()
    }
}

fn listed(v: &serde_json::Value, svid: &Svid) -> bool {
    v["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["serial"] == svid.info.serial.to_string())
}

#[tokio::test]
async fn revoking_a_serial_revokes_every_svid_renewed_from_it() {
    let ca = start().await;
    let a = ca.issue(WEB).await;
    let b = ca.client.renew(&a).await.expect("A renews into B");
    let c = ca.client.renew(&b).await.expect("B renews into C");
    let other = ca.issue(DB).await;
    let r = ca
        .admin(AdminRequest::Revoke {
            serial: a.info.serial.to_string(),
        })
        .await;
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(r.revoked_count, Some(3), "{r:?}");
    let v = ca.revoked().await;
    for s in [&a, &b, &c] {
        assert!(listed(&v, s), "{} must be listed: {v}", s.info.serial);
    }
    assert!(!listed(&v, &other), "an unrelated SVID stays valid: {v}");
    for s in [&b, &c] {
        let (_, csr) = make_csr(s.id()).unwrap();
        assert_eq!(
            ca.post(&csr, None, Some(s)).await.0,
            StatusCode::UNAUTHORIZED,
            "{} renewed from a revoked serial must not renew",
            s.info.serial
        );
    }
    assert!(ca.client.renew(&other).await.is_ok());
    // Revoking A again finds nothing left to revoke.
    let r = ca
        .admin(AdminRequest::Revoke {
            serial: b.info.serial.to_string(),
        })
        .await;
    assert!(!r.ok && r.error.unwrap().contains("already revoked"));
}

#[tokio::test]
async fn the_ledger_refuses_a_renewal_from_a_serial_revoked_meanwhile() {
    // A renewal authorised before the revocation committed reaches the ledger after it: the
    // single writer must refuse it, or the renewed SVID would escape the cascade.
    use trustline::ca::ledger::{Authorisation, IssuedRecord, LedgerError};
    let ca = start().await;
    let a = ca.issue(WEB).await;
    let now = ca.clock.unix();
    ca.bound
        .state
        .ledger
        .revoke(a.info.serial.clone(), now)
        .await
        .unwrap();
    let late = ca
        .bound
        .state
        .ledger
        .record_issue(
            trustline::identity::Serial::parse_hex("0badc0de").unwrap(),
            IssuedRecord {
                spiffe_id: WEB.into(),
                not_after: now + 3600,
                issued_at: now,
                authorisation: Authorisation::Svid {
                    serial: a.info.serial.to_string(),
                },
            },
            None,
        )
        .await;
    assert!(
        matches!(late, Err(LedgerError::ParentRevoked(_))),
        "{late:?}"
    );
}

#[tokio::test]
async fn a_revoked_spiffe_id_gets_nothing_until_lifted() {
    let ca = start().await;
    let live = ca.issue(WEB).await;
    let renewed = ca.client.renew(&live).await.unwrap();
    let minted_before = ca.token(WEB).await;
    let other = ca.issue(DB).await;
    let r = ca
        .admin(AdminRequest::RevokeId {
            spiffe_id: WEB.into(),
        })
        .await;
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(r.revoked_count, Some(2), "{r:?}");
    // Every live SVID of it is published, and so is the ban; the other ID is untouched.
    let v = ca.revoked().await;
    assert!(listed(&v, &live) && listed(&v, &renewed), "{v}");
    assert!(!listed(&v, &other), "{v}");
    assert_eq!(v["spiffe_ids"][0]["spiffe_id"], WEB, "{v}");
    // No renewal, no issuance with a token minted before, no new token.
    let (_, csr) = make_csr(renewed.id()).unwrap();
    assert_eq!(
        ca.post(&csr, None, Some(&renewed)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ca.post(&csr, Some(&minted_before), None).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into()),
        "the ban voided the token"
    );
    let t = admin::token(&ca.bound.admin_socket, WEB, 900).await;
    assert!(t.unwrap_err().to_string().contains("revoked"));
    assert!(ca.client.renew(&other).await.is_ok());
    // A second ban says so; lifting works once.
    let again = ca
        .admin(AdminRequest::RevokeId {
            spiffe_id: WEB.into(),
        })
        .await;
    assert!(!again.ok && again.error.unwrap().contains("already revoked"));
    let lift = ca
        .admin(AdminRequest::LiftId {
            spiffe_id: WEB.into(),
        })
        .await;
    assert!(lift.ok, "{:?}", lift.error);
    let v = ca.revoked().await;
    assert_eq!(v["spiffe_ids"].as_array().unwrap().len(), 0, "{v}");
    assert!(listed(&v, &live), "what the ban revoked stays revoked: {v}");
    // The token minted before the ban stays void; a new one works.
    assert_eq!(
        ca.post(&csr, Some(&minted_before), None).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    ca.issue(WEB).await;
    let r = ca
        .admin(AdminRequest::LiftId {
            spiffe_id: WEB.into(),
        })
        .await;
    assert!(!r.ok && r.error.unwrap().contains("not revoked"));
}

#[tokio::test]
async fn expired_revocations_leave_the_published_list_and_memory() {
    let ca = start().await;
    let svid = ca.issue(WEB).await;
    let r = ca
        .admin(AdminRequest::Revoke {
            serial: svid.info.serial.to_string(),
        })
        .await;
    assert!(r.ok);
    assert!(listed(&ca.revoked().await, &svid));
    // (The CA's own server certificate expires with the SVID, so the ledger is read directly.)
    ca.clock.advance(Duration::from_secs(3601));
    let ledger = &ca.bound.state.ledger;
    assert!(ledger.revoked_list(ca.clock.unix()).1.is_empty());
    assert_eq!(
        ledger.prune(ca.clock.unix()),
        1,
        "the expired entry leaves memory"
    );
}

#[tokio::test]
async fn the_revoked_list_is_built_once_per_change_and_served_from_cache() {
    let ca = start().await;
    let web = ca.issue(WEB).await;
    let builds = || ca.bound.state.revoked_cache.builds();
    assert!(
        ca.admin(AdminRequest::Revoke {
            serial: web.info.serial.to_string()
        })
        .await
        .ok
    );
    let before = builds();
    for _ in 0..20 {
        assert!(listed(&ca.revoked().await, &web));
    }
    assert_eq!(builds(), before + 1, "20 requests, one build");
    // A revocation shows up on the very next request.
    ca.clock.advance(Duration::from_secs(60));
    let db = ca.issue(DB).await;
    assert!(
        ca.admin(AdminRequest::Revoke {
            serial: db.info.serial.to_string()
        })
        .await
        .ok
    );
    let v = ca.revoked().await;
    assert!(listed(&v, &web) && listed(&v, &db), "{v}");
    assert_eq!(builds(), before + 2);
    // An entry that expires leaves the list without any other change.
    // (Read from the state: the CA's own server certificate would expire with it, here.)
    ca.clock.advance(Duration::from_secs(3600 - 60 + 1));
    let state = &ca.bound.state;
    let body = state
        .revoked_cache
        .body(state, trustline::ca::revoked_list::Scope::All)
        .await;
    let after: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(!listed(&after, &web) && listed(&after, &db), "{after}");
    assert_eq!(builds(), before + 3);
    // The peers' state is not told to anyone who asks.
    assert!(v.get("peers").is_none(), "{v}");
}

#[tokio::test]
async fn the_get_endpoints_answer_429_past_their_rate() {
    let ca = start_with(2).await; // GETs: 20/s, bursts of 40
    let mut conn = ca.client.connect(None).await.unwrap();
    let mut limited = 0;
    for n in 0..120 {
        let path = if n % 2 == 0 {
            "/v1/revoked"
        } else {
            "/v1/bundle"
        };
        let (status, body) = conn.get(path, None).await.unwrap();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], "rate_limited");
            limited += 1;
        }
    }
    assert!(limited >= 40, "{limited} of 120 refused");
    assert_eq!(
        ca.bound.state.metrics.reads_rate_limited.get(),
        limited as u64
    );
}

#[tokio::test]
async fn drain_closes_the_listeners_and_waits_for_the_servers_tasks() {
    let ca = start().await;
    let _svid = ca.issue(WEB).await;
    // An idle keep-alive connection is closed by the drain, not waited for until the deadline.
    let mut idle = ca.client.connect(None).await.expect("connect");
    let _ = idle.post_csr("not a csr", None).await.expect("request");
    let started = tokio::time::Instant::now();
    assert_eq!(ca.bound.drain(Duration::from_secs(30)).await, 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ca.bound.active_tasks(), 0);
    assert!(tokio::net::TcpStream::connect(ca.bound.api).await.is_err());
    let e = admin::token(&ca.bound.admin_socket, WEB, 900)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("cannot reach the CA admin socket"),
        "{e}"
    );
}
