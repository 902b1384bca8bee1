//! The policy file enforced by real sidecars: real sockets on 127.0.0.1:0, real TLS 1.3, SVIDs
//! from our CA (one root, regional intermediates, a CA server per region) via join tokens.
//! `checkout` is protected by a policy file; `frontend`, `batch` and friends call it through
//! their own sidecars' explicit listeners. Each decision is checked from the caller's side
//! (bytes, status codes), in checkout's metrics and in its audit log.
//!
//! Self-contained on purpose: other test files share `tests/common`.

// Certificates for the peers under test are minted against the wall clock the sidecars run on
// (`Clock::system()`), so this file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use trustline::ca::admin;
use trustline::ca::authority;
use trustline::ca::config::CaServeConfig;
use trustline::clock::Clock;
use trustline::identity::{parse_trust_domain, SpiffeId, TrustDomain};
use trustline::proxy::authz::RuleLabels;
use trustline::proxy::config::SidecarConfig;
use trustline::proxy::metrics::Dir;
use trustline::proxy::Bound;

const TD: &str = "policy.test";
/// Longest any single wait may take.
const PATIENCE: Duration = Duration::from_secs(10);
/// SVID lifetime: long enough to move a manual clock by hours.
const DAY: Duration = Duration::from_secs(86400);
/// A reload interval that never fires during a test (reloads are triggered by hand).
const NEVER: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A CA server issuing from one regional intermediate.
struct RegionalCa {
    region: String,
    bound: trustline::ca::server::Bound,
}

/// One root, a regional intermediate and a running CA server per region, in a temp dir.
struct Mesh {
    dir: tempfile::TempDir,
    td: TrustDomain,
    root: PathBuf,
    cas: Vec<RegionalCa>,
}

/// The inbound side of the protected sidecar.
struct Protect<'a> {
    app: SocketAddr,
    policy: &'a Path,
    reload_interval: Duration,
    clock: Clock,
}

impl Mesh {
    async fn new(regions: &[&str]) -> Mesh {
        let dir = tempfile::tempdir().expect("temp dir");
        let td = parse_trust_domain(TD).expect("trust domain");
        let root = dir.path().join("root");
        let year = Duration::from_secs(365 * 86400);
        authority::init_root(&td, &root, year, false).expect("root CA");
        let mut cas = Vec::new();
        for region in regions {
            let ca_dir = dir.path().join(region);
            authority::init_intermediate(&root, region, &ca_dir, year, false)
                .expect("intermediate CA");
            let config = CaServeConfig {
                ca_dir,
                data_dir: dir.path().join(format!("data-{region}")),
                listen: "127.0.0.1:0".parse().unwrap(),
                svid_ttl: DAY,
                san: vec![],
                metrics_listen: None,
                audit_log: None,
                bundle_endpoint: None,
                rate_limit: 0,
                peers: Default::default(),
                limits: Default::default(),
                ledger: None,
                ledger_options: Default::default(),
                jwt_ttl: std::time::Duration::from_secs(300),
                agents: Vec::new(),
                file: None,
            };
            let bound = trustline::ca::server::build(config, Clock::system())
                .await
                .expect("CA starts");
            cas.push(RegionalCa {
                region: region.to_string(),
                bound,
            });
        }
        Mesh { dir, td, root, cas }
    }

    fn id(&self, name: &str) -> SpiffeId {
        SpiffeId::new(format!("spiffe://{}/ns/shop/sa/{name}", self.td)).expect("SPIFFE ID")
    }

    async fn token(&self, ca: usize, id: &SpiffeId) -> String {
        admin::token(&self.cas[ca].bound.admin_socket, &id.to_string(), 900)
            .await
            .unwrap_or_else(|e| panic!("no token: {e}"))
    }

    fn audit_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-audit.log"))
    }

    /// Every line of `name`'s audit log (its sidecar is `sidecar`), parsed, once written out.
    fn audit(&self, name: &str, sidecar: &trustline::proxy::Bound) -> Vec<Value> {
        sidecar.audit.flush();
        std::fs::read_to_string(self.audit_path(name))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// A ready sidecar for workload `name`, with an SVID from CA `ca`. The config is written
    /// as a file and loaded like `trustline sidecar` does, so only user settings are named.
    async fn sidecar(
        &self,
        name: &str,
        ca: usize,
        inbound: Option<Protect<'_>>,
        services: &[(&str, SocketAddr, &SpiffeId)],
        top: &str,
    ) -> Bound {
        let dir = self.dir.path();
        let id = self.id(name);
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, self.token(ca, &id).await).expect("token file");
        let mut sections = String::new();
        if let Some(p) = &inbound {
            sections += &format!(
                r#"
[inbound]
listen = "127.0.0.1:0"
app_address = "{app}"
policy = {policy:?}
service = "checkout"
reload_interval = "{reload}"
"#,
                app = p.app,
                policy = p.policy,
                reload = humantime::format_duration(p.reload_interval),
            );
        }
        for (svc, addr, svc_id) in services {
            sections += &format!(
                r#"
[[service]]
name = "{svc}"
addresses = ["{addr}"]
spiffe_ids = ["{svc_id}"]

[[listener]]
listen = "127.0.0.1:0"
service = "{svc}"
"#
            );
        }
        let toml = format!(
            r#"trust_domain = "{td}"
spiffe_id = "{id}"
region = "{region}"
bundle = {bundle:?}
drain_timeout = "1s"
handshake_timeout = "5s"
audit_log = {audit:?}
{top}

[identity]
source = "ca"
ca_url = "https://{ca_api}"
token_file = {token_file:?}
refresh_interval = "1s"

[admin]
listen = "127.0.0.1:0"
{sections}"#,
            td = self.td,
            region = self.cas[ca].region,
            bundle = self.root.join("bundle.pem"),
            audit = self.audit_path(name),
            ca_api = self.cas[ca].bound.api,
        );
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, toml).expect("sidecar config");
        let config = SidecarConfig::load(&file).unwrap_or_else(|e| panic!("{name} config: {e}"));
        let clock = inbound.map_or_else(Clock::system, |p| p.clock);
        let bound = trustline::proxy::build(config, clock)
            .await
            .unwrap_or_else(|e| panic!("sidecar {name}: {e}"));
        let b = &bound;
        eventually(&format!("sidecar {name} holds an SVID"), || {
            b.identity.ready().is_ok()
        })
        .await;
        bound
    }

    /// `checkout`, protecting `app` with `policy`, SVID from CA 0.
    async fn checkout(&self, p: Protect<'_>) -> Bound {
        self.sidecar("checkout", 0, Some(p), &[], "").await
    }

    /// A caller `name` (SVID from CA `ca`) with one explicit listener to `checkout`.
    async fn caller(&self, name: &str, ca: usize, checkout: &Bound) -> Bound {
        self.caller_with(name, ca, checkout, "").await
    }

    /// [`Mesh::caller`] with `top` among its top-level settings (such as `pooling = false`).
    async fn caller_with(&self, name: &str, ca: usize, checkout: &Bound, top: &str) -> Bound {
        let target = checkout.inbound.expect("inbound");
        let svc = [("checkout", target, checkout.identity.id())];
        self.sidecar(name, ca, None, &svc, top).await
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("checkout-policy.toml")
    }
}

