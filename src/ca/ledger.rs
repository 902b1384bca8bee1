//! The CA's durable ledger: issued serials, join tokens (hashed) and revocations, in redb.
//!
//! All writes go through one writer thread that **group-commits**: it takes every request that
//! is waiting, applies them in one write transaction, commits it durably (fsync) and only then
//! answers each caller. A response to a client is sent after that answer, so whatever a client
//! received is on disk, and durability costs one fsync per batch rather than per request.
//! Token consumption is checked and recorded inside the same transaction that records the
//! serial, by the single writer, so a token cannot be used twice, concurrently or across restarts.
//!
//! The public surface is small on purpose: a shared SQL ledger for CA replicas can take its place.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::identity::Serial;

const SERIALS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("serials");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
const REVOKED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("revoked");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVOCATION_SEQ: &str = "revocation_seq";
/// Most requests folded into one transaction.
const MAX_BATCH: usize = 512;

/// Ledger failures. The token variants map to HTTP 401, the rest to 500 or admin errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger database: {0}")]
    Db(String),
    #[error("unknown join token")]
    TokenUnknown,
    #[error("join token already used")]
    TokenUsed,
    #[error("join token expired")]
    TokenExpired,
    #[error("join token is bound to another SPIFFE ID")]
    TokenWrongId,
    #[error("serial {0} already issued")]
    DuplicateSerial(Serial),
    #[error("serial {0} was not issued by this CA")]
    UnknownSerial(Serial),
    #[error("serial {0} is already revoked")]
    AlreadyRevoked(Serial),
    #[error("ledger writer stopped")]
    Closed,
}

fn db_err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Db(e.to_string())
}

/// How an issuance was authorised.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Authorisation {
    /// First issuance with a join token (the token's hash prefix, for correlation).
    Token { token_hash: String },
    /// Renewal with the SVID of this serial.
    Svid { serial: String },
    /// The CA server's own certificate.
    CaServer,
}

/// One issued certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub spiffe_id: String,
    pub not_after: u64,
    pub issued_at: u64,
    pub authorisation: Authorisation,
}

/// One join token, stored under the SHA-256 of its text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub spiffe_id: String,
    pub expires_at: u64,
    pub created_at: u64,
    /// Set once the token was consumed, with the serial it bought.
    pub used: Option<TokenUse>,
}

/// When and for what a token was used.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenUse {
    pub at: u64,
    pub serial: String,
}

/// A revoked serial.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RevokedRecord {
    pub not_after: u64,
    pub revoked_at: u64,
}

/// A token to consume atomically with an issuance.
pub struct TokenSpend {
    pub hash: [u8; 32],
    pub spiffe_id: String,
    pub now: u64,
}

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
}

enum Done {
    Ok,
    Revoked { seq: u64, not_after: u64 },
}

type Job = (Op, oneshot::Sender<Result<Done, LedgerError>>);

/// The ledger handle; cheap to share behind an `Arc`.
pub struct Ledger {
    db: Arc<Database>,
    /// `None` only while dropping: closing the channel ends the writer.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    revoked: Arc<RwLock<HashMap<Serial, u64>>>,
    seq: Arc<AtomicU64>,
}

