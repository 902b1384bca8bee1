//! The CA's durable ledger: issued serials (with their renewal lineage), join tokens (hashed),
//! revocations and banned SPIFFE IDs, behind one [`Ledger`] interface.
//!
//! [`RedbLedger`] (an embedded redb file, one CA, the default) and [`PgLedger`] (one PostgreSQL
//! database shared by several CA replicas of one region) implement it; the API, admin, peer and
//! server code only ever holds an `Arc<dyn Ledger>`. [`LedgerUrl`] says which one a CA opens.
//!
//! What every implementation promises:
//! - a write resolves only once it is durable, so whatever a client was answered survives a
//!   crash;
//! - an issuance is checked and recorded in one transaction with the join token it spends
//!   ([`Ledger::record_issue`]): a token buys one serial, concurrently or across restarts;
//! - revocation reaches everything that descends from what is revoked: revoking a serial revokes
//!   every SVID renewed from it, transitively (the lineage is [`Authorisation::Svid`]), and a
//!   renewal from a revoked serial is refused when it is recorded, so a renewal racing a
//!   revocation cannot escape it;
//! - a banned SPIFFE ID ([`Ledger::ban`]) gets no issuance or renewal until the ban is lifted, and
//!   its unexpired serials are revoked and its unused join tokens voided in the transaction that
//!   records the ban.

pub mod postgres;
mod redb;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use self::postgres::{PgLedger, PgOptions, PgUrl};
pub use self::redb::RedbLedger;
pub use super::error::LedgerError;
use crate::identity::Serial;

/// Where a CA's ledger lives: `redb:PATH` (one CA, the default `DATA/ledger.redb`) or
/// `postgres://USER@HOST:PORT/DB` (shared by the region's CA replicas; see [`PgUrl::parse`] for
/// TLS).
#[derive(Clone, Debug)]
pub enum LedgerUrl {
    Redb(PathBuf),
    Postgres(Box<PgUrl>),
}

impl LedgerUrl {
    /// Parses a ledger URL; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("redb:") {
            if path.is_empty() {
                return Err(
                    "redb: needs a file path, as in redb:/var/lib/trustline/ledger.redb".into(),
                );
            }
            return Ok(LedgerUrl::Redb(path.into()));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return PgUrl::parse(text).map(|u| LedgerUrl::Postgres(Box::new(u)));
        }
        Err(format!(
            "{:?} is not a ledger URL: use redb:PATH or postgres://USER@HOST:PORT/DB",
            text.split("://").next().unwrap_or(text)
        ))
    }

    /// Opens the ledger; `owner` is checked against a shared one's (a CA refuses another
    /// region's ledger).
    pub async fn open(
        &self,
        owner: &postgres::schema::Owner<'_>,
        options: PgOptions,
    ) -> Result<Arc<dyn Ledger>, LedgerError> {
        Ok(match self {
            LedgerUrl::Redb(path) => Arc::new(RedbLedger::open(path)?),
            LedgerUrl::Postgres(url) => {
                Arc::new(PgLedger::open((**url).clone(), owner, options).await?)
            }
        })
    }
}

impl std::fmt::Display for LedgerUrl {
    /// The URL as given, any password redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LedgerUrl::Redb(p) => write!(f, "redb:{}", p.display()),
            LedgerUrl::Postgres(u) => u.fmt(f),
        }
    }
}

/// A ledger write in flight: it resolves once the write is durable (or refused).
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

/// What the CA needs from its store. Writes are futures that resolve once durable. Reads of the
/// store are futures too (a shared ledger is across the network); the revocation and ban checks
/// on every request are synchronous, from an in-memory view the ledger keeps current (the redb
/// one after each commit, a shared one at each refresh; [`Ledger::stale`] says when it is not).
pub trait Ledger: Send + Sync {
    /// Records an issued serial, consuming `token` in the same durable transaction. Refused if
    /// the serial exists ([`LedgerError::DuplicateSerial`]), its ID is banned
    /// ([`LedgerError::Banned`]), the serial it renews is revoked
    /// ([`LedgerError::ParentRevoked`]), or the token cannot be spent on it (the `Token*`
    /// variants).
    fn record_issue(
        &self,
        serial: Serial,
        record: IssuedRecord,
        token: Option<TokenSpend>,
    ) -> Pending<'_, ()>;

