//! What the ledger's single writer does inside one write transaction: record issuances and
//! tokens, revoke along the renewal lineage, ban and lift SPIFFE IDs. Every check runs before
//! any write of its operation, so a refused operation leaves nothing behind in the batch.

use std::collections::HashSet;

use ::redb::{MultimapTable, ReadableMultimapTable, ReadableTable, Table, WriteTransaction};

use super::{
    db_err, Change, Done, Op, BANNED, INDEX_VERSION, META, OLD_BY_ID, RENEWALS, REVOCATION_SEQ,
    REVOKED, ROOTS_BY_ID, SERIALS, TOKENS,
};
use crate::ca::ledger::{
    Authorisation, BanRecord, IssuedRecord, LedgerError, RevokedRecord, TokenRecord, TokenSpend,
    TokenUse,
};
use crate::identity::Serial;

type Bytes<'t> = Table<'t, &'static [u8], &'static [u8]>;

/// The ledger's tables, opened once per write transaction.
pub(super) struct Tables<'t> {
    serials: Bytes<'t>,
    tokens: Bytes<'t>,
    revoked: Bytes<'t>,
    banned: Table<'t, &'static str, &'static [u8]>,
    renewals: MultimapTable<'t, &'static [u8], &'static [u8]>,
    roots: MultimapTable<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
}

/// Brings the indexes of an older ledger up to [`INDEX_VERSION`] 2, once, in the transaction
/// that opens it: the renewal lineage (missing before version 1) and the lineage roots of each
/// ID (version 1 had every serial of each ID instead, and that table is dropped).
pub(super) fn build_indexes(w: &WriteTransaction) -> Result<(), LedgerError> {
    let mut meta = w.open_table(META).map_err(db_err)?;
    let version = meta
        .get(INDEX_VERSION)
        .map_err(db_err)?
        .map(|v| v.value())
        .unwrap_or(0);
    if version >= 2 {
        return Ok(());
    }
    let serials = w.open_table(SERIALS).map_err(db_err)?;
    let mut renewals = w.open_multimap_table(RENEWALS).map_err(db_err)?;
    let mut roots = w.open_multimap_table(ROOTS_BY_ID).map_err(db_err)?;
    for row in serials.iter().map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        let rec: IssuedRecord = serde_json::from_slice(v.value()).map_err(db_err)?;
        let parent = parent_of(&rec)?;
        if let (Some(parent), true) = (&parent, version < 1) {
            renewals
                .insert(parent.as_bytes(), k.value())
                .map_err(db_err)?;
        }
        if is_root(&serials, &rec, parent.as_ref())? {
            roots
                .insert(rec.spiffe_id.as_str(), k.value())
                .map_err(db_err)?;
        }
    }
    drop((serials, renewals, roots));
    w.delete_multimap_table(OLD_BY_ID).map_err(db_err)?;
    meta.insert(INDEX_VERSION, 2).map_err(db_err)?;
    Ok(())
}

/// Whether a serial for `rec` starts a lineage in [`ROOTS_BY_ID`]: it renews no serial of the
/// same ID that this ledger holds (a first issuance, or a renewal of a serial from elsewhere).
fn is_root(
    serials: &impl ReadableTable<&'static [u8], &'static [u8]>,
    rec: &IssuedRecord,
    parent: Option<&Serial>,
) -> Result<bool, LedgerError> {
    let Some(parent) = parent else {
        return Ok(true);
    };
    let Some(v) = serials.get(parent.as_bytes()).map_err(db_err)? else {
        return Ok(true);
    };
    let parent: IssuedRecord = serde_json::from_slice(v.value()).map_err(db_err)?;
    Ok(parent.spiffe_id != rec.spiffe_id)
}

/// Every serial issued for `spiffe_id`, with its record: its lineage roots and what renews them,
/// transitively (a renewal keeps its parent's ID, so the walk stops at another ID's serial).
pub(super) fn serials_of(
    roots: &impl ReadableMultimapTable<&'static str, &'static [u8]>,
    renewals: &impl ReadableMultimapTable<&'static [u8], &'static [u8]>,
    serials: &impl ReadableTable<&'static [u8], &'static [u8]>,
    spiffe_id: &str,
) -> Result<Vec<(Serial, IssuedRecord)>, LedgerError> {
    let mut stack = Vec::new();
    for s in roots.get(spiffe_id).map_err(db_err)? {
        stack.push(Serial::from_bytes(s.map_err(db_err)?.value()));
    }
    let mut out = Vec::new();
    // A lineage is a tree (see `revoke_tree`); `seen` only guards against a damaged ledger.
    let mut seen = HashSet::new();
    while let Some(s) = stack.pop() {
        if !seen.insert(s.clone()) {
            continue;
        }
        let Some(v) = serials.get(s.as_bytes()).map_err(db_err)? else {
            continue;
        };
        let rec: IssuedRecord = serde_json::from_slice(v.value()).map_err(db_err)?;
        if rec.spiffe_id != spiffe_id {
            continue;
        }
        for child in renewals.get(s.as_bytes()).map_err(db_err)? {
            stack.push(Serial::from_bytes(child.map_err(db_err)?.value()));
        }
        out.push((s, rec));
    }
    Ok(out)
}

