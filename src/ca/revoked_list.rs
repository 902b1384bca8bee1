//! `GET /v1/revoked`'s body, built once per change and served from a cache.
//!
//! The merged list (this CA's entries and up to [`super::peers::MAX_PEERS`] peers' of up to
//! [`super::peers::MAX_PEER_SERIALS`] each) is costly to build, and the endpoint is open to
//! anyone who can reach the CA: building it per request was a CPU and memory lever. The body is
//! rebuilt only when this CA's revocation sequence moves, a peer's list changes, or its earliest
//! entry expires; one build runs at a time and the others wait for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Serialize, Serializer};

use super::api::CaState;
use crate::identity::Serial;

/// Which list: this CA's own entries (what peers pull) or the union with its peers'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Local,
    All,
}

/// The cached bodies of both scopes.
#[derive(Default)]
pub struct RevokedCache {
    local: Mutex<Option<Cached>>,
    all: Mutex<Option<Cached>>,
    build: tokio::sync::Mutex<()>,
    builds: AtomicU64,
}

#[derive(Clone)]
struct Cached {
    /// This CA's revocation sequence and the peers' generation the body was built from.
    key: (u64, u64),
    /// The earliest not_after in the body: from then on it lists an expired entry.
    stale_at: u64,
    body: Bytes,
}

impl RevokedCache {
    /// The body for `scope`, rebuilt only if what it lists changed.
    pub async fn body(&self, state: &CaState, scope: Scope) -> Bytes {
        if let Some(b) = self.fresh(state, scope) {
            return b;
        }
        let _one_build = self.build.lock().await;
        if let Some(b) = self.fresh(state, scope) {
            return b;
        }
        // The key is read before the lists: a change racing the build rebuilds next time.
        let key = key(state);
        let now = state.clock.unix();
        let (body, stale_at) = build(state, scope, now);
        self.builds.fetch_add(1, Ordering::Relaxed);
        *self.slot(scope).lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
            key,
            stale_at,
            body: body.clone(),
        });
        body
    }

    /// How many bodies were built (tests, and a sign of churn).
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    fn slot(&self, scope: Scope) -> &Mutex<Option<Cached>> {
        match scope {
            Scope::Local => &self.local,
            Scope::All => &self.all,
        }
    }

    fn fresh(&self, state: &CaState, scope: Scope) -> Option<Bytes> {
        let slot = self.slot(scope).lock().unwrap_or_else(|e| e.into_inner());
        let c = slot.as_ref()?;
        (c.key == key(state) && state.clock.unix() < c.stale_at).then(|| c.body.clone())
    }
}

fn key(state: &CaState) -> (u64, u64) {
    (state.ledger.sequence(), state.peers.generation())
}

/// The JSON body and the earliest not_after it lists.
fn build(state: &CaState, scope: Scope, now: u64) -> (Bytes, u64) {
    let (seq, local) = state.ledger.revoked_list(now);
    let bans = state.ledger.banned_list();
    let (revoked, banned) = match scope {
        Scope::Local => (local, bans),
        Scope::All => {
            let u = state.peers.union(local, bans, now);
            (u.revoked, u.banned)
        }
    };
    let stale_at = revoked.iter().map(|(_, na)| *na).min().unwrap_or(u64::MAX);
    let doc = ListOut {
        sequence: seq,
        revoked: revoked
            .iter()
            .map(|(serial, not_after)| EntryOut {
                serial: Hex(serial),
                not_after: *not_after,
            })
            .collect(),
        spiffe_ids: banned
            .iter()
            .map(|(spiffe_id, since)| BanOut {
                spiffe_id,
                since: *since,
            })
            .collect(),
    };
    let body = serde_json::to_vec(&doc).expect("the list serialises");
    (body.into(), stale_at)
}

#[derive(Serialize)]
struct ListOut<'a> {
    sequence: u64,
    revoked: Vec<EntryOut<'a>>,
    spiffe_ids: Vec<BanOut<'a>>,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    serial: Hex<'a>,
    not_after: u64,
}

#[derive(Serialize)]
struct BanOut<'a> {
    spiffe_id: &'a str,
    since: u64,
}

struct Hex<'a>(&'a Serial);

impl Serialize for Hex<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self.0)
    }
}