    /// Stores a new join token (by hash); refused for a banned ID.
    fn add_token(&self, hash: [u8; 32], record: TokenRecord) -> Pending<'_, ()>;

    /// Revokes an issued serial and every SVID renewed from it, transitively. Revoking an
    /// already revoked serial again revokes what descends from it and is not yet revoked (an
    /// older ledger did not cascade), or fails with [`LedgerError::AlreadyRevoked`].
    fn revoke(&self, serial: Serial, now: u64) -> Pending<'_, Revocation>;

    /// Bans a SPIFFE ID until [`Ledger::lift`]: no issuance or renewal for it, its unexpired
    /// serials revoked, its unused join tokens voided.
    fn ban(&self, spiffe_id: &str, now: u64) -> Pending<'_, Revocation>;

    /// Lifts a ban, giving the new revocation sequence. What it revoked stays revoked, and its
    /// voided tokens stay void: the workload joins again with a new token.
    fn lift(&self, spiffe_id: &str) -> Pending<'_, u64>;

    /// Looks a token up by hash (a consistent read; [`Ledger::record_issue`] re-checks it).
    fn token(&self, hash: [u8; 32]) -> Pending<'_, Option<TokenRecord>>;

    /// Whether a serial is revoked: a renewal with it is refused.
    fn is_revoked(&self, serial: &Serial) -> bool;

    /// Whether a SPIFFE ID is banned at this CA.
    fn is_banned(&self, spiffe_id: &str) -> bool;

    /// The banned SPIFFE IDs and since when, sorted.
    fn banned_list(&self) -> Vec<(String, u64)>;

    /// The revocation sequence number: it moves with every change of the published list.
    fn sequence(&self) -> u64;

    /// The revocation sequence number and the revoked serials not yet expired at `now`, sorted.
    fn revoked_list(&self, now: u64) -> (u64, Vec<(Serial, u64)>);

    /// Forgets revoked serials that expired by `now` from any in-memory view (an expired
    /// certificate is refused anyway); the store keeps them. Returns how many were forgotten.
    fn prune(&self, now: u64) -> usize;

    /// Why the in-memory view of revocations and bans may be behind the store (a shared ledger
    /// that could not refresh it lately), or `None` while it is current.
    fn stale(&self) -> Option<String> {
        None
    }

    /// The serials issued for `spiffe_id` that are unexpired at `now`, with their not_after.
    fn live_serials(&self, spiffe_id: &str, now: u64) -> Pending<'_, Vec<(Serial, u64)>>;

    /// Every issued serial (for audits and consistency checks).
    fn issued(&self) -> Pending<'_, Vec<(Serial, IssuedRecord)>>;

    /// Every token record (hashes and state, never the token text).
    fn tokens(&self) -> Pending<'_, Vec<TokenRecord>>;
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
    /// Asked for by a host's agent (its ID and SVID serial), which the CA's `[[agent]]`
    /// registrations allow to obtain this ID. Starts a lineage of its own: an agent's workload
    /// SVIDs are each obtained this way, never renewed by the workload.
    Agent { agent: String, serial: String },
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
    /// When a ban of its SPIFFE ID voided the token (it stays void after the ban is lifted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided_at: Option<u64>,
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

/// A banned SPIFFE ID.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BanRecord {
    /// When the ban was made (Unix seconds).
    pub since: u64,
}

/// What one revocation or ban changed.
#[derive(Clone, Debug, Default)]
pub struct Revocation {
    /// The revocation sequence number after it.
    pub sequence: u64,
    /// Every serial it revoked (the named one and its descendants, or an ID's live serials).
    pub serials: Vec<Serial>,
}

/// A token to consume atomically with an issuance.
pub struct TokenSpend {
    pub hash: [u8; 32],
    pub spiffe_id: String,
    pub now: u64,
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
