//! `trustline agent` end to end: a real CA (with an `[[agent]]` registration), the agent joining
//! it with a node token and serving the Workload API on a Unix socket, and callers: trustline's
//! own sidecar (`source = "workload-api"`), `trustline agent fetch` run as other uids, and the
//! agent's client module. Real sockets, real TLS 1.3, real certificates, system clock.
//!
//! Some tests run processes as other users (uid 65534, 65533): they need root and fail loudly
//! without it.

// Certificates are minted against the wall clock the agent runs on (`Clock::system()`).
#![allow(clippy::disallowed_methods)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::*;
use tokio_stream::StreamExt as _;
use trustline::agent::client::{split_certs, Client};
use trustline::agent::config::AgentConfig;
use trustline::ca::agents::AgentFile;
use trustline::clock::Clock;
use trustline::identity::{inspect_cert, Serial, SpiffeId};

const HOUR: Duration = Duration::from_secs(3600);

fn agent_id(node: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://{TD}/trustline/agent/{node}")).unwrap()
}

/// The uid this test runs as.
fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn require_root() {
    assert_eq!(
        my_uid(),
        0,
        "this test runs callers as other uids and needs root; run it as root (CI does)"
    );
}

/// A CA issuing `ttl` SVIDs on which agent `n1` may obtain every `ns/shop/` ID.
async fn ca(ttl: Duration) -> Ca {
    start_ca_tuned(ttl, &[], |c| {
        c.agents = vec![AgentFile {
            id: agent_id("n1").to_string(),
            workloads: vec![format!("spiffe://{TD}/ns/shop/*")],
        }]
    })
    .await
}

/// A running agent `n1` and where its files are.
struct Agent {
    bound: trustline::agent::Bound,
    socket: PathBuf,
    audit: PathBuf,
}

/// Writes agent `n1`'s config (a fresh node token, `extra` top-level keys, then the
/// `[[workload]]` entries `workloads`) beside the CA's files and starts it; its socket is in
/// a directory every user may enter.
async fn start_agent(ca: &Ca, extra: &str, workloads: &str) -> Agent {
    let dir = ca.pki.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let token = dir.join("n1.token");
    std::fs::write(&token, ca.token(&agent_id("n1")).await).unwrap();
    let socket = dir.join("run/agent.sock");
    let audit = dir.join("agent-audit.log");
    let toml = format!(
        r#"trust_domain = "{TD}"
bundle = {bundle:?}
socket = {socket:?}
node = "n1"
audit_log = {audit:?}
admin = "127.0.0.1:0"
{extra}

[identity]
source = "ca"
ca_url = "{url}"
token_file = {token:?}
refresh_interval = "200ms"

{workloads}"#,
        bundle = ca.pki.region.join("bundle.pem"),
        url = ca.url(),
    );
    let file = dir.join("agent.toml");
    std::fs::write(&file, toml).unwrap();
    let config = AgentConfig::load(&file).unwrap_or_else(|e| panic!("agent config: {e}"));
    let bound = trustline::agent::build(config, Clock::system())
        .await
        .expect("agent starts");
    Agent {
        bound,
        socket,
        audit,
    }
}

