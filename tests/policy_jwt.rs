//! Sidecar policy with `jwt` rules, on real sidecars: real sockets, TLS 1.3 with SVIDs from
//! two peered regional CAs (`a` and `b`, [`trustline::lab::Lab`]), JWT-SVIDs from those CAs'
//! `POST /v1/jwt`, and the JWT bundle each sidecar fetches from its own CA's bundle document
//! (which carries both regions' keys). `checkout` (region `a`) is protected; `gateway` (the
//! mTLS peer the rules name) and `stranger` call it through their own sidecars' explicit
//! listeners with `Authorization: Bearer <JWT-SVID>` headers. Tokens no CA would issue
//! (expired, a region claim that is not the key's) are signed here with CA a's own key file,
//! and an unknown key's with a fresh `SigningKey`. Each case is checked from the caller's side
//! (status), the app's side (did the header arrive) and in checkout's audit log (the mTLS peer
//! and the token's sub and region).

// Tokens are minted against the wall clock the sidecars run on (`Clock::system()`), so this
// file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use trustline::clock::Clock;
use trustline::identity::{Bundle, SpiffeId};
use trustline::jwt::{Claims, SigningKey};
use trustline::lab::{Lab, LabOptions, TD};
use trustline::proxy::Bound;
use trustline::region::Region;
use trustline::svid::ca_client::CaClient;

use common::{eventually, PATIENCE};

const FIVE_MIN: Duration = Duration::from_secs(300);

fn sid(path: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://{TD}/{path}")).expect("SPIFFE ID")
}

/// `spiffe://TD/ns/shop/sa/NAME`, the IDs of the lab's sidecars.
fn shop(name: &str) -> SpiffeId {
    sid(&format!("ns/shop/sa/{name}"))
}

fn portal() -> SpiffeId {
    sid("ns/web/sa/portal")
}

/// An HTTP/1.1 keep-alive app answering `got "<request line>" auth=<Authorization or ->`.
async fn http_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                loop {
                    let mut first = String::new();
                    if s.read_line(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut auth = "-".to_string();
                    let mut line = String::new();
                    while s.read_line(&mut line).await.unwrap_or(0) > 2 {
                        if let Some((n, v)) = line.split_once(':') {
                            if n.eq_ignore_ascii_case("authorization") {
                                auth = v.trim().to_string();
                            }
                        }
                        line.clear();
                    }
                    let body = format!("got {:?} auth={auth}\n", first.trim());
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.get_mut().write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The policy of the tests: the gateway's requests need a token of a web workload from region
/// `a`, for audience `checkout`; `/open` needs none; `/refunds/*` refuses region `b` tokens
/// even though a later allow would take them.
fn policy(app_port: u16, extra: &str) -> String {
    format!(
        r#"
[service.checkout]
http_ports = [{app_port}]
{extra}

[[service.checkout.rule]]
name = "no-b-refunds"
action = "deny"
paths = ["/refunds/*"]
jwt = {{ audiences = ["checkout"], regions = ["b"] }}

[[service.checkout.rule]]
name = "web-via-gateway"
action = "allow"
from = ["{gateway}"]
jwt = {{ audiences = ["checkout", "checkout-v2"], regions = ["a"], from = ["spiffe://{TD}/ns/web/*"] }}

[[service.checkout.rule]]
name = "refunds-any-region"
action = "allow"
from = ["{gateway}"]
paths = ["/refunds/*"]
jwt = {{ audiences = ["checkout"], from = ["spiffe://{TD}/ns/web/*"] }}

[[service.checkout.rule]]
name = "open"
action = "allow"
paths = ["/open"]
"#,
        gateway = shop("gateway"),
    )
}

/// Two peered regional CAs, an app, `checkout` (region a) protected by [`policy`] (with
/// `extra` service keys), and its callers.
struct World {
    lab: Lab,
    _dir: tempfile::TempDir,
    checkout: Bound,
    gateway: Bound,
    stranger: Bound,
    bundle: Bundle,
}

async fn world(extra: &str) -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = LabOptions {
        refresh_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let lab = Lab::new(dir.path(), options).await.expect("lab");
    let app = http_app().await;
    let policy_file = dir.path().join("checkout-policy.toml");
    std::fs::write(&policy_file, policy(app.port(), extra)).expect("policy file");
    let inbound = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy_file:?}\nservice = \"checkout\"\n"
    );
    let checkout = lab
        .sidecar("a", "checkout", &inbound)
        .await
        .expect("checkout");
    let c = &checkout;
    eventually("checkout holds both regions' JWT keys", || {
        c.identity
            .jwt_bundles()
            .get(c.identity.id().trust_domain())
            .is_some_and(|b| b.len() >= 2)
    })
    .await;
    let to = common::listener(
        "checkout",
        checkout.inbound.expect("inbound"),
        &[shop("checkout")],
    );
    let gateway = lab.sidecar("a", "gateway", &to).await.expect("gateway");
    let stranger = lab.sidecar("a", "stranger", &to).await.expect("stranger");
    let pem = std::fs::read(lab.bundle()).expect("bundle");
    let bundle = Bundle::from_pem(lab.td.clone(), &pem, "bundle").expect("bundle");
    World {
        lab,
        _dir: dir,
        checkout,
        gateway,
        stranger,
        bundle,
    }
}

