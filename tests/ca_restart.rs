//! Clients across CA crashes: a real `trustline ca serve` process is SIGKILLed and restarted on
//! the same address, three times, while a sidecar pair (a `trustline sidecar` process and an
//! in-process sidecar calling it) and six more identity tasks renew 20 s SVIDs against it.
//!
//! What must hold: while the CA is down every client keeps its current SVID (ready, and the
//! pair keeps answering over new mTLS handshakes); once it is back each client whose renewal
//! fell in the outage renews by itself (the test prints how long after the CA came back); no
//! serial is handed out twice across the restarts, and every serial a client received is in the
//! ledger.

mod common;

use std::collections::HashSet;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use common::{echo_app, id, Pki, PATIENCE, TD};
use trustline::ca::ledger::RedbLedger;
use trustline::clock::Clock;
use trustline::proxy::config::SidecarConfig;
use trustline::svid::ca_client::CaClient;
use trustline::svid::{Identity, IdentityConfig, IdentitySource, Jitter};

/// SVID lifetime: renewals come every ~10 s, and an outage shorter than half of it is survived.
const TTL: Duration = Duration::from_secs(20);
/// How long the CA stays dead in each cycle.
const OUTAGE: Duration = Duration::from_secs(6);
/// How long it serves between two crashes.
const UP: Duration = Duration::from_secs(5);
const CYCLES: usize = 3;
/// Identity tasks besides the pair's two sidecars.
const BARE: usize = 6;
const MARGIN: Duration = Duration::from_millis(200);

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a probe port");
    l.local_addr().expect("probe address").port()
}

/// The CA process; SIGKILLed when dropped.
struct CaProcess {
    child: Option<Child>,
    pki_region: PathBuf,
    data: PathBuf,
    api: SocketAddr,
    logs: PathBuf,
    starts: usize,
}