impl Agent {
    /// Waits until the agent holds an SVID for each of `ids`.
    async fn ready_for(&self, ids: &[SpiffeId]) {
        for id in ids {
            let w = self.bound.workloads.get(id).expect("registered");
            eventually(&format!("the agent holds an SVID for {id}"), || {
                w.current().is_some()
            })
            .await;
        }
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn entry(name: &str, selectors: &str) -> String {
    format!(
        "[[workload]]\nspiffe_id = \"{}\"\n{selectors}\n\n",
        id(name)
    )
}

/// The serial of an X.509-SVID of a Workload API answer.
fn serial_of(s: &trustline::agent::pb::X509svid) -> Serial {
    let chain = split_certs(&s.x509_svid).unwrap();
    inspect_cert(&chain[0]).unwrap().serial
}

/// Runs `trustline agent fetch --socket SOCKET` as `uid` (and gid); success and output.
async fn fetch_as(uid: u32, socket: &std::path::Path) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_trustline"));
    cmd.args(["agent", "fetch", "--socket"])
        .arg(socket)
        .uid(uid)
        .gid(uid)
        .env("RUST_LOG", "error");
    // Off the runtime's thread: the agent under test serves on it.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run trustline agent fetch");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_sidecar_fed_by_the_agent_carries_an_mtls_call() {
    let ca = ca(HOUR).await;
    let agent = start_agent(&ca, "", &entry("api", &format!("uid = {}", my_uid()))).await;
    agent.ready_for(&[id("api")]).await;
    // B takes its SVID from the agent's socket exactly as from a SPIRE agent's.
    let app = echo_app().await;
    let identity = format!(
        "source = \"workload-api\"\nsocket = \"unix://{}\"",
        agent.socket.display()
    );
    let b = start_ready(ca.config_file(
        "api",
        &ca.pki.region.join("bundle.pem"),
        &identity,
        &inbound(app, &[id("web")]),
    ))
    .await;
    let held = agent
        .bound
        .workloads
        .get(&id("api"))
        .unwrap()
        .current()
        .unwrap();
    assert_eq!(
        b.identity.current().unwrap().info.serial,
        held.info.serial,
        "the sidecar serves the SVID the agent obtained"
    );
    let to_b = listener("api", b.inbound.expect("inbound"), &[id("api")]);
    let a = start_ready(ca.sidecar_config("web", &to_b).await).await;
    assert_eq!(call(a.listeners[0], b"hello").await.unwrap(), b"hello");
    assert!(failed_series(a.admin).await.is_empty());
    // The agent's audit trail names who was given what.
    let v = agent.audit_lines();
    assert!(
        v.iter().any(|e| e["event"] == "grant"
            && e["rpc"] == "FetchX509SVID"
            && e["spiffe_ids"][0] == id("api").to_string()),
        "{v:?}"
    );
    // The admin listener shows how long each identity lasts without the CA.
    let (status, body) = http_get(agent.bound.admin.unwrap(), "/identity").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["agent"]["spiffe_id"], agent_id("n1").to_string());
    assert_eq!(v["workloads"][0]["serial"], held.info.serial.to_string());
    assert!(
        v["workloads"][0]["seconds_left_if_ca_down"]
            .as_u64()
            .unwrap()
            > 3000
    );
    let (_, metrics) = http_get(agent.bound.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "trustline_agent_svid_expiry_timestamp_seconds{{spiffe_id=\"{}\"}} {}",
            id("api"),
            trustline::clock::unix_secs(held.info.not_after)
        )),
        "{metrics}"
    );
    agent.bound.stop().await;
}

#[tokio::test]
async fn callers_are_attested_by_uid_and_executable_and_a_stranger_is_refused() {
    require_root();
    let ca = ca(HOUR).await;
    let bin = std::fs::canonicalize(env!("CARGO_BIN_EXE_trustline")).unwrap();
    let workloads = [
        entry("api", "uid = 0"),
        // uid 65534 is named, but with another executable: all selectors must match.
        entry("batch", "uid = 65534\npath = \"/usr/bin/true\""),
        entry("tool", &format!("uid = 65533\npath = {bin:?}")),
    ]
    .concat();
    let agent = start_agent(&ca, "", &workloads).await;
    agent.ready_for(&[id("api"), id("batch"), id("tool")]).await;
    let socket = &agent.socket;

    let (ok, out) = fetch_as(0, socket).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("spiffe_id: {}", id("api"))), "{out}");
    assert!(
        !out.contains("sa/batch") && !out.contains("sa/tool"),
        "{out}"
    );

    let (ok, out) = fetch_as(65533, socket).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("spiffe_id: {}", id("tool"))), "{out}");
    assert!(out.contains("received 1 X.509-SVID(s)"), "{out}");

    let (ok, out) = fetch_as(65534, socket).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("PermissionDenied: no identity issued"),
        "{out}"
    );

    let trail = agent.audit_lines();
    let deny = trail
        .iter()
        .find(|e| e["event"] == "deny")
        .unwrap_or_else(|| panic!("no deny line: {trail:?}"));
    assert_eq!(deny["uid"], 65534);
    assert_eq!(deny["rpc"], "FetchX509SVID");
    assert_eq!(deny["reason"], "no identity issued");
    assert_eq!(deny["path"], bin.display().to_string());
    assert!(trail.iter().any(|e| e["event"] == "grant"
        && e["uid"] == 65533
        && e["spiffe_ids"][0] == id("tool").to_string()));
    agent.bound.stop().await;
}

