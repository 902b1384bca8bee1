//! The embedded ledger: one redb file, one CA.
//!
//! All writes go through one writer thread that **group-commits**: it takes every request that
//! is waiting, applies them in one write transaction, commits it durably (fsync) and only then
//! answers each caller. A response to a client is sent after that answer, so whatever a client
//! received is on disk, and durability costs one fsync per batch rather than per request.
//! Token consumption is checked and recorded inside the same transaction that records the
//! serial, by the single writer, so a token cannot be used twice, concurrently or across restarts.
//! The revoked serials and the bans are also kept in memory, loaded at open and updated by the
//! writer after each commit and before anyone is answered.
//!
//! A failed write (a full or read-only disk, an I/O error) refuses its whole batch, and redb then
//! refuses everything until the database is closed and opened again. So the writer closes it at
//! once and reopens it, reloading the in-memory view from disk; while that fails (the disk is
//! still full), every read and write is refused with the reason, and the writer tries again at
//! each new request and every [`REOPEN_EVERY`]. The CA recovers when the disk does, without a
//! restart, and never serves from a view the disk does not hold.
//!
//! Layout, and what one SVID writes. redb copies every B-tree page it changes (and the branch
//! pages above it) at each commit, so the cost of a commit is the number of distinct pages its
//! keys land on. `serials` is keyed by the serial, and leaf serials begin with the issuance
//! time (`authority::leaf_serial`), so the SVIDs of a batch append to the same right-edge leaf.
//! A renewal adds its serial under its parent in `renewals` (parents were issued in about the
//! order they are renewed, so that spot moves forward too). `lineage_roots_by_id` lists only
//! the serials that start a lineage (a first issuance), so a renewal never writes there; a ban
//! or `live_serials` walks the lineage from them. A first issuance also rewrites its join token,
//! which is keyed by the token's hash: one random page per token spent, which the trait's
//! hash-only token key does not let us avoid. Ledgers of index version 0 and 1 (a
//! `serials_by_id` entry per serial: a random page per SVID) are re-indexed once at open.
//! Measured by `tests::ledger_write_bytes_per_renewal_random_against_time_ordered_serials`
//! (100,000 serials, 1,000 workloads): about 40 KiB per commit whatever the keys, which is all a
//! lone renewal costs; in batches of 8, 7.9 KiB per renewal against 17.8 with random serials, and
//! 2.6 against 10.9 in batches of 32.

mod apply;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::Duration;

use ::redb::{
    Database, MultimapTableDefinition, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition,
};
use tokio::sync::oneshot;

use super::{
    BanRecord, IssuedRecord, Ledger, LedgerError, Pending, Revocation, RevokedRecord, TokenRecord,
    TokenSpend,
};
use crate::identity::Serial;

const SERIALS: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("serials");
const TOKENS: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("tokens");
const REVOKED: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("revoked");
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// Parent serial -> the serials renewed with it.
const RENEWALS: MultimapTableDefinition<'static, &[u8], &[u8]> =
    MultimapTableDefinition::new("renewals");
/// SPIFFE ID -> the roots of its renewal lineages: the serials issued for it that do not renew
/// a serial of the same ID in this ledger (first issuances, mostly). Every serial of an ID is
/// one of these or renews one, transitively, so a renewal writes nothing here.
const ROOTS_BY_ID: MultimapTableDefinition<'static, &str, &[u8]> =
    MultimapTableDefinition::new("lineage_roots_by_id");
/// Before index version 2: SPIFFE ID -> every serial issued for it (a random page per SVID);
/// replaced by [`ROOTS_BY_ID`] at open.
const OLD_BY_ID: MultimapTableDefinition<'static, &str, &[u8]> =
    MultimapTableDefinition::new("serials_by_id");
/// Banned SPIFFE IDs -> [`BanRecord`].
const BANNED: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("banned_ids");
const REVOCATION_SEQ: &str = "revocation_seq";
/// Version of the indexes: none (0), `renewals` and `serials_by_id` (1), `renewals` and
/// `lineage_roots_by_id` (2). An older ledger is indexed at open.
const INDEX_VERSION: &str = "index_version";
/// Most requests folded into one transaction.
const MAX_BATCH: usize = 512;
/// How often a writer whose database could not be reopened tries again, requests or not.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

fn db_err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Db(e.to_string())
}

/// The open database, or why it is closed (a write failed and it could not be reopened yet).
type Slot = Arc<RwLock<Result<Database, String>>>;

enum Op {
    Issue {
        serial: Serial,
        record: IssuedRecord,
        token: Option<TokenSpend>,
    },
    AddToken {
        hash: [u8; 32],
        record: TokenRecord,
    },
    Revoke {
        serial: Serial,
        now: u64,
    },
    Ban {
        spiffe_id: String,
        now: u64,
    },
    Lift {
        spiffe_id: String,
    },
}

