//! The shared ledger: one PostgreSQL database, any number of CA replicas of one region.
//!
//! Every write is one transaction that commits before its future resolves (PostgreSQL's
//! `synchronous_commit`, on by default, makes it durable; the server group-commits concurrent
//! transactions itself). What the redb ledger gets from its single writer, this one gets from
//! row and advisory locks, so replicas in separate processes keep the [`Ledger`] promises:
//! - a join token is spent by a conditional `UPDATE ... WHERE used_at IS NULL`: of two
//!   replicas spending it at once, the second waits on the row and then matches nothing;
//! - a serial is the primary key: it is never recorded twice;
//! - an issuance takes a shared advisory lock on its SPIFFE ID, a revocation or ban of that ID
//!   an exclusive one, so a renewal racing a revocation of its lineage (all of one ID) or a ban
//!   either commits first, and is revoked with the rest, or waits and is refused;
//! - the revocation sequence lives in the one `ledger` row: a revocation, ban or lift bumps it
//!   under that row's lock, so sequences commit in order and a replica that read sequence `n`
//!   has seen every change up to `n`.
//!
//! The revoked serials and bans are kept in memory for the checks on every request, and each
//! replica refreshes them every [`PgOptions::refresh`] (one `SELECT` when nothing changed), so
//! a revocation made at one replica is served by all within one refresh. While the database is
//! unreachable, writes and store reads fail at once with the reason (clients get 503), the last
//! view keeps serving, and [`Ledger::stale`] says since when it has not been refreshed; every
//! connection is re-made when the database is back, with no restart.

mod pool;
pub mod schema;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Transaction};

pub use self::pool::PgUrl;
use self::pool::{pg, Pool};
use super::{
    Authorisation, BanRecord, IssuedRecord, Ledger, LedgerError, Pending, Revocation, TokenRecord,
    TokenSpend, TokenUse,
};
use crate::identity::Serial;

/// The longest any one ledger operation may take, queueing for a connection included.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// How a replica uses the database.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections this replica keeps at most.
    pub pool: usize,
    /// How often the in-memory revocations and bans are re-read.
    pub refresh: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool: 16,
            refresh: Duration::from_secs(1),
        }
    }
}

/// The in-memory view of revocations and bans, and how current it is.
#[derive(Default)]
struct View {
    revoked: HashMap<Serial, u64>,
    banned: HashMap<String, BanRecord>,
    seq: u64,
}

/// When the view was last refreshed, and the error since, if any.
struct Freshness {
    at: Instant,
    error: Option<String>,
}

struct Shared {
    pool: Pool,
    view: RwLock<View>,
    fresh: Mutex<Freshness>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    options: PgOptions,
}

/// A replica's handle on the shared ledger; cheap to share behind an `Arc`.
pub struct PgLedger {
    shared: Arc<Shared>,
    /// Dropping it stops the refresh task.
    _stop: watch::Sender<()>,
}

type Db = fn(tokio_postgres::Error) -> LedgerError;