#[tokio::test]
async fn a_rotation_is_pushed_on_the_open_stream() {
    let ca = ca(Duration::from_secs(4)).await;
    let agent = start_agent(&ca, "", &entry("api", &format!("uid = {}", my_uid()))).await;
    let mut client = Client::connect(&agent.socket).await.unwrap();
    let mut stream = client.x509_svids().await.expect("stream opens");
    let first = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("a first message")
        .unwrap()
        .unwrap();
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].spiffe_id, id("api").to_string());
    let s1 = serial_of(&first.svids[0]);
    // The agent renews at about half of the 4 s lifetime and pushes the new SVID, on the same
    // stream, with its new key.
    let second = tokio::time::timeout(PATIENCE, async {
        loop {
            let m = stream.next().await.expect("stream open").expect("message");
            if serial_of(&m.svids[0]) != s1 {
                return m;
            }
        }
    })
    .await
    .expect("a rotated SVID within the patience");
    assert_ne!(second.svids[0].x509_svid_key, first.svids[0].x509_svid_key);
    let chain = split_certs(&second.svids[0].x509_svid).unwrap();
    let roots = split_certs(&second.svids[0].bundle).unwrap();
    let bundle = trustline::identity::Bundle::new(ca.pki.td.clone(), roots).unwrap();
    let info = trustline::tls::verify_svid_chain(&bundle, &chain, SystemTime::now()).unwrap();
    assert_eq!(info.id, id("api"));
    agent.bound.stop().await;
}

#[tokio::test]
async fn a_call_without_the_security_metadata_is_refused() {
    let ca = ca(HOUR).await;
    let agent = start_agent(&ca, "", &entry("api", &format!("uid = {}", my_uid()))).await;
    agent.ready_for(&[id("api")]).await;
    let client = Client::connect(&agent.socket).await.unwrap();
    let Err(e) = client.clone().without_metadata().x509_svids().await else {
        panic!("served without the metadata")
    };
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let Err(e) = client.clone().without_metadata().x509_bundles().await else {
        panic!("served without the metadata")
    };
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // With it, the same caller is served.
    let mut s = client.clone().x509_svids().await.unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().svids.len(), 1);
    let mut b = client.clone().x509_bundles().await.unwrap();
    let bundles = b.next().await.unwrap().unwrap().bundles;
    let roots = split_certs(&bundles[&format!("spiffe://{TD}")]).unwrap();
    assert_eq!(roots, ca.pki.published_bundle().roots);
    agent.bound.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_per_uid_cap_are_closed() {
    let ca = ca(HOUR).await;
    let agent = start_agent(
        &ca,
        "max_connections_per_uid = 2",
        &entry("api", &format!("uid = {}", my_uid())),
    )
    .await;
    agent.ready_for(&[id("api")]).await;
    let open = |socket: PathBuf| async move {
        let mut c = Client::connect(&socket).await.ok()?;
        let mut s = c.x509_svids().await.ok()?;
        s.next().await?.ok()?;
        Some((c, s))
    };
    let one = open(agent.socket.clone()).await.expect("first connection");
    let _two = open(agent.socket.clone()).await.expect("second connection");
    assert!(
        open(agent.socket.clone()).await.is_none(),
        "a third connection of the same uid is refused"
    );
    drop(one);
    eventually_async("a slot is free again", || async {
        open(agent.socket.clone()).await.is_some()
    })
    .await;
    let (_, metrics) = http_get(agent.bound.admin.unwrap(), "/metrics").await;
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("trustline_agent_connections_refused_max_connections_per_uid_total ")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_ne!(refused, "0", "{metrics}");
    agent.bound.stop().await;
}

