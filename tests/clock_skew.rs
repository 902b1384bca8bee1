//! Clock skew between the CA and the sidecars, with real processes on shifted clocks: the CA
//! (`trustline ca serve`) or a sidecar (`trustline sidecar`) runs under libfaketime with an
//! offset (`faketime -f +5m`; monotonic time is left alone, so timers keep real time), the
//! others on the system clock.
//!
//! The tolerance (README, "Clock skew"): every certificate starts [`BACKDATE`] (5 minutes)
//! before the CA signed it, so a clock up to 5 minutes behind the CA's accepts it; a clock ahead
//! of the CA's sees each certificate expire that much earlier, which is harmless while the skew
//! is well under the 40 % of the lifetime left at renewal. Inside: issuance, renewal and mTLS
//! work. Outside: the refusal says "not valid yet" or "expired".
//!
//! Run them on a build without jemalloc, whose start-up deadlocks under libfaketime:
//! `cargo test --no-default-features --test clock_skew -- --ignored` (as `.ci/run` does).
//! Needs the `faketime` command (Debian package `faketime`), so the tests are `#[ignore]`d for
//! `cargo test`; CI installs it and runs them as above.

mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use common::{echo_app, id, Pki, PATIENCE, TD};
use trustline::clock::Clock;
use trustline::identity::BACKDATE;
use trustline::proxy::config::SidecarConfig;
use trustline::svid::ca_client::{CaClient, ClientError};

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a probe port");
    l.local_addr().expect("probe address").port()
}

