//! Crash safety of the CA ledger, with the real binary and real sockets.
//!
//! Many workloads redeem join tokens at once; the CA process is SIGKILLed part-way. Afterwards the
//! ledger on disk must hold every serial a client received, exactly once, with its token marked
//! used; and a restarted CA on the same data directory must refuse every token that bought an
//! SVID, while a token whose request died with the server is either spent (the commit happened,
//! the answer was lost) or still good for exactly one issuance, as the ledger says.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;
use trustline::ca::admin::{self, AdminRequest};
use trustline::ca::ledger::{token_hash, Authorisation, RedbLedger};
use trustline::clock::Clock;
use trustline::identity::{parse_trust_domain, Bundle, SpiffeId};
use trustline::svid::ca_client::{CaClient, ClientError};

const TRUST_DOMAIN: &str = "crash.test";
/// Join tokens minted, one per distinct workload ID.
const TOKENS: usize = 200;
/// Concurrent issuing clients.
const WORKERS: usize = 16;
/// Successful issuances before the CA is killed.
const KILL_AFTER: usize = 50;
/// Tokens never sent before the crash that are redeemed after the restart.
const FRESH_AFTER_RESTART: usize = 4;
/// Upper bound for anything that waits on the server (start-up, the issuance phase).
const DEADLINE: Duration = Duration::from_secs(60);

/// Paths of one test run.
struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    region: PathBuf,
    data: PathBuf,
    base: PathBuf,
}

impl Dirs {
    fn ledger(&self) -> PathBuf {
        self.data.join("ledger.redb")
    }
    fn admin_socket(&self) -> PathBuf {
        self.data.join("admin.sock")
    }
}

fn trustline(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_trustline"))
        .args(args)
        .output()
        .expect("running trustline");
    assert!(
        out.status.success(),
        "trustline {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn init_ca() -> Dirs {
    let tmp = tempfile::tempdir().expect("temp dir");
    let base = tmp.path().to_path_buf();
    let (root, region, data) = (base.join("root"), base.join("r1"), base.join("data"));
    let s = |p: &Path| p.to_str().expect("utf-8 temp path").to_string();
    trustline(&[
        "ca",
        "init",
        "--trust-domain",
        TRUST_DOMAIN,
        "--out",
        &s(&root),
    ]);
    trustline(&[
        "ca",
        "init",
        "--root",
        &s(&root),
        "--region",
        "r1",
        "--out",
        &s(&region),
    ]);
    Dirs {
        _tmp: tmp,
        root,
        region,
        data,
        base,
    }
}

/// A port that was free a moment ago (the server binds it itself).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a probe port");
    l.local_addr().expect("probe address").port()
}

/// A running `trustline ca serve`; SIGKILLed when dropped.
struct Server {
    child: Child,
    api: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts the CA and waits until it answers HTTPS. The accept loop is spawned only after the
    /// admin socket is bound, so an answered request also means the admin socket is up (a stale
    /// socket file from a killed server would not tell us that).
    async fn start(dirs: &Dirs, client_for: impl Fn(SocketAddr) -> CaClient, name: &str) -> Self {
        // Another process may take the probed port between probe and bind: try a few.
        for attempt in 0..3 {
            let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let log = dirs.base.join(format!("{name}-{attempt}.log"));
            let out = File::create(&log).expect("server log");
            let child = Command::new(env!("CARGO_BIN_EXE_trustline"))
                .args(["ca", "serve", "--ca"])
                .arg(&dirs.region)
                .arg("--data")
                .arg(&dirs.data)
                .args(["--listen", &api.to_string()])
                .args(["--rate-limit", "0", "--metrics-listen", "off"])
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log handle"))
                .stderr(out)
                .spawn()
                .expect("spawning trustline ca serve");
            let mut server = Server { child, api, log };
            if server.wait_ready(&client_for(api)).await {
                return server;
            }
            let log = server.log_text();
            if !log.contains("binding API") {
                panic!("CA server {name} did not become ready:\n{log}");
            }
        }
        panic!("CA server {name}: no free port after 3 attempts");
    }