fn db(e: tokio_postgres::Error) -> LedgerError {
    LedgerError::Db(pg(&e))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PgLedger {
    /// Connects, creates or migrates the schema, checks the ledger is this CA's (`owner`),
    /// loads the revocations and starts refreshing them. Must run inside a tokio runtime.
    pub async fn open(
        url: PgUrl,
        owner: &schema::Owner<'_>,
        options: PgOptions,
    ) -> Result<Self, LedgerError> {
        let pool = Pool::new(url, options.pool);
        {
            let mut c = pool.get().await?;
            let from = schema::migrate(c.client(), owner).await?;
            if from != schema::VERSION {
                tracing::info!(url = %pool.url(), from, to = schema::VERSION, "ledger schema migrated");
            }
            c.done();
        }
        let shared = Arc::new(Shared {
            pool,
            view: RwLock::new(View::default()),
            fresh: Mutex::new(Freshness {
                at: Instant::now(),
                error: None,
            }),
            refreshing: tokio::sync::Mutex::new(()),
            options,
        });
        shared.refresh().await?;
        let (stop, stopped) = watch::channel(());
        tokio::spawn(refresh_loop(Arc::downgrade(&shared), stopped));
        Ok(PgLedger {
            shared,
            _stop: stop,
        })
    }

    /// Re-reads the revocations now (tests, and after this replica's own revocations).
    pub async fn refresh(&self) -> Result<(), LedgerError> {
        self.shared.refresh().await
    }
}

async fn refresh_loop(shared: std::sync::Weak<Shared>, mut stop: watch::Receiver<()>) {
    loop {
        let Some(every) = shared.upgrade().map(|s| s.options.refresh) else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let Some(s) = shared.upgrade() else { return };
        if let Err(e) = s.refresh().await {
            tracing::warn!(error = %e, "ledger: revocations could not be refreshed");
        }
    }
}

impl Shared {
    /// Runs `op` with a pooled connection, within [`OP_TIMEOUT`]. A connection error drops the
    /// idle connections too: when the database restarts, every one of them is dead.
    async fn with<T, F>(&self, what: &'static str, op: F) -> Result<T, LedgerError>
    where
        F: for<'c> FnOnce(
            &'c mut tokio_postgres::Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, LedgerError>> + Send + 'c>,
        >,
    {
        let run = async {
            let mut c = self.pool.get().await?;
            let r = op(c.client()).await;
            if c.client().is_closed() {
                // The connection died: when the database restarts, so did the idle ones.
                self.pool.clear();
            } else if !matches!(r, Err(LedgerError::Db(_) | LedgerError::Closed)) {
                // Committed, or a refusal rolled back: the connection is clean.
                c.done();
            }
            r
        };
        match tokio::time::timeout(OP_TIMEOUT, run).await {
            Ok(r) => r,
            Err(_) => {
                self.pool.clear();
                Err(LedgerError::Db(format!(
                    "{what}: the ledger database did not answer within {OP_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Loads what changed since the view's sequence, in one consistent snapshot.
    async fn refresh(&self) -> Result<(), LedgerError> {
        let _one = self.refreshing.lock().await;
        let since = self.view.read().unwrap_or_else(|e| e.into_inner()).seq;
        let r = self
            .with("refreshing revocations", move |c| {
                Box::pin(async move {
                    let tx = c
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()
                        .await
                        .map_err(db)?;
                    let seq = u64_of(
                        tx.query_typed("SELECT revocation_seq FROM ledger", &[])
                            .await
                            .map_err(db)?
                            .first()
                            .ok_or_else(|| LedgerError::Db("table `ledger` has no row".into()))?
                            .get(0),
                    );
                    if seq == since {
                        tx.commit().await.map_err(db)?;
                        return Ok(None);
                    }
                    let revoked = tx
                        .query_typed(
                            "SELECT serial, not_after FROM revoked WHERE seq > $1",
                            &[(&i64_of(since), Type::INT8)],
                        )
                        .await
                        .map_err(db)?;
                    let banned = tx
                        .query_typed("SELECT spiffe_id, since FROM banned", &[])
                        .await
                        .map_err(db)?;
                    tx.commit().await.map_err(db)?;
                    Ok(Some((seq, revoked, banned)))
                })
            })
            .await;
        let mut fresh = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(changed) => {
                if let Some((seq, revoked, banned)) = changed {
                    let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
                    for row in revoked {
                        let serial: Vec<u8> = row.get(0);
                        view.revoked
                            .insert(Serial::from_bytes(&serial), u64_of(row.get(1)));
                    }
                    view.banned = banned
                        .into_iter()
                        .map(|row| {
                            (
                                row.get::<_, String>(0),
                                BanRecord {
                                    since: u64_of(row.get(1)),
                                },
                            )
                        })
                        .collect();
                    view.seq = seq;
                }
                if let Some(e) = fresh.error.take() {
                    tracing::info!(previous_error = %e, "ledger: revocations refreshed again");
                }
                fresh.at = Instant::now();
                Ok(())
            }
            Err(e) => {
                fresh.error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// After a revocation committed here: the view catches up at once (the caller's answer
    /// then holds it), or at the next refresh if the database went away meanwhile.
    async fn publish(&self, revoked: &[(Serial, u64)]) {
        if self.refresh().await.is_err() {
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            for (s, na) in revoked {
                view.revoked.insert(s.clone(), *na);
            }
        }
    }
}

/// Takes the advisory lock of `spiffe_id`: shared for an issuance, exclusive for what revokes.
async fn lock_id(
    tx: &Transaction<'_>,
    spiffe_id: &str,
    exclusive: bool,
) -> Result<(), LedgerError> {
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))::text"
    } else {
        "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))::text"
    };
    tx.query_typed(sql, &[(&spiffe_id, Type::TEXT)])
        .await
        .map_err(db)?;
    Ok(())
}

/// Bumps the revocation sequence (under the `ledger` row's lock until commit).
async fn bump(tx: &Transaction<'_>) -> Result<u64, LedgerError> {
    let rows = tx
        .query_typed(
            "UPDATE ledger SET revocation_seq = revocation_seq + 1 RETURNING revocation_seq",
            &[],
        )
        .await
        .map_err(db)?;
    Ok(u64_of(
        rows.first()
            .ok_or_else(|| LedgerError::Db("table `ledger` has no row".into()))?
            .get(0),
    ))
}

/// Commits, or rolls back with `refusal` (nothing of the operation is kept).
async fn finish<T>(tx: Transaction<'_>, r: Result<T, LedgerError>) -> Result<T, LedgerError> {
    match r {
        Ok(v) => {
            tx.commit().await.map_err(db)?;
            Ok(v)
        }
        Err(e) => {
            tx.rollback().await.map_err(db)?;
            Err(e)
        }
    }
}

fn serials_of(rows: Vec<Row>) -> Vec<(Serial, u64)> {
    rows.into_iter()
        .map(|r| {
            let s: Vec<u8> = r.get(0);
            (Serial::from_bytes(&s), u64_of(r.get(1)))
        })
        .collect()
}

/// Records an issuance in one statement: the `record_issue` function of the schema takes the
/// ID's shared lock, checks, spends the token and inserts, atomically.
async fn record_issue(
    c: &tokio_postgres::Client,
    serial: &Serial,
    record: &IssuedRecord,
    token: Option<&TokenSpend>,
) -> Result<(), LedgerError> {
    let parent = match &record.authorisation {
        Authorisation::Svid { serial } => Some(
            Serial::parse_hex(serial)
                .ok_or_else(|| LedgerError::Db(format!("renewal parent {serial:?} is not hex")))?,
        ),
        _ => None,
    };
    let parent_bytes = parent.as_ref().map(|p| p.as_bytes().to_vec());
    let auth =
        serde_json::to_string(&record.authorisation).map_err(|e| LedgerError::Db(e.to_string()))?;
    if let Some(spend) = token {
        if spend.spiffe_id != record.spiffe_id {
            return Err(LedgerError::TokenWrongId);
        }
    }
    let hash = token.map(|t| t.hash.to_vec());
    let now = i64_of(token.map_or(record.issued_at, |t| t.now));
    let rows = c
        .query_typed(
            "SELECT record_issue($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                (&serial.as_bytes(), Type::BYTEA),
                (&serial.to_string(), Type::TEXT),
                (&record.spiffe_id, Type::TEXT),
                (&i64_of(record.not_after), Type::INT8),
                (&i64_of(record.issued_at), Type::INT8),
                (&auth, Type::TEXT),
                (&parent_bytes, Type::BYTEA),
                (&hash, Type::BYTEA),
                (&now, Type::INT8),
            ],
        )
        .await
        .map_err(|e| match e.code() {
            // Two replicas recording one serial at the same moment: the key decides.
            Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                LedgerError::DuplicateSerial(serial.clone())
            }
            _ => db(e),
        })?;
    let outcome: String = rows
        .first()
        .ok_or_else(|| LedgerError::Db("record_issue returned no row".into()))?
        .get(0);
    match outcome.as_str() {
        "ok" => Ok(()),
        "banned" => Err(LedgerError::Banned(record.spiffe_id.clone())),
        "parent_revoked" => Err(LedgerError::ParentRevoked(
            parent.expect("only a renewal has a parent to be revoked"),
        )),
        "duplicate" => Err(LedgerError::DuplicateSerial(serial.clone())),
        "token_unknown" => Err(LedgerError::TokenUnknown),
        "token_used" => Err(LedgerError::TokenUsed),
        "token_voided" => Err(LedgerError::TokenVoided),
        "token_expired" => Err(LedgerError::TokenExpired),
        "token_wrong_id" => Err(LedgerError::TokenWrongId),
        other => Err(LedgerError::Db(format!("record_issue answered {other:?}"))),
    }
}

/// What a revocation or ban changed, with the not_after of each serial (for the view).
type Revoked = (Revocation, Vec<(Serial, u64)>);

async fn revoke(tx: &Transaction<'_>, serial: &Serial, now: u64) -> Result<Revoked, LedgerError> {
    let s = serial.as_bytes();
    let owner = tx
        .query_typed(
            "SELECT spiffe_id FROM serials WHERE serial = $1",
            &[(&s, Type::BYTEA)],
        )
        .await
        .map_err(db)?;
    let Some(owner) = owner.first() else {
        return Err(LedgerError::UnknownSerial(serial.clone()));
    };
    let id: String = owner.get(0);
    lock_id(tx, &id, true).await?;
    let seq = bump(tx).await?;
    // UNION (not UNION ALL) also ends the walk on a damaged ledger with a cycle.
    let rows = tx
        .query_typed(
            "WITH RECURSIVE tree(serial) AS (
                 SELECT $1::bytea
                 UNION SELECT s.serial FROM serials s JOIN tree t ON s.parent = t.serial
             )
             INSERT INTO revoked (serial, not_after, revoked_at, seq)
             SELECT s.serial, s.not_after, $2, $3 FROM serials s JOIN tree USING (serial)
             ON CONFLICT (serial) DO NOTHING
             RETURNING serial, not_after",
            &[
                (&s, Type::BYTEA),
                (&i64_of(now), Type::INT8),
                (&i64_of(seq), Type::INT8),
            ],
        )
        .await
        .map_err(db)?;
    if rows.is_empty() {
        return Err(LedgerError::AlreadyRevoked(serial.clone()));
    }
    Ok(revoked(seq, rows))
}

fn revoked(seq: u64, rows: Vec<Row>) -> Revoked {
    let pairs = serials_of(rows);
    let r = Revocation {
        sequence: seq,
        serials: pairs.iter().map(|(s, _)| s.clone()).collect(),
    };
    (r, pairs)
}

async fn ban(tx: &Transaction<'_>, spiffe_id: &str, now: u64) -> Result<Revoked, LedgerError> {
    lock_id(tx, spiffe_id, true).await?;
    let now = i64_of(now);
    let added = tx
        .query_typed(
            "INSERT INTO banned (spiffe_id, since) VALUES ($1, $2)
             ON CONFLICT (spiffe_id) DO NOTHING RETURNING 1",
            &[(&spiffe_id, Type::TEXT), (&now, Type::INT8)],
        )
        .await
        .map_err(db)?;
    if added.is_empty() {
        return Err(LedgerError::AlreadyBanned(spiffe_id.to_string()));
    }
    let seq = bump(tx).await?;
    let rows = tx
        .query_typed(
            "INSERT INTO revoked (serial, not_after, revoked_at, seq)
             SELECT serial, not_after, $2, $3 FROM serials WHERE spiffe_id = $1 AND not_after > $2
             ON CONFLICT (serial) DO NOTHING
             RETURNING serial, not_after",
            &[
                (&spiffe_id, Type::TEXT),
                (&now, Type::INT8),
                (&i64_of(seq), Type::INT8),
            ],
        )
        .await
        .map_err(db)?;
    tx.query_typed(
        "UPDATE tokens SET voided_at = $2
         WHERE spiffe_id = $1 AND used_at IS NULL AND voided_at IS NULL RETURNING 1",
        &[(&spiffe_id, Type::TEXT), (&now, Type::INT8)],
    )
    .await
    .map_err(db)?;
    Ok(revoked(seq, rows))
}

async fn lift(tx: &Transaction<'_>, spiffe_id: &str) -> Result<u64, LedgerError> {
    lock_id(tx, spiffe_id, true).await?;
    let gone = tx
        .query_typed(
            "DELETE FROM banned WHERE spiffe_id = $1 RETURNING 1",
            &[(&spiffe_id, Type::TEXT)],
        )
        .await
        .map_err(db)?;
    if gone.is_empty() {
        return Err(LedgerError::NotBanned(spiffe_id.to_string()));
    }
    bump(tx).await
}

async fn add_token(
    tx: &Transaction<'_>,
    hash: &[u8; 32],
    r: &TokenRecord,
) -> Result<(), LedgerError> {
    lock_id(tx, &r.spiffe_id, false).await?;
    let banned = tx
        .query_typed(
            "SELECT 1 FROM banned WHERE spiffe_id = $1",
            &[(&r.spiffe_id, Type::TEXT)],
        )
        .await
        .map_err(db)?;
    if !banned.is_empty() {
        return Err(LedgerError::Banned(r.spiffe_id.clone()));
    }
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&hash.as_slice(), Type::BYTEA),
        (&r.spiffe_id, Type::TEXT),
        (&i64_of(r.expires_at), Type::INT8),
        (&i64_of(r.created_at), Type::INT8),
    ];
    tx.query_typed(
        "INSERT INTO tokens (hash, spiffe_id, expires_at, created_at) VALUES ($1, $2, $3, $4)
         RETURNING 1",
        &params,
    )
    .await
    .map_err(db)?;
    Ok(())
}

fn token_record(row: &Row) -> TokenRecord {
    let used_at: Option<i64> = row.get("used_at");
    let used_serial: Option<String> = row.get("used_serial");
    TokenRecord {
        spiffe_id: row.get("spiffe_id"),
        expires_at: u64_of(row.get("expires_at")),
        created_at: u64_of(row.get("created_at")),
        used: used_at.map(|at| TokenUse {
            at: u64_of(at),
            serial: used_serial.unwrap_or_default(),
        }),
        voided_at: row.get::<_, Option<i64>>("voided_at").map(u64_of),
    }
}

const TOKEN_COLUMNS: &str = "spiffe_id, expires_at, created_at, used_at, used_serial, voided_at";

/// A write in one transaction: `body` runs in it, and its refusal rolls it all back.
macro_rules! in_tx {
    ($self:ident, $what:literal, |$tx:ident| $body:expr) => {{
        let shared = $self.shared.clone();
        Box::pin(async move {
            shared
                .with($what, move |c| {
                    Box::pin(async move {
                        let $tx = c.transaction().await.map_err(db as Db)?;
                        let r = $body;
                        finish($tx, r).await
                    })
                })
                .await
        })
    }};
}

impl Ledger for PgLedger {
    fn record_issue(
        &self,
        serial: Serial,
        record: IssuedRecord,
        token: Option<TokenSpend>,
    ) -> Pending<'_, ()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared
                .with("recording an issuance", move |c| {
                    Box::pin(async move { record_issue(c, &serial, &record, token.as_ref()).await })
                })
                .await
        })
    }

    fn add_token(&self, hash: [u8; 32], record: TokenRecord) -> Pending<'_, ()> {
        in_tx!(self, "adding a join token", |tx| add_token(
            &tx, &hash, &record
        )
        .await)
    }

    fn revoke(&self, serial: Serial, now: u64) -> Pending<'_, Revocation> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let r: Result<Revoked, LedgerError> =
                in_tx!(self, "revoking", |tx| revoke(&tx, &serial, now).await).await;
            let (r, pairs) = r?;
            shared.publish(&pairs).await;
            Ok(r)
        })
    }

    fn ban(&self, spiffe_id: &str, now: u64) -> Pending<'_, Revocation> {
        let spiffe_id = spiffe_id.to_string();
        let shared = self.shared.clone();
        Box::pin(async move {
            let r: Result<Revoked, LedgerError> =
                in_tx!(self, "revoking an ID", |tx| ban(&tx, &spiffe_id, now).await).await;
            let (r, pairs) = r?;
            shared.publish(&pairs).await;
            Ok(r)
        })
    }

    fn lift(&self, spiffe_id: &str) -> Pending<'_, u64> {
        let spiffe_id = spiffe_id.to_string();
        let shared = self.shared.clone();
        Box::pin(async move {
            let r: Result<u64, LedgerError> =
                in_tx!(self, "lifting a revocation", |tx| lift(&tx, &spiffe_id)
                    .await)
                .await;
            let r = r?;
            shared.publish(&[]).await;
            Ok(r)
        })
    }

    fn token(&self, hash: [u8; 32]) -> Pending<'_, Option<TokenRecord>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared
                .with("reading a join token", move |c| {
                    Box::pin(async move {
                        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1");
                        let rows = c
                            .query_typed(&sql, &[(&hash.as_slice(), Type::BYTEA)])
                            .await
                            .map_err(db)?;
                        Ok(rows.first().map(token_record))
                    })
                })
                .await
        })
    }

    fn is_revoked(&self, serial: &Serial) -> bool {
        self.shared
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .revoked
            .contains_key(serial)
    }

    fn is_banned(&self, spiffe_id: &str) -> bool {
        self.shared
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .banned
            .contains_key(spiffe_id)
    }

    fn banned_list(&self) -> Vec<(String, u64)> {
        let view = self.shared.view.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = view
            .banned
            .iter()
            .map(|(id, b)| (id.clone(), b.since))
            .collect();
        list.sort();
        list
    }

    fn sequence(&self) -> u64 {
        self.shared
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .seq
    }

    fn revoked_list(&self, now: u64) -> (u64, Vec<(Serial, u64)>) {
        let view = self.shared.view.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = view
            .revoked
            .iter()
            .filter(|(_, na)| **na > now)
            .map(|(s, na)| (s.clone(), *na))
            .collect();
        list.sort();
        (view.seq, list)
    }

    fn prune(&self, now: u64) -> usize {
        let mut view = self.shared.view.write().unwrap_or_else(|e| e.into_inner());
        let before = view.revoked.len();
        view.revoked.retain(|_, not_after| *not_after > now);
        before - view.revoked.len()
    }

    fn stale(&self) -> Option<String> {
        let fresh = self.shared.fresh.lock().unwrap_or_else(|e| e.into_inner());
        let error = fresh.error.as_ref()?;
        Some(format!(
            "revocations last read from the ledger database {:.0?} ago; since then: {error}",
            fresh.at.elapsed()
        ))
    }

    fn live_serials(&self, spiffe_id: &str, now: u64) -> Pending<'_, Vec<(Serial, u64)>> {
        let shared = self.shared.clone();
        let spiffe_id = spiffe_id.to_string();
        Box::pin(async move {
            shared
                .with("reading an ID's serials", move |c| {
                    Box::pin(async move {
                        let rows = c
                            .query_typed(
                                "SELECT serial, not_after FROM serials
                                 WHERE spiffe_id = $1 AND not_after > $2",
                                &[(&spiffe_id, Type::TEXT), (&i64_of(now), Type::INT8)],
                            )
                            .await
                            .map_err(db)?;
                        Ok(serials_of(rows))
                    })
                })
                .await
        })
    }

    fn issued(&self) -> Pending<'_, Vec<(Serial, IssuedRecord)>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared
                .with("reading issued serials", move |c| {
                    Box::pin(async move {
                        let rows = c
                            .query_typed(
                                "SELECT serial, spiffe_id, not_after, issued_at, authorisation
                                 FROM serials ORDER BY issued_at, serial",
                                &[],
                            )
                            .await
                            .map_err(db)?;
                        rows.into_iter()
                            .map(|r| {
                                let s: Vec<u8> = r.get(0);
                                let auth: String = r.get(4);
                                Ok((
                                    Serial::from_bytes(&s),
                                    IssuedRecord {
                                        spiffe_id: r.get(1),
                                        not_after: u64_of(r.get(2)),
                                        issued_at: u64_of(r.get(3)),
                                        authorisation: serde_json::from_str(&auth).map_err(
                                            |e| {
                                                LedgerError::Db(format!(
                                                    "serial {}: {e}",
                                                    Serial::from_bytes(&s)
                                                ))
                                            },
                                        )?,
                                    },
                                ))
                            })
                            .collect()
                    })
                })
                .await
        })
    }

    fn tokens(&self) -> Pending<'_, Vec<TokenRecord>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared
                .with("reading join tokens", move |c| {
                    Box::pin(async move {
                        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at");
                        let rows = c.query_typed(&sql, &[]).await.map_err(db)?;
                        Ok(rows.iter().map(token_record).collect())
                    })
                })
                .await
        })
    }
}