/// The serial a renewal was authorised with.
fn parent_of(rec: &IssuedRecord) -> Result<Option<Serial>, LedgerError> {
    match &rec.authorisation {
        Authorisation::Svid { serial } => Serial::parse_hex(serial)
            .map(Some)
            .ok_or_else(|| LedgerError::Db(format!("renewal parent {serial:?} is not hex"))),
        _ => Ok(None),
    }
}

impl<'t> Tables<'t> {
    pub(super) fn open(w: &'t WriteTransaction) -> Result<Self, LedgerError> {
        Ok(Tables {
            serials: w.open_table(SERIALS).map_err(db_err)?,
            tokens: w.open_table(TOKENS).map_err(db_err)?,
            revoked: w.open_table(REVOKED).map_err(db_err)?,
            banned: w.open_table(BANNED).map_err(db_err)?,
            renewals: w.open_multimap_table(RENEWALS).map_err(db_err)?,
            roots: w.open_multimap_table(ROOTS_BY_ID).map_err(db_err)?,
            meta: w.open_table(META).map_err(db_err)?,
        })
    }

    pub(super) fn set_sequence(&mut self, seq: u64) -> Result<(), LedgerError> {
        self.meta.insert(REVOCATION_SEQ, seq).map_err(db_err)?;
        Ok(())
    }

    /// Applies one operation; a change of the published list bumps `seq` and is added to
    /// `changes` (for the in-memory view, once committed).
    pub(super) fn apply(
        &mut self,
        op: &Op,
        seq: &mut u64,
        changes: &mut Vec<Change>,
    ) -> Result<Done, LedgerError> {
        match op {
            Op::Issue {
                serial,
                record,
                token,
            } => self.issue(serial, record, token.as_ref()),
            Op::AddToken { hash, record } => self.add_token(hash, record),
            Op::Revoke { serial, now } => {
                let revoked = self.revoke_tree(serial, *now)?;
                Ok(bump(seq, changes, revoked, *now))
            }
            Op::Ban { spiffe_id, now } => {
                let revoked = self.ban(spiffe_id, *now)?;
                changes.push(Change::Banned(spiffe_id.clone(), BanRecord { since: *now }));
                Ok(bump(seq, changes, revoked, *now))
            }
            Op::Lift { spiffe_id } => {
                if self
                    .banned
                    .remove(spiffe_id.as_str())
                    .map_err(db_err)?
                    .is_none()
                {
                    return Err(LedgerError::NotBanned(spiffe_id.clone()));
                }
                changes.push(Change::Lifted(spiffe_id.clone()));
                Ok(bump(seq, changes, Vec::new(), 0))
            }
        }
    }

    fn is_banned(&self, spiffe_id: &str) -> Result<bool, LedgerError> {
        Ok(self.banned.get(spiffe_id).map_err(db_err)?.is_some())
    }

    fn is_revoked(&self, serial: &Serial) -> Result<bool, LedgerError> {
        Ok(self
            .revoked
            .get(serial.as_bytes())
            .map_err(db_err)?
            .is_some())
    }