impl World {
    /// Every line of checkout's audit log, parsed, once written out.
    fn audit(&self) -> Vec<Value> {
        self.checkout.audit.flush();
        std::fs::read_to_string(self.lab.dir.join("checkout-audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// The audit lines of requests to `path`.
    fn audit_of(&self, path: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|l| l["path"] == path)
            .collect()
    }

    fn client(&self, region: &str) -> CaClient {
        let url = format!("https://{}", self.lab.region(region).ca.api);
        CaClient::new(&url, self.bundle.clone(), Clock::system()).expect("CA client")
    }

    /// A JWT-SVID of `sub` for `aud` from `region`'s CA (`POST /v1/jwt` with `sub`'s SVID).
    async fn issued(&self, region: &str, sub: &SpiffeId, aud: &[&str]) -> String {
        let client = self.client(region);
        let join = self
            .lab
            .token(region, &sub.to_string())
            .await
            .expect("join token");
        let svid = client.issue_with_token(sub, &join).await.expect("SVID");
        let aud: Vec<String> = aud.iter().map(|a| a.to_string()).collect();
        client
            .fetch_jwt(&svid, sub, &aud)
            .await
            .expect("JWT-SVID")
            .0
    }

    /// The key CA a signs its JWT-SVIDs with (`CA_DIR/jwt.key`).
    fn ca_a_key(&self) -> SigningKey {
        let path = self.lab.dir.join("ca-a").join("jwt.key");
        let pem = std::fs::read(&path).expect("jwt.key");
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).expect("PKCS#8 PEM");
        SigningKey::from_pkcs8(der.secret_pkcs8_der()).expect("signing key")
    }
}

/// A token of `sub` for `aud` with the `region` claim `reg`, signed by `key`, issued `ago`
/// before now for five minutes.
fn signed(key: &SigningKey, sub: &SpiffeId, aud: &[&str], reg: &str, ago: Duration) -> String {
    let claims = Claims::new(
        sub.clone(),
        aud.iter().map(|a| a.to_string()).collect(),
        SystemTime::now() - ago,
        FIVE_MIN,
        Some(Region::new(reg).expect("region")),
    );
    key.sign(&claims).expect("signed")
}

/// One HTTP/1.1 response: status and body.
struct Response {
    status: u16,
    body: String,
}

/// `GET path` with `headers` (each `Name: value`) on `s`, kept alive; reads one response.
async fn get_on(s: &mut BufReader<TcpStream>, path: &str, headers: &[String]) -> Response {
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: checkout\r\n");
    for h in headers {
        req += h;
        req += "\r\n";
    }
    req += "\r\n";
    s.get_mut()
        .write_all(req.as_bytes())
        .await
        .expect("write request");
    tokio::time::timeout(PATIENCE, read_response(s))
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response in time"))
}

async fn read_response(s: &mut BufReader<TcpStream>) -> Response {
    let mut line = String::new();
    s.read_line(&mut line).await.expect("status line");
    assert!(!line.is_empty(), "connection closed instead of a response");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut len = 0;
    loop {
        line.clear();
        s.read_line(&mut line).await.expect("header line");
        if line.trim().is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().expect("content-length");
            }
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.expect("body");
    Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `GET path` through `via`'s listener to checkout on a new connection.
async fn get(via: &Bound, path: &str, headers: &[String]) -> Response {
    let tcp = TcpStream::connect(via.listeners[0])
        .await
        .expect("listener");
    get_on(&mut BufReader::new(tcp), path, headers).await
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

/// The one audit line of requests to `path`; fails unless there is exactly one.
fn one(w: &World, path: &str) -> Value {
    let lines = w.audit_of(path);
    assert_eq!(lines.len(), 1, "audit lines of {path}: {lines:?}");
    lines.into_iter().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_of_an_allowed_sub_and_region_is_allowed_and_audited_with_the_peer() {
    let w = world("").await;
    let t = w.issued("a", &portal(), &["checkout"]).await;
    let r = get(&w.gateway, "/ok", &[bearer(&t)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The sidecar consumed the token: the app never sees it.
    assert_eq!(r.body, "got \"GET /ok HTTP/1.1\" auth=-\n");
    let line = one(&w, "/ok");
    assert_eq!(line["outcome"], "allow");
    assert_eq!(line["rule"], "web-via-gateway");
    assert_eq!(line["source_id"], shop("gateway").to_string());
    assert_eq!(line["source_region"], "a");
    assert_eq!(line["jwt_sub"], portal().to_string());
    assert_eq!(line["jwt_region"], "a");
    assert!(line.get("jwt_error").is_none(), "{line}");
    // Another audience of the rule, listed second in the token.
    let t2 = w.issued("a", &portal(), &["other", "checkout-v2"]).await;
    assert_eq!(get(&w.gateway, "/ok2", &[bearer(&t2)]).await.status, 200);
    // The scheme is case-insensitive.
    let lower = format!("authorization: bearer {t}");
    assert_eq!(get(&w.gateway, "/ok3", &[lower]).await.status, 200);
    // A rule without jwt does not need a token, and a Basic header is the app's.
    let basic = "Authorization: Basic dTpw".to_string();
    let r = get(&w.stranger, "/open", &[basic]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "got \"GET /open HTTP/1.1\" auth=Basic dTpw\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_token_is_denied_and_the_audit_line_says_why() {
    let w = world("").await;
    let (key, web) = (w.ca_a_key(), portal());
    let rogue = SigningKey::generate().expect("key");
    let good = w.issued("a", &web, &["checkout"]).await;
    let late = FIVE_MIN + Duration::from_secs(5);
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        (
            "/wrong-audience",
            vec![bearer(&w.issued("a", &web, &["billing"]).await)],
            "jwt_error",
            "aud [\"billing\"] has none of [\"checkout\", \"checkout-v2\"]",
        ),
        (
            "/expired",
            vec![bearer(&signed(&key, &web, &["checkout"], "a", late))],
            "jwt_error",
            "expired at ",
        ),
        (
            "/wrong-region",
            vec![bearer(&w.issued("b", &web, &["checkout"]).await)],
            "jwt_region",
            "b",
        ),
        (
            "/region-claim-not-the-keys",
            vec![bearer(&signed(
                &key,
                &web,
                &["checkout"],
                "b",
                Duration::ZERO,
            ))],
            "jwt_error",
            "region \"b\", but key",
        ),
        (
            "/sub-not-in-from",
            vec![bearer(&w.issued("a", &shop("batch"), &["checkout"]).await)],
            "jwt_sub",
            "/ns/shop/sa/batch",
        ),
        ("/missing", vec![], "jwt_error", "no Authorization header"),
        (
            "/unknown-key",
            vec![bearer(&signed(
                &rogue,
                &web,
                &["checkout"],
                "a",
                Duration::ZERO,
            ))],
            "jwt_error",
            "is not in the JWT bundle of",
        ),
        (
            "/tampered",
            vec![bearer(&tamper(&good))],
            "jwt_error",
            "JWT signature",
        ),
        (
            "/two-headers",
            vec![bearer(&good), bearer(&good)],
            "jwt_error",
            "more than one Authorization header",
        ),
        (
            "/not-bearer",
            vec!["Authorization: Basic dTpw".into()],
            "jwt_error",
            "not a Bearer token",
        ),
        ("/garbage", vec![bearer("not.a-token")], "jwt_error", "JWT"),
    ];
    for (path, headers, field, want) in &cases {
        let r = get(&w.gateway, path, headers).await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        let line = one(&w, path);
        assert_eq!(line["outcome"], "deny", "{path}: {line}");
        assert_eq!(line["rule"], "default", "{path}: {line}");
        assert_eq!(line["source_id"], shop("gateway").to_string(), "{path}");
        let got = line[field]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no {field}: {line}"));
        assert!(got.contains(want), "{path}: {field} {got:?} lacks {want:?}");
    }
    // The same good token passes (the cases failed for their own reason).
    assert_eq!(get(&w.gateway, "/good", &[bearer(&good)]).await.status, 200);
    // A valid token through the wrong mTLS peer: the rule's own `from` still applies.
    assert_eq!(
        get(&w.stranger, "/wrong-peer", &[bearer(&good)])
            .await
            .status,
        403
    );
    let line = one(&w, "/wrong-peer");
    assert_eq!(line["source_id"], shop("stranger").to_string());
    assert_eq!(line["jwt_sub"], web.to_string());
    // An error quoting a long claim is cut short in the audit line.
    let b64 = |v: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    };
    let sub = format!("spiffe://{TD}/{}%", "a".repeat(5000));
    let long = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"ES256","kid":"k","typ":"JWT"}"#),
        b64(
            &serde_json::json!({"sub": sub, "aud": "checkout", "exp": 4_000_000_000u64})
                .to_string()
        ),
        "A".repeat(86)
    );
    assert_eq!(get(&w.gateway, "/long", &[bearer(&long)]).await.status, 403);
    let e = one(&w, "/long")["jwt_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        e.len() <= 303 && e.ends_with("..."),
        "jwt_error of {} bytes: {e}",
        e.len()
    );
}

/// `t` with one character of its signature changed.
fn tamper(t: &str) -> String {
    let mut b = t.as_bytes().to_vec();
    let i = b.len() - 5;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).expect("ASCII")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_with_jwt_matches_only_a_valid_token_of_its_region() {
    let w = world("").await;
    let from_b = w.issued("b", &portal(), &["checkout"]).await;
    let r = get(&w.gateway, "/refunds/1", &[bearer(&from_b)]).await;
    assert_eq!(r.status, 403);
    let line = one(&w, "/refunds/1");
    assert_eq!(line["rule"], "no-b-refunds");
    assert_eq!(line["jwt_region"], "b");
    // A region b token elsewhere is taken by the allow without regions ...
    let from_a = w.issued("a", &portal(), &["checkout"]).await;
    assert_eq!(
        get(&w.gateway, "/refunds/2", &[bearer(&from_a)])
            .await
            .status,
        200
    );
    assert_eq!(one(&w, "/refunds/2")["rule"], "web-via-gateway");
    // ... and an invalid one does not make the deny match: the allow rules still need a token.
    let expired = signed(&w.ca_a_key(), &portal(), &["checkout"], "b", FIVE_MIN * 2);
    assert_eq!(
        get(&w.gateway, "/refunds/3", &[bearer(&expired)])
            .await
            .status,
        403
    );
    assert_eq!(one(&w, "/refunds/3")["rule"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_on_one_connection_is_decided_and_a_new_subject_audited() {
    let w = world("").await;
    let tcp = TcpStream::connect(w.gateway.listeners[0])
        .await
        .expect("listener");
    let mut s = BufReader::new(tcp);
    let shop_web = sid("ns/web/sa/shop");
    let a = w.issued("a", &portal(), &["checkout"]).await;
    let b = w.issued("a", &shop_web, &["checkout"]).await;
    let bad = w.issued("a", &shop("batch"), &["checkout"]).await;
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&a)]).await.status, 200);
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&a)]).await.status, 200);
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&bad)]).await.status, 403);
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&b)]).await.status, 200);
    assert_eq!(get_on(&mut s, "/keep", &[]).await.status, 403);
    let lines = w.audit_of("/keep");
    let seen: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let who = l["jwt_sub"].as_str().or(l["jwt_error"].as_str());
            (
                l["outcome"].as_str().unwrap_or("").to_string(),
                who.unwrap_or("").to_string(),
            )
        })
        .collect();
    let pair = |o: &str, w: String| (o.to_string(), w);
    assert_eq!(
        seen,
        [
            pair("allow", portal().to_string()),
            pair("deny", shop("batch").to_string()),
            pair("allow", shop_web.to_string()),
            pair("deny", "no Authorization header".into()),
        ],
        "the repeated token is not audited twice; a new subject is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_forward_keeps_the_header_for_the_app() {
    let w = world("jwt_forward = true").await;
    let t = w.issued("a", &portal(), &["checkout"]).await;
    let r = get(&w.gateway, "/fwd", &[bearer(&t)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        format!("got \"GET /fwd HTTP/1.1\" auth=Bearer {t}\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cut_off_from_its_ca_keeps_validating_with_the_keys_it_has() {
    let w = world("").await;
    let from_a = w.issued("a", &portal(), &["checkout"]).await;
    let from_b = w.issued("b", &portal(), &["checkout"]).await;
    // checkout's own CA goes away; its fetches fail and the keys it has stay.
    assert_eq!(w.lab.region("a").ca.drain(Duration::from_secs(2)).await, 0);
    let id = &w.checkout.identity;
    let failed = id.jwt_bundle_failures();
    eventually("two more JWT bundle fetches failed", || {
        id.jwt_bundle_failures() >= failed + 2
    })
    .await;
    assert_eq!(
        get(&w.gateway, "/cut-off", &[bearer(&from_a)]).await.status,
        200
    );
    let r = get(&w.gateway, "/refunds/9", &[bearer(&from_b)]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        one(&w, "/refunds/9")["rule"],
        "no-b-refunds",
        "b's key is still known"
    );
}

// ---------------------------------------------------------------------------------------------
// The policy file and `policy explain`, as a user runs them
// ---------------------------------------------------------------------------------------------

#[test]
fn the_example_jwt_policy_checks_clean_and_explains_with_token_facts() {
    let (ok, out) = common::trustline(&["policy", "check", "config/policy-jwt.toml"]);
    assert!(ok, "{out}");
    assert!(out.contains("0 warnings"), "{out}");
    let base = [
        "policy",
        "explain",
        "--policy",
        "config/policy-jwt.toml",
        "--to",
        "orders",
        "--port",
        "8443",
        "--from",
        "spiffe://example.org/ns/edge/sa/gateway",
        "--method",
        "POST",
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend(extra);
        let (ok, out) = common::trustline(&args);
        assert!(ok, "{out}");
        out
    };
    let web = "spiffe://example.org/ns/shop/sa/web";
    let out = run(&[
        "--path",
        "/orders",
        "--jwt-sub",
        web,
        "--jwt-region",
        "eu-west",
    ]);
    assert!(
        out.starts_with("decision: ALLOW by rule \"shop-via-gateway\""),
        "{out}"
    );
    let out = run(&["--path", "/orders"]);
    assert!(
        out.starts_with("decision: DENY by rule \"default\""),
        "{out}"
    );
    assert!(out.contains("jwt: no Authorization header"), "{out}");
    let out = run(&[
        "--path",
        "/refunds/7",
        "--jwt-sub",
        web,
        "--jwt-region",
        "us-east",
    ]);
    assert!(
        out.starts_with("decision: DENY by rule \"no-refunds-from-us\""),
        "{out}"
    );
    let out = run(&[
        "--path",
        "/orders",
        "--jwt-sub",
        web,
        "--jwt-aud",
        "billing",
    ]);
    assert!(
        out.contains("jwt: aud [\"billing\"] has none of [\"orders\"]"),
        "{out}"
    );
    let (ok, out) = common::trustline(&[
        "policy",
        "explain",
        "--policy",
        "config/policy-jwt.toml",
        "--to",
        "orders",
        "--port",
        "8443",
        "--from",
        web,
        "--jwt-sub",
        web,
    ]);
    assert!(!ok, "--jwt-sub needs a request (--method/--path): {out}");
}

#[test]
fn policy_check_names_every_jwt_mistake() {
    let dir = tempfile::tempdir().expect("temp dir");
    let f = dir.path().join("bad-jwt.toml");
    std::fs::write(
        &f,
        r#"[service.api]
http_ports = [8080]

[[service.api.rule]]
name = "no-audience"
action = "allow"
jwt = { from = ["spiffe://example.org/ns/web/*"] }

[[service.api.rule]]
name = "on-a-tcp-port"
action = "allow"
ports = [5432]
jwt = { audiences = ["api"] }

[[service.api.rule]]
name = "bad-region"
action = "allow"
jwt = { audiences = ["api"], regions = ["EU"] }
"#,
    )
    .expect("policy file");
    let (ok, out) = common::trustline(&["policy", "check", path_str(&f)]);
    assert!(!ok, "{out}");
    for want in [
        "bad-jwt.toml:4: error: service api, rule \"no-audience\", jwt.audiences: required",
        "bad-jwt.toml:9: error: service api, rule \"on-a-tcp-port\", jwt: jwt needs an HTTP port: add the port to http_ports (ports [5432] are not in http_ports [8080]",
        "bad-jwt.toml:15: error: service api, rule \"bad-region\", jwt.regions[0]: region \"EU\"",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