impl CaProcess {
    fn spawn(&mut self) {
        let log = self.logs.join(format!("ca-{}.log", self.starts));
        self.starts += 1;
        let out = File::create(&log).expect("CA log");
        let child = Command::new(env!("CARGO_BIN_EXE_trustline"))
            .args(["ca", "serve", "--ca"])
            .arg(&self.pki_region)
            .arg("--data")
            .arg(&self.data)
            .args(["--listen", &self.api.to_string()])
            .args(["--svid-ttl", &format!("{}s", TTL.as_secs())])
            .args(["--rate-limit", "0", "--metrics-listen", "off"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("spawning trustline ca serve");
        self.child = Some(child);
    }

    /// Waits until the CA answers; returns when it did.
    async fn ready(&mut self, client: &CaClient) -> Instant {
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the CA exited at start: {st}\n{}", self.log());
            }
            if client.fetch_bundle_pem().await.is_ok() {
                return Instant::now();
            }
            assert!(Instant::now() < until, "CA not ready:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        let log = self.logs.join(format!("ca-{}.log", self.starts - 1));
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every publication of one identity: when (wall clock, and the test's instant) and what.
#[derive(Clone, Debug)]
struct Published {
    at: Instant,
    wall: SystemTime,
    serial: String,
    not_after: SystemTime,
}

type History = Arc<Mutex<Vec<Published>>>;

/// Records each publication of `identity` until the task is aborted.
fn watch_identity(identity: Arc<Identity>) -> (History, tokio::task::JoinHandle<()>) {
    let history: History = Arc::default();
    let h = history.clone();
    let mut rx = identity.rotations();
    let task = tokio::spawn(async move {
        loop {
            if let Some(s) = identity.current() {
                let mut h = h.lock().unwrap();
                let serial = s.info.serial.to_string();
                if h.last().map(|p| &p.serial) != Some(&serial) {
                    h.push(Published {
                        at: Instant::now(),
                        wall: identity_now(),
                        serial,
                        not_after: s.info.not_after,
                    });
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    (history, task)
}

fn identity_now() -> SystemTime {
    Clock::system().now()
}

async fn token_file(dir: &Path, admin: &Path, name: &str) -> PathBuf {
    let token = trustline::ca::admin::token(admin, &id(name).to_string(), 900)
        .await
        .expect("token");
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, token).expect("token file");
    path
}

/// A sidecar config file for `name` against the CA at `url`, its admin on `admin`, with
/// `sections`.
fn sidecar_toml(
    dir: &Path,
    pki: &Pki,
    url: &str,
    name: &str,
    token: &Path,
    admin: &str,
    sections: &str,
) -> PathBuf {
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
        td = pki.td,
        id = id(name),
        bundle = pki.root.join("bundle.pem"),
    );
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml).expect("sidecar config");
    file
}

/// A `trustline sidecar` process; killed when dropped.
struct SidecarProcess {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl SidecarProcess {
    async fn start(config: &Path, admin: SocketAddr, log: PathBuf) -> Self {
        let out = File::create(&log).expect("sidecar log");
        let child = Command::new(env!("CARGO_BIN_EXE_trustline"))
            .arg("sidecar")
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("spawning trustline sidecar");
        let mut me = SidecarProcess { child, admin, log };
        let deadline = Instant::now() + PATIENCE;
        while !me.ready().await {
            if let Some(st) = me.child.try_wait().expect("polling the sidecar") {
                panic!("the sidecar exited at start ({st}):\n{}", me.log());
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready:\n{}",
                me.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        me
    }

    /// `/readyz` answers 200.
    async fn ready(&self) -> bool {
        tokio::net::TcpStream::connect(self.admin).await.is_ok()
            && common::http_get(self.admin, "/readyz").await.0 == 200
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Records each new serial a sidecar process's `/identity` shows (polled every 100 ms).
fn watch_admin(admin: SocketAddr) -> (History, tokio::task::JoinHandle<()>) {
    let history: History = Arc::default();
    let h = history.clone();
    let task = tokio::spawn(async move {
        loop {
            let (status, body) = common::http_get(admin, "/identity").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let (200, Some(serial)) = (status, v["serial"].as_str()) {
                let mut h = h.lock().unwrap();
                if h.last().map(|p| p.serial.as_str()) != Some(serial) {
                    let wall = identity_now();
                    h.push(Published {
                        at: Instant::now(),
                        wall,
                        serial: serial.to_string(),
                        not_after: wall,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (history, task)
}

/// The outages, as the test's instants: (killed, answering again).
type Outage = (Instant, Instant);

/// For each identity renewing at a fixed jitter: every renewal that fell due inside an outage,
/// and how long after the CA was back the next SVID came.
fn recoveries(history: &[Published], fraction: f64, outages: &[Outage]) -> Vec<Duration> {
    let mut out = Vec::new();
    for w in history.windows(2) {
        let (held, next) = (&w[0], &w[1]);
        let left = held.not_after.duration_since(held.wall).unwrap_or_default();
        let due = held.at + left.mul_f64(fraction);
        for (down, back) in outages {
            // A margin for when the watcher saw the publication (a few ms late).
            if due >= *down + MARGIN && due < *back {
                assert!(
                    next.at >= *back,
                    "renewed while the CA was dead: {held:?} {next:?}"
                );
                out.push(next.at - *back);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_serving_through_ca_crashes_and_renew_by_themselves_when_it_is_back() {
    let pki = Pki::new(TD);
    let dir = tempfile::tempdir().expect("temp dir");
    let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let url = format!("https://{api}");
    let mut ca = CaProcess {
        child: None,
        pki_region: pki.region.clone(),
        data: dir.path().join("data"),
        api,
        logs: dir.path().to_path_buf(),
        starts: 0,
    };
    let probe = CaClient::new(&url, pki.bundle(), Clock::system()).expect("client");
    ca.spawn();
    ca.ready(&probe).await;
    let admin = ca.data.join("admin.sock");

    // The pair: A (web, in process) calls B (api, a process) with a full handshake per
    // connection.
    let app = echo_app().await;
    let t = token_file(dir.path(), &admin, "api").await;
    let (b_admin, b_inbound): (SocketAddr, SocketAddr) = (
        ([127, 0, 0, 1], free_port()).into(),
        ([127, 0, 0, 1], free_port()).into(),
    );
    let b_sections = format!(
        "[inbound]\nlisten = \"{b_inbound}\"\napp_address = \"{app}\"\nallow = [\"{}\"]\n",
        id("web")
    );
    let b_file = sidecar_toml(
        dir.path(),
        &pki,
        &url,
        "api",
        &t,
        &b_admin.to_string(),
        &b_sections,
    );
    let b = SidecarProcess::start(&b_file, b_admin, dir.path().join("api.log")).await;
    let t = token_file(dir.path(), &admin, "web").await;
    let to_b = common::listener("api", b_inbound, &[id("api")]);
    let a_file = sidecar_toml(dir.path(), &pki, &url, "web", &t, "127.0.0.1:0", &to_b);
    let mut a_cfg = SidecarConfig::load(&a_file).unwrap_or_else(|e| panic!("sidecar config: {e}"));
    a_cfg.pooling = false;
    a_cfg.resumption = false;
    let a = common::start_ready(a_cfg).await;
    let entry = a.listeners[0];

    // Bare identity tasks, each at its own fixed point of the renewal window.
    let (stop, stop_rx) = watch::channel(false);
    let mut bare = Vec::new();
    for i in 0..BARE {
        let name = format!("w{i}");
        let token = token_file(dir.path(), &admin, &name).await;
        let at = i as f64 / (BARE - 1) as f64;
        let config = IdentityConfig {
            id: id(&name),
            bundle: pki.bundle(),
            source: IdentitySource::Ca {
                url: url.clone(),
                token_file: token,
                region: None,
            },
            refresh: Duration::from_secs(1),
            jitter: Jitter::At(at),
        };
        let identity =
            trustline::svid::start(config, Clock::system(), stop_rx.clone()).expect("identity");
        bare.push((identity, 0.4 + 0.2 * at));
    }
    for (identity, _) in &bare {
        common::eventually("every identity holds an SVID", || identity.ready().is_ok()).await;
    }
    let mut watched = vec![watch_identity(a.identity.clone()), watch_admin(b.admin)];
    for (identity, _) in &bare {
        watched.push(watch_identity(identity.clone()));
    }

    let mut outages = Vec::new();
    let mut calls = 0usize;
    for cycle in 0..CYCLES {
        tokio::time::sleep(UP).await;
        ca.kill();
        let down = Instant::now();
        // Dead: everyone stays ready on the SVID it holds, and the pair answers.
        while down.elapsed() < OUTAGE {
            assert!(
                b.ready().await,
                "cycle {cycle}: the sidecar process is not ready with the CA down:\n{}",
                b.log()
            );
            for identity in std::iter::once(&a.identity).chain(bare.iter().map(|(i, _)| i)) {
                identity.ready().unwrap_or_else(|e| {
                    panic!(
                        "cycle {cycle}: {} not ready with the CA down: {e}",
                        identity.id()
                    )
                });
            }
            let got = common::call(entry, b"ping")
                .await
                .expect("a call with the CA down");
            assert_eq!(got, b"ping");
            calls += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ca.spawn();
        let back = ca.ready(&probe).await;
        eprintln!(
            "cycle {cycle}: CA dead {:?}, answering {:?} after the restart",
            back - down,
            back - down - OUTAGE
        );
        outages.push((down, back));
    }
    // Past the last outage by more than a renewal interval: every due renewal happened.
    tokio::time::sleep(TTL / 2 + Duration::from_secs(2)).await;
    let got = common::call(entry, b"pong")
        .await
        .expect("a call after the crashes");
    assert_eq!(got, b"pong");

    let _ = stop.send(true);
    let mut histories = Vec::new();
    for (h, task) in watched {
        task.abort();
        histories.push(h.lock().unwrap().clone());
    }
    let mut times = Vec::new();
    for (h, (_, fraction)) in histories[2..].iter().zip(&bare) {
        times.extend(recoveries(h, *fraction, &outages));
    }
    let last = outages.last().expect("outages").1;
    for (h, name) in histories.iter().zip(["web", "api"]) {
        assert!(
            h.iter().any(|p| p.at > last),
            "sidecar {name} renewed nothing after the last restart: {h:?}"
        );
    }
    times.sort();
    assert!(
        !times.is_empty(),
        "no renewal fell inside an outage; the test exercised nothing"
    );
    eprintln!(
        "{} renewals fell due while the CA was dead; renewed after it was back in: min {:?}, median {:?}, max {:?}; {calls} calls through the pair while it was dead, all answered",
        times.len(),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );

    // No serial twice, and each is in the ledger.
    let received: Vec<String> = histories
        .iter()
        .flatten()
        .map(|p| p.serial.clone())
        .collect();
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(
        unique.len(),
        received.len(),
        "a serial was handed out twice"
    );
    drop(a);
    drop(b);
    ca.kill();
    let ledger = RedbLedger::open(&ca.data.join("ledger.redb")).expect("ledger opens");
    let issued: HashSet<String> = ledger
        .issued()
        .expect("issued serials")
        .into_iter()
        .map(|(s, _)| s.to_string())
        .collect();
    for s in &received {
        assert!(
            issued.contains(s),
            "serial {s} was received but is not in the ledger"
        );
    }
    eprintln!(
        "{} serials received over {} CA starts, each once, each in the ledger",
        received.len(),
        ca.starts
    );
}