/// Replaces the policy file atomically (a watcher never sees half a file).
fn write_policy(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("policy file");
    std::fs::rename(&tmp, path).expect("policy file");
}

/// Polls `cond` until it holds, failing the test after [`PATIENCE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP echo app.
async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An HTTP/1.1 keep-alive app answering each request with `checkout got "<request line>"`.
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
                    let mut line = String::new();
                    while s.read_line(&mut line).await.unwrap_or(0) > 2 {
                        line.clear();
                    }
                    let body = format!("checkout got {:?}\n", first.trim());
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

/// An HTTP/1.1 keep-alive app that reads paths leniently, as nginx, Tomcat or Python do between
/// them: `\\` as `/`, `;params` cut, every escape decoded, slashes merged, dots resolved. It
/// serves `SECRET` for `/secret.txt` and `ADMIN` under `/admin`, and otherwise answers with the
/// request line it got, like [`http_app`].
async fn normalising_app() -> SocketAddr {
    fn reads(target: &str) -> String {
        let path = target.split('?').next().unwrap_or("").replace('\\', "/");
        let cut: Vec<&str> = path
            .split('/')
            .map(|s| s.split(';').next().unwrap_or(""))
            .collect();
        let cut = cut.join("/");
        let (b, mut bytes, mut i) = (cut.as_bytes(), Vec::new(), 0);
        while i < b.len() {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
                (b'%', Some(v)) => {
                    bytes.push(v);
                    i += 3;
                }
                (c, _) => {
                    bytes.push(c);
                    i += 1;
                }
            }
        }
        let mut segments: Vec<String> = Vec::new();
        for s in String::from_utf8_lossy(&bytes)
            .replace('\\', "/")
            .split('/')
        {
            match s {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                s => segments.push(s.to_string()),
            }
        }
        format!("/{}", segments.join("/"))
    }
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
                    let mut line = String::new();
                    while s.read_line(&mut line).await.unwrap_or(0) > 2 {
                        line.clear();
                    }
                    let target = first.split_whitespace().nth(1).unwrap_or("");
                    let served = reads(target);
                    let body = if served == "/secret.txt" {
                        "SECRET\n".to_string()
                    } else if served == "/admin" || served.starts_with("/admin/") {
                        "ADMIN\n".to_string()
                    } else {
                        format!("checkout got {:?}\n", first.trim())
                    };
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

/// Writes `msg` and reads back as many bytes.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>, String> {
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0; msg.len()];
    match tokio::time::timeout(PATIENCE, s.read_exact(&mut back)).await {
        Ok(Ok(_)) => Ok(back),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer in time".into()),
    }
}

/// A new connection through `listener` whose bytes come back.
async fn echo_works(listener: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(listener)
        .await
        .map_err(|e| e.to_string())?;
    let back = round_trip(&mut s, b"ping through the mesh").await?;
    if back == b"ping through the mesh" {
        Ok(())
    } else {
        Err(format!("echo returned {back:?}"))
    }
}

/// Waits for the peer to close `s` (EOF or error); fails if any data arrives or it stays open.
async fn assert_closed_without_data(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(PATIENCE, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: got {n} bytes: {:?}", &buf[..n]),
        Err(_) => panic!("{what}: the connection stayed open"),
    }
}

/// A new connection through `listener` is closed without any echoed data.
async fn assert_refused(listener: SocketAddr, what: &str) {
    let mut s = TcpStream::connect(listener).await.expect("listener");
    // The write may fail if the close is already there; either way no data may come back.
    let _ = s.write_all(b"let me in").await;
    assert_closed_without_data(&mut s, what).await;
}

/// One HTTP/1.1 response: status, lower-cased headers, body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on a kept-alive connection and reads one response (content-length bodies).
async fn request(s: &mut BufReader<TcpStream>, method: &str, path: &str) -> Response {
    let req = format!("{method} {path} HTTP/1.1\r\nhost: checkout\r\n\r\n");
    s.get_mut()
        .write_all(req.as_bytes())
        .await
        .expect("write request");
    tokio::time::timeout(PATIENCE, read_response(s))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no response in time"))
}