enum Done {
    Ok,
    /// The published list changed: the new sequence and the serials revoked (with not_after).
    Changed {
        seq: u64,
        revoked: Vec<(Serial, u64)>,
    },
}

/// In-memory state a committed batch changes.
enum Change {
    Revoked(Serial, u64),
    Banned(String, BanRecord),
    Lifted(String),
}

type Job = (Op, oneshot::Sender<Result<Done, LedgerError>>);

/// The redb ledger; cheap to share behind an `Arc`.
pub struct RedbLedger {
    db: Slot,
    /// `None` only while dropping: closing the channel ends the writer.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    revoked: Arc<RwLock<HashMap<Serial, u64>>>,
    banned: Arc<RwLock<HashMap<String, BanRecord>>>,
    seq: Arc<AtomicU64>,
}

impl RedbLedger {
    /// Opens (creating) the ledger file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let db = open_db(path)?;
        let (revoked, banned, seq) = load_revocations(&db)?;
        let db = Arc::new(RwLock::new(Ok(db)));
        let revoked = Arc::new(RwLock::new(revoked));
        let banned = Arc::new(RwLock::new(banned));
        let seq = Arc::new(AtomicU64::new(seq));
        let (jobs, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            path: path.to_path_buf(),
            revoked: revoked.clone(),
            banned: banned.clone(),
            seq: seq.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(db_err)?;
        Ok(RedbLedger {
            db,
            jobs: Some(jobs),
            writer: Some(writer),
            revoked,
            banned,
            seq,
        })
    }

    async fn submit(&self, op: Op) -> Result<Done, LedgerError> {
        let (tx, rx) = oneshot::channel();
        let jobs = self.jobs.as_ref().ok_or(LedgerError::Closed)?;
        jobs.send((op, tx)).map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Runs `f` in a read transaction, or says why the database is closed.
    fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let slot = self.db.read().unwrap_or_else(|e| e.into_inner());
        let db = slot.as_ref().map_err(|why| LedgerError::Db(why.clone()))?;
        f(&db.begin_read().map_err(db_err)?)
    }
}

/// Opens (creating) the database file and its tables, and indexes an older ledger.
fn open_db(path: &Path) -> Result<Database, LedgerError> {
    let db =
        Database::create(path).map_err(|e| LedgerError::Db(format!("{}: {e}", path.display())))?;
    let w = db.begin_write().map_err(db_err)?;
    for t in [SERIALS, TOKENS, REVOKED] {
        w.open_table(t).map_err(db_err)?;
    }
    w.open_table(META).map_err(db_err)?;
    w.open_table(BANNED).map_err(db_err)?;
    w.open_multimap_table(RENEWALS).map_err(db_err)?;
    w.open_multimap_table(ROOTS_BY_ID).map_err(db_err)?;
    apply::build_indexes(&w)?;
    w.commit().map_err(db_err)?;
    Ok(db)
}

/// The trait's documentation says what each does; here is how redb does it.
impl Ledger for RedbLedger {
    fn record_issue(
        &self,
        serial: Serial,
        record: IssuedRecord,
        token: Option<TokenSpend>,
    ) -> Pending<'_, ()> {
        let op = Op::Issue {
            serial,
            record,
            token,
        };
        Box::pin(async move { self.submit(op).await.map(|_| ()) })
    }

    fn add_token(&self, hash: [u8; 32], record: TokenRecord) -> Pending<'_, ()> {
        Box::pin(async move { self.submit(Op::AddToken { hash, record }).await.map(|_| ()) })
    }

    fn revoke(&self, serial: Serial, now: u64) -> Pending<'_, Revocation> {
        Box::pin(async move { changed(self.submit(Op::Revoke { serial, now }).await?) })
    }

    fn ban(&self, spiffe_id: &str, now: u64) -> Pending<'_, Revocation> {
        let spiffe_id = spiffe_id.to_string();
        Box::pin(async move { changed(self.submit(Op::Ban { spiffe_id, now }).await?) })
    }

    fn lift(&self, spiffe_id: &str) -> Pending<'_, u64> {
        let spiffe_id = spiffe_id.to_string();
        Box::pin(
            async move { changed(self.submit(Op::Lift { spiffe_id }).await?).map(|r| r.sequence) },
        )
    }

    // The writer checks the token again before it spends it.
    fn token(&self, hash: [u8; 32]) -> Pending<'_, Option<TokenRecord>> {
        Box::pin(std::future::ready(self.token_record(&hash)))
    }

    // From memory: loaded at open, updated by the writer after each commit.
    fn is_revoked(&self, serial: &Serial) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(serial)
    }

    fn is_banned(&self, spiffe_id: &str) -> bool {
        self.banned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(spiffe_id)
    }

    fn banned_list(&self) -> Vec<(String, u64)> {
        let map = self.banned.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = map.iter().map(|(id, b)| (id.clone(), b.since)).collect();
        list.sort();
        list
    }

    fn prune(&self, now: u64) -> usize {
        let mut map = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, not_after| *not_after > now);
        before - map.len()
    }

    fn sequence(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    fn revoked_list(&self, now: u64) -> (u64, Vec<(Serial, u64)>) {
        let map = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = map
            .iter()
            .filter(|(_, na)| **na > now)
            .map(|(s, na)| (s.clone(), *na))
            .collect();
        list.sort();
        (self.seq.load(Ordering::Acquire), list)
    }

    fn live_serials(&self, spiffe_id: &str, now: u64) -> Pending<'_, Vec<(Serial, u64)>> {
        Box::pin(std::future::ready(
            self.read(|r| live_serials(r, spiffe_id, now)),
        ))
    }

    fn issued(&self) -> Pending<'_, Vec<(Serial, IssuedRecord)>> {
        Box::pin(std::future::ready(RedbLedger::issued(self)))
    }

    fn tokens(&self) -> Pending<'_, Vec<TokenRecord>> {
        Box::pin(std::future::ready(RedbLedger::tokens(self)))
    }
}