    fn issued(&self, serial: &Serial) -> Result<Option<IssuedRecord>, LedgerError> {
        match self.serials.get(serial.as_bytes()).map_err(db_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(db_err)?)),
            None => Ok(None),
        }
    }

    /// Records an issuance. Checked here, by the one writer, so that a revocation or a ban
    /// committed while the certificate was being signed still stops it.
    fn issue(
        &mut self,
        serial: &Serial,
        record: &IssuedRecord,
        token: Option<&TokenSpend>,
    ) -> Result<Done, LedgerError> {
        if self.issued(serial)?.is_some() {
            return Err(LedgerError::DuplicateSerial(serial.clone()));
        }
        if self.is_banned(&record.spiffe_id)? {
            return Err(LedgerError::Banned(record.spiffe_id.clone()));
        }
        let parent = parent_of(record)?;
        if let Some(p) = &parent {
            if self.is_revoked(p)? {
                return Err(LedgerError::ParentRevoked(p.clone()));
            }
        }
        let root = is_root(&self.serials, record, parent.as_ref())?;
        if let Some(spend) = token {
            self.spend(serial, spend)?;
        }
        let v = serde_json::to_vec(record).map_err(db_err)?;
        self.serials
            .insert(serial.as_bytes(), v.as_slice())
            .map_err(db_err)?;
        if let Some(p) = parent {
            self.renewals
                .insert(p.as_bytes(), serial.as_bytes())
                .map_err(db_err)?;
        }
        // A renewal, the common case, writes only at the right edge of `serials` (time-ordered
        // serials, see `authority::leaf_serial`) and under its parent in `renewals`.
        if root {
            self.roots
                .insert(record.spiffe_id.as_str(), serial.as_bytes())
                .map_err(db_err)?;
        }
        Ok(Done::Ok)
    }

    /// Consumes a join token for `serial`.
    fn spend(&mut self, serial: &Serial, spend: &TokenSpend) -> Result<(), LedgerError> {
        let current: Option<TokenRecord> =
            match self.tokens.get(spend.hash.as_slice()).map_err(db_err)? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(db_err)?),
                None => None,
            };
        let mut rec = current.ok_or(LedgerError::TokenUnknown)?;
        if rec.used.is_some() {
            return Err(LedgerError::TokenUsed);
        }
        if rec.voided_at.is_some() {
            return Err(LedgerError::TokenVoided);
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
        self.put_token(&spend.hash, &rec)
    }

    fn put_token(&mut self, hash: &[u8], rec: &TokenRecord) -> Result<(), LedgerError> {
        let v = serde_json::to_vec(rec).map_err(db_err)?;
        self.tokens.insert(hash, v.as_slice()).map_err(db_err)?;
        Ok(())
    }

    fn add_token(&mut self, hash: &[u8; 32], record: &TokenRecord) -> Result<Done, LedgerError> {
        if self.is_banned(&record.spiffe_id)? {
            return Err(LedgerError::Banned(record.spiffe_id.clone()));
        }
        self.put_token(hash, record)?;
        Ok(Done::Ok)
    }

    /// Revokes `root` and every serial renewed from it, transitively; returns what it revoked.
    fn revoke_tree(&mut self, root: &Serial, now: u64) -> Result<Vec<(Serial, u64)>, LedgerError> {
        if self.issued(root)?.is_none() {
            return Err(LedgerError::UnknownSerial(root.clone()));
        }
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        // Serials are unique and a child is recorded after its parent, so the lineage is a
        // tree; `seen` only guards against a damaged ledger.
        let mut seen = HashSet::new();
        while let Some(s) = stack.pop() {
            if !seen.insert(s.clone()) {
                continue;
            }
            for child in self.renewals.get(s.as_bytes()).map_err(db_err)? {
                stack.push(Serial::from_bytes(child.map_err(db_err)?.value()));
            }
            self.revoke_one(&s, now, &mut out)?;
        }
        if out.is_empty() {
            return Err(LedgerError::AlreadyRevoked(root.clone()));
        }
        Ok(out)
    }

    /// Revokes one issued serial unless it already is.
    fn revoke_one(
        &mut self,
        serial: &Serial,
        now: u64,
        out: &mut Vec<(Serial, u64)>,
    ) -> Result<(), LedgerError> {
        if self.is_revoked(serial)? {
            return Ok(());
        }
        let Some(issued) = self.issued(serial)? else {
            return Ok(());
        };
        let rec = RevokedRecord {
            not_after: issued.not_after,
            revoked_at: now,
        };
        let v = serde_json::to_vec(&rec).map_err(db_err)?;
        self.revoked
            .insert(serial.as_bytes(), v.as_slice())
            .map_err(db_err)?;
        out.push((serial.clone(), issued.not_after));
        Ok(())
    }

    /// Bans `spiffe_id`: records the ban, revokes its unexpired serials and voids its unused
    /// tokens.
    fn ban(&mut self, spiffe_id: &str, now: u64) -> Result<Vec<(Serial, u64)>, LedgerError> {
        if self.is_banned(spiffe_id)? {
            return Err(LedgerError::AlreadyBanned(spiffe_id.to_string()));
        }
        let v = serde_json::to_vec(&BanRecord { since: now }).map_err(db_err)?;
        self.banned
            .insert(spiffe_id, v.as_slice())
            .map_err(db_err)?;
        let serials = serials_of(&self.roots, &self.renewals, &self.serials, spiffe_id)?;
        let mut out = Vec::new();
        for (s, rec) in serials {
            if rec.not_after > now {
                self.revoke_one(&s, now, &mut out)?;
            }
        }
        self.void_tokens(spiffe_id, now)?;
        Ok(out)
    }

    /// Voids every unused token bound to `spiffe_id`. Tokens are minted by operators only, so
    /// the scan is bounded by what they minted.
    fn void_tokens(&mut self, spiffe_id: &str, now: u64) -> Result<(), LedgerError> {
        let mut void = Vec::new();
        for row in self.tokens.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let rec: TokenRecord = serde_json::from_slice(v.value()).map_err(db_err)?;
            if rec.spiffe_id == spiffe_id && rec.used.is_none() && rec.voided_at.is_none() {
                void.push((k.value().to_vec(), rec));
            }
        }
        for (hash, mut rec) in void {
            rec.voided_at = Some(now);
            self.put_token(&hash, &rec)?;
        }
        Ok(())
    }
}

/// Counts one change of the published list.
fn bump(seq: &mut u64, changes: &mut Vec<Change>, revoked: Vec<(Serial, u64)>, now: u64) -> Done {
    *seq += 1;
    for (s, not_after) in &revoked {
        // Only what can still be presented needs to be in memory.
        if *not_after > now {
            changes.push(Change::Revoked(s.clone(), *not_after));
        }
    }
    Done::Changed { seq: *seq, revoked }
}
