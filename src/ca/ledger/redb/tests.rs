//! The redb ledger's on-disk layout: older files open with everything in them, and the indexes
//! of version 2 stay small.

use ::redb::{
    MultimapTableDefinition, MultimapTableHandle, ReadableDatabase, ReadableTableMetadata,
    TableDefinition,
};

use super::{RedbLedger, INDEX_VERSION, META, RENEWALS, ROOTS_BY_ID, SERIALS};
use crate::ca::ledger::{
    token_hash, Authorisation, BanRecord, IssuedRecord, Ledger, LedgerError, RevokedRecord,
    TokenRecord, TokenSpend, TokenUse,
};
use crate::identity::Serial;

const A: &str = "spiffe://td/ns/a/sa/w";
const B: &str = "spiffe://td/ns/b/sa/w";
const C: &str = "spiffe://td/ns/c/sa/w";
const D: &str = "spiffe://td/ns/d/sa/w";
const E: &str = "spiffe://td/ns/e/sa/w";
/// Far in the future: unexpired at every `now` below.
const LATER: u64 = 4_000_000_000;
const NOW: u64 = 1_000;

fn record(id: &str, not_after: u64, authorisation: Authorisation) -> IssuedRecord {
    IssuedRecord {
        spiffe_id: id.into(),
        not_after,
        issued_at: 10,
        authorisation,
    }
}

fn by_token(id: &str, not_after: u64) -> IssuedRecord {
    record(
        id,
        not_after,
        Authorisation::Token {
            token_hash: "00".into(),
        },
    )
}

fn renewing(id: &str, parent: &Serial) -> IssuedRecord {
    record(
        id,
        LATER,
        Authorisation::Svid {
            serial: parent.to_string(),
        },
    )
}

/// A serial as trustline made them before they carried the time: 16 random-looking bytes, the
/// first one odd.
fn old_serial(n: u8) -> Serial {
    let mut b = [n.wrapping_mul(37); 16];
    b[0] = (n << 1) | 1;
    Serial::from_bytes(&b)
}

fn token(id: &str, used: Option<&Serial>, voided_at: Option<u64>) -> TokenRecord {
    TokenRecord {
        spiffe_id: id.into(),
        expires_at: LATER,
        created_at: 5,
        used: used.map(|s| TokenUse {
            at: 10,
            serial: s.to_string(),
        }),
        voided_at,
    }
}

/// What the index-version-1 ledger below holds.
struct Old {
    /// A's lineage: a1 (token), a2 renews a1, a3 renews a2; a0 expired.
    a: [Serial; 4],
    /// B's lineage b1 -> b2, revoked together (sequence 1).
    b: [Serial; 2],
    /// C's serial, revoked when C was banned (sequence 2).
    c: Serial,
    /// E's serial renews one this ledger never saw.
    e: Serial,
    issued: Vec<(Serial, IssuedRecord)>,
    tokens: Vec<(String, TokenRecord)>,
}