impl Ledger {
    /// Opens (creating) the ledger file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let db = Arc::new(
            Database::create(path)
                .map_err(|e| LedgerError::Db(format!("{}: {e}", path.display())))?,
        );
        let w = db.begin_write().map_err(db_err)?;
        for t in [SERIALS, TOKENS, REVOKED] {
            w.open_table(t).map_err(db_err)?;
        }
        w.open_table(META).map_err(db_err)?;
        w.commit().map_err(db_err)?;
        let (revoked, seq) = load_revocations(&db)?;
        let revoked = Arc::new(RwLock::new(revoked));
        let seq = Arc::new(AtomicU64::new(seq));
        let (jobs, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            revoked: revoked.clone(),
            seq: seq.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(db_err)?;
        Ok(Ledger {
            db,
            jobs: Some(jobs),
            writer: Some(writer),
            revoked,
            seq,
        })
    }

    async fn submit(&self, op: Op) -> Result<Done, LedgerError> {
        let (tx, rx) = oneshot::channel();
        let jobs = self.jobs.as_ref().ok_or(LedgerError::Closed)?;
        jobs.send((op, tx)).map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// Records an issued serial, consuming `token` in the same durable transaction.
    pub async fn record_issue(
        &self,
        serial: Serial,
        record: IssuedRecord,
        token: Option<TokenSpend>,
    ) -> Result<(), LedgerError> {
        self.submit(Op::Issue {
            serial,
            record,
            token,
        })
        .await
        .map(|_| ())
    }

    /// Stores a new join token (by hash).
    pub async fn add_token(&self, hash: [u8; 32], record: TokenRecord) -> Result<(), LedgerError> {
        self.submit(Op::AddToken { hash, record }).await.map(|_| ())
    }

    /// Revokes an issued serial; returns the new revocation sequence number.
    pub async fn revoke(&self, serial: Serial, now: u64) -> Result<u64, LedgerError> {
        match self.submit(Op::Revoke { serial, now }).await? {
            Done::Revoked { seq, .. } => Ok(seq),
            Done::Ok => Err(LedgerError::Db("revoke returned no sequence".into())),
        }
    }

    /// Looks a token up by hash (a consistent read; the writer re-checks before consuming).
    pub fn token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, LedgerError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(TOKENS).map_err(db_err)?;
        let v = t.get(hash.as_slice()).map_err(db_err)?;
        v.map(|v| serde_json::from_slice(v.value()).map_err(db_err))
            .transpose()
    }

    /// Whether a serial is revoked (from memory; the ledger is the source of truth at start).
    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(serial)
    }

    /// The revocation sequence number and the revoked serials not yet expired at `now`.
    pub fn revoked_list(&self, now: u64) -> (u64, Vec<(Serial, u64)>) {
        let map = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = map
            .iter()
            .filter(|(_, na)| **na > now)
            .map(|(s, na)| (s.clone(), *na))
            .collect();
        list.sort();
        (self.seq.load(Ordering::Acquire), list)
    }

    /// Every issued serial (for audits and consistency checks).
    pub fn issued(&self) -> Result<Vec<(Serial, IssuedRecord)>, LedgerError> {
        let r = self.db.begin_read().map_err(db_err)?;
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
    }

    /// Every token record (hashes and state, never the token text).
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, LedgerError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(TOKENS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(db_err)?);
        }
        Ok(out)
    }
}

impl Drop for Ledger {
    /// Stops the writer and waits for it, so the database file lock is free once dropped.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn load_revocations(db: &Database) -> Result<(HashMap<Serial, u64>, u64), LedgerError> {
    let r = db.begin_read().map_err(db_err)?;
    let t = r.open_table(REVOKED).map_err(db_err)?;
    let mut map = HashMap::new();
    for row in t.iter().map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        let rec: RevokedRecord = serde_json::from_slice(v.value()).map_err(db_err)?;
        map.insert(Serial::from_bytes(k.value()), rec.not_after);
    }
    let meta = r.open_table(META).map_err(db_err)?;
    let seq = meta
        .get(REVOCATION_SEQ)
        .map_err(db_err)?
        .map(|v| v.value())
        .unwrap_or(0);
    Ok((map, seq))
}