#[tokio::test]
async fn a_revoked_agent_gets_nothing_new_and_serves_what_it_holds_until_expiry() {
    let ca = ca(Duration::from_secs(6)).await;
    let agent = start_agent(&ca, "", &entry("api", &format!("uid = {}", my_uid()))).await;
    let mut client = Client::connect(&agent.socket).await.unwrap();
    let mut stream = client.x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let held = serial_of(&first.svids[0]);
    let own = agent.bound.identity.current().expect("the agent's SVID");
    ca.revoke(&own.info.serial).await;
    let not_after = agent
        .bound
        .workloads
        .get(&id("api"))
        .unwrap()
        .current()
        .unwrap()
        .info
        .not_after;
    // Until its expiry the SVID held keeps being served (renewal attempts are refused by the
    // CA); then it is withdrawn, and the stream ends with PermissionDenied.
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.next().await {
                Some(Ok(m)) => {
                    assert_eq!(
                        serial_of(&m.svids[0]),
                        held,
                        "no new SVID after the revocation"
                    )
                }
                Some(Err(status)) => return status,
                None => panic!("the stream ended without a status"),
            }
        }
    })
    .await
    .expect("the stream ends at the SVID's expiry");
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    assert!(SystemTime::now() >= not_after, "withdrawn only at expiry");
    assert!(agent
        .bound
        .workloads
        .get(&id("api"))
        .unwrap()
        .current()
        .is_none());
    // A new call waits for an SVID that cannot come.
    let mut again = client.x509_svids().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), again.next())
            .await
            .is_err(),
        "nothing is served once the SVIDs expired"
    );
    agent.bound.stop().await;
}