    /// True once the server answered; false if it exited (e.g. port taken). Panics at the deadline.
    async fn wait_ready(&mut self, client: &CaClient) -> bool {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the server") {
                eprintln!("CA server exited during start-up: {status}");
                return false;
            }
            if client.fetch_bundle_pem().await.is_ok() {
                return true;
            }
            assert!(
                Instant::now() < until,
                "CA server on {} not ready within {DEADLINE:?}:\n{}",
                self.api,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, then reap, so the ledger's file lock is gone when this returns.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn workload_id(i: usize) -> SpiffeId {
    SpiffeId::new(format!("spiffe://{TRUST_DOMAIN}/ns/crash/sa/w{i:03}")).expect("valid ID")
}

async fn mint_tokens(socket: &Path, ids: &[SpiffeId]) -> Vec<String> {
    let mut set = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let socket = socket.to_path_buf();
        let req = AdminRequest::Token {
            spiffe_id: id.to_string(),
            ttl_secs: 3600,
        };
        set.spawn(async move { (i, admin::call(&socket, &req).await) });
    }
    let mut tokens = vec![String::new(); ids.len()];
    while let Some(joined) = set.join_next().await {
        let (i, resp) = joined.expect("token task");
        let resp = resp.expect("admin socket");
        assert!(resp.ok, "minting a token for {}: {:?}", ids[i], resp.error);
        tokens[i] = resp.token.expect("token in answer");
    }
    tokens
}

/// What the issuing client saw for one token before the crash.
#[derive(Clone, Debug)]
enum Outcome {
    /// Never sent.
    NotSent,
    /// Sent; no answer yet (stays so only if the task vanished).
    Sending,
    /// An SVID with this serial.
    Issued(String),
    /// The CA answered with an error status.
    Refused(u16, String),
    /// The connection failed or died with the server: the request was in flight.
    Lost(String),
}

struct Shared {
    client: CaClient,
    ids: Vec<SpiffeId>,
    tokens: Vec<String>,
    next: AtomicUsize,
    stop: AtomicBool,
    successes: AtomicUsize,
    enough: Notify,
    outcomes: Mutex<Vec<Outcome>>,
}

impl Shared {
    fn set(&self, i: usize, o: Outcome) {
        self.outcomes.lock().unwrap()[i] = o;
    }
}

async fn worker(s: Arc<Shared>) {
    while !s.stop.load(Ordering::Acquire) {
        let i = s.next.fetch_add(1, Ordering::AcqRel);
        if i >= s.tokens.len() {
            return;
        }
        s.set(i, Outcome::Sending);
        match s.client.issue_with_token(&s.ids[i], &s.tokens[i]).await {
            Ok(svid) => {
                assert_eq!(svid.id(), &s.ids[i], "SVID for the wrong ID");
                s.set(i, Outcome::Issued(svid.info.serial.to_string()));
                if s.successes.fetch_add(1, Ordering::AcqRel) + 1 == KILL_AFTER {
                    s.enough.notify_one();
                }
            }
            Err(ClientError::Refused { status, error, .. }) => {
                s.set(i, Outcome::Refused(status.as_u16(), error))
            }
            Err(e) => s.set(i, Outcome::Lost(e.to_string())),
        }
    }
}