/// Synchronous reads, for tools and tests that open a ledger file directly.
impl RedbLedger {
    /// Looks a token up by hash.
    pub fn token_record(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, LedgerError> {
        self.read(|r| {
            let t = r.open_table(TOKENS).map_err(db_err)?;
            let v = t.get(hash.as_slice()).map_err(db_err)?;
            v.map(|v| serde_json::from_slice(v.value()).map_err(db_err))
                .transpose()
        })
    }

    /// Every issued serial.
    pub fn issued(&self) -> Result<Vec<(Serial, IssuedRecord)>, LedgerError> {
        self.read(|r| {
            let t = r.open_table(SERIALS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                out.push((
                    Serial::from_bytes(k.value()),
                    serde_json::from_slice(v.value()).map_err(db_err)?,
                ));
            }
            Ok(out)
        })
    }

    /// Every token record.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, LedgerError> {
        self.read(|r| {
            let t = r.open_table(TOKENS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                out.push(serde_json::from_slice(v.value()).map_err(db_err)?);
            }
            Ok(out)
        })
    }
}

/// The serials issued for `spiffe_id` that are unexpired at `now`.
fn live_serials(
    r: &ReadTransaction,
    spiffe_id: &str,
    now: u64,
) -> Result<Vec<(Serial, u64)>, LedgerError> {
    let roots = r.open_multimap_table(ROOTS_BY_ID).map_err(db_err)?;
    let renewals = r.open_multimap_table(RENEWALS).map_err(db_err)?;
    let serials = r.open_table(SERIALS).map_err(db_err)?;
    Ok(apply::serials_of(&roots, &renewals, &serials, spiffe_id)?
        .into_iter()
        .filter(|(_, rec)| rec.not_after > now)
        .map(|(s, rec)| (s, rec.not_after))
        .collect())
}

impl Drop for RedbLedger {
    /// Stops the writer and waits for it, so the database file lock is free once dropped.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn changed(done: Done) -> Result<Revocation, LedgerError> {
    match done {
        Done::Changed { seq, revoked } => Ok(Revocation {
            sequence: seq,
            serials: revoked.into_iter().map(|(s, _)| s).collect(),
        }),
        Done::Ok => Err(LedgerError::Db("revocation returned no sequence".into())),
    }
}

type Loaded = (HashMap<Serial, u64>, HashMap<String, BanRecord>, u64);

/// The revocations (the server prunes the expired ones with its clock), the bans and the
/// sequence number, at open.
fn load_revocations(db: &Database) -> Result<Loaded, LedgerError> {
    let r = db.begin_read().map_err(db_err)?;
    let t = r.open_table(REVOKED).map_err(db_err)?;
    let mut map = HashMap::new();
    for row in t.iter().map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        let rec: RevokedRecord = serde_json::from_slice(v.value()).map_err(db_err)?;
        map.insert(Serial::from_bytes(k.value()), rec.not_after);
    }
    let mut banned = HashMap::new();
    for row in r
        .open_table(BANNED)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = row.map_err(db_err)?;
        let rec: BanRecord = serde_json::from_slice(v.value()).map_err(db_err)?;
        banned.insert(k.value().to_string(), rec);
    }
    let meta = r.open_table(META).map_err(db_err)?;
    let seq = meta
        .get(REVOCATION_SEQ)
        .map_err(db_err)?
        .map(|v| v.value())
        .unwrap_or(0);
    Ok((map, banned, seq))
}