#[tokio::test]
async fn jwt_svids_are_fetched_cached_and_validated_per_audience() {
    let ca = ca(HOUR).await;
    let me = my_uid();
    let workloads = [
        entry("api", &format!("uid = {me}")),
        entry("web", &format!("uid = {me}")),
    ]
    .concat();
    // With `region`, the CA must be region eu's, and the regions of its JWT keys are believed.
    let agent = start_agent(&ca, "region = \"eu\"", &workloads).await;
    agent.ready_for(&[id("api"), id("web")]).await;
    let mut client = Client::connect(&agent.socket).await.unwrap();
    let aud = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // Every ID of the caller, the default (first entry) first.
    let all = client
        .jwt_svids(aud(&["https://pay.example"]), String::new())
        .await
        .expect("JWT-SVIDs");
    let ids: Vec<&str> = all.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, [id("api").to_string(), id("web").to_string()]);
    // Asked for one ID: that one; from the cache while it has more than half its life left.
    let one = client
        .jwt_svids(aud(&["https://pay.example"]), id("api").to_string())
        .await
        .unwrap();
    assert_eq!(one.svids.len(), 1);
    assert_eq!(
        one.svids[0].svid, all.svids[0].svid,
        "served from the cache"
    );
    let other = client
        .jwt_svids(aud(&["https://pay.example", "b"]), id("api").to_string())
        .await
        .unwrap();
    assert_ne!(
        other.svids[0].svid, one.svids[0].svid,
        "another audience set"
    );

    // The agent validates for its callers: the subject and the claims, for the audience only.
    let token = one.svids[0].svid.clone();
    let v = client
        .validate_jwt("https://pay.example".into(), token.clone())
        .await
        .expect("valid");
    assert_eq!(v.spiffe_id, id("api").to_string());
    let claims = v.claims.unwrap().fields;
    assert_eq!(
        claims["sub"].kind,
        Some(prost_types::value::Kind::StringValue(id("api").to_string()))
    );
    assert!(claims.contains_key("exp"));
    assert_eq!(
        claims["region"].kind,
        Some(prost_types::value::Kind::StringValue("eu".into())),
        "the verified region"
    );
    let e = client
        .validate_jwt("https://elsewhere.example".into(), token.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // FetchJWTBundles: our trust domain's JWKS, which validates the token with our own code.
    let mut bundles = client.jwt_bundles().await.unwrap();
    let b = bundles.next().await.unwrap().unwrap().bundles;
    let jwks = &b[&format!("spiffe://{TD}")];
    let jwt_bundle = trustline::jwt::parse_jwks(&ca.pki.td, jwks).expect("a JWKS");
    let ok = trustline::jwt::validate(
        &token,
        &jwt_bundle.into(),
        "https://pay.example",
        SystemTime::now(),
    )
    .expect("the JWKS verifies the token");
    assert_eq!(ok.sub, id("api"));

    // Bad requests: no audience, too many, an ID not the caller's, a request too large.
    let e = client.jwt_svids(vec![], String::new()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
    let e = client.jwt_svids(many, String::new()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = client
        .jwt_svids(aud(&["x"]), id("db").to_string())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = client
        .jwt_svids(vec!["x".repeat(70 * 1024)], String::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    let e = client
        .clone()
        .without_metadata()
        .jwt_svids(aud(&["x"]), String::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    agent.bound.stop().await;
}

#[test]
fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let td = trustline::identity::parse_trust_domain("example.org").unwrap();
    trustline::ca::authority::init_root(&td, &dir.path().join("root"), HOUR, false).unwrap();
    std::fs::copy(
        dir.path().join("root/bundle.pem"),
        dir.path().join("bundle.pem"),
    )
    .unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml");
    let file = dir.path().join("agent.toml");
    std::fs::copy(example, &file).unwrap();
    let c = AgentConfig::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.socket, std::path::Path::new("/run/trustline/agent.sock"));
    assert_eq!(c.workloads.len(), 2);
    assert_eq!(c.workloads[1].uid, Some(1001));
    assert!(c
        .identity
        .id
        .to_string()
        .starts_with("spiffe://example.org/trustline/agent/"));
}

#[tokio::test]
async fn a_revoked_workload_svid_is_withdrawn_and_replaced_at_once() {
    let ca = ca(HOUR).await;
    let agent = start_agent(&ca, "", &entry("api", &format!("uid = {}", my_uid()))).await;
    let mut client = Client::connect(&agent.socket).await.unwrap();
    let mut stream = client.x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let revoked = serial_of(&first.svids[0]);
    ca.revoke(&revoked).await;
    // The agent sees the serial on the CA's list (refreshed every 200 ms here): it stops
    // serving it (its only SVID: the stream ends with PermissionDenied, so the client stops
    // using it) and obtains a new one at once, not at the next renewal half an hour away.
    let end = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("the stream ends after the revocation")
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    let mut again = client.x509_svids().await.unwrap();
    let next = tokio::time::timeout(PATIENCE, again.next())
        .await
        .expect("a new SVID after the revocation")
        .unwrap()
        .unwrap();
    assert_eq!(next.svids.len(), 1);
    assert_ne!(serial_of(&next.svids[0]), revoked);
    agent.bound.stop().await;
}

#[tokio::test]
async fn a_caller_with_no_identity_gets_no_bundles_unless_verifiers_are_allowed() {
    let ca = ca(HOUR).await;
    // The only entry is another uid's: this process is a stranger to the agent.
    let agent = start_agent(&ca, "", &entry("api", "uid = 4242")).await;
    agent.ready_for(&[id("api")]).await;
    let mut client = Client::connect(&agent.socket).await.unwrap();
    let Err(e) = client.x509_bundles().await else {
        panic!("bundles served to a stranger")
    };
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let Err(e) = client.jwt_bundles().await else {
        panic!("JWT bundles served to a stranger")
    };
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = client
        .validate_jwt("a".into(), "x.y.z".into())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = client
        .jwt_svids(vec!["a".into()], String::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    agent.bound.stop().await;

    // With allow_unauthenticated_verifiers, bundles and validation are served to anyone, and
    // SVIDs still only to the callers they are registered for.
    let ca2 = self::ca(HOUR).await;
    let open = start_agent(
        &ca2,
        "allow_unauthenticated_verifiers = true",
        &entry("api", "uid = 4242"),
    )
    .await;
    open.ready_for(&[id("api")]).await;
    let mut client = Client::connect(&open.socket).await.unwrap();
    let mut b = client.x509_bundles().await.expect("bundles for a verifier");
    assert!(!b.next().await.unwrap().unwrap().bundles.is_empty());
    let e = client
        .validate_jwt("a".into(), "x.y.z".into())
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::InvalidArgument,
        "validated, and refused: {e:?}"
    );
    let Err(e) = client.x509_svids().await else {
        panic!("SVIDs served to a stranger")
    };
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    open.bound.stop().await;
}

#[tokio::test]
async fn federated_trust_domains_bundles_reach_callers_and_their_jwt_svids_validate() {
    use trustline::ca::bundle_endpoint::{BundleEndpointConfig, BundleEndpointProfile};
    let ca = ca(HOUR).await;
    // Another trust domain's CA, with its bundle endpoint.
    let other = start_ca_in("other.test", HOUR, &[], |c| {
        c.bundle_endpoint = Some(BundleEndpointConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            profile: BundleEndpointProfile::HttpsSpiffe,
        })
    })
    .await;
    let federation = format!(
        "[[federation]]\ntrust_domain = \"other.test\"\nbundle_endpoint = \"https://{}\"\n\
         endpoint_spiffe_id = \"spiffe://other.test/trustline/ca\"\nbundle = {:?}\nrefresh = \"200ms\"\n",
        other.bound.bundle_endpoint.unwrap(),
        other.pki.root.join("bundle.pem"),
    );
    let me = my_uid();
    let agent = start_agent(&ca, &federation, &entry("api", &format!("uid = {me}"))).await;
    agent.ready_for(&[id("api")]).await;
    let mut client = Client::connect(&agent.socket).await.unwrap();
    // FetchX509Bundles: ours and the federated one (its roots, as its endpoint serves them).
    let mut bundles = client.x509_bundles().await.unwrap();
    let first = bundles.next().await.unwrap().unwrap();
    let theirs = split_certs(&first.bundles["spiffe://other.test"]).unwrap();
    assert_eq!(theirs, other.pki.roots());
    assert!(first.bundles.contains_key(&format!("spiffe://{TD}")));
    // FetchX509SVID: the federated bundle beside the SVID.
    let mut svids = client.x509_svids().await.unwrap();
    let msg = svids.next().await.unwrap().unwrap();
    assert!(
        msg.federated_bundles.contains_key("spiffe://other.test"),
        "{:?}",
        msg.federated_bundles.keys()
    );
    // A JWT-SVID of the other trust domain validates at our agent; its region is not ours to
    // vouch for, so none is reported as verified.
    let peer_id = SpiffeId::new("spiffe://other.test/ns/shop/sa/partner").unwrap();
    let partner = other.issue(&peer_id).await;
    let (token, _) = other
        .client()
        .fetch_jwt(&partner, &peer_id, &["api".to_string()])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let v = loop {
        match client.validate_jwt("api".into(), token.clone()).await {
            Ok(v) => break v,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never validated: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(v.spiffe_id, peer_id.to_string());
    // The other trust domain's CA put its own region in the token; no key of ours vouches for
    // it, so it is not handed on.
    assert!(!v.claims.unwrap().fields.contains_key("region"));
    let jwt = client
        .jwt_bundles()
        .await
        .unwrap()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert!(jwt.bundles.contains_key("spiffe://other.test"));
}