/// Sends `head` (a request line and headers, without the final empty line) and reads one
/// response.
async fn raw_request(s: &mut BufReader<TcpStream>, head: &str) -> Response {
    let req = format!("{head}\r\n\r\n");
    s.get_mut()
        .write_all(req.as_bytes())
        .await
        .expect("write request");
    tokio::time::timeout(PATIENCE, read_response(s))
        .await
        .unwrap_or_else(|_| panic!("{head:?}: no response in time"))
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
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        s.read_line(&mut h).await.expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').expect("header line");
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().expect("content-length"))
        .expect("a content-length (the test reads one response at a time)");
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.expect("body");
    Response {
        status,
        headers,
        body: String::from_utf8(body).expect("UTF-8 body"),
    }
}

fn decisions(b: &Bound, rule: &str, outcome: &'static str, mode: &'static str) -> u64 {
    b.authz
        .as_ref()
        .expect("policy configured")
        .metrics
        .decisions
        .get_or_create(&RuleLabels {
            rule: rule.into(),
            outcome,
            mode,
        })
        .get()
}

fn serial(b: &Bound) -> String {
    b.identity.current().expect("SVID").info.serial.to_string()
}

/// Audit lines about `source`.
fn lines_from<'a>(lines: &'a [Value], source: &SpiffeId) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["source_id"] == source.to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn l4_allows_one_caller_and_closes_the_other_naming_the_rule() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = echo_app().await;
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            r#"[service.checkout]

[[service.checkout.rule]]
name = "no-batch"
action = "deny"
from = ["{batch}"]

[[service.checkout.rule]]
name = "frontend-in"
action = "allow"
from = ["{frontend}"]
"#,
            batch = mesh.id("batch"),
            frontend = mesh.id("frontend"),
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let batch = mesh.caller("batch", 0, &checkout).await;

    let mut conn = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    for i in 0..3 {
        let msg = format!("order #{i}");
        let back = round_trip(&mut conn, msg.as_bytes()).await.expect("echo");
        assert_eq!(back, msg.as_bytes());
    }
    assert_refused(batch.listeners[0], "batch -> checkout").await;

    let m = &checkout.metrics;
    eventually("checkout counts batch's denial", || {
        m.failures("inbound", "policy_denied") == 1
    })
    .await;
    assert_eq!(
        m.opened
            .get_or_create(&Dir {
                direction: "inbound"
            })
            .get(),
        1
    );
    assert_eq!(decisions(&checkout, "no-batch", "deny", "enforced"), 1);
    assert_eq!(decisions(&checkout, "frontend-in", "allow", "enforced"), 1);

    let audit = mesh.audit("checkout", &checkout);
    let denied = lines_from(&audit, &mesh.id("batch"));
    assert_eq!(denied.len(), 1, "one line for batch: {audit:#?}");
    let d = denied[0];
    for (field, want) in [
        ("event", Value::from("decision")),
        ("source_serial", serial(&batch).into()),
        ("source_region", "eu-west".into()),
        ("destination_service", "checkout".into()),
        ("destination_region", "eu-west".into()),
        ("port", app.port().into()),
        ("method", Value::Null),
        ("path", Value::Null),
        ("outcome", "deny".into()),
        ("rule", "no-batch".into()),
        ("mode", "enforced".into()),
    ] {
        assert_eq!(d[field], want, "field {field} of {d}");
    }
    let time = d["time"].as_str().expect("time");
    let at = humantime::parse_rfc3339(time).expect("RFC 3339 time");
    let skew = SystemTime::now()
        .duration_since(at)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(60), "time {time} is not now");
    let allowed = lines_from(&audit, &mesh.id("frontend"));
    assert_eq!(allowed.len(), 1, "one line per connection: {audit:#?}");
    assert_eq!(allowed[0]["outcome"], "allow");
    assert_eq!(allowed[0]["rule"], "frontend-in");
    assert_eq!(allowed[0]["source_serial"], serial(&frontend));
}

#[tokio::test]
async fn l7_answers_403_between_two_allowed_requests_on_one_connection() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = http_app().await;
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            r#"[service.checkout]
http_ports = [{port}]

[[service.checkout.rule]]
name = "no-deletes"
action = "deny"
methods = ["DELETE"]

[[service.checkout.rule]]
name = "frontend-orders"
action = "allow"
from = ["{frontend}"]
paths = ["/orders/*"]
"#,
            port = app.port(),
            frontend = mesh.id("frontend"),
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;

    let tcp = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    let mut conn = BufReader::new(tcp);
    let first = request(&mut conn, "GET", "/orders/1").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body, "checkout got \"GET /orders/1 HTTP/1.1\"\n");

    let denied = request(&mut conn, "DELETE", "/orders/1").await;
    assert_eq!(denied.status, 403);
    // The caller learns nothing about the policy; the rule is in the audit log and metrics.
    assert_eq!(denied.body, "forbidden\n");
    assert_eq!(denied.header("x-trustline-rule"), None);

    let again = request(&mut conn, "GET", "/orders/2").await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body, "checkout got \"GET /orders/2 HTTP/1.1\"\n");

    // All three on the one mesh connection.
    let opened = |b: &Bound, direction| b.metrics.opened.get_or_create(&Dir { direction }).get();
    assert_eq!(opened(&frontend, "outbound"), 1);
    assert_eq!(opened(&checkout, "inbound"), 1);
    assert_eq!(
        decisions(&checkout, "frontend-orders", "allow", "enforced"),
        2
    );
    assert_eq!(decisions(&checkout, "no-deletes", "deny", "enforced"), 1);

    let audit = mesh.audit("checkout", &checkout);
    let deny: Vec<_> = audit.iter().filter(|l| l["outcome"] == "deny").collect();
    assert_eq!(deny.len(), 1, "{audit:#?}");
    assert_eq!(deny[0]["method"], "DELETE");
    assert_eq!(deny[0]["path"], "/orders/1");
    assert_eq!(deny[0]["rule"], "no-deletes");
    assert_eq!(deny[0]["port"], app.port());
    assert_eq!(deny[0]["source_id"], mesh.id("frontend").to_string());
}

