//! Sidecar policy with `jwt` rules, on real sidecars: real sockets, TLS 1.3 with SVIDs from a
//! running CA (region `eu`), the JWT bundle fetched from that CA's bundle document. `checkout`
//! is protected; `gateway` (the mTLS peer the rules name) and `stranger` call it through their
//! own sidecars' explicit listeners with `Authorization: Bearer <JWT-SVID>` headers. Tokens are
//! signed here with `trustline::jwt::SigningKey`s whose public keys are in checkout's JWT
//! bundle. Each case is checked from the caller's side (status), the app's side (did the
//! header arrive) and in checkout's audit log (the mTLS peer and the token's sub and region).

// Tokens are minted against the wall clock the sidecars run on (`Clock::system()`), so this
// file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use trustline::identity::SpiffeId;
use trustline::jwt::{Claims, JwtBundle, SigningKey};
use trustline::proxy::Bound;
use trustline::region::Region;

use common::{eventually, start_ca, Ca, PATIENCE, TD};

const DAY: Duration = Duration::from_secs(86400);
const FIVE_MIN: Duration = Duration::from_secs(300);

fn sid(path: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://{TD}/{path}")).expect("SPIFFE ID")
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

/// The CA, the protected `checkout` and its callers.
struct World {
    ca: Ca,
    app: SocketAddr,
    checkout: Bound,
    gateway: Bound,
    stranger: Bound,
}

impl World {
    fn path(&self, name: &str) -> PathBuf {
        self.ca.pki.dir.path().join(name)
    }

    /// Every line of checkout's audit log, parsed, once written out.
    fn audit(&self) -> Vec<Value> {
        self.checkout.audit.flush();
        std::fs::read_to_string(self.path("checkout-audit.log"))
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
}

/// Writes and loads the config of workload `name`'s sidecar (region `eu`, its CA's), with
/// `sections` after the common ones, and starts it; returns once it holds an SVID.
async fn sidecar(ca: &Ca, name: &str, refresh: &str, sections: &str) -> Bound {
    let dir = ca.pki.dir.path();
    let id = common::id(name);
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, ca.token(&id).await).expect("token file");
    let toml = format!(
        r#"trust_domain = "{TD}"
spiffe_id = "{id}"
region = "eu"
bundle = {bundle:?}
drain_timeout = "1s"
handshake_timeout = "5s"
audit_log = {audit:?}

[identity]
source = "ca"
ca_url = "{url}"
token_file = {token_file:?}
refresh_interval = "{refresh}"

[admin]
listen = "127.0.0.1:0"

{sections}"#,
        bundle = ca.pki.root.join("bundle.pem"),
        audit = dir.join(format!("{name}-audit.log")),
        url = ca.url(),
    );
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml).expect("sidecar config");
    let config = trustline::proxy::config::SidecarConfig::load(&file)
        .unwrap_or_else(|e| panic!("{name} config: {e}"));
    common::start_ready(config).await
}

/// A caller with an explicit listener to checkout.
async fn caller(ca: &Ca, name: &str, checkout: &Bound) -> Bound {
    let to = common::listener(
        "checkout",
        checkout.inbound.expect("inbound"),
        &[common::id("checkout")],
    );
    sidecar(ca, name, "1s", &to).await
}

/// The policy of the tests: the gateway's requests need a token of a web workload from region
/// `eu`, for audience `checkout`; `/open` needs none; `/refunds/*` refuses `us` tokens.
fn policy(app_port: u16, extra: &str) -> String {
    format!(
        r#"
[service.checkout]
http_ports = [{app_port}]
{extra}

[[service.checkout.rule]]
name = "no-us-refunds"
action = "deny"
paths = ["/refunds/*"]
jwt = {{ audiences = ["checkout"], regions = ["us"] }}

[[service.checkout.rule]]
name = "web-via-gateway"
action = "allow"
from = ["{gateway}"]
jwt = {{ audiences = ["checkout", "checkout-v2"], regions = ["eu"], from = ["spiffe://{TD}/ns/web/*"] }}

[[service.checkout.rule]]
name = "us-refunds-would-be-allowed"
action = "allow"
from = ["{gateway}"]
paths = ["/refunds/*"]
jwt = {{ audiences = ["checkout"], from = ["spiffe://{TD}/ns/web/*"] }}

[[service.checkout.rule]]
name = "open"
action = "allow"
paths = ["/open"]
"#,
        gateway = common::id("gateway"),
    )
}

/// The CA, an app, checkout protected by [`policy`] (with `extra` service keys), and callers.
/// checkout's bundle refresh is hourly, so the JWT keys the test sets after the first fetch
/// stay (until the CA publishes keys of its own, this is how the test's keys get there).
async fn world(extra: &str) -> World {
    let ca = start_ca(DAY).await;
    let app = http_app().await;
    let policy_file = ca.pki.dir.path().join("checkout-policy.toml");
    std::fs::write(&policy_file, policy(app.port(), extra)).expect("policy file");
    let inbound = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy_file:?}\nservice = \"checkout\"\n"
    );
    let checkout = sidecar(&ca, "checkout", "1h", &inbound).await;
    let c = &checkout;
    eventually("checkout fetched its CA's JWT bundle", || {
        c.identity.jwt_bundle_fetches() >= 1
    })
    .await;
    let gateway = caller(&ca, "gateway", &checkout).await;
    let stranger = caller(&ca, "stranger", &checkout).await;
    World {
        ca,
        app,
        checkout,
        gateway,
        stranger,
    }
}