/// Writes a ledger as trustline wrote them at index version 1: `serials_by_id` held every serial
/// of an ID. Table names and encodings are spelled out here, not taken from the code under test.
fn write_version_1(path: &std::path::Path) -> Old {
    let t_serials: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("serials");
    let t_tokens: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("tokens");
    let t_revoked: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("revoked");
    let t_meta: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
    let t_banned: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("banned_ids");
    let t_renewals: MultimapTableDefinition<'static, &[u8], &[u8]> =
        MultimapTableDefinition::new("renewals");
    let t_by_id: MultimapTableDefinition<'static, &str, &[u8]> =
        MultimapTableDefinition::new("serials_by_id");

    let a = [old_serial(1), old_serial(2), old_serial(3), old_serial(4)];
    let b = [old_serial(5), old_serial(6)];
    let c = old_serial(7);
    let e = old_serial(8);
    let issued = vec![
        (a[0].clone(), by_token(A, NOW - 1)),
        (a[1].clone(), by_token(A, LATER)),
        (a[2].clone(), renewing(A, &a[1])),
        (a[3].clone(), renewing(A, &a[2])),
        (b[0].clone(), by_token(B, LATER)),
        (b[1].clone(), renewing(B, &b[0])),
        (c.clone(), by_token(C, LATER)),
        (e.clone(), renewing(E, &old_serial(99))),
    ];
    let tokens = vec![
        ("tlj_a".to_string(), token(A, Some(&a[1]), None)),
        ("tlj_b".to_string(), token(B, Some(&b[0]), None)),
        ("tlj_c".to_string(), token(C, None, Some(20))),
        ("tlj_d".to_string(), token(D, None, None)),
    ];

    let db = ::redb::Database::create(path).unwrap();
    let w = db.begin_write().unwrap();
    {
        let mut serials = w.open_table(t_serials).unwrap();
        let mut renewals = w.open_multimap_table(t_renewals).unwrap();
        let mut by_id = w.open_multimap_table(t_by_id).unwrap();
        for (s, rec) in &issued {
            let v = serde_json::to_vec(rec).unwrap();
            serials.insert(s.as_bytes(), v.as_slice()).unwrap();
            by_id.insert(rec.spiffe_id.as_str(), s.as_bytes()).unwrap();
            if let Authorisation::Svid { serial } = &rec.authorisation {
                let p = Serial::parse_hex(serial).unwrap();
                renewals.insert(p.as_bytes(), s.as_bytes()).unwrap();
            }
        }
        let mut t = w.open_table(t_tokens).unwrap();
        for (text, rec) in &tokens {
            let v = serde_json::to_vec(rec).unwrap();
            t.insert(token_hash(text).as_slice(), v.as_slice()).unwrap();
        }
        let mut revoked = w.open_table(t_revoked).unwrap();
        for s in [&b[0], &b[1], &c] {
            let v = serde_json::to_vec(&RevokedRecord {
                not_after: LATER,
                revoked_at: 20,
            })
            .unwrap();
            revoked.insert(s.as_bytes(), v.as_slice()).unwrap();
        }
        let v = serde_json::to_vec(&BanRecord { since: 20 }).unwrap();
        w.open_table(t_banned)
            .unwrap()
            .insert(C, v.as_slice())
            .unwrap();
        let mut meta = w.open_table(t_meta).unwrap();
        meta.insert("revocation_seq", 2).unwrap();
        meta.insert("index_version", 1).unwrap();
    }
    w.commit().unwrap();
    Old {
        a,
        b,
        c,
        e,
        issued,
        tokens,
    }
}

fn sorted(mut v: Vec<Serial>) -> Vec<Serial> {
    v.sort();
    v
}

async fn live(ledger: &RedbLedger, id: &str) -> Vec<Serial> {
    let got = ledger.live_serials(id, NOW).await.unwrap();
    sorted(got.into_iter().map(|(s, _)| s).collect())
}