/// F3: rules decide on the path the app will serve. The app here reads paths leniently (as most
/// servers do); before normalisation, every one of these reached it and it served the secret
/// or the admin page.
#[tokio::test]
async fn l7_rules_decide_the_path_the_app_will_serve() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = normalising_app().await;
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            r#"[service.checkout]
http_ports = [{port}]

[[service.checkout.rule]]
name = "no-admin"
action = "deny"
paths = ["/admin/*"]

[[service.checkout.rule]]
name = "no-deletes"
action = "deny"
methods = ["DELETE"]

[[service.checkout.rule]]
name = "frontend-api"
action = "allow"
from = ["{frontend}"]
methods = ["GET"]
paths = ["/api/*"]

[[service.checkout.rule]]
name = "batch-any"
action = "allow"
from = ["{batch}"]
"#,
            port = app.port(),
            frontend = mesh.id("frontend"),
            batch = mesh.id("batch"),
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let batch = mesh.caller("batch", 0, &checkout).await;
    let connect = |b: &Bound| {
        let to = b.listeners[0];
        async move { BufReader::new(TcpStream::connect(to).await.unwrap()) }
    };

    // An allow on /api/* is not a way out of /api.
    let mut f = connect(&frontend).await;
    for path in [
        "/api/../secret.txt",
        "/api/%2e%2e/secret.txt",
        "/api/.%2e/secret.txt",
        "/api/%2E./secret.txt",
        "/api/./../secret.txt",
    ] {
        let r = request(&mut f, "GET", path).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, "forbidden\n"),
            "GET {path}"
        );
    }
    // A deny on /admin/* is not escaped by spelling the path differently.
    let mut b = connect(&batch).await;
    for path in [
        "//admin/x",
        "/./admin/x",
        "/%61dmin/x",
        "/api/../admin/x",
        "/orders/%2e%2e/admin/x",
        "/admin",
        "/admin/",
    ] {
        let r = request(&mut b, "GET", path).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, "forbidden\n"),
            "GET {path}"
        );
    }
    // What could be read two ways is refused, whatever the rules.
    for path in [
        "/api/..%2fsecret.txt",
        "/api/..%5Csecret.txt",
        "/admin;x/y",
        "/api/a%00b",
        "/api/%zz",
    ] {
        let r = request(&mut b, "GET", path).await;
        assert_eq!(r.status, 400, "GET {path}: {}", r.body);
        assert!(
            r.body.starts_with("bad request: request path: "),
            "{}",
            r.body
        );
    }
    // The app gets exactly the path that was decided on, and the query as sent.
    let r = request(&mut f, "GET", "/api/./orders//%31?q=%2e%2e&x=/../").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        "checkout got \"GET /api/orders/1?q=%2e%2e&x=/../ HTTP/1.1\"\n"
    );
    let r = request(&mut b, "GET", "/orders/%7euser/a%2bb").await;
    assert_eq!(
        r.body,
        "checkout got \"GET /orders/~user/a%2Bb HTTP/1.1\"\n"
    );

    // Methods: an allow matches exactly, a deny any case.
    let r = request(&mut f, "get", "/api/orders").await;
    assert_eq!(r.status, 403, "`get` is not `GET`: {}", r.body);
    let r = request(&mut b, "delete", "/orders/1").await;
    assert_eq!(
        r.status, 403,
        "a deny on DELETE catches `delete`: {}",
        r.body
    );

    // Request targets and Host, as a strict server reads them.
    let r = raw_request(
        &mut f,
        "GET http://checkout/api/x HTTP/1.1\r\nhost: checkout",
    )
    .await;
    assert_eq!(r.body, "checkout got \"GET /api/x HTTP/1.1\"\n");
    let r = raw_request(&mut b, "OPTIONS * HTTP/1.1\r\nhost: checkout").await;
    assert_eq!(r.body, "checkout got \"OPTIONS * HTTP/1.1\"\n");
    for (head, why) in [
        (
            "GET http://elsewhere/api/x HTTP/1.1\r\nhost: checkout",
            "different hosts",
        ),
        (
            "GET /api/x HTTP/1.1\r\nhost: checkout\r\nhost: other",
            "exactly one",
        ),
        ("GET /api/x HTTP/1.1", "exactly one"),
        (
            "GET http://u@checkout/api/x HTTP/1.1\r\nhost: checkout",
            "user info",
        ),
        ("GET * HTTP/1.1\r\nhost: checkout", "request target"),
        (
            "CONNECT checkout:80 HTTP/1.1\r\nhost: checkout:80",
            "request target",
        ),
    ] {
        let mut c = connect(&batch).await;
        let r = raw_request(&mut c, head).await;
        assert_eq!(r.status, 400, "{head:?}: {}", r.body);
        assert!(r.body.contains(why), "{head:?}: {}", r.body);
    }

    // A method that is not a token never reaches a rule (hyper answers 400 and closes).
    let mut c = connect(&batch).await;
    c.get_mut()
        .write_all(b"GE(T /api/x HTTP/1.1\r\nhost: checkout\r\n\r\n")
        .await
        .unwrap();
    let mut status = String::new();
    tokio::time::timeout(PATIENCE, c.read_line(&mut status))
        .await
        .expect("an answer")
        .expect("status line");
    assert!(status.starts_with("HTTP/1.1 400"), "{status:?}");

    // Decided and audited on the normalised path, refusals counted.
    assert_eq!(decisions(&checkout, "no-admin", "deny", "enforced"), 7);
    assert_eq!(decisions(&checkout, "default", "deny", "enforced"), 6);
    // 11 refused by the sidecar's own checks, and the request hyper could not parse (counted
    // since unparseable requests are audited as bad-request too).
    assert_eq!(decisions(&checkout, "bad-request", "deny", "enforced"), 12);
    let audit = mesh.audit("checkout", &checkout);
    let paths: Vec<&str> = audit
        .iter()
        .filter(|l| l["rule"] == "no-admin")
        .filter_map(|l| l["path"].as_str())
        .collect();
    assert!(
        paths
            .iter()
            .all(|p| *p == "/admin/x" || p.starts_with("/admin")),
        "{paths:?}"
    );
    let refused: Vec<_> = audit
        .iter()
        .filter(|l| l["rule"] == "bad-request")
        .collect();
    assert!(
        refused.iter().any(|l| l["path"] == "/api/..%2fsecret.txt"
            && l["detail"].as_str().unwrap_or("").contains("encoded slash")),
        "{refused:#?}"
    );
}

