//! The ledger's tables in PostgreSQL, created and migrated by the CA itself.
//!
//! The `ledger` table's one row holds the schema version, whose ledger it is (trust domain and
//! region: a CA refuses another region's ledger) and the revocation sequence. Migrations run in
//! one transaction under an advisory lock, so replicas starting together migrate once (SPIRE's
//! concurrent-init deadlocks, spire#3948, came from racing DDL) and a failed migration leaves
//! the previous schema whole. A CA refuses a schema newer than it knows.

use tokio_postgres::Client;

use super::pool::pg;
use crate::ca::ledger::LedgerError;

/// Key of the advisory lock held while migrating (an arbitrary constant: "tl-ledgr").
const MIGRATION_LOCK: i64 = 0x746c_2d6c_6564_6772;

/// Migration `n` takes a ledger from schema version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    "
    CREATE TABLE ledger (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        schema_version integer NOT NULL,
        trust_domain text NOT NULL,
        region text NOT NULL,
        revocation_seq bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE serials (
        serial bytea PRIMARY KEY,
        spiffe_id text NOT NULL,
        not_after bigint NOT NULL,
        issued_at bigint NOT NULL,
        authorisation text NOT NULL,
        parent bytea
    );
    CREATE INDEX serials_by_id ON serials (spiffe_id, not_after);
    CREATE INDEX serials_by_parent ON serials (parent) WHERE parent IS NOT NULL;
    CREATE TABLE tokens (
        hash bytea PRIMARY KEY,
        spiffe_id text NOT NULL,
        expires_at bigint NOT NULL,
        created_at bigint NOT NULL,
        used_at bigint,
        used_serial text,
        voided_at bigint
    );
    CREATE INDEX tokens_unused_by_id ON tokens (spiffe_id)
        WHERE used_at IS NULL AND voided_at IS NULL;
    CREATE TABLE revoked (
        serial bytea PRIMARY KEY REFERENCES serials (serial),
        not_after bigint NOT NULL,
        revoked_at bigint NOT NULL,
        seq bigint NOT NULL
    );
    CREATE INDEX revoked_by_seq ON revoked (seq);
    CREATE TABLE banned (
        spiffe_id text PRIMARY KEY,
        since bigint NOT NULL
    );
    -- One issuance in one statement (one round trip): the ID's shared advisory lock first, then
    -- each check, each in a snapshot taken after the lock (plpgsql, READ COMMITTED), then the
    -- token's spend and the serial. A refusal returns before any write; an error after the
    -- spend (the serial's unique key) aborts the statement, spend included.
    CREATE FUNCTION record_issue(p_serial bytea, p_serial_text text, p_id text,
                                 p_not_after bigint, p_issued_at bigint, p_auth text,
                                 p_parent bytea, p_token bytea, p_now bigint)
    RETURNS text LANGUAGE plpgsql AS $fn$
    DECLARE
        t record;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_id, 0));
        IF EXISTS (SELECT 1 FROM banned WHERE spiffe_id = p_id) THEN
            RETURN 'banned';
        END IF;
        IF p_parent IS NOT NULL AND EXISTS (SELECT 1 FROM revoked WHERE serial = p_parent) THEN
            RETURN 'parent_revoked';
        END IF;
        IF EXISTS (SELECT 1 FROM serials WHERE serial = p_serial) THEN
            RETURN 'duplicate';
        END IF;
        IF p_token IS NOT NULL THEN
            UPDATE tokens SET used_at = p_now, used_serial = p_serial_text
             WHERE hash = p_token AND used_at IS NULL AND voided_at IS NULL
               AND expires_at > p_now AND spiffe_id = p_id;
            IF NOT FOUND THEN
                SELECT used_at, voided_at, expires_at, spiffe_id INTO t
                  FROM tokens WHERE hash = p_token;
                IF NOT FOUND THEN RETURN 'token_unknown'; END IF;
                IF t.used_at IS NOT NULL THEN RETURN 'token_used'; END IF;
                IF t.voided_at IS NOT NULL THEN RETURN 'token_voided'; END IF;
                IF t.expires_at <= p_now THEN RETURN 'token_expired'; END IF;
                RETURN 'token_wrong_id';
            END IF;
        END IF;
        INSERT INTO serials (serial, spiffe_id, not_after, issued_at, authorisation, parent)
        VALUES (p_serial, p_id, p_not_after, p_issued_at, p_auth, p_parent);
        RETURN 'ok';
    END
    $fn$;
    ",
];

/// The schema version this build writes.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// Whose ledger it is.
pub struct Owner<'a> {
    pub trust_domain: &'a str,
    /// The CA's region, or `""` for a root CA.
    pub region: &'a str,
}

/// Creates or migrates the schema, and checks the ledger belongs to `owner`. Returns the
/// version found before (0: a new ledger).
pub async fn migrate(client: &mut Client, owner: &Owner<'_>) -> Result<i32, LedgerError> {
    let db = |e: tokio_postgres::Error| LedgerError::Db(pg(&e));
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('ledger') IS NOT NULL", &[])
        .await
        .map_err(db)?
        .get(0);
    let found = if exists {
        let row = tx
            .query_opt(
                "SELECT schema_version, trust_domain, region FROM ledger",
                &[],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| {
                LedgerError::Db(
                    "table `ledger` has no row: not a trustline ledger, or a damaged one".into(),
                )
            })?;
        let (version, td, region): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
        if version > VERSION {
            return Err(LedgerError::Db(format!(
                "the ledger's schema is version {version}, newer than this trustline knows ({VERSION}): upgrade trustline on this replica"
            )));
        }
        if td != owner.trust_domain || region != owner.region {
            return Err(LedgerError::Db(format!(
                "this database holds the ledger of trust domain {td:?} region {region:?}, not of this CA (trust domain {:?} region {:?}): give each region's CA its own database",
                owner.trust_domain, owner.region
            )));
        }
        version
    } else {
        0
    };
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql).await.map_err(|e| {
            LedgerError::Db(format!(
                "migrating the ledger schema {n} -> {}: {}",
                n + 1,
                pg(&e)
            ))
        })?;
    }
    if found == 0 {
        tx.execute(
            "INSERT INTO ledger (schema_version, trust_domain, region) VALUES ($1, $2, $3)",
            &[&VERSION, &owner.trust_domain, &owner.region],
        )
        .await
        .map_err(db)?;
    } else if found < VERSION {
        tx.execute("UPDATE ledger SET schema_version = $1", &[&VERSION])
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(found)
}
