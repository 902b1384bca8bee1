//! The shared PostgreSQL ledger, against a real PostgreSQL server started by the test
//! (`common/postgres.rs`): the ledger's promises across replicas (a token spends once, a serial
//! is recorded once, a renewal or issuance racing a revocation or ban cannot escape it), schema
//! creation and refusal, the database going away and coming back, and `trustline ca serve`
//! replicas in separate processes issuing, renewing and revoking for each other, one of them
//! SIGKILLed mid-issuance.

// Child processes and their logs are managed with std (tests, not the async data path).
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::collections::HashSet;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{id, Pki, PATIENCE};
use postgres::Postgres;
use tokio::time::Instant;
use trustline::ca::admin::{self, AdminRequest};
use trustline::ca::ledger::postgres::schema::Owner;
use trustline::ca::ledger::{
    Authorisation, IssuedRecord, Ledger, LedgerError, PgLedger, PgOptions, PgUrl, TokenRecord,
    TokenSpend,
};
use trustline::clock::Clock;
use trustline::identity::Serial;
use trustline::svid::ca_client::CaClient;

const OWNER: Owner<'static> = Owner {
    trust_domain: "mesh.test",
    region: "eu",
};

fn opts(refresh_ms: u64) -> PgOptions {
    PgOptions {
        pool: 8,
        refresh: Duration::from_millis(refresh_ms),
    }
}

async fn open(url: &str, refresh_ms: u64) -> Result<PgLedger, LedgerError> {
    PgLedger::open(PgUrl::parse(url).unwrap(), &OWNER, opts(refresh_ms)).await
}

fn serial(n: u64) -> Serial {
    let mut b = [0u8; 16];
    b[0] = 0x40;
    b[8..].copy_from_slice(&n.to_be_bytes());
    Serial::from_bytes(&b)
}

fn random_serial() -> Serial {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Serial::from_bytes(&b)
}

const NOW: u64 = 1_900_000_000;
const ID: &str = "spiffe://mesh.test/ns/shop/sa/web";

fn record(id: &str, authorisation: Authorisation) -> IssuedRecord {
    IssuedRecord {
        spiffe_id: id.to_string(),
        not_after: NOW + 3600,
        issued_at: NOW,
        authorisation,
    }
}

fn by_token(id: &str) -> IssuedRecord {
    record(
        id,
        Authorisation::Token {
            token_hash: "t".into(),
        },
    )
}

fn renewing(parent: &Serial) -> IssuedRecord {
    record(
        ID,
        Authorisation::Svid {
            serial: parent.to_string(),
        },
    )
}

fn token(id: &str) -> ([u8; 32], TokenRecord) {
    let mut hash = [0u8; 32];
    aws_lc_rs::rand::fill(&mut hash).unwrap();
    (
        hash,
        TokenRecord {
            spiffe_id: id.to_string(),
            expires_at: NOW + 900,
            created_at: NOW,
            used: None,
            voided_at: None,
        },
    )
}