/// A caller that opens a connection to an HTTP port and never finishes (or never starts) a
/// request head is closed after `handshake_timeout` (5 s here), not held forever.
#[tokio::test]
async fn l7_port_closes_a_client_that_stalls_its_request_head() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = http_app().await;
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!("[service.checkout]\nhttp_ports = [{}]\n", app.port()),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let to = frontend.listeners[0];
    let mut half = TcpStream::connect(to).await.unwrap();
    half.write_all(b"GET /orders/1 HTTP/1.1\r\nhost: checkout\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(to).await.unwrap();
    // One request answered, then half of the next (and a keep-alive connection idle as long).
    let mut second = BufReader::new(TcpStream::connect(to).await.unwrap());
    assert_eq!(request(&mut second, "GET", "/orders/1").await.status, 200);
    let mut second = second.into_inner();
    second
        .write_all(b"GET /orders/2 HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::join!(
        assert_closed_without_data(&mut half, "half a request head"),
        assert_closed_without_data(&mut silent, "no request at all"),
        assert_closed_without_data(&mut second, "half a second request head"),
    );
    // Others are served meanwhile and after.
    let mut ok = BufReader::new(TcpStream::connect(to).await.unwrap());
    assert_eq!(request(&mut ok, "GET", "/orders/2").await.status, 200);
}

/// The same decisions for an HTTP/2 caller (prior knowledge, h2c to its sidecar): the inbound
/// sidecar detects HTTP/2 inside the mesh connection and decides each stream.
#[tokio::test]
async fn l7_decides_each_http2_stream_on_one_connection() {
    use http_body_util::{BodyExt, Empty};
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = http_app().await;
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            "[service.checkout]\nhttp_ports = [{port}]\n\n[[service.checkout.rule]]\nname = \"frontend-get\"\naction = \"allow\"\nfrom = [\"{frontend}\"]\nmethods = [\"GET\"]\n",
            port = app.port(),
            frontend = mesh.id("frontend"),
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let tcp = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake through the mesh");
    tokio::spawn(conn);
    let mut send = |method: &str, path: &str| {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://checkout{path}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        h2.send_request(req)
    };
    let (a, b) = (send("GET", "/orders/1"), send("POST", "/orders"));
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.expect("GET answered"), b.expect("POST answered"));
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 403);
    assert!(b.headers().get("x-trustline-rule").is_none());
    let body = a.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"checkout got \"GET /orders/1 HTTP/1.1\"\n");
    // HTTP/2 paths are normalised and forwarded so too.
    let c = send("GET", "/orders/./%31//").await.expect("GET answered");
    let body = c.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"checkout got \"GET /orders/1/ HTTP/1.1\"\n");
    let opened = |b: &Bound, direction| b.metrics.opened.get_or_create(&Dir { direction }).get();
    assert_eq!(
        opened(&checkout, "inbound"),
        1,
        "all streams rode one mesh connection"
    );
    assert_eq!(decisions(&checkout, "frontend-get", "allow", "enforced"), 2);
    assert_eq!(decisions(&checkout, "default", "deny", "enforced"), 1);
}

#[tokio::test]
async fn region_rule_tells_callers_of_two_regional_cas_apart() {
    let mesh = Mesh::new(&["eu-west", "us-east"]).await;
    let app = echo_app().await;
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            r#"[service.checkout]

[[service.checkout.rule]]
name = "shop-in-eu"
action = "allow"
from = ["spiffe://{td}/ns/shop/*"]
regions = ["eu-west"]
"#,
            td = mesh.td,
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let eu = mesh.caller("web-eu", 0, &checkout).await;
    let us = mesh.caller("web-us", 1, &checkout).await;
    // Both chains verify against the one root; they differ only in the issuing intermediate.
    let region = |b: &Bound| {
        trustline::identity::region_of_chain(&b.identity.current().expect("SVID").chain)
    };
    assert_eq!(region(&eu).as_deref(), Some("eu-west"));
    assert_eq!(region(&us).as_deref(), Some("us-east"));

    echo_works(eu.listeners[0])
        .await
        .expect("eu caller allowed");
    assert_refused(us.listeners[0], "us caller").await;
    eventually("checkout counts the us denial", || {
        checkout.metrics.failures("inbound", "policy_denied") == 1
    })
    .await;
    assert_eq!(decisions(&checkout, "shop-in-eu", "allow", "enforced"), 1);
    assert_eq!(decisions(&checkout, "default", "deny", "enforced"), 1);

    let audit = mesh.audit("checkout", &checkout);
    let eu_lines = lines_from(&audit, &mesh.id("web-eu"));
    let us_lines = lines_from(&audit, &mesh.id("web-us"));
    assert_eq!(eu_lines.len(), 1, "{audit:#?}");
    assert_eq!(us_lines.len(), 1, "{audit:#?}");
    assert_eq!(eu_lines[0]["source_region"], "eu-west");
    assert_eq!(eu_lines[0]["outcome"], "allow");
    assert_eq!(eu_lines[0]["rule"], "shop-in-eu");
    assert_eq!(us_lines[0]["source_region"], "us-east");
    assert_eq!(us_lines[0]["outcome"], "deny");
    assert_eq!(us_lines[0]["rule"], "default");
    assert_eq!(us_lines[0]["source_serial"], serial(&us));
}