#[tokio::test]
async fn a_version_1_ledger_opens_with_every_serial_token_revocation_and_ban() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let old = write_version_1(&path);
    let ledger = RedbLedger::open(&path).unwrap();

    // Every serial with its record.
    let mut issued: Vec<_> = RedbLedger::issued(&ledger)
        .unwrap()
        .into_iter()
        .map(|(s, r)| (s, serde_json::to_string(&r).unwrap()))
        .collect();
    issued.sort();
    let mut want: Vec<_> = old
        .issued
        .iter()
        .map(|(s, r)| (s.clone(), serde_json::to_string(r).unwrap()))
        .collect();
    want.sort();
    assert_eq!(issued, want);

    // Every token, by hash, in its state.
    for (text, rec) in &old.tokens {
        let got = ledger.token_record(&token_hash(text)).unwrap().unwrap();
        assert_eq!(
            serde_json::to_string(&got).unwrap(),
            serde_json::to_string(rec).unwrap(),
            "{text}"
        );
    }
    assert_eq!(RedbLedger::tokens(&ledger).unwrap().len(), old.tokens.len());

    // Revocations, the sequence and the ban.
    assert_eq!(
        ledger.revoked_list(NOW),
        (
            2,
            sorted(vec![old.b[0].clone(), old.b[1].clone(), old.c.clone()])
                .into_iter()
                .map(|s| (s, LATER))
                .collect()
        )
    );
    assert!(ledger.is_banned(C));
    assert_eq!(ledger.banned_list(), vec![(C.to_string(), 20)]);
    assert!(!ledger.is_revoked(&old.a[1]));

    // The serials of each ID, found through the new index (E's parent is not in the ledger).
    assert_eq!(
        live(&ledger, A).await,
        sorted(vec![old.a[1].clone(), old.a[2].clone(), old.a[3].clone()])
    );
    assert_eq!(live(&ledger, E).await, vec![old.e.clone()]);

    // The spent token stays spent, the void one void, the unused one buys one serial.
    let spend = |text: &str, id: &str| TokenSpend {
        hash: token_hash(text),
        spiffe_id: id.into(),
        now: NOW,
    };
    let fresh = |n: u8| Serial::from_bytes(&[0x40, 0, 0, 0, 0, 0, 0, n, 1, 2, 3, 4]);
    let r = ledger
        .record_issue(fresh(1), by_token(A, LATER), Some(spend("tlj_a", A)))
        .await;
    assert!(matches!(r, Err(LedgerError::TokenUsed)), "{r:?}");
    let r = ledger
        .record_issue(fresh(1), by_token(C, LATER), Some(spend("tlj_c", C)))
        .await;
    assert!(matches!(r, Err(LedgerError::Banned(_))), "{r:?}");
    ledger
        .record_issue(fresh(2), by_token(D, LATER), Some(spend("tlj_d", D)))
        .await
        .unwrap();
    let r = ledger
        .record_issue(fresh(3), by_token(D, LATER), Some(spend("tlj_d", D)))
        .await;
    assert!(matches!(r, Err(LedgerError::TokenUsed)), "{r:?}");

    // A renewal of an old serial with a new one joins the old lineage: revoking a2 reaches it
    // and a3, not a1.
    ledger
        .record_issue(fresh(4), renewing(A, &old.a[3]), None)
        .await
        .unwrap();
    let r = ledger.revoke(old.a[2].clone(), NOW).await.unwrap();
    assert_eq!(
        sorted(r.serials),
        sorted(vec![old.a[2].clone(), old.a[3].clone(), fresh(4)])
    );
    assert_eq!(r.sequence, 3);

    // A ban finds E's serial through the new index too.
    let r = ledger.ban(E, NOW).await.unwrap();
    assert_eq!(r.serials, vec![old.e.clone()]);
    drop(ledger);

    // The old index is gone and the version recorded; opening again changes nothing.
    let db = ::redb::Database::open(&path).unwrap();
    let r = db.begin_read().unwrap();
    let names: Vec<String> = r
        .list_multimap_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    assert!(!names.contains(&"serials_by_id".to_string()), "{names:?}");
    let meta = r.open_table(META).unwrap();
    assert_eq!(meta.get(INDEX_VERSION).unwrap().unwrap().value(), 2);
    drop((meta, r, db));
    let ledger = RedbLedger::open(&path).unwrap();
    assert_eq!(
        RedbLedger::issued(&ledger).unwrap().len(),
        old.issued.len() + 2
    );
    assert_eq!(live(&ledger, D).await, vec![fresh(2)]);
}

#[tokio::test]
async fn a_renewal_writes_no_lineage_root_and_a_ban_still_reaches_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let ledger = RedbLedger::open(&path).unwrap();
    let s = |n: u8| Serial::from_bytes(&[0x40, 0, 0, 0, 0, 0, 1, n, 9, 9, 9]);
    ledger
        .record_issue(s(1), by_token(A, LATER), None)
        .await
        .unwrap();
    ledger
        .record_issue(s(2), renewing(A, &s(1)), None)
        .await
        .unwrap();
    ledger
        .record_issue(s(3), renewing(A, &s(2)), None)
        .await
        .unwrap();
    ledger
        .record_issue(s(4), renewing(A, &s(2)), None)
        .await
        .unwrap();
    // A renewal of a serial from another CA starts a lineage of its own.
    ledger
        .record_issue(s(5), renewing(A, &s(99)), None)
        .await
        .unwrap();
    {
        let db = ledger.db.read().unwrap();
        let r = db.as_ref().unwrap().begin_read().unwrap();
        let roots = r.open_multimap_table(ROOTS_BY_ID).unwrap();
        let got: Vec<Serial> = roots
            .get(A)
            .unwrap()
            .map(|v| Serial::from_bytes(v.unwrap().value()))
            .collect();
        assert_eq!(got, vec![s(1), s(5)]);
        let renewals = r.open_multimap_table(RENEWALS).unwrap();
        assert_eq!(renewals.get(s(2).as_bytes()).unwrap().count(), 2);
        assert_eq!(r.open_table(SERIALS).unwrap().len().unwrap(), 5);
    }
    assert_eq!(live(&ledger, A).await, (1..=5).map(s).collect::<Vec<_>>());
    let r = ledger.ban(A, NOW).await.unwrap();
    assert_eq!(sorted(r.serials), (1..=5).map(s).collect::<Vec<_>>());
    assert!((1..=5).all(|n| ledger.is_revoked(&s(n))));
}