fn spend(hash: [u8; 32], id: &str) -> TokenSpend {
    TokenSpend {
        hash,
        spiffe_id: id.to_string(),
        now: NOW,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_create_the_schema_once_and_refuse_a_newer_one_or_another_regions() {
    let pg = Postgres::start();
    let url = pg.create_db("schema");
    // Four replicas starting at once on an empty database: one creates, the others wait.
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { open(&url, 1000).await.map(|_| ()) })
        })
        .collect();
    for r in opens {
        r.await
            .unwrap()
            .expect("every replica opens the new ledger");
    }
    assert_eq!(pg.psql("schema", "SELECT schema_version FROM ledger"), "1");
    assert_eq!(pg.psql("schema", "SELECT count(*) FROM ledger"), "1");

    pg.psql("schema", "UPDATE ledger SET schema_version = 99");
    let e = open(&url, 1000)
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(
        e.to_string()
            .contains("version 99, newer than this trustline knows (1)"),
        "{e}"
    );
    pg.psql("schema", "UPDATE ledger SET schema_version = 1");

    let other = Owner {
        trust_domain: "mesh.test",
        region: "us",
    };
    let e = PgLedger::open(PgUrl::parse(&url).unwrap(), &other, opts(1000))
        .await
        .err()
        .expect("another region's ledger is refused");
    assert!(
        e.to_string()
            .contains("give each region's CA its own database"),
        "{e}"
    );

    pg.psql("schema", "DELETE FROM ledger");
    let e = open(&url, 1000)
        .await
        .err()
        .expect("a damaged ledger is refused");
    assert!(e.to_string().contains("no row"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_spends_once_and_a_serial_records_once_across_replicas() {
    let pg = Postgres::start();
    let url = pg.create_db("spend");
    let a = Arc::new(open(&url, 1000).await.unwrap());
    let b = Arc::new(open(&url, 1000).await.unwrap());
    const TOKENS: u64 = 60;
    let mut races = Vec::new();
    for i in 0..TOKENS {
        let (hash, rec) = token(ID);
        a.add_token(hash, rec).await.unwrap();
        let (a, b) = (a.clone(), b.clone());
        races.push(tokio::spawn(async move {
            let at_a = a.record_issue(serial(2 * i), by_token(ID), Some(spend(hash, ID)));
            let at_b = b.record_issue(serial(2 * i + 1), by_token(ID), Some(spend(hash, ID)));
            let (ra, rb) = tokio::join!(at_a, at_b);
            (ra, rb)
        }));
    }
    for r in races {
        let (ra, rb) = r.await.unwrap();
        let oks = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "one spend of a token wins: {ra:?} {rb:?}");
        let lost = if ra.is_err() { ra } else { rb };
        assert!(matches!(lost, Err(LedgerError::TokenUsed)), "{lost:?}");
    }
    assert_eq!(b.issued().await.unwrap().len() as u64, TOKENS);
    let tokens = a.tokens().await.unwrap();
    assert!(tokens.iter().all(|t| t.used.is_some()));

    // The same serial at two replicas at once: recorded once.
    for n in 0..20 {
        let s = serial(1000 + n);
        let (ra, rb) = tokio::join!(
            a.record_issue(s.clone(), by_token(ID), None),
            b.record_issue(s.clone(), by_token(ID), None)
        );
        let refused: Vec<_> = [ra, rb].into_iter().filter_map(|r| r.err()).collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            matches!(refused[0], LedgerError::DuplicateSerial(_)),
            "{refused:?}"
        );
    }
    // A token spent, unknown, bound to another ID, voided or expired says so.
    let (hash, rec) = token(ID);
    a.add_token(hash, rec).await.unwrap();
    let other = "spiffe://mesh.test/ns/shop/sa/other";
    let e = b
        .record_issue(random_serial(), by_token(other), Some(spend(hash, other)))
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::TokenWrongId), "{e:?}");
    let e = b
        .record_issue(random_serial(), by_token(ID), Some(spend([7; 32], ID)))
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::TokenUnknown), "{e:?}");
    let mut late = spend(hash, ID);
    late.now = NOW + 900;
    let e = b
        .record_issue(random_serial(), by_token(ID), Some(late))
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::TokenExpired), "{e:?}");
    // Refusals left nothing behind: the token still spends once.
    b.record_issue(random_serial(), by_token(ID), Some(spend(hash, ID)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_or_issuance_racing_a_revocation_or_ban_cannot_escape_it() {
    let pg = Postgres::start();
    let url = pg.create_db("race");
    let a = Arc::new(open(&url, 1000).await.unwrap());
    let b = Arc::new(open(&url, 1000).await.unwrap());
    let (mut refused, mut revoked_after) = (0, 0);
    for round in 0..40u64 {
        // A lineage root -> child at replica A; then B renews from the child while A revokes
        // the root.
        let root = serial(10_000 + 3 * round);
        let child = serial(10_000 + 3 * round + 1);
        let grandchild = serial(10_000 + 3 * round + 2);
        a.record_issue(root.clone(), by_token(ID), None)
            .await
            .unwrap();
        a.record_issue(child.clone(), renewing(&root), None)
            .await
            .unwrap();
        let (renewal, revocation) = tokio::join!(
            b.record_issue(grandchild.clone(), renewing(&child), None),
            a.revoke(root.clone(), NOW)
        );
        let revocation = revocation.expect("the revocation is made");
        match renewal {
            Ok(()) => {
                revoked_after += 1;
                assert!(
                    revocation.serials.contains(&grandchild),
                    "a renewal committed before the revocation is revoked with its lineage"
                );
            }
            Err(LedgerError::ParentRevoked(p)) => {
                refused += 1;
                assert_eq!(p, child);
            }
            Err(e) => panic!("round {round}: {e:?}"),
        }
    }
    println!("renewal vs revocation: {refused} refused, {revoked_after} revoked with the lineage");

    let (mut refused, mut revoked_after) = (0, 0);
    for round in 0..40u64 {
        let id = format!("spiffe://mesh.test/ns/shop/sa/ban{round}");
        let (hash, rec) = token(&id);
        a.add_token(hash, rec).await.unwrap();
        let s = random_serial();
        let (issue, ban) = tokio::join!(
            b.record_issue(s.clone(), by_token(&id), Some(spend(hash, &id))),
            a.ban(&id, NOW)
        );
        let ban = ban.expect("the ban is made");
        match issue {
            Ok(()) => {
                revoked_after += 1;
                assert!(
                    ban.serials.contains(&s),
                    "an issuance committed first is revoked by the ban"
                );
            }
            Err(LedgerError::Banned(_)) => refused += 1,
            Err(e) => panic!("round {round}: {e:?}"),
        }
        // After the ban, no issuance for the ID, and a new token cannot be added.
        let e = b
            .record_issue(random_serial(), by_token(&id), None)
            .await
            .unwrap_err();
        assert!(matches!(e, LedgerError::Banned(_)), "{e:?}");
        let (h2, r2) = token(&id);
        assert!(matches!(
            a.add_token(h2, r2).await,
            Err(LedgerError::Banned(_))
        ));
    }
    println!("issuance vs ban: {refused} refused, {revoked_after} revoked by the ban");
    // The lift: issuance again, and the sequence moved with every change.
    let id0 = "spiffe://mesh.test/ns/shop/sa/ban0";
    let seq = a.lift(id0).await.unwrap();
    assert_eq!(seq, 80 + 1, "40 revocations, 40 bans and a lift");
    assert!(matches!(a.lift(id0).await, Err(LedgerError::NotBanned(_))));
    b.record_issue(random_serial(), by_token(id0), None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_at_one_replica_reaches_the_other_at_its_next_refresh() {
    let pg = Postgres::start();
    let url = pg.create_db("refresh");
    let a = open(&url, 1000).await.unwrap();
    let b = open(&url, 200).await.unwrap();
    let s = random_serial();
    a.record_issue(s.clone(), by_token(ID), None).await.unwrap();
    let r = a.revoke(s.clone(), NOW).await.unwrap();
    assert!(
        a.is_revoked(&s),
        "the replica that revoked serves it at once"
    );
    assert_eq!(a.sequence(), r.sequence);
    let t0 = Instant::now();
    while !b.is_revoked(&s) {
        assert!(
            t0.elapsed() < PATIENCE,
            "replica b never saw the revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "seen by the other replica after {:?} (refresh 200 ms)",
        t0.elapsed()
    );
    assert_eq!(b.sequence(), r.sequence);
    assert_eq!(b.revoked_list(NOW).1, vec![(s.clone(), NOW + 3600)]);
    // A ban too, and its lift.
    a.ban(ID, NOW).await.unwrap();
    let t0 = Instant::now();
    while !b.is_banned(ID) {
        assert!(t0.elapsed() < PATIENCE, "replica b never saw the ban");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.lift(ID).await.unwrap();
    let t0 = Instant::now();
    while b.is_banned(ID) {
        assert!(t0.elapsed() < PATIENCE, "replica b never saw the lift");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_gone_writes_fail_with_the_reason_and_recover_by_themselves() {
    let pg = Postgres::start();
    let url = pg.create_db("gone");
    let a = open(&url, 200).await.unwrap();
    let s = random_serial();
    a.record_issue(s.clone(), by_token(ID), None).await.unwrap();
    a.revoke(s.clone(), NOW).await.unwrap();
    assert!(a.stale().is_none());

    pg.stop_server();
    let t0 = Instant::now();
    let e = a
        .record_issue(random_serial(), by_token(ID), None)
        .await
        .expect_err("no issuance without the database");
    assert!(matches!(e, LedgerError::Db(_)), "{e:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "failed within the operation timeout"
    );
    println!("with the database down: {e} (after {:?})", t0.elapsed());
    assert!(a.token([1; 32]).await.is_err());
    // The view keeps serving what it had, and says it is stale.
    let t0 = Instant::now();
    while a.stale().is_none() {
        assert!(t0.elapsed() < PATIENCE, "the view never said it was stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("stale: {}", a.stale().unwrap());
    assert!(a.is_revoked(&s));

    pg.start_server();
    let t0 = Instant::now();
    let mut failures = 0;
    while a
        .record_issue(random_serial(), by_token(ID), None)
        .await
        .is_err()
    {
        failures += 1;
        assert!(t0.elapsed() < PATIENCE, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("recovered after the restart: {failures} failed attempts first");
    assert!(
        failures <= 1,
        "at most the first attempt after the restart fails ({failures})"
    );
    let t0 = Instant::now();
    while a.stale().is_some() {
        assert!(t0.elapsed() < PATIENCE, "the view never refreshed again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing half-written: the ledger holds what was answered.
    assert_eq!(a.issued().await.unwrap().len(), 2);
}

/// A `trustline ca serve` replica on the shared ledger; SIGKILLed when dropped.
struct Replica {
    child: Option<Child>,
    api: SocketAddr,
    data: PathBuf,
    log: PathBuf,
}

impl Replica {
    fn start(pki: &Pki, name: &str, url: &str) -> Self {
        let data = pki.dir.path().join(name);
        let log = pki.dir.path().join(format!("{name}.log"));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_trustline"))
            .args(["ca", "serve", "--ca"])
            .arg(&pki.region)
            .arg("--data")
            .arg(&data)
            .args(["--listen", &api.to_string(), "--ledger", url])
            .args(["--ledger-refresh", "200ms", "--rate-limit", "0"])
            .args(["--metrics-listen", "off", "--svid-ttl", "1h"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning trustline ca serve");
        Replica {
            child: Some(child),
            api,
            data,
            log,
        }
    }

    fn client(&self, pki: &Pki) -> CaClient {
        CaClient::new(
            &format!("https://{}", self.api),
            pki.bundle(),
            Clock::system(),
        )
        .unwrap()
    }

    fn admin(&self) -> PathBuf {
        self.data.join("admin.sock")
    }

    async fn ready(&mut self, pki: &Pki) {
        let client = self.client(pki);
        let t0 = Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("replica exited: {st}\n{}", self.log());
            }
            if client.fetch_bundle_pem().await.is_ok() && self.admin().exists() {
                return;
            }
            assert!(
                t0.elapsed() < PATIENCE,
                "replica not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn revoked_serials(client: &CaClient) -> Vec<String> {
    let mut conn = client.connect(None).await.unwrap();
    let (status, body) = conn.get("/v1/revoked", None).await.unwrap();
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    doc["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["serial"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replica_processes_issue_renew_and_revoke_for_each_other() {
    let pg = Postgres::start();
    let url = pg.create_db("replicas");
    let pki = Pki::new("mesh.test");
    let mut a = Replica::start(&pki, "a", &url);
    let mut b = Replica::start(&pki, "b", &url);
    a.ready(&pki).await;
    b.ready(&pki).await;
    let web = id("web");
    // A token minted at replica a buys an SVID at replica b, once.
    let token = admin::token(&a.admin(), &web.to_string(), 900)
        .await
        .unwrap();
    let svid = b
        .client(&pki)
        .issue_with_token(&web, &token)
        .await
        .expect("issued at b");
    let again = a.client(&pki).issue_with_token(&web, &token).await;
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("already used")),
        "{again:?}"
    );
    // Replica a renews what b issued.
    let renewed = a.client(&pki).renew(&svid).await.expect("renewed at a");
    assert_ne!(renewed.info.serial, svid.info.serial);
    // Revoked through b's admin socket: a serves it within its refresh, and refuses renewals
    // from it.
    let r = admin::call(
        &b.admin(),
        &AdminRequest::Revoke {
            serial: svid.info.serial.to_string(),
        },
    )
    .await
    .unwrap();
    assert!(r.ok, "{:?}", r.error);
    let client_a = a.client(&pki);
    let t0 = Instant::now();
    loop {
        let listed = revoked_serials(&client_a).await;
        if listed.contains(&svid.info.serial.to_string()) {
            assert!(
                listed.contains(&renewed.info.serial.to_string()),
                "the renewal made at a is revoked with its lineage: {listed:?}"
            );
            break;
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "replica a never served the revocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "replica a served b's revocation after {:?} (refresh 200 ms)",
        t0.elapsed()
    );
    let e = a
        .client(&pki)
        .renew(&renewed)
        .await
        .expect_err("renewal of a revoked SVID");
    assert!(e.to_string().contains("revoked"), "{e}");
    // One ledger holds what both replicas issued: b's SVID and a's renewal of it.
    let ledger = open(&url, 1000).await.unwrap();
    let issued: HashSet<String> = ledger
        .issued()
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _)| s.to_string())
        .collect();
    let expected: HashSet<String> = [
        svid.info.serial.to_string(),
        renewed.info.serial.to_string(),
    ]
    .into();
    assert_eq!(issued, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sigkilled_mid_issuance_leaves_the_ledger_whole_and_the_other_serves_on() {
    let pg = Postgres::start();
    let url = pg.create_db("kill");
    let pki = Pki::new("mesh.test");
    let mut a = Replica::start(&pki, "a", &url);
    let mut b = Replica::start(&pki, "b", &url);
    a.ready(&pki).await;
    b.ready(&pki).await;
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 40;
    let mut tokens = Vec::new();
    for i in 0..CLIENTS * PER_CLIENT {
        let wid = id(&format!("w{i}"));
        tokens.push((
            wid.clone(),
            admin::token(&b.admin(), &wid.to_string(), 900)
                .await
                .unwrap(),
        ));
    }
    let answered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for chunk in tokens.chunks(PER_CLIENT) {
        let chunk = chunk.to_vec();
        let client = a.client(&pki);
        let answered = answered.clone();
        clients.push(tokio::spawn(async move {
            let mut failed = 0;
            for (wid, token) in chunk {
                match client.issue_with_token(&wid, &token).await {
                    Ok(svid) => answered.lock().unwrap().push(svid.info.serial.to_string()),
                    Err(_) => failed += 1,
                }
            }
            failed
        }));
    }
    // Kill replica a once a part of the load was answered.
    let t0 = Instant::now();
    while answered.lock().unwrap().len() < CLIENTS * PER_CLIENT / 4 {
        assert!(
            t0.elapsed() < PATIENCE * 3,
            "issuance too slow:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill();
    let mut failed = 0;
    for c in clients {
        failed += c.await.unwrap();
    }
    let answered: HashSet<String> = answered.lock().unwrap().iter().cloned().collect();
    println!(
        "answered {} before and around the SIGKILL, {failed} failed",
        answered.len()
    );
    assert!(failed > 0, "the kill happened mid-load");

    let ledger = open(&url, 1000).await.unwrap();
    let issued = ledger.issued().await.unwrap();
    let recorded: HashSet<String> = issued.iter().map(|(s, _)| s.to_string()).collect();
    for s in &answered {
        assert!(
            recorded.contains(s),
            "serial {s} was answered but is not in the ledger"
        );
    }
    // No half-written issuance: every spent token names a recorded serial, and every
    // token-authorised serial spent a token.
    let tokens_now = ledger.tokens().await.unwrap();
    let spent: HashSet<String> = tokens_now
        .iter()
        .filter_map(|t| t.used.as_ref().map(|u| u.serial.clone()))
        .collect();
    let by_token: HashSet<String> = issued
        .iter()
        .filter(|(_, r)| matches!(r.authorisation, Authorisation::Token { .. }))
        .map(|(s, _)| s.to_string())
        .collect();
    assert_eq!(spent, by_token, "tokens spent == serials issued by token");
    // Replica b serves on with the tokens a never spent.
    let used_ids: HashSet<String> = tokens_now
        .iter()
        .filter(|t| t.used.is_some())
        .map(|t| t.spiffe_id.clone())
        .collect();
    let (wid, token) = tokens
        .iter()
        .find(|(w, _)| !used_ids.contains(&w.to_string()))
        .expect("a token left unspent");
    b.client(&pki)
        .issue_with_token(wid, token)
        .await
        .expect("replica b issues after a was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_from_its_database_says_why_and_serves_again_when_it_is_back() {
    let pg = Postgres::start();
    let url = pg.create_db("cut");
    let pki = Pki::new("mesh.test");
    let mut a = Replica::start(&pki, "a", &url);
    a.ready(&pki).await;
    let web = id("web");
    let token = admin::token(&a.admin(), &web.to_string(), 900)
        .await
        .unwrap();
    let client = a.client(&pki);
    let svid = client.issue_with_token(&web, &token).await.unwrap();

    pg.stop_server();
    let e = client
        .renew(&svid)
        .await
        .expect_err("no renewal without the ledger");
    println!("renewal with the database down: {e}");
    assert!(
        e.to_string().contains("503") || e.to_string().contains("cannot record issuances"),
        "{e}"
    );
    let t0 = Instant::now();
    let why = loop {
        let mut conn = client.connect(None).await.unwrap();
        let (status, body) = conn.get("/v1/revoked", None).await.unwrap();
        if status == 503 {
            break String::from_utf8_lossy(&body).into_owned();
        }
        assert_eq!(status, 200);
        assert!(
            t0.elapsed() < PATIENCE,
            "the revocation list never said it was stale"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("/v1/revoked with the database down: {why}");
    assert!(why.contains("may be out of date"), "{why}");
    assert!(
        client.fetch_bundle_pem().await.is_ok(),
        "the bundle does not need the ledger"
    );
    let e = admin::token(&a.admin(), &web.to_string(), 900)
        .await
        .expect_err("no token");
    assert!(e.to_string().contains("ledger"), "{e}");

    pg.start_server();
    let t0 = Instant::now();
    let renewed = loop {
        match client.renew(&svid).await {
            Ok(s) => break s,
            Err(e) => assert!(
                t0.elapsed() < PATIENCE,
                "no renewal after the database came back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "renewed again {:?} after the database came back",
        t0.elapsed()
    );
    assert_ne!(renewed.info.serial, svid.info.serial);
    // The list is served again at the next refresh.
    let t0 = Instant::now();
    loop {
        let mut conn = client.connect(None).await.unwrap();
        if conn.get("/v1/revoked", None).await.unwrap().0 == 200 {
            break;
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "the revocation list stayed unavailable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_verifies_the_server_and_is_tls_1_3() {
    let pg = Postgres::start();
    let (port, root) = pg.enable_tls();
    pg.create_db("tls");
    let url = format!(
        "postgres://{}@localhost:{port}/tls?sslmode=verify-full&sslrootcert={}",
        postgres::USER,
        root.display()
    );
    let a = open(&url, 1000).await.expect("the ledger opens over TLS");
    a.record_issue(random_serial(), by_token(ID), None)
        .await
        .unwrap();
    assert_eq!(
        pg.psql(
            "tls",
            "SELECT ssl, version FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'trustline-ca' LIMIT 1"
        ),
        "t|TLSv1.3",
        "the CA's connections are TLS 1.3"
    );
    // Without TLS the server refuses (hostssl only): proof the URL above did use it.
    let plain = format!("postgres://{}@localhost:{port}/tls", postgres::USER);
    let e = open(&plain, 1000).await.err().expect("plain TCP refused");
    assert!(
        e.to_string().contains("no pg_hba.conf entry") || e.to_string().contains("28000"),
        "{e}"
    );
    // Another root: the server's certificate is not trusted.
    let other = pg.socket_dir().join("other-root.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, p.self_signed(&key).unwrap().pem()).unwrap();
    let wrong = format!(
        "postgres://{}@localhost:{port}/tls?sslmode=verify-full&sslrootcert={}",
        postgres::USER,
        other.display()
    );
    let e = open(&wrong, 1000)
        .await
        .err()
        .expect("an unknown server certificate is refused");
    println!("with another root: {e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    // A name the certificate does not hold.
    let by_ip = format!(
        "postgres://{}@127.0.0.1:{port}/tls?sslmode=verify-full&sslrootcert={}",
        postgres::USER,
        root.display()
    );
    let e = open(&by_ip, 1000)
        .await
        .err()
        .expect("a server name mismatch is refused");
    println!("by IP: {e}");
    assert!(e.to_string().contains("certificate"), "{e}");
}