/// A window of `len_min` minutes starting at the whole minute that is 61 minutes after `t`
/// (so between 60 and 61 minutes away), as a policy `hours` entry, and how far `t` must move
/// to be 10 minutes into it.
fn window_an_hour_after(t: SystemTime, len_min: u64) -> (String, Duration) {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap();
    let start = (since_epoch.as_secs() / 60 + 61) * 60;
    let end = start + len_min * 60;
    let hhmm = |s: u64| format!("{:02}:{:02}", s % 86400 / 3600, s % 3600 / 60);
    // Every day, so midnight wrap (an end before the start) and weekdays do not matter.
    let window = format!("Mon-Sun {}-{} UTC", hhmm(start), hhmm(end));
    let advance = Duration::from_secs(start + 600) - since_epoch;
    (window, advance)
}

#[test]
fn the_window_helper_starts_an_hour_ahead_and_wraps_midnight() {
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    // 23:15:30 UTC: the window starts at 00:16 the next day.
    let (w, adv) = window_an_hour_after(at(19_000 * 86400 + 23 * 3600 + 15 * 60 + 30), 30);
    assert_eq!(w, "Mon-Sun 00:16-00:46 UTC");
    assert_eq!(adv, Duration::from_secs(60 * 60 + 30 + 600));
    // 22:40:00: the window wraps midnight.
    let (w, _) = window_an_hour_after(at(19_000 * 86400 + 22 * 3600 + 40 * 60), 30);
    assert_eq!(w, "Mon-Sun 23:41-00:11 UTC");
}

#[tokio::test]
async fn time_window_rule_flips_when_the_injected_clock_moves() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = echo_app().await;
    let start = SystemTime::now();
    let clock = Clock::manual(start);
    let (window, advance) = window_an_hour_after(start, 30);
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            r#"[service.checkout]

[[service.checkout.rule]]
name = "frontend-in-window"
action = "allow"
from = ["{frontend}"]
hours = ["{window}"]
"#,
            frontend = mesh.id("frontend"),
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: clock.clone(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;

    assert_refused(frontend.listeners[0], &format!("before {window}")).await;
    eventually("checkout counts the denial", || {
        checkout.metrics.failures("inbound", "policy_denied") == 1
    })
    .await;
    assert_eq!(decisions(&checkout, "default", "deny", "enforced"), 1);

    clock.advance(advance);
    echo_works(frontend.listeners[0])
        .await
        .unwrap_or_else(|e| panic!("inside {window}: {e}"));
    assert_eq!(
        decisions(&checkout, "frontend-in-window", "allow", "enforced"),
        1
    );
    let audit = mesh.audit("checkout", &checkout);
    let outcomes: Vec<_> = audit
        .iter()
        .map(|l| (l["outcome"].as_str(), l["rule"].as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Some("deny"), Some("default")),
            (Some("allow"), Some("frontend-in-window"))
        ]
    );
    // The audit time is the injected one.
    let t = humantime::parse_rfc3339(audit[1]["time"].as_str().unwrap()).unwrap();
    let moved = t.duration_since(start).unwrap_or_default();
    assert!(
        moved >= advance - Duration::from_secs(1),
        "audit time {t:?}"
    );
}

/// F14: a raw TCP connection admitted inside an `hours` window is closed when the window ends
/// (the injected clock moves past it; the sweep runs at least every refresh interval), audited
/// with the rule that denies it now and the one that had allowed it.
#[tokio::test]
async fn a_live_l4_connection_is_closed_when_its_time_window_ends() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = echo_app().await;
    let start = SystemTime::now();
    let clock = Clock::manual(start);
    let (window, advance) = window_an_hour_after(start, 30);
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            r#"[service.checkout]

[[service.checkout.rule]]
name = "frontend-in-window"
action = "allow"
from = ["{frontend}"]
hours = ["{window}"]
"#,
            frontend = mesh.id("frontend"),
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: clock.clone(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    clock.advance(advance);
    let mut live = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    assert_eq!(round_trip(&mut live, b"inside").await.unwrap(), b"inside");
    // Still inside the window (10 of its 30 minutes in): a sweep leaves it alone.
    clock.advance(Duration::from_secs(10 * 60));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(round_trip(&mut live, b"still").await.unwrap(), b"still");

    clock.advance(Duration::from_secs(11 * 60));
    assert_closed_without_data(&mut live, &format!("the connection after {window} ended")).await;
    eventually("checkout counts the closure", || {
        checkout
            .metrics
            .closed_live_count("inbound", "time_window_closed")
            == 1
    })
    .await;
    let audit = mesh.audit("checkout", &checkout);
    let closed: Vec<_> = audit
        .iter()
        .filter(|l| {
            l["detail"]
                .as_str()
                .is_some_and(|d| d.contains("time_window_closed"))
        })
        .collect();
    assert_eq!(closed.len(), 1, "{audit:#?}");
    assert_eq!(closed[0]["outcome"], "deny");
    assert_eq!(closed[0]["rule"], "default");
    assert_eq!(closed[0]["source_id"], mesh.id("frontend").to_string());
    assert!(
        closed[0]["detail"]
            .as_str()
            .unwrap()
            .contains("frontend-in-window"),
        "{audit:#?}"
    );
    assert_refused(frontend.listeners[0], "a new connection after the window").await;
}

/// F14: a live connection is closed when the caller's certificate expires, though nothing else
/// happens (no reload, no revocation): the injected clock moves past its `not_after`.
#[tokio::test]
async fn a_live_connection_is_closed_when_the_callers_certificate_expires() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = echo_app().await;
    let clock = Clock::manual(SystemTime::now());
    let policy = mesh.policy_path();
    write_policy(&policy, &allow_only(&mesh, "frontend"));
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: clock.clone(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let mut live = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    assert_eq!(round_trip(&mut live, b"valid").await.unwrap(), b"valid");
    let not_after = frontend.identity.current().expect("SVID").info.not_after;
    let left = not_after.duration_since(clock.now()).unwrap();
    clock.advance(left + Duration::from_secs(1));
    assert_closed_without_data(&mut live, "the connection after the caller's SVID expired").await;
    eventually("checkout counts the closure", || {
        checkout
            .metrics
            .closed_live_count("inbound", "expired_certificate")
            >= 1
    })
    .await;
    let audit = mesh.audit("checkout", &checkout);
    assert!(
        audit.iter().any(|l| l["rule"] == "expired_certificate"
            && l["source_serial"] == serial(&frontend)
            && l["outcome"] == "deny"),
        "{audit:#?}"
    );
}