#[tokio::test]
async fn a_ledger_written_before_the_lineage_index_cascades_once_opened() {
    // Serials 0a and 0b (renewed from 0a) as an older trustline wrote them: no index tables.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    {
        let db = ::redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let t_serials: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("serials");
            let mut t = w.open_table(t_serials).unwrap();
            let a = serde_json::to_vec(&by_token(A, LATER)).unwrap();
            let b = serde_json::to_vec(&renewing(A, &Serial::parse_hex("0a").unwrap())).unwrap();
            t.insert([0x0a_u8].as_slice(), a.as_slice()).unwrap();
            t.insert([0x0b_u8].as_slice(), b.as_slice()).unwrap();
        }
        w.commit().unwrap();
    }
    let ledger = RedbLedger::open(&path).unwrap();
    let r = ledger
        .revoke(Serial::parse_hex("0a").unwrap(), 1)
        .await
        .unwrap();
    let mut got: Vec<String> = r.serials.iter().map(|s| s.to_string()).collect();
    got.sort();
    assert_eq!(got, ["0a", "0b"]);
    assert_eq!(
        live(&ledger, A).await.len(),
        2,
        "the serials of each ID are indexed too"
    );
}

/// Bytes this process has caused to be written to storage (`/proc/self/io`).
fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A serial as `authority::leaf_serial` makes them (time-ordered) or as before (random).
fn serial(ordered: bool, n: u64) -> Serial {
    let mut b = [0u8; 19];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    if ordered {
        b[0] = 0x40;
        b[1..8].copy_from_slice(&(1_800_000_000_000_000 + n).to_be_bytes()[1..]);
    } else {
        b[0] = (b[0] & 0x7f) | 1;
    }
    Serial::from_bytes(&b[..if ordered { 19 } else { 16 }])
}

/// Disk bytes per renewal for a ledger of `existing` serials, `workloads` renewing in turn from
/// their latest SVID, group commits of about `batch`.
async fn bytes_per_renewal(ordered: bool, existing: u64, workloads: usize, batch: usize) -> f64 {
    // On the real disk: a tmpfs counts no writes.
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let path = dir.path().join("ledger.redb");
    let mut latest = Vec::new();
    {
        let ledger = RedbLedger::open(&path).unwrap();
        let db = ledger.db.read().unwrap();
        let w = db.as_ref().unwrap().begin_write().unwrap();
        {
            let mut serials = w.open_table(SERIALS).unwrap();
            let mut roots = w.open_multimap_table(ROOTS_BY_ID).unwrap();
            for n in 0..existing {
                let s = serial(ordered, n);
                let id = format!("spiffe://td/ns/w/sa/{}", n as usize % workloads);
                let v = serde_json::to_vec(&by_token(&id, LATER)).unwrap();
                serials.insert(s.as_bytes(), v.as_slice()).unwrap();
                if n < workloads as u64 {
                    roots.insert(id.as_str(), s.as_bytes()).unwrap();
                }
                if n >= existing - workloads as u64 {
                    latest.push((id, s));
                }
            }
        }
        w.commit().unwrap();
    }
    let ledger = std::sync::Arc::new(RedbLedger::open(&path).unwrap());
    let rounds = 2_000 / batch;
    let before = write_bytes();
    let mut next = existing;
    let mut w = 0;
    for _ in 0..rounds {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (id, parent) = latest[w].clone();
            let child = serial(ordered, next);
            next += 1;
            latest[w] = (id.clone(), child.clone());
            w = (w + 1) % workloads;
            let l = ledger.clone();
            set.spawn(async move { l.record_issue(child, renewing(&id, &parent), None).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
    }
    (write_bytes() - before) as f64 / (rounds * batch) as f64
}

/// What the time-ordered serials save on disk writes, measured (`--nocapture` prints it). A
/// batch of renewals from different workloads lands on one right-edge leaf of `serials`, where
/// random serials dirty a leaf each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, ~1 min: cargo test --lib ledger_write_bytes -- --ignored --nocapture"]
async fn ledger_write_bytes_per_renewal_random_against_time_ordered_serials() {
    for batch in [1, 8, 32] {
        let random = bytes_per_renewal(false, 100_000, 1_000, batch).await;
        let ordered = bytes_per_renewal(true, 100_000, 1_000, batch).await;
        eprintln!(
            "batch {batch:>2}: random serials {:.1} KiB/renewal, time-ordered {:.1} KiB/renewal",
            random / 1024.0,
            ordered / 1024.0
        );
        if batch >= 8 {
            assert!(ordered < random * 0.7, "{ordered} against {random}");
        }
    }
}