/// What the ledger on disk says, after its invariants were checked.
struct LedgerView {
    /// SPIFFE ID -> serial its token bought, if spent.
    used: HashMap<String, Option<String>>,
    /// Every issued serial.
    serials: HashSet<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the ledger of a stopped CA and checks its own consistency: one token record per ID,
/// every spent token names an issued serial for its ID, every token-authorised serial is named by
/// exactly one spent token, and no serial is bought twice.
fn read_ledger(path: &Path, ids: &[SpiffeId], tokens: &[String]) -> LedgerView {
    let ledger = RedbLedger::open(path).expect("opening the ledger after the crash");
    let issued = ledger.issued().expect("reading issued serials");
    let records = ledger.tokens().expect("reading tokens");
    drop(ledger);
    wait_unlocked(path);

    let mut serials = HashSet::new();
    let mut by_serial = HashMap::new();
    for (serial, rec) in &issued {
        let s = serial.to_string();
        assert!(serials.insert(s.clone()), "serial {s} issued twice");
        by_serial.insert(s, rec);
    }
    let hash_prefix: HashMap<String, &SpiffeId> = tokens
        .iter()
        .zip(ids)
        .map(|(t, id)| (hex(&token_hash(t)[..8]), id))
        .collect();

    assert_eq!(records.len(), ids.len(), "token records in the ledger");
    let mut used = HashMap::new();
    let mut bought = HashSet::new();
    for rec in &records {
        let spend = rec.used.as_ref().map(|u| u.serial.clone());
        assert!(
            used.insert(rec.spiffe_id.clone(), spend.clone()).is_none(),
            "two token records for {}",
            rec.spiffe_id
        );
        if let Some(serial) = spend {
            let issued = by_serial.get(&serial).unwrap_or_else(|| {
                panic!(
                    "token of {} spent on serial {serial}, which was never issued",
                    rec.spiffe_id
                )
            });
            assert_eq!(issued.spiffe_id, rec.spiffe_id, "serial {serial} ID");
            assert!(
                bought.insert(serial.clone()),
                "serial {serial} bought by two tokens"
            );
        }
    }
    let mut by_token = 0;
    for (serial, rec) in &by_serial {
        let Authorisation::Token { token_hash } = &rec.authorisation else {
            continue;
        };
        by_token += 1;
        let id = hash_prefix
            .get(token_hash)
            .unwrap_or_else(|| panic!("serial {serial} authorised by unknown token {token_hash}"));
        assert_eq!(
            rec.spiffe_id,
            id.to_string(),
            "serial {serial} vs its token"
        );
        assert_eq!(
            used.get(&rec.spiffe_id),
            Some(&Some(serial.clone())),
            "serial {serial} was issued for a token, but that token is not marked spent on it"
        );
    }
    assert_eq!(
        bought.len(),
        by_token,
        "spent tokens vs serials issued for a token"
    );
    LedgerView { used, serials }
}

/// Waits until nothing in this process holds the ledger's file lock. Dropping a `Ledger` does not
/// join its writer thread, which keeps the database open a moment longer; a server started in
/// that moment would fail with "Database already open".
fn wait_unlocked(path: &Path) {
    let until = Instant::now() + DEADLINE;
    loop {
        match redb::Database::create(path) {
            Ok(db) => return drop(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < until => {
                // A synchronous poll outside any runtime, 5 ms at a time.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("ledger {} still locked: {e}", path.display()),
        }
    }
}

/// Redeems `token` once more and returns the status (200 with the serial, or the refusal).
async fn redeem(client: &CaClient, id: &SpiffeId, token: &str) -> Result<String, (u16, String)> {
    match client.issue_with_token(id, token).await {
        Ok(svid) => Ok(svid.info.serial.to_string()),
        Err(ClientError::Refused { status, error, .. }) => Err((status.as_u16(), error)),
        Err(e) => panic!("redeeming the token of {id}: {e}"),
    }
}

async fn expect_spent(client: &CaClient, id: &SpiffeId, token: &str, why: &str) {
    match redeem(client, id, token).await {
        Err((401, error)) => assert_eq!(error, "unauthorized", "{id}: error code"),
        other => panic!("{id}: {why}, so reuse must be refused with 401; got {other:?}"),
    }
}

/// Runs WORKERS concurrent issuing clients over all tokens and SIGKILLs the server once
/// KILL_AFTER of them got an SVID. Returns what each token's client saw.
async fn issue_until_killed(
    server: &mut Server,
    client: CaClient,
    ids: &[SpiffeId],
    tokens: &[String],
) -> Vec<Outcome> {
    let shared = Arc::new(Shared {
        client,
        ids: ids.to_vec(),
        tokens: tokens.to_vec(),
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        successes: AtomicUsize::new(0),
        enough: Notify::new(),
        outcomes: Mutex::new(vec![Outcome::NotSent; tokens.len()]),
    });
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| tokio::spawn(worker(shared.clone())))
        .collect();
    if tokio::time::timeout(DEADLINE, shared.enough.notified())
        .await
        .is_err()
    {
        panic!(
            "{KILL_AFTER} issuances did not succeed within {DEADLINE:?}; outcomes: {:?}\n{}",
            shared.outcomes.lock().unwrap(),
            server.log_text()
        );
    }
    shared.stop.store(true, Ordering::Release);
    server.kill();
    for w in workers {
        tokio::time::timeout(DEADLINE, w)
            .await
            .expect("a client hung after the CA died")
            .expect("worker panicked");
    }
    let outcomes = shared.outcomes.lock().unwrap().clone();
    outcomes
}

/// Sanity of what the clients saw: nothing refused, the kill fell inside the stream of requests.
fn check_outcomes(outcomes: &[Outcome], ids: &[SpiffeId]) {
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let issued = count(|o| matches!(o, Outcome::Issued(_)));
    let lost = count(|o| matches!(o, Outcome::Lost(_)));
    let not_sent = count(|o| matches!(o, Outcome::NotSent));
    eprintln!("before the crash: {issued} issued, {lost} in flight, {not_sent} never sent");
    let mut lost_reasons = Vec::new();
    for (o, id) in outcomes.iter().zip(ids) {
        match o {
            Outcome::Refused(status, error) => panic!(
                "{id}: refused with {status} {error} before the crash; a fresh token must be honoured"
            ),
            Outcome::Sending => panic!("{id}: its request never finished"),
            Outcome::Lost(why) if lost_reasons.len() < 3 => lost_reasons.push(why.clone()),
            _ => {}
        }
    }
    eprintln!("in-flight requests failed with e.g. {lost_reasons:?}");
    assert!(issued >= KILL_AFTER, "{issued} issued");
    assert!(
        lost > 0,
        "no request was in flight when the CA was killed; the crash window was not exercised"
    );
    assert!(
        not_sent >= FRESH_AFTER_RESTART,
        "too few unsent tokens left"
    );
}

/// Every SVID a client received is in the ledger, once, with its token spent on it; no token
/// that was never sent is spent.
fn check_ledger_matches_clients(view: &LedgerView, outcomes: &[Outcome], ids: &[SpiffeId]) {
    let mut received = HashSet::new();
    let mut lost_committed = 0;
    for (o, id) in outcomes.iter().zip(ids) {
        let spent = &view.used[&id.to_string()];
        match o {
            Outcome::Issued(serial) => {
                assert!(received.insert(serial), "serial {serial} received twice");
                assert!(
                    view.serials.contains(serial),
                    "{id}: received serial {serial}, which is not in the ledger"
                );
                assert_eq!(
                    spent.as_ref(),
                    Some(serial),
                    "{id}: got an SVID, so its token must be spent on that serial"
                );
            }
            Outcome::NotSent => assert!(spent.is_none(), "{id}: token never sent but spent"),
            Outcome::Lost(_) => lost_committed += usize::from(spent.is_some()),
            Outcome::Refused(..) | Outcome::Sending => {}
        }
    }
    eprintln!("{lost_committed} of the in-flight requests were committed before the kill");
}

/// Against a restarted server: every spent token is refused with 401; every unspent one that
/// was in flight (and a few never sent) works exactly once. Returns the serials it bought.
async fn check_restarted(
    client: &CaClient,
    view: &LedgerView,
    outcomes: &[Outcome],
    ids: &[SpiffeId],
    tokens: &[String],
) -> HashSet<String> {
    let mut new_serials = HashSet::new();
    let mut fresh = 0;
    for ((o, id), token) in outcomes.iter().zip(ids).zip(tokens) {
        let spent = view.used[&id.to_string()].is_some();
        match o {
            Outcome::Issued(_) => expect_spent(client, id, token, "its SVID was issued").await,
            Outcome::Lost(_) if spent => {
                expect_spent(client, id, token, "the ledger says its token is spent").await
            }
            Outcome::NotSent if fresh >= FRESH_AFTER_RESTART => {}
            Outcome::Lost(_) | Outcome::NotSent => {
                fresh += usize::from(matches!(o, Outcome::NotSent));
                let serial = redeem(client, id, token).await.unwrap_or_else(|e| {
                    panic!("{id}: ledger says its token is unspent, yet it was refused: {e:?}")
                });
                assert!(
                    !view.serials.contains(&serial) && new_serials.insert(serial.clone()),
                    "{id}: serial {serial} issued again"
                );
                expect_spent(client, id, token, "it was just redeemed").await;
            }
            Outcome::Refused(..) | Outcome::Sending => unreachable!("checked before"),
        }
    }
    new_serials
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_issuance_loses_nothing_and_reuses_no_token() {
    let dirs = init_ca();
    let td = parse_trust_domain(TRUST_DOMAIN).unwrap();
    let bundle_pem = std::fs::read(dirs.root.join("bundle.pem")).expect("root bundle");
    let bundle = Bundle::from_pem(td, &bundle_pem, "bundle.pem").expect("bundle");
    let client_for = |api: SocketAddr| {
        CaClient::new(&format!("https://{api}"), bundle.clone(), Clock::system()).expect("client")
    };
    let ids: Vec<SpiffeId> = (0..TOKENS).map(workload_id).collect();

    // Mint, issue concurrently, SIGKILL mid-stream.
    let mut server = Server::start(&dirs, client_for, "first").await;
    let tokens = mint_tokens(&dirs.admin_socket(), &ids).await;
    let client = client_for(server.api);
    let outcomes = issue_until_killed(&mut server, client, &ids, &tokens).await;
    check_outcomes(&outcomes, &ids);

    // The ledger on disk, read directly, agrees with the clients.
    let view = read_ledger(&dirs.ledger(), &ids, &tokens);
    check_ledger_matches_clients(&view, &outcomes, &ids);

    // A restarted server on the same data dir agrees with the ledger.
    let server2 = Server::start(&dirs, client_for, "restarted").await;
    let new_serials =
        check_restarted(&client_for(server2.api), &view, &outcomes, &ids, &tokens).await;
    drop(server2);

    // And what it issued after the restart is durable and accounted for too.
    let after = read_ledger(&dirs.ledger(), &ids, &tokens);
    for s in &new_serials {
        assert!(
            after.serials.contains(s),
            "serial {s} issued after the restart is missing"
        );
    }
    let spent = |v: &LedgerView| v.used.values().filter(|u| u.is_some()).count();
    assert_eq!(
        spent(&after),
        spent(&view) + new_serials.len(),
        "spent tokens after the restart"
    );
}

/// Refused with this HTTP status, or panics with what happened instead.
fn refused_with<T: std::fmt::Debug>(r: Result<T, ClientError>, want: u16, what: &str) {
    match r {
        Err(ClientError::Refused { status, .. }) if status.as_u16() == want => {}
        other => panic!("{what}: expected a {want} refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_spiffe_id_stays_cut_off_after_sigkill() {
    let dirs = init_ca();
    let td = parse_trust_domain(TRUST_DOMAIN).unwrap();
    let bundle_pem = std::fs::read(dirs.root.join("bundle.pem")).expect("root bundle");
    let bundle = Bundle::from_pem(td, &bundle_pem, "bundle.pem").expect("bundle");
    let client_for = |api: SocketAddr| {
        CaClient::new(&format!("https://{api}"), bundle.clone(), Clock::system()).expect("client")
    };
    let id = workload_id(0);
    let mut server = Server::start(&dirs, client_for, "first").await;
    let client = client_for(server.api);
    let tokens = mint_tokens(&dirs.admin_socket(), &[id.clone(), id.clone()]).await;
    let svid = client
        .issue_with_token(&id, &tokens[0])
        .await
        .expect("issue");
    let renewed = client.renew(&svid).await.expect("renew");
    let data = dirs.data.to_str().expect("utf-8 temp path");
    // The CLI returns once the ban is committed; the process dies right after.
    trustline(&[
        "ca",
        "revoke",
        "--data",
        data,
        "--spiffe-id",
        &id.to_string(),
    ]);
    server.kill();

    let server = Server::start(&dirs, client_for, "restarted").await;
    let client = client_for(server.api);
    let body = client
        .get_limited("/v1/revoked", 1 << 20)
        .await
        .expect("revocation list");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for s in [&svid, &renewed] {
        let serial = s.info.serial.to_string();
        assert!(
            v["revoked"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["serial"] == serial),
            "{serial} still revoked after the crash: {v}"
        );
    }
    assert_eq!(v["spiffe_ids"][0]["spiffe_id"], id.to_string(), "{v}");
    refused_with(client.renew(&renewed).await, 401, "renewal of a revoked ID");
    refused_with(
        client.issue_with_token(&id, &tokens[1]).await,
        401,
        "a token minted before the ban",
    );
    assert!(admin::token(&dirs.admin_socket(), &id.to_string(), 600)
        .await
        .is_err());
    // Lifted, it joins again with a new token.
    trustline(&[
        "ca",
        "revoke",
        "--data",
        data,
        "--spiffe-id",
        &id.to_string(),
        "--lift",
    ]);
    let t = admin::token(&dirs.admin_socket(), &id.to_string(), 600)
        .await
        .expect("a token once lifted");
    client
        .issue_with_token(&id, &t)
        .await
        .expect("issued once lifted");
}

/// Renewals before the kill: a ban after it reaches each of them through the renewal lineage.
const RENEW_BEFORE_KILL: usize = 20;

/// A chain of renewals is cut by SIGKILL. The ledger records an ID's first issuance as the root
/// of its lineage and each renewal only under its parent, so a ban after the restart must find
/// every SVID a client received by walking that lineage: nothing renewed before the crash may
/// escape it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_after_sigkill_reaches_every_renewal_received_before_it() {
    let dirs = init_ca();
    let td = parse_trust_domain(TRUST_DOMAIN).unwrap();
    let bundle_pem = std::fs::read(dirs.root.join("bundle.pem")).expect("root bundle");
    let bundle = Bundle::from_pem(td, &bundle_pem, "bundle.pem").expect("bundle");
    let client_for = |api: SocketAddr| {
        CaClient::new(&format!("https://{api}"), bundle.clone(), Clock::system()).expect("client")
    };
    let id = workload_id(7);
    let mut server = Server::start(&dirs, client_for, "first").await;
    let client = client_for(server.api);
    let tokens = mint_tokens(&dirs.admin_socket(), std::slice::from_ref(&id)).await;
    let first = client
        .issue_with_token(&id, &tokens[0])
        .await
        .expect("issue");
    // Renew from the latest SVID, again and again, until the server dies under it.
    let (tx, mut rx) = tokio::sync::mpsc::channel(RENEW_BEFORE_KILL * 4);
    let renewer = {
        let client = client.clone();
        let mut svid = first.clone();
        tokio::spawn(async move {
            while let Ok(next) = client.renew(&svid).await {
                if tx.send(next.info.serial.to_string()).await.is_err() {
                    return;
                }
                svid = next;
            }
        })
    };
    let mut received = vec![first.info.serial.to_string()];
    while received.len() <= RENEW_BEFORE_KILL {
        received.push(
            rx.recv()
                .await
                .expect("the renewer stopped before the kill"),
        );
    }
    server.kill();
    renewer.await.expect("renewer");
    while let Some(s) = rx.recv().await {
        received.push(s);
    }

    let server = Server::start(&dirs, client_for, "restarted").await;
    let client = client_for(server.api);
    let data = dirs.data.to_str().expect("utf-8 temp path");
    trustline(&[
        "ca",
        "revoke",
        "--data",
        data,
        "--spiffe-id",
        &id.to_string(),
    ]);
    let body = client
        .get_limited("/v1/revoked", 1 << 20)
        .await
        .expect("revocation list");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let revoked: HashSet<&str> = v["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["serial"].as_str().unwrap())
        .collect();
    for s in &received {
        assert!(
            revoked.contains(s.as_str()),
            "{s}, received before the crash, escaped the ban ({} received, {} revoked)",
            received.len(),
            revoked.len()
        );
    }
}