/// F14 on an HTTP port: a keep-alive connection of a caller whose certificate is revoked is
/// closed once checkout's revocation list has the serial (requests were decided one by one, but
/// the certificate under them is re-checked too), on a pooled session and on its own.
#[tokio::test]
async fn a_live_http_connection_of_a_revoked_caller_is_closed() {
    for top in ["", "pooling = false"] {
        revoked_http_caller_is_closed(top).await;
    }
}

/// `checkout` protecting an HTTP app (decided per request on its port) with `rules`, the
/// policy text after the service's header, on the system clock.
async fn http_checkout(mesh: &Mesh, rules: &str) -> Bound {
    let app = http_app().await;
    let policy = mesh.policy_path();
    let text = format!(
        "[service.checkout]\nhttp_ports = [{}]\n\n{rules}",
        app.port()
    );
    write_policy(&policy, &text);
    mesh.checkout(Protect {
        app,
        policy: &policy,
        reload_interval: NEVER,
        clock: Clock::system(),
    })
    .await
}

async fn revoked_http_caller_is_closed(top: &str) {
    let mesh = Mesh::new(&["eu-west"]).await;
    let rules = format!(
        "[[service.checkout.rule]]\nname = \"frontend-in\"\naction = \"allow\"\nfrom = [\"{}\"]\n",
        mesh.id("frontend")
    );
    let checkout = http_checkout(&mesh, &rules).await;
    let frontend = mesh.caller_with("frontend", 0, &checkout, top).await;
    let tcp = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    let mut conn = BufReader::new(tcp);
    assert_eq!(request(&mut conn, "GET", "/orders/1").await.status, 200);

    let svid = frontend.identity.current().expect("SVID");
    let r = admin::call(
        &mesh.cas[0].bound.admin_socket,
        &admin::AdminRequest::Revoke {
            serial: svid.info.serial.to_string(),
        },
    )
    .await
    .expect("admin socket");
    assert!(r.ok, "revocation refused: {:?}", r.error);
    eventually("checkout's revocation list has the serial", || {
        checkout.identity.revoked.load().contains(&svid.info.serial)
    })
    .await;
    assert_closed_without_data(
        conn.get_mut(),
        &format!("the revoked caller's HTTP connection ({top:?})"),
    )
    .await;
    eventually("checkout counts the closure as revoked", || {
        checkout.metrics.closed_live_count("inbound", "revoked") >= 1
    })
    .await;
}

#[tokio::test]
async fn dry_run_rule_logs_a_deny_without_enforcing_it() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = echo_app().await;
    let policy = mesh.policy_path();
    write_policy(
        &policy,
        &format!(
            r#"[service.checkout]

[[service.checkout.rule]]
name = "would-block-frontend"
action = "deny"
mode = "dry-run"
from = ["{frontend}"]

[[service.checkout.rule]]
name = "frontend-in"
action = "allow"
from = ["{frontend}"]
"#,
            frontend = mesh.id("frontend"),
        ),
    );
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;

    echo_works(frontend.listeners[0])
        .await
        .expect("a dry-run deny does not block");
    assert_eq!(checkout.metrics.failures("inbound", "policy_denied"), 0);
    assert_eq!(
        decisions(&checkout, "would-block-frontend", "deny", "dry-run"),
        1
    );
    assert_eq!(
        decisions(&checkout, "would-block-frontend", "deny", "enforced"),
        0
    );
    assert_eq!(decisions(&checkout, "frontend-in", "allow", "enforced"), 1);

    let audit = mesh.audit("checkout", &checkout);
    let dry: Vec<_> = audit.iter().filter(|l| l["mode"] == "dry-run").collect();
    assert_eq!(dry.len(), 1, "{audit:#?}");
    assert_eq!(dry[0]["outcome"], "deny");
    assert_eq!(dry[0]["rule"], "would-block-frontend");
    assert_eq!(dry[0]["source_id"], mesh.id("frontend").to_string());
    let enforced: Vec<_> = audit.iter().filter(|l| l["mode"] == "enforced").collect();
    assert_eq!(enforced.len(), 1, "{audit:#?}");
    assert_eq!(enforced[0]["outcome"], "allow");
}

fn allow_only(mesh: &Mesh, name: &str) -> String {
    format!(
        r#"[service.checkout]

[[service.checkout.rule]]
name = "only-{name}"
action = "allow"
from = ["{id}"]
"#,
        id = mesh.id(name),
    )
}

#[tokio::test]
async fn hot_reload_closes_a_live_connection_the_new_policy_denies() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = echo_app().await;
    let policy = mesh.policy_path();
    write_policy(&policy, &allow_only(&mesh, "frontend"));
    // The file watcher does the reload.
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: Duration::from_millis(100),
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let authz = checkout.authz.clone().expect("policy configured");

    let mut live = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    assert_eq!(round_trip(&mut live, b"before").await.unwrap(), b"before");

    write_policy(&policy, &allow_only(&mesh, "somebody-else"));
    eventually("the watcher applies the new policy", || {
        authz.metrics.reloads.get() == 1
    })
    .await;
    assert_closed_without_data(&mut live, "the live connection after the reload").await;
    assert_eq!(authz.metrics.closed_by_reload.get(), 1);
    assert_eq!(authz.metrics.stale.get(), 0);
    eventually("checkout counts the closure", || {
        checkout
            .metrics
            .closed_live_count("inbound", "policy_reload")
            == 1
    })
    .await;

    assert_refused(frontend.listeners[0], "a new connection after the reload").await;
    eventually("checkout counts the new denial", || {
        checkout.metrics.failures("inbound", "policy_denied") == 1
    })
    .await;
    let audit = mesh.audit("checkout", &checkout);
    let denies: Vec<_> = audit.iter().filter(|l| l["outcome"] == "deny").collect();
    // The re-authorisation of the live connection and the new connection.
    assert_eq!(denies.len(), 2, "{audit:#?}");
    assert!(denies.iter().all(|l| l["rule"] == "default"), "{audit:#?}");
}