struct Writer {
    db: Slot,
    path: PathBuf,
    revoked: Arc<RwLock<HashMap<Serial, u64>>>,
    banned: Arc<RwLock<HashMap<String, BanRecord>>>,
    seq: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Job>) {
        loop {
            let first = if self.is_closed() {
                // Reopen when asked or every REOPEN_EVERY, so reads recover without a write.
                match rx.recv_timeout(REOPEN_EVERY) {
                    Ok(j) => Some(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(j) => Some(j),
                    Err(_) => return,
                }
            };
            let reopened = self.reopen_if_closed();
            let Some(first) = first else { continue };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            match reopened {
                Ok(()) => self.commit_batch(batch),
                Err(e) => refuse(batch, &e),
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.db.read().unwrap_or_else(|e| e.into_inner()).is_err()
    }

    /// Reopens a database closed after a failed write, reloading the in-memory view from it.
    /// Only this thread writes the slot, so the file is opened (maybe repaired, which takes a
    /// while) without holding its lock: readers meanwhile get the reason at once.
    fn reopen_if_closed(&self) -> Result<(), LedgerError> {
        if !self.is_closed() {
            return Ok(());
        }
        let reopened = open_db(&self.path).and_then(|db| Ok((load_revocations(&db)?, db)));
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        match reopened {
            Ok(((revoked, banned, seq), db)) => {
                *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = revoked;
                *self.banned.write().unwrap_or_else(|e| e.into_inner()) = banned;
                self.seq.store(seq, Ordering::Release);
                *slot = Ok(db);
                tracing::info!(path = %self.path.display(), "ledger reopened after a write failure; issuing again");
                Ok(())
            }
            Err(e) => {
                let why = format!("ledger closed after a write failure, reopening failed: {e}");
                tracing::debug!(error = %why);
                *slot = Err(why.clone());
                Err(LedgerError::Db(why))
            }
        }
    }

    /// redb refuses every operation after a failed write until the database is closed: close
    /// it now (so its file lock is released) and reopen it at once.
    fn close_after(&self, e: &LedgerError) {
        let why = match e {
            LedgerError::Db(why) => why.clone(),
            other => other.to_string(),
        };
        *self.db.write().unwrap_or_else(|e| e.into_inner()) =
            Err(format!("ledger closed after a write failure: {why}"));
        let _ = self.reopen_if_closed();
    }

    fn commit_batch(&self, batch: Vec<Job>) {
        let mut results = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        let outcome = (|| -> Result<u64, LedgerError> {
            let slot = self.db.read().unwrap_or_else(|e| e.into_inner());
            let db = slot.as_ref().map_err(|why| LedgerError::Db(why.clone()))?;
            let w = db.begin_write().map_err(db_err)?;
            let before = self.seq.load(Ordering::Acquire);
            let mut seq = before;
            {
                let mut tables = apply::Tables::open(&w)?;
                for (op, _) in &batch {
                    let r = tables.apply(op, &mut seq, &mut changes);
                    // A database error may leave the transaction half written: refuse it all.
                    if let Err(e @ LedgerError::Db(_)) = r {
                        return Err(e);
                    }
                    results.push(r);
                }
                if seq != before {
                    tables.set_sequence(seq)?;
                }
            }
            w.commit().map_err(db_err)?;
            Ok(seq)
        })();
        match outcome {
            Ok(seq) => {
                self.publish(changes, seq);
                for ((_, tx), r) in batch.into_iter().zip(results) {
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger commit failed; batch refused");
                refuse(batch, &e);
                self.close_after(&e);
            }
        }
    }

    /// Applies a committed batch's changes to the in-memory view, before anyone is answered.
    fn publish(&self, changes: Vec<Change>, seq: u64) {
        if changes.is_empty() {
            return;
        }
        let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        let mut banned = self.banned.write().unwrap_or_else(|e| e.into_inner());
        for c in changes {
            match c {
                Change::Revoked(s, not_after) => {
                    revoked.insert(s, not_after);
                }
                Change::Banned(id, rec) => {
                    banned.insert(id, rec);
                }
                Change::Lifted(id) => {
                    banned.remove(&id);
                }
            }
        }
        self.seq.store(seq, Ordering::Release);
    }
}

/// Answers every request of `batch` with `e` (nothing of it was recorded).
fn refuse(batch: Vec<Job>, e: &LedgerError) {
    let why = match e {
        LedgerError::Db(why) => why.clone(),
        other => other.to_string(),
    };
    for (_, tx) in batch {
        let _ = tx.send(Err(LedgerError::Db(why.clone())));
    }
}