struct Writer {
    db: Arc<Database>,
    revoked: Arc<RwLock<HashMap<Serial, u64>>>,
    seq: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    fn commit_batch(&self, batch: Vec<Job>) {
        let mut results = Vec::with_capacity(batch.len());
        let mut new_revocations = Vec::new();
        let outcome = (|| -> Result<(), LedgerError> {
            let w = self.db.begin_write().map_err(db_err)?;
            {
                let mut serials = w.open_table(SERIALS).map_err(db_err)?;
                let mut tokens = w.open_table(TOKENS).map_err(db_err)?;
                let mut revoked = w.open_table(REVOKED).map_err(db_err)?;
                let mut meta = w.open_table(META).map_err(db_err)?;
                let mut seq = self.seq.load(Ordering::Acquire);
                for (op, _) in &batch {
                    let r = match op {
                        Op::Issue {
                            serial,
                            record,
                            token,
                        } => apply_issue(&mut serials, &mut tokens, serial, record, token.as_ref()),
                        Op::AddToken { hash, record } => {
                            let v = serde_json::to_vec(record).map_err(db_err)?;
                            tokens
                                .insert(hash.as_slice(), v.as_slice())
                                .map_err(db_err)?;
                            Ok(Done::Ok)
                        }
                        Op::Revoke { serial, now } => {
                            let r = apply_revoke(&serials, &mut revoked, serial, *now, seq + 1);
                            if let Ok(Done::Revoked { seq: s, not_after }) = &r {
                                seq = *s;
                                meta.insert(REVOCATION_SEQ, seq).map_err(db_err)?;
                                new_revocations.push((serial.clone(), *not_after, seq));
                            }
                            r
                        }
                    };
                    results.push(r);
                }
            }
            w.commit().map_err(db_err)
        })();
        match outcome {
            Ok(()) => {
                if !new_revocations.is_empty() {
                    let mut map = self.revoked.write().unwrap_or_else(|e| e.into_inner());
                    for (s, na, seq) in new_revocations {
                        map.insert(s, na);
                        self.seq.store(seq, Ordering::Release);
                    }
                }
                for ((_, tx), r) in batch.into_iter().zip(results) {
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger commit failed; batch refused");
                for (_, tx) in batch {
                    let _ = tx.send(Err(LedgerError::Db(e.to_string())));
                }
            }
        }
    }
}

fn apply_issue(
    serials: &mut redb::Table<&[u8], &[u8]>,
    tokens: &mut redb::Table<&[u8], &[u8]>,
    serial: &Serial,
    record: &IssuedRecord,
    token: Option<&TokenSpend>,
) -> Result<Done, LedgerError> {
    if serials.get(serial.as_bytes()).map_err(db_err)?.is_some() {
        return Err(LedgerError::DuplicateSerial(serial.clone()));
    }
    if let Some(spend) = token {
        let current: Option<TokenRecord> =
            match tokens.get(spend.hash.as_slice()).map_err(db_err)? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(db_err)?),
                None => None,
            };
        let mut rec = current.ok_or(LedgerError::TokenUnknown)?;
        if rec.used.is_some() {
            return Err(LedgerError::TokenUsed);
        }
        if rec.expires_at <= spend.now {
            return Err(LedgerError::TokenExpired);
        }
        if rec.spiffe_id != spend.spiffe_id {
            return Err(LedgerError::TokenWrongId);
        }
        rec.used = Some(TokenUse {
            at: spend.now,
            serial: serial.to_string(),
        });
        let v = serde_json::to_vec(&rec).map_err(db_err)?;
        tokens
            .insert(spend.hash.as_slice(), v.as_slice())
            .map_err(db_err)?;
    }
    let v = serde_json::to_vec(record).map_err(db_err)?;
    serials
        .insert(serial.as_bytes(), v.as_slice())
        .map_err(db_err)?;
    Ok(Done::Ok)
}

fn apply_revoke(
    serials: &redb::Table<&[u8], &[u8]>,
    revoked: &mut redb::Table<&[u8], &[u8]>,
    serial: &Serial,
    now: u64,
    next_seq: u64,
) -> Result<Done, LedgerError> {
    let issued: IssuedRecord = match serials.get(serial.as_bytes()).map_err(db_err)? {
        Some(v) => serde_json::from_slice(v.value()).map_err(db_err)?,
        None => return Err(LedgerError::UnknownSerial(serial.clone())),
    };
    if revoked.get(serial.as_bytes()).map_err(db_err)?.is_some() {
        return Err(LedgerError::AlreadyRevoked(serial.clone()));
    }
    let rec = RevokedRecord {
        not_after: issued.not_after,
        revoked_at: now,
    };
    let v = serde_json::to_vec(&rec).map_err(db_err)?;
    revoked
        .insert(serial.as_bytes(), v.as_slice())
        .map_err(db_err)?;
    Ok(Done::Revoked {
        seq: next_seq,
        not_after: issued.not_after,
    })
}

/// SHA-256 of a token's text: what the ledger stores.
pub fn token_hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A new random join token: `tlj_` and 32 random bytes in hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).expect("system random generator failed");
    format!("tlj_{}", crate::util::hex(&b))
}