#[tokio::test]
async fn a_bad_reload_keeps_the_last_good_policy() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let app = echo_app().await;
    let policy = mesh.policy_path();
    write_policy(&policy, &allow_only(&mesh, "frontend"));
    let checkout = mesh
        .checkout(Protect {
            app,
            policy: &policy,
            reload_interval: NEVER,
            clock: Clock::system(),
        })
        .await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let batch = mesh.caller("batch", 0, &checkout).await;
    let authz = checkout.authz.clone().expect("policy configured");
    echo_works(frontend.listeners[0]).await.expect("allowed");
    let mut live = TcpStream::connect(frontend.listeners[0]).await.unwrap();
    assert_eq!(round_trip(&mut live, b"live").await.unwrap(), b"live");

    // Would allow everybody if it were applied, but one rule is invalid.
    write_policy(
        &policy,
        r#"[service.checkout]
default = "allow"

[[service.checkout.rule]]
name = "typo"
action = "permit"
"#,
    );
    let err = authz
        .reload()
        .expect_err("an invalid policy is refused")
        .to_string();
    assert!(err.contains("permit"), "error names the bad value: {err}");
    assert!(err.contains("action"), "error names the field: {err}");
    assert_eq!(authz.metrics.reload_failures.get(), 1);
    assert_eq!(authz.metrics.stale.get(), 1);
    assert_eq!(authz.metrics.reloads.get(), 0);
    assert_eq!(authz.metrics.closed_by_reload.get(), 0);

    // The old policy still decides: frontend in (old and new connections), batch out.
    assert_eq!(round_trip(&mut live, b"still").await.unwrap(), b"still");
    echo_works(frontend.listeners[0])
        .await
        .expect("still allowed");
    assert_refused(batch.listeners[0], "batch under the old policy").await;
    eventually("checkout counts batch's denial", || {
        checkout.metrics.failures("inbound", "policy_denied") == 1
    })
    .await;

    // A valid file clears the flag. Only `live` may still be open when it is applied.
    eventually("the finished connections are over", || {
        checkout
            .metrics
            .closed
            .get_or_create(&Dir {
                direction: "inbound",
            })
            .get()
            == 2
    })
    .await;
    write_policy(&policy, &allow_only(&mesh, "batch"));
    assert_eq!(
        authz.reload().map_err(|e| e.to_string()),
        Ok(1),
        "frontend's live connection closed"
    );
    assert_closed_without_data(&mut live, "frontend's live connection after a good reload").await;
    assert_eq!(authz.metrics.stale.get(), 0);
    assert_eq!(authz.metrics.reload_failures.get(), 1);
    echo_works(batch.listeners[0])
        .await
        .expect("batch allowed now");
}

/// Speaks HTTP/1.1 to `checkout`'s inbound directly over mTLS as `caller` (no pooled session):
/// sends one request and returns whatever came back (empty when the connection was closed).
async fn direct_http(mesh: &Mesh, checkout: &Bound, caller: &Bound, path: &str) -> String {
    use trustline::crypto::TLS13_ONLY;
    use trustline::tls::{ExpectedPeer, SpiffeServerVerifier};
    let bundle = trustline::identity::Bundle::from_pem(
        mesh.td.clone(),
        &std::fs::read(mesh.root.join("bundle.pem")).unwrap(),
        "bundle",
    )
    .unwrap();
    let svid = caller.identity.current().expect("caller SVID");
    let verifier = SpiffeServerVerifier::new(
        bundle.store(),
        ExpectedPeer::AnyOf(vec![mesh.id("checkout")]),
    );
    let mut cfg = rustls::ClientConfig::builder_with_provider(trustline::crypto::provider())
        .with_protocol_versions(TLS13_ONLY)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
        .unwrap();
    cfg.alpn_protocols = vec![trustline::tls::mesh::MESH_ALPN.to_vec()];
    let tcp = TcpStream::connect(checkout.inbound.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("checkout").unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: checkout\r\nConnection: close\r\n\r\n");
    if tls.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut got))
        .await
        .expect("answered or closed");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn an_http_port_refuses_the_connection_of_a_caller_no_rule_could_ever_allow() {
    let mesh = Mesh::new(&["eu-west"]).await;
    let rules = format!(
        "[[service.checkout.rule]]\nname = \"frontend-orders\"\naction = \"allow\"\n\
         from = [\"{}\"]\npaths = [\"/orders/*\"]\n",
        mesh.id("frontend")
    );
    let checkout = http_checkout(&mesh, &rules).await;
    let frontend = mesh.caller("frontend", 0, &checkout).await;
    let batch = mesh.caller("batch", 0, &checkout).await;
    let allowed = direct_http(&mesh, &checkout, &frontend, "/orders/1").await;
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    // batch could never be allowed a request: no connection to send them on.
    let refused = direct_http(&mesh, &checkout, &batch, "/orders/1").await;
    assert_eq!(refused, "", "batch got an HTTP answer");
    eventually("the refusal is counted with its rule", || {
        checkout.metrics.failures("inbound", "policy_denied") == 1
            && decisions(&checkout, "default", "deny", "enforced") == 1
    })
    .await;
}