/// `trustline ARGS` under `faketime -f OFFSET` (real time without an offset); killed when
/// dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(offset: Option<&str>, args: &[&str], log: PathBuf) -> Self {
        let mut cmd = match offset {
            Some(off) => {
                let mut c = Command::new("faketime");
                c.args(["-f", off]).arg(env!("CARGO_BIN_EXE_trustline"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_trustline")),
        };
        let out = File::create(&log).expect("log file");
        let child = cmd
            .args(args)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("spawning trustline (is the faketime command installed?)");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require_faketime() {
    let ok = Command::new("faketime")
        .args(["-f", "+5m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "these tests need the faketime command: apt-get install faketime"
    );
}

/// A CA process whose clock reads `offset` (faketime syntax) away from ours.
struct SkewedCa {
    pki: Pki,
    proc: Proc,
    url: String,
    admin: PathBuf,
}

async fn start_ca(offset: Option<&str>, ttl: &str) -> SkewedCa {
    let pki = Pki::new(TD);
    let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let data = pki.dir.path().join("data");
    let log = pki.dir.path().join("ca.log");
    let proc = Proc::spawn(
        offset,
        &[
            "ca",
            "serve",
            "--ca",
            pki.region.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &api.to_string(),
            "--svid-ttl",
            ttl,
            "--rate-limit",
            "0",
            "--metrics-listen",
            "off",
        ],
        log,
    );
    let ca = SkewedCa {
        url: format!("https://{api}"),
        admin: data.join("admin.sock"),
        pki,
        proc,
    };
    // Ready once the admin socket answers (the TLS API may refuse a skewed client).
    let deadline = Instant::now() + PATIENCE;
    while trustline::ca::admin::token(&ca.admin, &id("probe").to_string(), 60)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "CA not ready:\n{}",
            ca.proc.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ca
}

impl SkewedCa {
    fn client(&self, clock: Clock) -> CaClient {
        CaClient::new(&self.url, self.pki.bundle(), clock).expect("client")
    }

    async fn token(&self, name: &str) -> String {
        trustline::ca::admin::token(&self.admin, &id(name).to_string(), 900)
            .await
            .expect("token")
    }

    async fn token_file(&self, name: &str) -> PathBuf {
        let path = self.pki.dir.path().join(format!("{name}.token"));
        std::fs::write(&path, self.token(name).await).expect("token file");
        path
    }

    /// The TOML of sidecar `name`'s config, with `sections`.
    async fn sidecar_toml(&self, name: &str, admin: &str, sections: &str) -> PathBuf {
        let toml = format!(
            r#"trust_domain = "{td}"
spiffe_id = "{id}"
bundle = {bundle:?}
drain_timeout = "1s"
handshake_timeout = "5s"

[identity]
source = "ca"
ca_url = "{url}"
token_file = {token:?}
refresh_interval = "1s"

[admin]
listen = "{admin}"

{sections}"#,
            td = self.pki.td,
            id = id(name),
            bundle = self.pki.root.join("bundle.pem"),
            url = self.url,
            token = self.token_file(name).await,
        );
        let file = self.pki.dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, toml).expect("sidecar config");
        file
    }

    async fn sidecar_config(&self, name: &str, sections: &str) -> SidecarConfig {
        let file = self.sidecar_toml(name, "127.0.0.1:0", sections).await;
        SidecarConfig::load(&file).unwrap_or_else(|e| panic!("sidecar config: {e}"))
    }
}

/// Issues with a token and renews once, as a client on `clock`.
async fn issue_and_renew(ca: &SkewedCa, clock: Clock) -> Result<(), ClientError> {
    let client = ca.client(clock);
    let svid = client
        .issue_with_token(&id("web"), &ca.token("web").await)
        .await?;
    client.renew(&svid).await?;
    Ok(())
}

/// A pair of in-process sidecars on the system clock, web -> api, through this CA: a call
/// reaches the app.
async fn pair_answers(ca: &SkewedCa) {
    let app = echo_app().await;
    let b = common::start_ready(
        ca.sidecar_config("api", &common::inbound(app, &[id("web")]))
            .await,
    )
    .await;
    let to_b = common::listener("api", b.inbound.expect("inbound"), &[id("api")]);
    let a = common::start_ready(ca.sidecar_config("web", &to_b).await).await;
    let got = common::call(a.listeners[0], b"skew").await.expect("call");
    assert_eq!(got, b"skew", "the pair answers");
}

fn expect_refusal(r: Result<(), ClientError>, words: &[&str], what: &str) {
    let e = r.expect_err(what).to_string();
    assert!(
        words.iter().any(|w| e.contains(w)),
        "{what}: the error must say {words:?}: {e}"
    );
    eprintln!("{what}: {e}");
}

#[test]
fn the_documented_tolerance_is_five_minutes() {
    assert_eq!(BACKDATE, Duration::from_secs(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the faketime command (CI: cargo test --no-default-features --test clock_skew -- --ignored)"]
async fn a_ca_five_minutes_ahead_still_issues_and_a_pair_talks() {
    require_faketime();
    let ca = start_ca(Some("+5m"), "1h").await;
    issue_and_renew(&ca, Clock::system())
        .await
        .unwrap_or_else(|e| panic!("CA 5 min ahead: {e}\n{}", ca.proc.log()));
    pair_answers(&ca).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the faketime command (CI: cargo test --no-default-features --test clock_skew -- --ignored)"]
async fn a_ca_five_minutes_behind_still_issues_and_a_pair_talks() {
    require_faketime();
    let ca = start_ca(Some("-5m"), "1h").await;
    issue_and_renew(&ca, Clock::system())
        .await
        .unwrap_or_else(|e| panic!("CA 5 min behind: {e}\n{}", ca.proc.log()));
    pair_answers(&ca).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the faketime command (CI: cargo test --no-default-features --test clock_skew -- --ignored)"]
async fn a_ca_further_ahead_than_the_backdating_is_refused_as_not_yet_valid() {
    require_faketime();
    let ca = start_ca(Some("+7m"), "1h").await;
    expect_refusal(
        issue_and_renew(&ca, Clock::system()).await,
        &["not valid yet", "not yet valid"],
        "a CA 7 min ahead",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the faketime command (CI: cargo test --no-default-features --test clock_skew -- --ignored)"]
async fn a_ca_behind_by_more_than_the_svid_lifetime_is_refused_as_expired() {
    require_faketime();
    let ca = start_ca(Some("-5m"), "4m").await;
    expect_refusal(
        issue_and_renew(&ca, Clock::system()).await,
        &["expired"],
        "a CA 5 min behind issuing 4 min SVIDs",
    );
}

/// Sidecar `api` as a process 5 minutes behind, inbound to `app`, once ready; started again
/// on new ports if one probed was taken in the meantime (tests run in parallel).
async fn start_behind(ca: &SkewedCa, app: SocketAddr) -> (Proc, SocketAddr) {
    for attempt in 0..3 {
        let (admin, inbound): (SocketAddr, SocketAddr) = (
            ([127, 0, 0, 1], free_port()).into(),
            ([127, 0, 0, 1], free_port()).into(),
        );
        let sections = format!(
            "[inbound]\nlisten = \"{inbound}\"\napp_address = \"{app}\"\nallow = [\"{}\"]\n",
            id("web")
        );
        let file = ca.sidecar_toml("api", &admin.to_string(), &sections).await;
        let log = ca.pki.dir.path().join(format!("api-{attempt}.log"));
        let mut b = Proc::spawn(
            Some("-5m"),
            &["sidecar", "--config", file.to_str().unwrap()],
            log,
        );
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = b.child.try_wait().expect("polling the sidecar") {
                let log = b.log();
                assert!(
                    log.contains("Address already in use"),
                    "the sidecar 5 min behind exited ({st}):\n{log}"
                );
                break;
            }
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && common::http_get(admin, "/readyz").await.0 == 200
            {
                return (b, inbound);
            }
            assert!(
                Instant::now() < deadline,
                "sidecar 5 min behind not ready:\n{}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("the sidecar 5 min behind found no free ports in 3 attempts");
}

/// A sidecar process 5 minutes behind everyone else (the CA and its peer), and one 5 minutes
/// ahead (in process, on a clock set forward): they get their SVIDs and talk both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the faketime command (CI: cargo test --no-default-features --test clock_skew -- --ignored)"]
async fn sidecars_five_minutes_apart_from_the_ca_and_each_other_still_talk() {
    require_faketime();
    let ca = start_ca(None, "1h").await;
    let app = echo_app().await;
    let (b, inbound) = start_behind(&ca, app).await;
    // A, 5 minutes ahead of the CA and 10 ahead of B.
    let ahead = Clock::following_tokio();
    ahead.advance(Duration::from_secs(300));
    let to_b = common::listener("api", inbound, &[id("api")]);
    let a = trustline::proxy::build(ca.sidecar_config("web", &to_b).await, ahead)
        .await
        .expect("sidecar starts");
    common::eventually("the sidecar 5 min ahead holds an SVID", || {
        a.identity.ready().is_ok()
    })
    .await;
    let got = common::call(a.listeners[0], b"skew").await.expect("call");
    assert_eq!(
        got,
        b"skew",
        "a call from 5 min ahead to 5 min behind:\n{}",
        b.log()
    );
}