/// The test's regional JWT keys: `eu` and `us` ones in checkout's bundle, and one that is not.
struct Keys {
    eu: SigningKey,
    us: SigningKey,
    rogue: SigningKey,
}

impl Keys {
    /// Fresh keys, the `eu` and `us` ones put into `sidecar`'s JWT bundle for our trust domain.
    fn trusted_by(sidecar: &Bound) -> Keys {
        let k = Keys {
            eu: SigningKey::generate().expect("key"),
            us: SigningKey::generate().expect("key"),
            rogue: SigningKey::generate().expect("key"),
        };
        let td = sidecar.identity.id().trust_domain().clone();
        let mut b = JwtBundle::new(td);
        b.insert(k.eu.public(Some(region("eu")))).expect("eu key");
        b.insert(k.us.public(Some(region("us")))).expect("us key");
        sidecar.identity.set_jwt_bundle(b);
        k
    }
}

fn region(r: &str) -> Region {
    Region::new(r).expect("region")
}

/// A token of `sub` for `aud`, region `reg`, signed by `key`, issued `ago` before now for `ttl`.
fn token(key: &SigningKey, sub: &SpiffeId, aud: &[&str], reg: &str, ago: Duration) -> String {
    let claims = Claims::new(
        sub.clone(),
        aud.iter().map(|a| a.to_string()).collect(),
        SystemTime::now() - ago,
        FIVE_MIN,
        Some(region(reg)),
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
    let k = Keys::trusted_by(&w.checkout);
    let t = token(&k.eu, &portal(), &["checkout"], "eu", Duration::ZERO);
    let r = get(&w.gateway, "/ok", &[bearer(&t)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The sidecar consumed the token: the app never sees it.
    assert_eq!(r.body, "got \"GET /ok HTTP/1.1\" auth=-\n");
    let line = one(&w, "/ok");
    assert_eq!(line["outcome"], "allow");
    assert_eq!(line["rule"], "web-via-gateway");
    assert_eq!(line["source_id"], common::id("gateway").to_string());
    assert_eq!(line["source_region"], "eu");
    assert_eq!(line["jwt_sub"], portal().to_string());
    assert_eq!(line["jwt_region"], "eu");
    assert!(line.get("jwt_error").is_none(), "{line}");
    // Another audience of the rule, listed second in the token.
    let t2 = token(
        &k.eu,
        &portal(),
        &["other", "checkout-v2"],
        "eu",
        Duration::ZERO,
    );
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
    let _ = w.app;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_token_is_denied_and_the_audit_line_says_why() {
    let w = world("").await;
    let k = Keys::trusted_by(&w.checkout);
    let now = Duration::ZERO;
    let web = portal();
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        (
            "/wrong-audience",
            vec![bearer(&token(&k.eu, &web, &["billing"], "eu", now))],
            "jwt_error",
            "aud [\"billing\"] has none of [\"checkout\", \"checkout-v2\"]",
        ),
        (
            "/expired",
            vec![bearer(&token(
                &k.eu,
                &web,
                &["checkout"],
                "eu",
                FIVE_MIN + Duration::from_secs(5),
            ))],
            "jwt_error",
            "expired at ",
        ),
        (
            "/wrong-region",
            vec![bearer(&token(&k.us, &web, &["checkout"], "us", now))],
            "jwt_region",
            "us",
        ),
        (
            "/region-claim-not-the-keys",
            vec![bearer(&token(&k.us, &web, &["checkout"], "eu", now))],
            "jwt_error",
            "region \"eu\", but key",
        ),
        (
            "/sub-not-in-from",
            vec![bearer(&token(
                &k.eu,
                &common::id("batch"),
                &["checkout"],
                "eu",
                now,
            ))],
            "jwt_sub",
            "spiffe://mesh.test/ns/shop/sa/batch",
        ),
        ("/missing", vec![], "jwt_error", "no Authorization header"),
        (
            "/unknown-key",
            vec![bearer(&token(&k.rogue, &web, &["checkout"], "eu", now))],
            "jwt_error",
            "is not in the JWT bundle of",
        ),
        (
            "/tampered",
            vec![bearer(&tamper(&token(
                &k.eu,
                &web,
                &["checkout"],
                "eu",
                now,
            )))],
            "jwt_error",
            "JWT signature: does not verify",
        ),
        (
            "/two-headers",
            vec![
                bearer(&token(&k.eu, &web, &["checkout"], "eu", now)),
                bearer(&token(&k.eu, &web, &["checkout"], "eu", now)),
            ],
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
        assert_eq!(
            line["source_id"],
            common::id("gateway").to_string(),
            "{path}"
        );
        let got = line[field]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no {field}: {line}"));
        assert!(got.contains(want), "{path}: {field} {got:?} lacks {want:?}");
    }
    // A valid token through the wrong mTLS peer: the rule's own `from` still applies.
    let t = token(&k.eu, &web, &["checkout"], "eu", now);
    assert_eq!(
        get(&w.stranger, "/wrong-peer", &[bearer(&t)]).await.status,
        403
    );
    let line = one(&w, "/wrong-peer");
    assert_eq!(line["source_id"], common::id("stranger").to_string());
    assert_eq!(line["jwt_sub"], web.to_string());
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
    let k = Keys::trusted_by(&w.checkout);
    let web = portal();
    let us = token(&k.us, &web, &["checkout"], "us", Duration::ZERO);
    let r = get(&w.gateway, "/refunds/1", &[bearer(&us)]).await;
    assert_eq!(r.status, 403);
    let line = one(&w, "/refunds/1");
    assert_eq!(
        (&line["rule"], &line["jwt_region"]),
        (&"no-us-refunds".into(), &"us".into())
    );
    // The deny's region does not match an eu token: the allow rule without regions decides.
    let eu = token(&k.eu, &web, &["checkout"], "eu", Duration::ZERO);
    assert_eq!(
        get(&w.gateway, "/refunds/2", &[bearer(&eu)]).await.status,
        200
    );
    assert_eq!(one(&w, "/refunds/2")["rule"], "web-via-gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_on_one_connection_is_decided_and_a_new_subject_audited() {
    let w = world("").await;
    let k = Keys::trusted_by(&w.checkout);
    let tcp = TcpStream::connect(w.gateway.listeners[0])
        .await
        .expect("listener");
    let mut s = BufReader::new(tcp);
    let a = token(&k.eu, &portal(), &["checkout"], "eu", Duration::ZERO);
    let b = token(
        &k.eu,
        &sid("ns/web/sa/shop"),
        &["checkout"],
        "eu",
        Duration::ZERO,
    );
    let bad = token(
        &k.eu,
        &common::id("batch"),
        &["checkout"],
        "eu",
        Duration::ZERO,
    );
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&a)]).await.status, 200);
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&a)]).await.status, 200);
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&bad)]).await.status, 403);
    assert_eq!(get_on(&mut s, "/keep", &[bearer(&b)]).await.status, 200);
    assert_eq!(get_on(&mut s, "/keep", &[]).await.status, 403);
    let lines = w.audit_of("/keep");
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["outcome"].as_str().unwrap_or(""),
                l["jwt_sub"]
                    .as_str()
                    .or(l["jwt_error"].as_str())
                    .unwrap_or(""),
            )
        })
        .collect();
    let batch = common::id("batch").to_string();
    let shop = sid("ns/web/sa/shop").to_string();
    let portal = portal().to_string();
    assert_eq!(
        seen,
        [
            ("allow", portal.as_str()),
            ("deny", batch.as_str()),
            ("allow", shop.as_str()),
            ("deny", "no Authorization header"),
        ],
        "the repeated token is not audited twice; a new subject is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_forward_keeps_the_header_for_the_app() {
    let w = world("jwt_forward = true").await;
    let k = Keys::trusted_by(&w.checkout);
    let t = token(&k.eu, &portal(), &["checkout"], "eu", Duration::ZERO);
    let r = get(&w.gateway, "/fwd", &[bearer(&t)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        format!("got \"GET /fwd HTTP/1.1\" auth=Bearer {t}\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwt_bundle_comes_from_the_ca_and_a_cut_off_sidecar_keeps_it() {
    let ca = start_ca(DAY).await;
    let app = http_app().await;
    let policy_file = ca.pki.dir.path().join("checkout-policy.toml");
    std::fs::write(&policy_file, policy(app.port(), "")).expect("policy file");
    let inbound = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy_file:?}\nservice = \"checkout\"\n"
    );
    let checkout = sidecar(&ca, "checkout", "200ms", &inbound).await;
    let c = &checkout;
    eventually("checkout fetched its CA's JWT bundle", || {
        c.identity.jwt_bundle_fetches() >= 1
    })
    .await;
    // The CA's document parsed and was published for our trust domain.
    let bundles = c.identity.jwt_bundles();
    assert!(bundles.get(c.identity.id().trust_domain()).is_some());
    let gateway = caller(&ca, "gateway", &checkout).await;
    // The CA goes away; the keys in hand survive the failed fetches and keep validating.
    assert_eq!(ca.bound.drain(Duration::from_secs(2)).await, 0);
    let k = Keys::trusted_by(&checkout);
    let failed = c.identity.jwt_bundle_failures();
    eventually("two more fetches failed", || {
        c.identity.jwt_bundle_failures() >= failed + 2
    })
    .await;
    let t = token(&k.eu, &portal(), &["checkout"], "eu", Duration::ZERO);
    assert_eq!(get(&gateway, "/cut-off", &[bearer(&t)]).await.status, 200);
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
